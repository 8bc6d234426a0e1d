//! A serde `Deserializer` over the located YAML tree.
//!
//! The policy types keep their plain serde derives; this deserializer is what
//! makes their errors usable: each error remembers the node it came from (its
//! position and its path from the root of the typed tree) and is phrased for someone
//! editing the file, with a "did you mean" for misspelt fields and values.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Unexpected,
    VariantAccess, Visitor,
};

use super::yaml::{Node, Resolved, Value};
use super::{did_you_mean, Location};

/// Enums written only as a one-entry mapping (`{exact: …}`), where a plain
/// string is a common mistake worth its own message.
const MAPPING_ONLY_ENUMS: &[&str] = &["StringMatch"];

/// One step from a node to a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// The key of the i-th mapping entry.
    Key(usize),
    /// The value of the i-th mapping entry.
    Value(usize),
    /// The i-th sequence item.
    Item(usize),
    /// The key of a one-entry mapping that selects an enum variant.
    VariantKey,
    /// The value of a one-entry mapping that selects an enum variant.
    VariantValue,
}

/// A deserialization error: what went wrong, and at which node.
#[derive(Debug, Clone)]
pub(super) struct Error {
    kind: Kind,
    /// Position of the innermost node that saw the error.
    pub(super) at: Option<Location>,
    /// Key under which that node sits, when it is a mapping value.
    field: Option<String>,
    /// Steps from the root of the typed tree to that node, innermost first while the
    /// error unwinds; read it with [`Error::path`].
    steps: Vec<Step>,
}

#[derive(Debug, Clone)]
enum Kind {
    Custom(String),
    InvalidType {
        found: String,
        expected: String,
    },
    InvalidValue {
        found: String,
        expected: String,
    },
    UnknownField {
        name: String,
        expected: &'static [&'static str],
    },
    UnknownVariant {
        name: String,
        expected: &'static [&'static str],
    },
    MissingField(&'static str),
    DuplicateField(&'static str),
}

impl Error {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            at: None,
            field: None,
            steps: Vec::new(),
        }
    }

    /// Records that the error happened inside `node`, reached by `step`.
    fn within(mut self, step: Step, node: &Node, field: Option<&str>) -> Self {
        self.steps.push(step);
        if self.at.is_none() {
            self.at = Some(node.at);
            self.field = field.map(str::to_owned);
            // A variant name in key position is a field name to the user.
            if let (Step::VariantKey, Kind::UnknownVariant { name, expected }) = (step, &self.kind)
            {
                self.kind = Kind::UnknownField {
                    name: name.clone(),
                    expected,
                };
            }
        }
        self
    }

    /// Locates an error that no inner node claimed at the root of the
    /// typed tree, the value of `field`.
    pub(super) fn at_root(mut self, root: &Node, field: &str) -> Self {
        if self.at.is_none() {
            self.at = Some(root.at);
            self.field = Some(field.to_owned());
        }
        self
    }

    /// Steps from the root of the typed tree to the node the error is about.
    pub(super) fn path(&self) -> Vec<Step> {
        self.steps.iter().rev().copied().collect()
    }

    /// The known field an unknown one was probably meant to be.
    pub(super) fn suggested_field(&self) -> Option<&'static str> {
        match &self.kind {
            Kind::UnknownField { name, expected } => did_you_mean(name, expected.iter().copied()),
            _ => None,
        }
    }

    /// The field a mapping lacks, for a missing-field error.
    pub(super) fn missing_field(&self) -> Option<&'static str> {
        match self.kind {
            Kind::MissingField(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = self.field.as_deref();
        match (&self.kind, field) {
            (Kind::Custom(message), Some(field)) => write!(f, "`{field}`: {message}"),
            (Kind::Custom(message), None) => f.write_str(message),
            (
                Kind::InvalidType { found, expected } | Kind::InvalidValue { found, expected },
                Some(field),
            ) => write!(f, "`{field}` must be {expected}, found {found}"),
            (
                Kind::InvalidType { found, expected } | Kind::InvalidValue { found, expected },
                None,
            ) => write!(f, "expected {expected}, found {found}"),
            (Kind::UnknownField { name, expected }, _) => {
                f.write_str(&unknown_field(name, expected))
            }
            (Kind::UnknownVariant { name, expected }, field) => {
                match field {
                    Some(field) => write!(f, "unknown `{field}` value `{name}`")?,
                    None => write!(f, "unknown value `{name}`")?,
                }
                match did_you_mean(name, expected.iter().copied()) {
                    Some(close) => write!(f, ", did you mean `{close}`?"),
                    None => write!(f, "; expected one of {}", list(expected)),
                }
            }
            (Kind::MissingField(name), Some(field)) => {
                write!(f, "`{field}` is missing required field `{name}`")
            }
            (Kind::MissingField(name), None) => write!(f, "missing required field `{name}`"),
            (Kind::DuplicateField(name), _) => write!(f, "field `{name}` is set twice"),
        }
    }
}

/// The message for a field that `expected` does not hold.
pub(super) fn unknown_field(name: &str, expected: &[&str]) -> String {
    match did_you_mean(name, expected.iter().copied()) {
        Some(close) => format!("unknown field `{name}`, did you mean `{close}`?"),
        None => format!(
            "unknown field `{name}`; valid fields here: {}",
            list(expected)
        ),
    }
}

/// `` `a`, `b` or `c` `` as a message fragment.
pub(super) fn list(items: &[&str]) -> String {
    join(items, "or")
}

/// `` `a`, `b` {last} `c` ``.
pub(super) fn join(items: &[&str], last: &str) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("`{i}`")).collect();
    match quoted.split_last() {
        None => "nothing".to_owned(),
        Some((only, [])) => only.clone(),
        Some((final_item, rest)) => format!("{} {last} {final_item}", rest.join(", ")),
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::new(Kind::Custom(msg.to_string()))
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self::new(Kind::InvalidType {
            found: unexpected(&unexp),
            expected: expected(exp),
        })
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self::new(Kind::InvalidValue {
            found: unexpected(&unexp),
            expected: expected(exp),
        })
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self::new(Kind::UnknownVariant {
            name: variant.to_owned(),
            expected,
        })
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Self::new(Kind::UnknownField {
            name: field.to_owned(),
            expected,
        })
    }

    fn missing_field(field: &'static str) -> Self {
        Self::new(Kind::MissingField(field))
    }

    fn duplicate_field(field: &'static str) -> Self {
        Self::new(Kind::DuplicateField(field))
    }
}

fn unexpected(unexp: &Unexpected<'_>) -> String {
    match unexp {
        Unexpected::Bool(b) => format!("boolean `{b}`"),
        Unexpected::Unsigned(n) => format!("integer `{n}`"),
        Unexpected::Signed(n) => format!("integer `{n}`"),
        Unexpected::Float(n) => format!("number `{n}`"),
        Unexpected::Str(s) => format!("string {s:?}"),
        Unexpected::Unit | Unexpected::Option => "nothing (null)".to_owned(),
        Unexpected::Seq => "a list".to_owned(),
        Unexpected::Map => "a mapping".to_owned(),
        other => other.to_string(),
    }
}

/// Serde's names for what a visitor wanted, in the words of a YAML file.
fn expected(exp: &dyn de::Expected) -> String {
    let text = exp.to_string();
    let int_range = |max: u64| format!("a whole number from 0 to {max}");
    match text.as_str() {
        "u8" => int_range(u8::MAX.into()),
        "u16" => int_range(u16::MAX.into()),
        "u32" => int_range(u32::MAX.into()),
        "u64" => int_range(u64::MAX),
        "i32" | "i64" => "a whole number".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a sequence" => "a list".to_owned(),
        "a map" => "a mapping".to_owned(),
        _ if text.starts_with("struct ") => "a mapping".to_owned(),
        _ => text,
    }
}

// === impl De ===

/// Deserializes one node of the tree.
pub(super) struct De<'n>(pub(super) &'n Node);

impl De<'_> {
    fn invalid_type(&self, exp: &dyn de::Expected) -> Error {
        Error::new(Kind::InvalidType {
            found: self.0.describe(),
            expected: expected(exp),
        })
    }
}

impl<'de> Deserializer<'de> for De<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.0.value {
            Value::Scalar(scalar) => match scalar.resolve() {
                Resolved::Null => visitor.visit_unit(),
                Resolved::Bool(b) => visitor.visit_bool(b),
                Resolved::Unsigned(n) => visitor.visit_u64(n),
                Resolved::Signed(n) => visitor.visit_i64(n),
                Resolved::Float(n) => visitor.visit_f64(n),
                Resolved::Str(s) => visitor.visit_str(s),
            },
            Value::Seq(items) => visitor.visit_seq(Items { items, next: 0 }),
            Value::Map(entries) => visitor.visit_map(Entries {
                entries,
                next: 0,
                value: None,
            }),
        }
    }

    /// Any scalar but null reads as a string, as written: `name: 8080` is
    /// the string "8080", as in most YAML-configured tools.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.0.value {
            Value::Scalar(s) if s.resolve() != Resolved::Null => visitor.visit_str(&s.text),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.0.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.0.value {
            Value::Seq(_) => self.deserialize_any(visitor),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.0.value {
            Value::Map(_) => self.deserialize_any(visitor),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match &self.0.value {
            Value::Scalar(_) if MAPPING_ONLY_ENUMS.contains(&name) => {
                let example = variants.first().copied().unwrap_or("exact");
                Err(Error::new(Kind::InvalidType {
                    found: self.0.describe(),
                    expected: format!(
                        "a mapping with one of {}, e.g. `{{{example}: {}}}`",
                        list(variants),
                        self.0.as_str().unwrap_or("…"),
                    ),
                }))
            }
            Value::Scalar(_) if !self.0.is_null() => visitor.visit_enum(ScalarVariant(self.0)),
            Value::Map(entries) if entries.len() == 1 => visitor.visit_enum(MapVariant {
                key: &entries[0].0,
                value: &entries[0].1,
            }),
            Value::Map(entries) => Err(Error::new(Kind::InvalidType {
                found: match entries.len() {
                    0 => "an empty mapping".to_owned(),
                    n => format!("{n} keys"),
                },
                expected: format!("a mapping with exactly one of {}", list(variants)),
            })),
            _ => Err(Error::new(Kind::InvalidType {
                found: self.0.describe(),
                expected: format!("one of {}", list(variants)),
            })),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
        unit unit_struct tuple tuple_struct ignored_any
    }
}

struct Items<'n> {
    items: &'n [Node],
    next: usize,
}

impl<'de> SeqAccess<'de> for Items<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some(item) = self.items.get(self.next) else {
            return Ok(None);
        };
        let index = self.next;
        self.next += 1;
        seed.deserialize(De(item))
            .map(Some)
            .map_err(|e| e.within(Step::Item(index), item, None))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len() - self.next)
    }
}

struct Entries<'n> {
    entries: &'n [(Node, Node)],
    next: usize,
    /// Index of the entry whose key was just read.
    value: Option<usize>,
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, _)) = self.entries.get(self.next) else {
            return Ok(None);
        };
        let index = self.next;
        self.next += 1;
        self.value = Some(index);
        seed.deserialize(De(key))
            .map(Some)
            .map_err(|e| e.within(Step::Key(index), key, None))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let Some((index, (key, value))) = self
            .value
            .take()
            .and_then(|i| self.entries.get(i).map(|entry| (i, entry)))
        else {
            return Err(de::Error::custom("value requested before its key"));
        };
        seed.deserialize(De(value))
            .map_err(|e| e.within(Step::Value(index), value, key.as_str()))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len() - self.next)
    }
}

/// An enum written as a plain string: only unit variants fit.
struct ScalarVariant<'n>(&'n Node);

impl<'de> EnumAccess<'de> for ScalarVariant<'_> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let variant = seed.deserialize(De(self.0))?;
        Ok((variant, self))
    }
}

impl<'de> VariantAccess<'de> for ScalarVariant<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, Error> {
        let name = self.0.as_str().unwrap_or_default();
        Err(de::Error::custom(format!(
            "`{name}` needs a value: write `{name}: …`"
        )))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::invalid_type(Unexpected::UnitVariant, &visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        Err(de::Error::invalid_type(Unexpected::UnitVariant, &visitor))
    }
}

/// An enum written as a one-entry mapping `{variant: value}`.
struct MapVariant<'n> {
    key: &'n Node,
    value: &'n Node,
}

impl<'de> EnumAccess<'de> for MapVariant<'_> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let variant = seed
            .deserialize(De(self.key))
            .map_err(|e| e.within(Step::VariantKey, self.key, None))?;
        Ok((variant, self))
    }
}

impl<'de> VariantAccess<'de> for MapVariant<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        if self.value.is_null() {
            return Ok(());
        }
        let name = self.key.as_str().unwrap_or_default();
        Err(Error::new(Kind::Custom(format!(
            "`{name}` takes no value: write just `{name}`"
        )))
        .within(Step::VariantValue, self.value, None))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(De(self.value))
            .map_err(|e| e.within(Step::VariantValue, self.value, self.key.as_str()))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        De(self.value)
            .deserialize_seq(visitor)
            .map_err(|e| e.within(Step::VariantValue, self.value, self.key.as_str()))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        De(self.value)
            .deserialize_map(visitor)
            .map_err(|e| e.within(Step::VariantValue, self.value, self.key.as_str()))
    }
}

//! The YAML tree the loader checks, built from `saphyr-parser` events. Every
//! node keeps where it was written, so every error can point at it.
//!
//! Unlike a generic YAML value, the tree keeps mappings as ordered entry
//! lists with their keys' positions, keeps scalars as written (typing happens
//! in `de`, against the field's type), and reports duplicate keys as ordinary
//! errors instead of stopping.

use std::collections::HashMap;

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, Span};

use super::Location;

/// Most nodes that aliases may expand to in one file: a few nested anchors
/// could otherwise blow up into billions of nodes ("billion laughs").
const ALIAS_BUDGET: usize = 100_000;

/// Deepest nesting of collections accepted. Policies nest about six deep;
/// the limit keeps the recursive walks over the tree off the stack's edge.
const MAX_DEPTH: usize = 64;

/// A YAML node and where it starts.
#[derive(Debug, Clone)]
pub(super) struct Node {
    pub(super) at: Location,
    pub(super) value: Value,
}

#[derive(Debug, Clone)]
pub(super) enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Entries in document order; keys are unique (duplicates are reported
    /// and dropped while building).
    Map(Vec<(Node, Node)>),
}

/// A scalar as written.
#[derive(Debug, Clone)]
pub(super) struct Scalar {
    pub(super) text: String,
    /// Unquoted and untagged: `5`, `true`, `~` and the empty value take
    /// their YAML 1.2 core-schema meaning. Quoted scalars are always strings.
    pub(super) plain: bool,
}

/// What a plain scalar means under the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Resolved<'a> {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Str(&'a str),
}

impl Scalar {
    pub(super) fn resolve(&self) -> Resolved<'_> {
        let text = self.text.as_str();
        if !self.plain {
            return Resolved::Str(text);
        }
        match text {
            "" | "~" | "null" | "Null" | "NULL" => return Resolved::Null,
            "true" | "True" | "TRUE" => return Resolved::Bool(true),
            "false" | "False" | "FALSE" => return Resolved::Bool(false),
            ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
                return Resolved::Float(f64::INFINITY)
            }
            "-.inf" | "-.Inf" | "-.INF" => return Resolved::Float(f64::NEG_INFINITY),
            ".nan" | ".NaN" | ".NAN" => return Resolved::Float(f64::NAN),
            _ => {}
        }
        if let Some(int) = resolve_int(text) {
            return int;
        }
        if looks_like_float(text) {
            if let Ok(f) = text.parse::<f64>() {
                return Resolved::Float(f);
            }
        }
        Resolved::Str(text)
    }
}

fn resolve_int(text: &str) -> Option<Resolved<'static>> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = if let Some(hex) = digits.strip_prefix("0x") {
        (16, hex)
    } else if let Some(oct) = digits.strip_prefix("0o") {
        (8, oct)
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // Too large for 64 bits: still a number, so say so rather than "string".
    let Ok(magnitude) = u64::from_str_radix(digits, radix) else {
        return Some(Resolved::Float(f64::INFINITY));
    };
    if !negative {
        return Some(Resolved::Unsigned(magnitude));
    }
    Some(match i64::try_from(magnitude) {
        Ok(m) => Resolved::Signed(-m),
        Err(_) if magnitude == i64::MIN.unsigned_abs() => Resolved::Signed(i64::MIN),
        Err(_) => Resolved::Float(f64::NEG_INFINITY),
    })
}

/// The core schema's float pattern: `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`.
fn looks_like_float(text: &str) -> bool {
    let t = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match frac {
        Some(f) => digits(int) && digits(f) && !(int.is_empty() && f.is_empty()),
        None => !int.is_empty() && digits(int),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

impl Node {
    /// The value of `key` when this node is a mapping that has it.
    pub(super) fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The text of a scalar that is a string (not null, not a collection).
    pub(super) fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar(s) if s.resolve() != Resolved::Null => Some(&s.text),
            _ => None,
        }
    }

    pub(super) fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(s) if s.resolve() == Resolved::Null)
    }

    /// How the node reads in a message: `a list`, `string "x"`, `integer 5`.
    pub(super) fn describe(&self) -> String {
        match &self.value {
            Value::Seq(_) => "a list".to_owned(),
            Value::Map(_) => "a mapping".to_owned(),
            Value::Scalar(s) => match s.resolve() {
                Resolved::Null => "nothing (null)".to_owned(),
                Resolved::Bool(b) => format!("boolean `{b}`"),
                Resolved::Unsigned(_) | Resolved::Signed(_) => format!("integer `{}`", s.text),
                Resolved::Float(_) => format!("number `{}`", s.text),
                Resolved::Str(text) => format!("string {text:?}"),
            },
        }
    }
}

/// What one file holds: its non-empty documents, and the problems found
/// while reading them. A syntax error ends the file; the documents before it
/// are kept.
#[derive(Debug, Default)]
pub(super) struct Parsed {
    pub(super) documents: Vec<Node>,
    pub(super) problems: Vec<(Location, String)>,
}

/// Reads every document of `text`.
pub(super) fn parse(text: &str) -> Parsed {
    let mut builder = Builder {
        end: Some(end_of(text)),
        ..Builder::default()
    };
    let mut parser = Parser::new_from_str(text);
    while let Some(event) = parser.next_event() {
        match event {
            Ok((event, span)) => {
                if let Err(message) = builder.on_event(event, span) {
                    let at = builder.at(span.start);
                    builder.out.problems.push((at, message));
                    break;
                }
            }
            Err(e) => {
                let mut message = format!("YAML syntax error: {}", e.info());
                if e.info().contains("tab") {
                    message.push_str("; indent with spaces, not tabs");
                } else if e.info().contains("flow construct") {
                    message.push_str("; is a closing `]` or `}` missing above?");
                }
                let at = builder.at(*e.marker());
                builder.out.problems.push((at, message));
                break;
            }
        }
    }
    builder.out
}

fn location(mark: Marker) -> Location {
    Location {
        line: mark.line(),
        column: mark.col() + 1,
    }
}

/// The position just past the last character of `text`: the column after
/// its last line, or the start of the line after a final line break (where
/// an editor puts the cursor). Lines end as YAML ends them: LF, CR LF or a
/// lone CR.
fn end_of(text: &str) -> Location {
    let mut end = Location { line: 1, column: 1 };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' && chars.peek() == Some(&'\n') {
            continue;
        }
        if c == '\n' || c == '\r' {
            end = Location {
                line: end.line + 1,
                column: 1,
            };
        } else {
            end.column += 1;
        }
    }
    end
}

#[derive(Default)]
struct Builder {
    /// The end of the text: the parser's end-of-stream marker can lie past
    /// it (on a line the file does not have), so positions are clamped here.
    end: Option<Location>,
    out: Parsed,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    alias_budget_used: usize,
}

struct Frame {
    node: Node,
    anchor: usize,
    /// For a mapping: the key read, waiting for its value.
    key: Option<Node>,
}

impl Builder {
    /// The location of `mark`, never past the end of the text.
    fn at(&self, mark: Marker) -> Location {
        let at = location(mark);
        match self.end {
            Some(end) if at > end => end,
            _ => at,
        }
    }

    fn on_event(&mut self, event: Event<'_>, span: Span) -> Result<(), String> {
        let at = self.at(span.start);
        match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd => {}
            Event::DocumentStart(_) => {
                self.stack.clear();
                self.anchors.clear();
            }
            Event::DocumentEnd => self.stack.clear(),
            Event::Scalar(text, style, anchor, tag) => {
                let is_str_tag = tag
                    .as_ref()
                    .is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                let plain = style == ScalarStyle::Plain && !is_str_tag;
                let node = Node {
                    at,
                    value: Value::Scalar(Scalar {
                        text: text.into_owned(),
                        plain,
                    }),
                };
                self.finish(node, anchor);
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.stack.len() >= MAX_DEPTH => {
                return Err(format!(
                    "collections are nested more than {MAX_DEPTH} deep; a policy never needs that"
                ));
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame {
                node: Node {
                    at,
                    value: Value::Seq(Vec::new()),
                },
                anchor,
                key: None,
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame {
                node: Node {
                    at,
                    value: Value::Map(Vec::new()),
                },
                anchor,
                key: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(frame) = self.stack.pop() {
                    self.finish(frame.node, frame.anchor);
                }
            }
            Event::Alias(id) => {
                // The parser rejects unknown anchors, but not those of an
                // earlier document, which YAML does not allow either.
                let Some(target) = self.anchors.get(&id) else {
                    return Err("this alias names an anchor of another document; an anchor only reaches within its own document".to_owned());
                };
                self.alias_budget_used += count_nodes(target);
                if self.alias_budget_used > ALIAS_BUDGET {
                    return Err(format!(
                        "aliases expand to more than {ALIAS_BUDGET} nodes; refusing to expand further"
                    ));
                }
                let node = target.clone();
                self.finish(node, 0);
            }
        }
        Ok(())
    }

    /// Places a complete node in its parent, or ends a document with it.
    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some(parent) = self.stack.last_mut() else {
            // An empty document is a lone empty plain scalar: skip it.
            if !matches!(&node.value, Value::Scalar(s) if s.plain && s.text.is_empty()) {
                self.out.documents.push(node);
            }
            return;
        };
        match &mut parent.node.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match parent.key.take() {
                None => parent.key = Some(node),
                Some(key) => {
                    let first = key.as_str().and_then(|k| {
                        entries
                            .iter()
                            .find(|(other, _)| other.as_str() == Some(k))
                            .map(|(other, _)| other.at)
                    });
                    match first {
                        Some(first) => self.out.problems.push((
                            key.at,
                            format!(
                                "duplicate key `{}`: it is already set at line {}",
                                key.as_str().unwrap_or_default(),
                                first.line
                            ),
                        )),
                        None => entries.push((key, node)),
                    }
                }
            },
            Value::Scalar(_) => {}
        }
    }
}

fn count_nodes(node: &Node) -> usize {
    1 + match &node.value {
        Value::Scalar(_) => 0,
        Value::Seq(items) => items.iter().map(count_nodes).sum(),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| count_nodes(k) + count_nodes(v))
            .sum(),
    }
}

#[cfg(test)]
mod position_tests {
    use super::*;

    fn first_problem(text: &str) -> Location {
        parse(text).problems[0].0
    }

    #[test]
    fn an_error_at_the_end_of_a_file_without_a_final_line_break_is_on_its_last_line() {
        // The parser's end-of-stream marker lies on a line the file lacks.
        assert_eq!(
            first_problem("kind: Backend\n.s"),
            Location { line: 2, column: 3 }
        );
        // With a final line break, the line after it is where an editor
        // puts the cursor, as before.
        assert_eq!(
            first_problem("kind: Backend\n.s\n"),
            Location { line: 3, column: 1 }
        );
        assert_eq!(end_of("a\nbc"), Location { line: 2, column: 3 });
        assert_eq!(end_of(""), Location { line: 1, column: 1 });
        assert_eq!(end_of("a\rbc"), Location { line: 2, column: 3 });
        assert_eq!(end_of("a\r\nb"), Location { line: 2, column: 2 });
    }
}

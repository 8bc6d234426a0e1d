//! Durations as humantime strings: `250ms`, `2s`, `5m`.

pub mod optional;

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// How a duration is written, for the JSON Schema.
pub struct Schema;

impl schemars::JsonSchema for Schema {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A number and a unit, like `250ms`, `2s`, `5m` or `1h 30m`.",
            "pattern": PATTERN,
            "examples": ["250ms", "2s", "5m"],
        })
    }
}

/// One or more `NUMBER UNIT` groups; the loader checks the units.
const PATTERN: &str = r"^\s*([0-9]+\s*[a-zA-Zµ]+\s*)+$";

/// Parses a humantime duration, with a message that says how to write one.
pub fn parse(text: &str) -> Result<Duration, String> {
    use humantime::DurationError as E;
    humantime::parse_duration(text).map_err(|e| match e {
        E::InvalidCharacter(_) | E::NumberExpected(_) | E::Empty => {
            format!("invalid duration {text:?}: write a number and a unit, like 250ms, 2s or 5m")
        }
        e => format!("invalid duration {text:?}: {e}"),
    })
}

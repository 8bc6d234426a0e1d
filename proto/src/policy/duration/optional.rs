//! Optional durations: a humantime string, or `none` / `off` for no limit.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.collect_str(&humantime::format_duration(*d)),
        None => s.serialize_str("none"),
    }
}

/// How an optional duration is written, for the JSON Schema.
pub struct Schema;

impl schemars::JsonSchema for Schema {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "OptionalDuration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A number and a unit, like `250ms`, `2s` or `5m`; `none` (or `off`) for no limit.",
            "anyOf": [
                {"enum": ["none", "off"]},
                {"pattern": super::PATTERN},
            ],
            "examples": ["2s", "5m", "none"],
        })
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    if matches!(text.as_str(), "none" | "off") {
        return Ok(None);
    }
    let parsed = super::parse(&text).map_err(serde::de::Error::custom)?;
    if parsed.is_zero() {
        return Err(serde::de::Error::custom(
            "a zero duration is not a limit; write `none` to disable it",
        ));
    }
    Ok(Some(parsed))
}

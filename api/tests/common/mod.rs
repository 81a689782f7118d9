//! What the manifest tests share: an object read as its type and written back.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// `object` read as `T` and written back: the same JSON when every field is one `T` knows.
pub fn round_trip<T: DeserializeOwned + Serialize>(object: &serde_json::Value) -> serde_json::Value {
    let typed: T = serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object}"));
    numbers_as_floats(serde_json::to_value(typed).unwrap())
}

/// JSON with every number as a float, so that `0` and `0.0` (a schema's `minimum`) compare equal.
pub fn numbers_as_floats(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(Value::Number(n)),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, numbers_as_floats(v))).collect()),
        other => other,
    }
}

//! JSON parsing that notices duplicate keys.
//!
//! RFC 8259 §4 says names within an object "SHOULD be unique" and leaves duplicates to each
//! reader: serde_json keeps the last, other readers keep the first. For a credential that would
//! let the worker and its neighbours disagree on which token an event carried, so the worker
//! records every duplicated key's path and refuses the ones it reads (see [`super::decode`]).

use std::{cell::RefCell, collections::HashSet, fmt};

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `text` like `serde_json::from_str::<Value>` (the last of duplicate keys wins) and
/// returns the paths of keys that appeared more than once in their object, as the keys from
/// the root, e.g. `["PartnerUserProvision", "credential", "token_value"]` (a key may hold a dot,
/// so the path is a list, not a dotted string); array elements add `[]`.
///
/// # Errors
/// serde_json's error for text that is not JSON (its messages quote no input).
pub fn parse(text: &str) -> Result<(Value, HashSet<Vec<String>>), serde_json::Error> {
    let dups = RefCell::new(HashSet::new());
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Node {
        path: Vec::new(),
        dups: &dups,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok((value, dups.into_inner()))
}

/// A value being read at `path` (the keys from the root).
struct Node<'a> {
    path: Vec<String>,
    dups: &'a RefCell<HashSet<Vec<String>>>,
}

impl Node<'_> {
    /// The path of `key` in this object.
    fn child(&self, key: &str) -> Vec<String> {
        let mut path = self.path.clone();
        path.push(key.to_owned());
        path
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        let mut path = self.path.clone();
        path.push("[]".to_owned());
        while let Some(v) = seq.next_element_seed(Node {
            path: path.clone(),
            dups: self.dups,
        })? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(Node {
                path: self.child(&key),
                dups: self.dups,
            })?;
            // The duplicate's path is built only for a duplicate (nearly never).
            if out.contains_key(&key) {
                self.dups.borrow_mut().insert(self.child(&key));
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_found_at_every_depth_and_the_last_wins() {
        let (v, dups) = parse(
            r#"{"a": 1, "a": 2, "b": {"c": {"d": 1, "d": 2}}, "e": [{"f": 1, "f": 1}], "g": 1.5}"#,
        )
        .unwrap();
        assert_eq!(v["a"], 2);
        let mut dups: Vec<String> = dups.into_iter().map(|p| p.join(".")).collect();
        dups.sort();
        assert_eq!(dups, vec!["a", "b.c.d", "e.[].f"]);
        assert_eq!(v["g"], 1.5);
        assert!(parse("{} x").is_err(), "trailing input");
        let (_, none) = parse(r#"{"a": {"a": 1}}"#).unwrap();
        assert!(
            none.is_empty(),
            "the same name at other depths is no duplicate"
        );
    }
}

//! JSON Patch (RFC 6902) between two renderings of a pod (the
//! `json-patch` crate applies it).
//!
//! [`diff`] writes only `add`, `remove` and `replace`, at the deepest
//! place that changed. Arrays whose items all carry a unique `name`
//! (containers, init containers, volumes, env) are matched by name when
//! the old items keep their order: an inserted container is one `add` at
//! its index and the containers after it are diffed against themselves,
//! not against whatever moved into their index. Fields only the incoming
//! object has are therefore never touched.

use serde_json::{Value, json};

/// The operations that turn `before` into `after`.
pub fn diff(before: &Value, after: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    diff_at(&mut String::new(), before, after, &mut ops);
    ops
}

fn op(kind: &str, path: &str, value: Option<&Value>) -> Value {
    match value {
        Some(v) => json!({"op": kind, "path": path, "value": v}),
        None => json!({"op": kind, "path": path}),
    }
}

/// Appends one reference token to a JSON pointer (RFC 6901 escapes).
fn push_token(path: &mut String, token: &str) {
    path.push('/');
    path.push_str(&token.replace('~', "~0").replace('/', "~1"));
}

fn diff_at(path: &mut String, before: &Value, after: &Value, ops: &mut Vec<Value>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let len = path.len();
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                push_token(path, key);
                ops.push(op("remove", path, None));
                path.truncate(len);
            }
            for (key, av) in a {
                push_token(path, key);
                match b.get(key) {
                    Some(bv) => diff_at(path, bv, av, ops),
                    None => ops.push(op("add", path, Some(av))),
                }
                path.truncate(len);
            }
        }
        (Value::Array(b), Value::Array(a)) => diff_array(path, b, a, ops),
        _ if before == after => {}
        _ => ops.push(op("replace", path, Some(after))),
    }
}

/// The items' names, when every item is an object with a unique string
/// `name`.
fn names(items: &[Value]) -> Option<Vec<&str>> {
    let names = items
        .iter()
        .map(|i| i.get("name").and_then(Value::as_str))
        .collect::<Option<Vec<_>>>()?;
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    (sorted.len() == names.len()).then_some(names)
}

/// Whether `after` is `before` with items inserted: every old name is
/// there, in the same order.
fn only_insertions(before: &[&str], after: &[&str]) -> bool {
    let mut old = before.iter().peekable();
    for name in after {
        if old.peek() == Some(&name) {
            old.next();
        }
    }
    old.next().is_none()
}

fn diff_array(path: &mut String, b: &[Value], a: &[Value], ops: &mut Vec<Value>) {
    let len = path.len();
    if let (Some(bn), Some(an)) = (names(b), names(a))
        && only_insertions(&bn, &an)
    {
        let mut old = b.iter().zip(bn).peekable();
        for (j, (item, name)) in a.iter().zip(an).enumerate() {
            push_token(path, &j.to_string());
            match old.next_if(|(_, n)| *n == name) {
                Some((old_item, _)) => diff_at(path, old_item, item, ops),
                None => ops.push(op("add", path, Some(item))),
            }
            path.truncate(len);
        }
        return;
    }
    let common = b.len().min(a.len());
    for (i, (bv, av)) in b.iter().zip(a).enumerate() {
        push_token(path, &i.to_string());
        diff_at(path, bv, av, ops);
        path.truncate(len);
    }
    for (i, av) in a.iter().enumerate().skip(common) {
        push_token(path, &i.to_string());
        ops.push(op("add", path, Some(av)));
        path.truncate(len);
    }
    for i in (common..b.len()).rev() {
        push_token(path, &i.to_string());
        ops.push(op("remove", path, None));
        path.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(before: Value, after: Value) -> Vec<Value> {
        let ops = diff(&before, &after);
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops.clone())).unwrap();
        let mut doc = before.clone();
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc, after, "{ops:#?}");
        ops
    }

    #[test]
    fn inserted_named_items_are_one_add_each() {
        let ops = roundtrip(
            json!({"c": [{"name": "a", "x": 1}, {"name": "b"}]}),
            json!({"c": [{"name": "i"}, {"name": "a", "x": 2}, {"name": "j"}, {"name": "b"}]}),
        );
        assert_eq!(
            ops,
            vec![
                json!({"op": "add", "path": "/c/0", "value": {"name": "i"}}),
                json!({"op": "replace", "path": "/c/1/x", "value": 2}),
                json!({"op": "add", "path": "/c/2", "value": {"name": "j"}}),
            ]
        );
        // Applied to an object with fields the diff never saw, they stay
        // with their own item.
        let raw = json!({"c": [{"name": "a", "x": 1, "new": true}, {"name": "b", "n": 2}], "z": 0});
        assert_eq!(
            apply(&raw, &ops).unwrap(),
            json!({"c": [{"name": "i"}, {"name": "a", "x": 2, "new": true}, {"name": "j"}, {"name": "b", "n": 2}], "z": 0})
        );
    }

    #[test]
    fn other_changes() {
        roundtrip(
            json!({"a": 1, "b": {"c": 2}}),
            json!({"b": {"c": 3, "d": [1]}}),
        );
        // Reordered or repeated names fall back to index by index.
        roundtrip(
            json!([{"name": "a"}, {"name": "b"}]),
            json!([{"name": "b"}, {"name": "a"}, {"name": "c"}]),
        );
        roundtrip(
            json!([{"name": "a"}, {"name": "a"}, 3]),
            json!([{"name": "a"}]),
        );
        roundtrip(json!({"k": [1, 2]}), json!({"k": "s"}));
        let ops = roundtrip(json!({"a/b~c": 1}), json!({"a/b~c": 2}));
        assert_eq!(ops[0]["path"], "/a~1b~0c");
        assert!(diff(&json!({"a": [1]}), &json!({"a": [1]})).is_empty());
    }

    #[test]
    fn a_patch_that_does_not_fit_is_an_error() {
        let ops = diff(&json!({"a": {"b": 1}}), &json!({"a": {"b": 2}}));
        assert!(apply(&json!({"x": 1}), &ops).is_err());
    }

    /// What the webhook does with a patch: the `json-patch` crate applies it.
    fn apply(doc: &Value, ops: &[Value]) -> Result<Value, String> {
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(ops.to_vec())).map_err(|e| e.to_string())?;
        let mut doc = doc.clone();
        json_patch::patch(&mut doc, &patch).map_err(|e| e.to_string())?;
        Ok(doc)
    }
}

//! A schema-valid instance of a JSON Schema, for `json_schema` requests that
//! are neither interpretations nor reviews. Covers what structured-output
//! schemas use in practice: objects (required properties only), strings with
//! enum/length/format, bounded numbers, arrays with `minItems`, `const`,
//! `anyOf`/`oneOf` (first branch), `allOf` (merged), type lists, and local
//! `$ref`s. Patterns are not followed.

use serde_json::{Map, Value, json};

/// Deeper than this is taken as a reference cycle and ends in `null`.
const MAX_DEPTH: usize = 32;

/// At most this many values plus padding characters per instance, so a hostile
/// schema (nested `minItems`, huge `minLength`) cannot take the server down.
const BUDGET: usize = 50_000;

pub fn instance(schema: &Value) -> Value {
    let mut g = Gen { root: schema, budget: BUDGET };
    match g.instance(schema, 0) {
        // The top level of a structured output is an object; `{}` fits a schema with no constraints.
        Value::Null if infer_type(schema).is_none() => Value::Object(Map::new()),
        v => v,
    }
}

fn resolve<'a>(r: &str, root: &'a Value) -> Option<&'a Value> {
    // "#/$defs/x", "#/definitions/x" or any other local JSON pointer; "#" is the root.
    root.pointer(r.strip_prefix('#')?)
}

fn infer_type(schema: &Value) -> Option<&str> {
    let obj = schema.as_object()?;
    match obj.get("type") {
        Some(Value::String(t)) => Some(t.as_str()),
        Some(Value::Array(ts)) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            names.iter().find(|t| **t != "null").or(names.first()).copied()
        }
        _ if obj.contains_key("properties") || obj.contains_key("required") => Some("object"),
        _ if obj.contains_key("items") || obj.contains_key("prefixItems") => Some("array"),
        _ if ["minLength", "maxLength", "format", "pattern"].iter().any(|k| obj.contains_key(*k)) => {
            Some("string")
        }
        _ if ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]
            .iter()
            .any(|k| obj.contains_key(*k)) =>
        {
            Some("number")
        }
        _ => None,
    }
}

/// `allOf` branches folded into one schema: properties and `required` united,
/// other keywords taken from the first branch that has them.
fn merge_all_of(obj: &Map<String, Value>, branches: &[Value], root: &Value) -> Value {
    let mut merged = obj.clone();
    merged.remove("allOf");
    for b in branches {
        let b = match b.get("$ref").and_then(Value::as_str) {
            Some(r) => resolve(r, root).unwrap_or(b),
            None => b,
        };
        let Some(b) = b.as_object() else { continue };
        for (k, v) in b {
            match (k.as_str(), merged.get_mut(k)) {
                ("properties", Some(Value::Object(props))) => {
                    if let Some(more) = v.as_object() {
                        props.extend(more.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
                ("required", Some(Value::Array(req))) => {
                    let more: Vec<Value> =
                        v.as_array().into_iter().flatten().filter(|n| !req.contains(n)).cloned().collect();
                    req.extend(more);
                }
                (_, Some(_)) => {}
                (_, None) => {
                    merged.insert(k.clone(), v.clone());
                }
            }
        }
    }
    Value::Object(merged)
}

struct Gen<'a> {
    root: &'a Value,
    budget: usize,
}

impl Gen<'_> {
    fn instance(&mut self, schema: &Value, depth: usize) -> Value {
        if depth > MAX_DEPTH || self.budget == 0 {
            return Value::Null;
        }
        self.budget -= 1;
        let Some(obj) = schema.as_object() else { return Value::Null };
        if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
            let root = self.root;
            return resolve(r, root).map(|t| self.instance(t, depth + 1)).unwrap_or(Value::Null);
        }
        if let Some(c) = obj.get("const") {
            return c.clone();
        }
        if let Some(first) = obj.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
            return first.clone();
        }
        if let Some(branches) = obj.get("allOf").and_then(Value::as_array) {
            return self.instance(&merge_all_of(obj, branches, self.root), depth + 1);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(first) = obj.get(key).and_then(Value::as_array).and_then(|a| a.first()) {
                return self.instance(first, depth + 1);
            }
        }
        match infer_type(schema) {
            Some("object") => self.object(obj, depth),
            Some("array") => self.array(obj, depth),
            Some("string") => self.string(obj),
            Some("integer") => integer(obj),
            Some("number") => json!(number(obj)),
            Some("boolean") => Value::Bool(false),
            _ => Value::Null,
        }
    }

    fn object(&mut self, obj: &Map<String, Value>, depth: usize) -> Value {
        let props = obj.get("properties").and_then(Value::as_object);
        let closed = obj.get("additionalProperties") == Some(&Value::Bool(false));
        let required: Vec<&str> = obj
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let mut out = Map::new();
        for name in &required {
            let value = match props.and_then(|p| p.get(*name)) {
                Some(sub) => self.instance(sub, depth + 1),
                // A required name the schema does not describe; a closed object cannot have it.
                None if closed => continue,
                None => Value::String("sim".to_string()),
            };
            out.insert((*name).to_string(), value);
        }
        // Optional properties come only when `minProperties` asks for more than the required ones.
        let min = obj.get("minProperties").and_then(Value::as_u64).unwrap_or(0) as usize;
        for (name, sub) in props.into_iter().flatten() {
            if out.len() >= min {
                break;
            }
            if !out.contains_key(name) {
                let value = self.instance(sub, depth + 1);
                out.insert(name.clone(), value);
            }
        }
        Value::Object(out)
    }

    fn array(&mut self, obj: &Map<String, Value>, depth: usize) -> Value {
        // A tuple is `prefixItems` (2020-12) or an `items` list (draft 4–7).
        let tuple = obj.get("prefixItems").or_else(|| obj.get("items").filter(|i| i.is_array()));
        let prefix: &[Value] = tuple.and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        let rest =
            obj.get("items").filter(|i| i.is_object()).cloned().unwrap_or_else(|| json!({"type": "string"}));
        let min =
            usize::try_from(obj.get("minItems").and_then(Value::as_u64).unwrap_or(0)).unwrap_or(usize::MAX);
        let n = min.max(prefix.len()).min(self.budget);
        Value::Array((0..n).map(|i| self.instance(prefix.get(i).unwrap_or(&rest), depth + 1)).collect())
    }

    fn string(&mut self, obj: &Map<String, Value>) -> Value {
        let base = match obj.get("format").and_then(Value::as_str) {
            Some("date-time") => "2025-01-01T00:00:00Z",
            Some("date") => "2025-01-01",
            Some("time") => "00:00:00Z",
            Some("email") => "sim@example.com",
            Some("uri" | "url" | "iri") => "https://example.com/",
            Some("uuid") => "00000000-0000-4000-8000-000000000000",
            Some("ipv4") => "127.0.0.1",
            Some("ipv6") => "::1",
            Some("hostname") => "example.com",
            _ => "sim",
        };
        let len =
            |k: &str| obj.get(k).and_then(Value::as_u64).map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        let min = len("minLength").unwrap_or(0);
        let max = len("maxLength").unwrap_or(usize::MAX).max(min);
        let mut s: String = base.chars().take(max).collect();
        let pad = min.saturating_sub(s.chars().count()).min(self.budget);
        self.budget -= pad;
        s.extend(std::iter::repeat_n('x', pad));
        Value::String(s)
    }
}

/// The lower bound if there is one, else 0 kept under the upper bound.
fn number(obj: &Map<String, Value>) -> f64 {
    let get = |k: &str| obj.get(k).and_then(Value::as_f64);
    let hi = get("maximum").or(get("exclusiveMaximum").map(|m| m - 1.0));
    let lo = match (get("minimum"), get("exclusiveMinimum"), obj.get("exclusiveMinimum")) {
        // Draft 4 spelled an exclusive minimum as a flag next to `minimum`.
        (Some(m), _, Some(Value::Bool(true))) => Some(m + 1.0),
        (Some(m), _, _) => Some(m),
        (None, Some(m), _) => Some(m + 1.0),
        _ => None,
    };
    match (lo, hi) {
        (Some(lo), Some(hi)) if lo > hi => (get("minimum").unwrap_or(lo) + hi) / 2.0,
        (Some(lo), _) => lo,
        (None, Some(hi)) if hi < 0.0 => hi,
        _ => 0.0,
    }
}

fn integer(obj: &Map<String, Value>) -> Value {
    let mut n = number(obj).ceil();
    if let Some(m) = obj.get("multipleOf").and_then(Value::as_f64).filter(|m| *m >= 1.0) {
        n = (n / m).ceil() * m;
    }
    if n.is_finite() && n.abs() < 9.0e15 { json!(n as i64) } else { json!(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(schema: &Value) -> Value {
        Gen { root: schema, budget: BUDGET }.instance(schema, 0)
    }

    #[test]
    fn objects_enums_refs_and_bounds() {
        let schema = json!({
            "type": "object", "additionalProperties": false,
            "required": ["kind", "n", "x", "tags", "inner", "maybe", "legacy"],
            "properties": {
                "kind": {"type": "string", "enum": ["a", "b"]},
                "n": {"type": "integer", "minimum": 3, "maximum": 9},
                "x": {"type": "number", "exclusiveMinimum": 0.5},
                "tags": {"type": "array", "minItems": 2, "items": {"type": "string", "minLength": 5}},
                "inner": {"$ref": "#/$defs/inner"},
                "legacy": {"$ref": "#/definitions/legacy"},
                "maybe": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                "optional": {"type": "string"}
            },
            "$defs": {"inner": {"type": "object", "required": ["c"], "properties": {"c": {"const": 7}}}},
            "definitions": {"legacy": {"type": ["null", "integer"], "maximum": -4}}
        });
        let v = instance(&schema);
        assert_eq!(v["kind"], "a");
        assert_eq!(v["n"], 3);
        assert_eq!(v["x"], 1.5);
        assert_eq!(v["tags"], json!(["simxx", "simxx"]));
        assert_eq!(v["inner"], json!({"c": 7}));
        assert_eq!(v["legacy"], -4);
        assert_eq!(v["maybe"], false);
        assert!(v.get("optional").is_none());
        assert_eq!(v.as_object().unwrap().len(), 7);
    }

    #[test]
    fn strings_respect_length_and_format() {
        assert_eq!(one(&json!({"type": "string", "maxLength": 2})), "si");
        assert_eq!(one(&json!({"type": "string", "maxLength": 0})), "");
        assert_eq!(one(&json!({"type": "string", "format": "email"})), "sim@example.com");
        assert_eq!(one(&json!({"type": ["string", "null"], "minLength": 4})), "simx");
    }

    #[test]
    fn all_of_merges_and_min_properties_adds_optional_ones() {
        let s = json!({
            "allOf": [
                {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer", "multipleOf": 5, "minimum": 3}}},
                {"$ref": "#/$defs/b"}
            ],
            "$defs": {"b": {"required": ["b"], "properties": {"b": {"type": "boolean"}}}}
        });
        assert_eq!(instance(&s), json!({"a": 5, "b": false}));
        let m = json!({"type": "object", "minProperties": 1, "properties": {"p": {"type": "null"}}});
        assert_eq!(instance(&m), json!({"p": null}));
    }

    #[test]
    fn tuples_and_unconstrained_schemas() {
        let t = json!({"type": "array", "prefixItems": [{"type": "integer"}, {"const": "k"}], "minItems": 3});
        assert_eq!(instance(&t), json!([0, "k", "sim"]));
        assert_eq!(instance(&json!({})), json!({}));
        assert_eq!(instance(&json!({"type": "object"})), json!({}));
    }

    #[test]
    fn flota_interpretation_schema_gets_a_valid_instance() {
        let s = json!({
            "type": "object", "additionalProperties": false,
            "required": ["intent", "confidence", "work", "reply"],
            "properties": {
                "intent": {"type": "string", "enum": ["open_work", "chat"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "work": {"anyOf": [{"type": "object", "required": ["title"], "properties": {"title": {"type": "string", "maxLength": 200}}}, {"type": "null"}]},
                "reply": {"anyOf": [{"type": "string"}, {"type": "null"}]}
            }
        });
        assert_eq!(
            instance(&s),
            json!({"intent": "open_work", "confidence": 0.0, "work": {"title": "sim"}, "reply": "sim"})
        );
    }

    #[test]
    fn hostile_schemas_end() {
        let s = json!({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}});
        assert_eq!(instance(&s), json!({}));
        let deep = json!({"type": "object", "required": ["me"], "properties": {"me": {"$ref": "#"}}});
        assert!(instance(&deep).is_object());
        assert_eq!(instance(&json!("not a schema")), json!({}));
        assert_eq!(one(&json!({"$ref": "https://elsewhere"})), Value::Null);
        let huge = json!({"type": "array", "minItems": u64::MAX, "items": {"type": "string", "minLength": u64::MAX}});
        assert!(instance(&huge).to_string().len() < 5_000_000);
        let nested = json!({"type": "array", "minItems": 1000, "items": {"type": "array", "minItems": 1000, "items": {"type": "array", "minItems": 1000}}});
        assert!(instance(&nested).to_string().len() < 5_000_000);
    }
}

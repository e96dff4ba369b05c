//! Strict request bodies on `/v1`: every top-level field of a `/v1/chat/completions` or `/v1/completions`
//! body outside its schema is refused with OpenAI's 400 (`Unrecognized request argument supplied: X`), except
//! the few in [`IGNORED_FIELDS`], which change nothing amlserve answers.
//!
//! The known fields are serde's: the request types flatten [`CommonFields`] and capture whatever no named
//! field took in an `other` map, so a field added to `CommonFields` is known (and documented, the schema being
//! built from the same types) without a second list. The schemas are one object with
//! `additionalProperties: false`: `CommonFields`' properties, the body's own and the ignored fields'.
//!
//! Nested objects: `stream_options` refuses unknown keys (serde's message), like the top level. Messages stay
//! lenient (unknown keys such as `name`, or the `refusal` / `audio` / `annotations` nulls that clients copy
//! back from an earlier answer, are ignored): their schema leaves `additionalProperties` open to say so.
//! The Azure AI route (`azure_ai.rs`) decides about unknown top-level fields by its `extra-parameters`
//! header instead, and `/score` stays lenient.

use serde_json::{Map, Value};
use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::PartialSchema;

use super::ranges::{nullable, string_enum};
use super::requests::{content_schema, CommonFields};
use crate::server::error::ApiError;

/// Which strict body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Chat,
    Completion,
}

/// A top-level field accepted and ignored because it changes nothing amlserve answers; its value is still
/// checked against what OpenAI accepts.
pub struct IgnoredField {
    pub name: &'static str,
    /// Why it changes nothing here (the schema's description).
    pub why: &'static str,
    /// OpenAI's legacy completions take only `user`; the rest are chat fields.
    pub completions: bool,
    /// The accepted values (null included) as a schema, with the description given...
    schema: fn(String) -> Schema,
    /// ...and as a check of one value (null is always accepted).
    accepts: fn(&Value) -> bool,
}

fn string(description: String) -> Schema {
    ObjectBuilder::new()
        .schema_type(nullable(Type::String))
        .description(Some(description))
        .build()
        .into()
}

fn is_string(v: &Value) -> bool {
    v.is_string()
}

/// Text content: a string or a list of `{"type": "text", "text": ...}` parts (the messages' content shape).
fn is_text_content(v: &Value) -> bool {
    match v {
        Value::String(_) => true,
        Value::Array(parts) => parts.iter().all(|p| {
            p.get("type").and_then(Value::as_str) == Some("text") && p.get("text").is_some_and(Value::is_string)
        }),
        _ => false,
    }
}

/// OpenAI's service tiers.
const SERVICE_TIERS: &[&str] = &["auto", "default", "flex", "scale", "priority"];

/// The fields accepted and ignored, with why. Everything else outside the schema is refused, in particular
/// fields that would change the answer if honoured: `audio`, `reasoning_effort`, `verbosity`,
/// `web_search_options`, `functions` / `function_call`, and on completions `best_of`, `echo`, `suffix`.
pub const IGNORED_FIELDS: &[IgnoredField] = &[
    IgnoredField {
        name: "user",
        why: "An end-user id OpenAI uses for abuse monitoring; not used",
        completions: true,
        schema: string,
        accepts: is_string,
    },
    IgnoredField {
        name: "safety_identifier",
        why: "An end-user id (user's successor at OpenAI); not used",
        completions: false,
        schema: string,
        accepts: is_string,
    },
    IgnoredField {
        name: "prompt_cache_key",
        why: "A prompt-caching hint; the prefix cache needs none (outputs are the same either way)",
        completions: false,
        schema: string,
        accepts: is_string,
    },
    IgnoredField {
        name: "metadata",
        why: "Tags for stored completions; nothing is stored",
        completions: false,
        schema: |d| {
            ObjectBuilder::new()
                .schema_type(nullable(Type::Object))
                .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)))
                .description(Some(d))
                .build()
                .into()
        },
        accepts: |v| v.as_object().is_some_and(|m| m.values().all(Value::is_string)),
    },
    IgnoredField {
        name: "store",
        why: "Whether OpenAI keeps the completion for evals and distillation; nothing is stored",
        completions: false,
        schema: |d| {
            ObjectBuilder::new()
                .schema_type(nullable(Type::Boolean))
                .description(Some(d))
                .build()
                .into()
        },
        accepts: Value::is_boolean,
    },
    IgnoredField {
        name: "service_tier",
        why: "OpenAI's processing tier; this server has one",
        completions: false,
        schema: |d| {
            let values = SERVICE_TIERS.iter().map(|s| Value::from(*s)).chain([Value::Null]);
            ObjectBuilder::new()
                .schema_type(nullable(Type::String))
                .enum_values(Some(values))
                .description(Some(d))
                .build()
                .into()
        },
        accepts: |v| v.as_str().is_some_and(|s| SERVICE_TIERS.contains(&s)),
    },
    IgnoredField {
        name: "prediction",
        why: "Predicted Outputs only make OpenAI faster: the answer is the same without them",
        completions: false,
        schema: |d| {
            ObjectBuilder::new()
                .schema_type(nullable(Type::Object))
                .property("type", string_enum(&["content"]))
                .required("type")
                .property("content", content_schema())
                .required("content")
                .description(Some(d))
                .build()
                .into()
        },
        accepts: |v| {
            v.get("type").and_then(Value::as_str) == Some("content") && v.get("content").is_some_and(is_text_content)
        },
    },
    IgnoredField {
        name: "modalities",
        why: "Output kinds: only [\"text\"], the default, is served (audio output is not)",
        completions: false,
        schema: |d| {
            ArrayBuilder::new()
                .schema_type(nullable(Type::Array))
                .items(string_enum(&["text"]))
                .min_items(Some(1))
                .max_items(Some(1))
                .description(Some(d))
                .build()
                .into()
        },
        accepts: |v| *v == serde_json::json!(["text"]),
    },
];

impl IgnoredField {
    fn schema(&self) -> Schema {
        (self.schema)(format!("Ignored: {}", self.why))
    }

    fn on(&self, body: Body) -> bool {
        body == Body::Chat || self.completions
    }
}

/// The ignored fields of `body`.
pub fn ignored_fields(body: Body) -> impl Iterator<Item = &'static IgnoredField> {
    IGNORED_FIELDS.iter().filter(move |f| f.on(body))
}

/// Refuses the fields no named field of the body took, except the ignored ones (whose values are checked).
pub fn refuse_unrecognized(other: &Map<String, Value>, body: Body) -> Result<(), ApiError> {
    let mut unknown = Vec::new();
    for (name, value) in other {
        match ignored_fields(body).find(|f| f.name == name) {
            Some(f) if value.is_null() || (f.accepts)(value) => {}
            Some(f) => {
                return Err(ApiError::invalid_param(
                    name,
                    format!(
                        "invalid value for {name}: {value}; it must be as OpenAI documents it (ignored here: {})",
                        f.why
                    ),
                ))
            }
            None => unknown.push(name.as_str()),
        }
    }
    match unknown.as_slice() {
        [] => Ok(()),
        [one] => Err(ApiError::invalid_param(
            one,
            format!("Unrecognized request argument supplied: {one}"),
        )),
        [first, ..] => Err(ApiError::invalid_param(
            first,
            format!("Unrecognized request arguments supplied: {}", unknown.join(", ")),
        )),
    }
}

/// A strict body's schema: `own` (the body's own properties) plus `CommonFields`' and the ignored fields',
/// nothing else.
pub fn strict_schema(own: ObjectBuilder, body: Body) -> RefOr<Schema> {
    let mut b = own;
    if let RefOr::T(Schema::Object(common)) = CommonFields::schema() {
        for (name, schema) in common.properties {
            b = b.property(name, schema);
        }
        for name in common.required {
            b = b.required(name);
        }
    }
    for f in ignored_fields(body) {
        b = b.property(f.name, f.schema());
    }
    let names: Vec<&str> = ignored_fields(body).map(|f| f.name).collect();
    b.additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .description(Some(format!(
            "Fields outside this schema are refused (400, `Unrecognized request argument supplied`); {} are accepted and ignored (they change nothing here).",
            names.join(", ")
        )))
        .build()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::types::{ChatRequest, CompletionRequest};
    use serde_json::json;
    use utoipa::PartialSchema;

    /// The documented property names of a strict body.
    fn documented<T: PartialSchema>() -> Vec<String> {
        let v = serde_json::to_value(T::schema()).expect("serializes");
        assert_eq!(v["additionalProperties"], json!(false), "{v}");
        v["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .cloned()
            .collect()
    }

    /// A body with every documented field set to null (the body's own list field set to a valid value).
    fn all_null(names: &[String], own: (&str, Value)) -> Value {
        let mut body: Map<String, Value> = names.iter().map(|n| (n.clone(), Value::Null)).collect();
        body.insert(own.0.into(), own.1);
        Value::Object(body)
    }

    #[test]
    fn every_documented_field_is_known_and_nothing_else() {
        let names = documented::<ChatRequest>();
        let req: ChatRequest = serde_json::from_value(all_null(&names, ("messages", json!([])))).expect("parses");
        let left: Vec<&str> = req.other.keys().map(String::as_str).collect();
        let ignored: Vec<&str> = ignored_fields(Body::Chat).map(|f| f.name).collect();
        let mut sorted = ignored.clone();
        sorted.sort_unstable();
        assert_eq!(
            left, sorted,
            "documented fields that serde does not know: those not ignored"
        );
        assert!(refuse_unrecognized(&req.other, Body::Chat).is_ok());
        for f in ["temperature", "stream_options", "model", "max_completion_tokens"] {
            assert!(names.iter().any(|n| n == f), "{f} undocumented");
        }

        let names = documented::<CompletionRequest>();
        let req: CompletionRequest = serde_json::from_value(all_null(&names, ("prompt", json!("x")))).expect("parses");
        assert_eq!(req.other.keys().collect::<Vec<_>>(), ["user"]);
        assert!(
            !names.iter().any(|n| n == "metadata"),
            "chat-only no-op documented on completions"
        );
    }

    #[test]
    fn unknown_fields_are_refused_in_openai_words() {
        let req: ChatRequest =
            serde_json::from_value(json!({"messages": [], "foo": 1, "user": "u", "temperature": 0.5})).expect("parses");
        let e = refuse_unrecognized(&req.other, Body::Chat).expect_err("foo");
        assert_eq!(e.message, "Unrecognized request argument supplied: foo");
        assert_eq!(e.param.as_deref(), Some("foo"));
        let req: CompletionRequest =
            serde_json::from_value(json!({"prompt": "x", "metadata": {}, "echo": true})).expect("parses");
        let e = refuse_unrecognized(&req.other, Body::Completion).expect_err("two");
        // In the order sent (serde_json keeps insertion order: llguidance enables `preserve_order`).
        assert_eq!(e.message, "Unrecognized request arguments supplied: metadata, echo");
    }

    #[test]
    fn ignored_fields_still_check_their_values() {
        let check = |body: Value| {
            let req: ChatRequest = serde_json::from_value(body).expect("parses");
            refuse_unrecognized(&req.other, Body::Chat)
        };
        for ok in [
            json!({"messages": [], "user": "u", "store": false, "metadata": {"a": "b"}, "service_tier": "auto"}),
            json!({"messages": [], "modalities": ["text"], "prediction": {"type": "content", "content": "x"}}),
            json!({"messages": [], "prediction": {"type": "content", "content": [{"type": "text", "text": "x"}]}}),
            json!({"messages": [], "user": null, "modalities": null, "safety_identifier": "s", "prompt_cache_key": "k"}),
        ] {
            assert!(check(ok.clone()).is_ok(), "{ok}");
        }
        for (bad, field) in [
            (json!({"messages": [], "user": 5}), "user"),
            (json!({"messages": [], "modalities": ["text", "audio"]}), "modalities"),
            (json!({"messages": [], "metadata": {"a": 1}}), "metadata"),
            (json!({"messages": [], "service_tier": "fast"}), "service_tier"),
            (json!({"messages": [], "prediction": {"content": "x"}}), "prediction"),
        ] {
            assert_eq!(
                check(bad.clone()).expect_err("refused").param.as_deref(),
                Some(field),
                "{bad}"
            );
        }
    }

    #[test]
    fn stream_options_refuse_unknown_keys() {
        let bad = json!({"messages": [], "stream_options": {"include_usage": true, "foo": 1}});
        let e = serde_json::from_value::<ChatRequest>(bad).expect_err("refused");
        assert!(e.to_string().contains("unknown field `foo`"), "{e}");
    }
}

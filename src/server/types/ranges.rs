//! Numeric ranges and reusable schema pieces: one source for the OpenAPI document and for validation.

use serde_json::Value;
use utoipa::openapi::schema::{ArrayBuilder, ArrayItems, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;

use crate::server::error::ApiError;

/// The values a numeric request field accepts: `min` (inclusive, or exclusive with `min_exclusive`) up to
/// `max` (inclusive) when there is one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub field: &'static str,
    pub min: f64,
    pub min_exclusive: bool,
    pub max: Option<f64>,
    /// Whole numbers only.
    pub integer: bool,
}

impl Range {
    const fn closed(field: &'static str, min: f64, max: f64) -> Self {
        Self {
            field,
            min,
            min_exclusive: false,
            max: Some(max),
            integer: false,
        }
    }

    /// Whether `x` is in the range.
    pub fn contains(&self, x: f64) -> bool {
        let above = if self.min_exclusive {
            x > self.min
        } else {
            x >= self.min
        };
        above && self.max.is_none_or(|m| x <= m)
    }

    /// The rule in words, for error messages ("between 0 and 2").
    pub fn rule(&self) -> String {
        match (self.min_exclusive, self.max) {
            (false, Some(max)) => format!("between {} and {max}", self.min),
            (true, Some(max)) => format!("greater than {} and at most {max}", self.min),
            (false, None) => format!("at least {}", self.min),
            (true, None) => format!("greater than {}", self.min),
        }
    }

    /// 400 naming the field unless `v` is unset or in the range.
    pub fn check(&self, v: Option<f64>) -> Result<(), ApiError> {
        self.check_as(self.field, v)
    }

    /// [`Range::check`] for a field of another name with the same range (`max_new_tokens`).
    pub fn check_as(&self, field: &str, v: Option<f64>) -> Result<(), ApiError> {
        match v {
            Some(x) if !x.is_finite() || !self.contains(x) => Err(ApiError::invalid_param(
                field,
                format!("{field} must be {}; got {x}", self.rule()),
            )),
            _ => Ok(()),
        }
    }

    /// The schema of an optional field with this range (`null` means unset).
    pub fn schema(&self) -> Schema {
        let kind = if self.integer { Type::Integer } else { Type::Number };
        let mut b = ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([kind, Type::Null]))
            .maximum(self.max);
        b = if self.min_exclusive {
            b.exclusive_minimum(Some(self.min))
        } else {
            b.minimum(Some(self.min))
        };
        if self.integer {
            b = b.format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )));
        }
        b.build().into()
    }
}

pub const TEMPERATURE: Range = Range::closed("temperature", 0.0, 2.0);
pub const TOP_P: Range = Range {
    min_exclusive: true,
    ..Range::closed("top_p", 0.0, 1.0)
};
pub const MIN_P: Range = Range::closed("min_p", 0.0, 1.0);
pub const PRESENCE_PENALTY: Range = Range::closed("presence_penalty", -2.0, 2.0);
pub const FREQUENCY_PENALTY: Range = Range::closed("frequency_penalty", -2.0, 2.0);
pub const REPETITION_PENALTY: Range = Range {
    min_exclusive: true,
    ..Range::closed("repetition_penalty", 0.0, 10.0)
};
/// `top_k`: 0 turns it off.
pub const TOP_K: Range = Range {
    max: None,
    integer: true,
    ..Range::closed("top_k", 0.0, 0.0)
};
/// Generated-token limits (`max_tokens`, `max_completion_tokens`, `max_new_tokens`); the upper bound is the
/// room the prompt leaves in the context window, checked once the prompt is tokenized.
pub const MAX_TOKENS: Range = Range {
    max: None,
    integer: true,
    ..Range::closed("max_tokens", 1.0, 1.0)
};
/// Most stop strings accepted.
pub const MAX_STOPS: usize = 16;
/// Longest stop string accepted, in characters: real stops are short (`"\n\n"`, `"User:"`), and a stop's length
/// is what every stream's output is held back by.
pub const MAX_STOP_CHARS: usize = 1000;
/// Choices per request (`n`); the server's `--max-n` may lower the upper bound.
pub const N: Range = Range {
    integer: true,
    ..Range::closed("n", 1.0, 16.0)
};
/// Alternatives reported per token (chat `top_logprobs`, completions `logprobs`).
pub const TOP_LOGPROBS: Range = Range {
    integer: true,
    ..Range::closed("top_logprobs", 0.0, 20.0)
};
/// Completions' integer `logprobs` (alternatives per token).
pub const COMPLETION_LOGPROBS: Range = Range {
    field: "logprobs",
    ..TOP_LOGPROBS
};
/// A `logit_bias` value.
pub const LOGIT_BIAS: Range = Range::closed("logit_bias", -100.0, 100.0);
/// Most `logit_bias` entries (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most inputs in one embeddings request.
pub const MAX_EMBEDDING_INPUTS: usize = 256;

pub(super) fn temperature() -> Schema {
    TEMPERATURE.schema()
}
pub(super) fn top_p() -> Schema {
    TOP_P.schema()
}
pub(super) fn min_p() -> Schema {
    MIN_P.schema()
}
pub(super) fn presence_penalty() -> Schema {
    PRESENCE_PENALTY.schema()
}
pub(super) fn frequency_penalty() -> Schema {
    FREQUENCY_PENALTY.schema()
}
pub(super) fn repetition_penalty() -> Schema {
    REPETITION_PENALTY.schema()
}
pub(super) fn top_k() -> Schema {
    TOP_K.schema()
}
pub(super) fn max_tokens() -> Schema {
    MAX_TOKENS.schema()
}

pub(super) fn nullable(kind: Type) -> SchemaType {
    SchemaType::from_iter([kind, Type::Null])
}

/// A non-empty string.
pub(super) fn text() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).min_length(Some(1))
}

/// An array of `items`, which may be a reference or an inline schema.
pub(super) fn array_of(items: RefOr<Schema>) -> ArrayBuilder {
    ArrayBuilder::new().items(ArrayItems::RefOrSchema(Box::new(items)))
}

/// A non-empty string or a non-empty list of non-empty strings, with at most `max_items` items.
pub(super) fn text_or_list(max_items: Option<usize>) -> Schema {
    OneOfBuilder::new()
        .item(text())
        .item(
            ArrayBuilder::new()
                .items(text())
                .min_items(Some(1))
                .max_items(max_items),
        )
        .build()
        .into()
}

pub(super) fn text_list() -> Schema {
    text_or_list(None)
}

pub(super) fn embedding_inputs() -> Schema {
    text_or_list(Some(MAX_EMBEDDING_INPUTS))
}

/// `stop`: a string or at most [`MAX_STOPS`] strings of at most [`MAX_STOP_CHARS`] characters, or null.
pub(super) fn stop() -> Schema {
    let string = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(MAX_STOP_CHARS))
    };
    OneOfBuilder::new()
        .item(string())
        .item(ArrayBuilder::new().items(string()).max_items(Some(MAX_STOPS)))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .build()
        .into()
}

pub(super) fn n() -> Schema {
    N.schema()
}

pub(super) fn top_logprobs() -> Schema {
    TOP_LOGPROBS.schema()
}

pub(super) fn completion_logprobs() -> Schema {
    COMPLETION_LOGPROBS.schema()
}

/// Chat `logprobs`: a boolean.
pub(super) fn chat_logprobs() -> Schema {
    ObjectBuilder::new()
        .schema_type(nullable(Type::Boolean))
        .description(Some(
            "Return each output token's log-probability (from the model's raw distribution) and, with top_logprobs, the most likely alternatives",
        ))
        .build()
        .into()
}

/// `logit_bias`: token id (as a string) -> bias.
pub(super) fn logit_bias() -> Schema {
    let bias = ObjectBuilder::new()
        .schema_type(Type::Number)
        .minimum(Some(LOGIT_BIAS.min))
        .maximum(LOGIT_BIAS.max);
    ObjectBuilder::new()
        .schema_type(nullable(Type::Object))
        .property_names(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some("^(0|[1-9][0-9]{0,3})$"))))
        .additional_properties(Some(utoipa::openapi::schema::AdditionalProperties::RefOr(RefOr::T(bias.into()))))
        .max_properties(Some(MAX_LOGIT_BIAS))
        .description(Some(
            "Token id -> bias added to its logit before sampling (-100 bans, 100 forces); ids must be in the vocabulary",
        ))
        .build()
        .into()
}

/// A field amlserve does not implement yet: only `null` or the value that changes nothing is accepted.
pub(super) fn only_default(default: Value, what: &str) -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::AnyValue)
        .enum_values(Some([default, Value::Null]))
        .description(Some(format!(
            "{what} is not supported yet; only this value (or null) is accepted"
        )))
        .build()
        .into()
}

/// `response_format`: text, any JSON object, or JSON following a schema.
pub(super) fn response_format() -> Schema {
    let kind = |k: &str| string_enum(&[k]);
    let json_schema = ObjectBuilder::new()
        .property("name", ObjectBuilder::new().schema_type(Type::String))
        .property("schema", ObjectBuilder::new().schema_type(Type::Object))
        .required("schema")
        .property("strict", ObjectBuilder::new().schema_type(nullable(Type::Boolean)))
        .property("description", ObjectBuilder::new().schema_type(Type::String));
    OneOfBuilder::new()
        .item(ObjectBuilder::new().property("type", kind("text")).required("type"))
        .item(ObjectBuilder::new().property("type", kind("json_object")).required("type"))
        .item(
            ObjectBuilder::new()
                .property("type", kind("json_schema"))
                .required("type")
                .property("json_schema", json_schema)
                .required("json_schema"),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "json_object: the output is a JSON object; json_schema: it follows json_schema.schema (enforced by a grammar)",
        ))
        .build()
        .into()
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar`.
pub(super) fn structured_outputs() -> Schema {
    let one = |name: &str, schema: Schema| {
        ObjectBuilder::new()
            .property(name, schema)
            .required(name)
            .additional_properties(Some(utoipa::openapi::schema::AdditionalProperties::FreeForm(false)))
    };
    let string = || ObjectBuilder::new().schema_type(Type::String).build().into();
    OneOfBuilder::new()
        .item(one("json", ObjectBuilder::new().schema_type(SchemaType::from_iter([Type::Object, Type::String])).build().into()))
        .item(one("regex", string()))
        .item(one(
            "choice",
            ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)))
                .min_items(Some(1))
                .build()
                .into(),
        ))
        .item(one("grammar", string()))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "vLLM's structured outputs: json (a JSON schema), regex, choice (one of these strings) or grammar (llguidance Lark)",
        ))
        .build()
        .into()
}

pub(super) fn best_of_one() -> Schema {
    only_default(serde_json::json!(1), "best_of")
}

/// `tools`: functions with a name (letters, digits, `_`, `-`) and a JSON Schema of their arguments.
pub(super) fn tools() -> Schema {
    let function = ObjectBuilder::new()
        .property(
            "name",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[A-Za-z0-9_-]{1,64}$")),
        )
        .required("name")
        .property("description", ObjectBuilder::new().schema_type(Type::String))
        .property("parameters", ObjectBuilder::new().schema_type(nullable(Type::Object)))
        .property("strict", ObjectBuilder::new().schema_type(nullable(Type::Boolean)));
    let tool = ObjectBuilder::new()
        .property("type", string_enum(&["function"]))
        .required("type")
        .property("function", function)
        .required("function");
    OneOfBuilder::new()
        .item(ArrayBuilder::new().items(tool))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "Functions the model may call; names must be unique. A call's arguments are forced by a grammar to follow the function's parameters schema",
        ))
        .build()
        .into()
}

/// `tool_choice`: none, auto, required or a named function.
pub(super) fn tool_choice() -> Schema {
    let named = ObjectBuilder::new()
        .property("type", string_enum(&["function"]))
        .required("type")
        .property(
            "function",
            ObjectBuilder::new()
                .property("name", ObjectBuilder::new().schema_type(Type::String))
                .required("name"),
        )
        .required("function");
    OneOfBuilder::new()
        .item(string_enum(&["none", "auto", "required"]))
        .item(named)
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "Default: auto when tools are given, none otherwise; a named function must be in tools",
        ))
        .build()
        .into()
}

/// An assistant turn's call in the history.
pub(super) fn tool_call_schema() -> Schema {
    ObjectBuilder::new()
        .property("id", ObjectBuilder::new().schema_type(Type::String))
        .property("type", string_enum(&["function"]))
        .property(
            "function",
            ObjectBuilder::new()
                .property("name", ObjectBuilder::new().schema_type(Type::String))
                .required("name")
                .property("arguments", ObjectBuilder::new().schema_type(Type::String))
                .required("arguments"),
        )
        .required("function")
        .build()
        .into()
}

pub(super) fn nullable_bool() -> Schema {
    ObjectBuilder::new().schema_type(nullable(Type::Boolean)).build().into()
}

/// A field that is always `null` in responses (`logprobs`, `system_fingerprint`).
pub(super) fn always_null() -> Schema {
    ObjectBuilder::new().schema_type(Type::Null).build().into()
}

pub(super) fn string_enum(values: &[&str]) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
}

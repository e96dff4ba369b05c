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
/// The only `n` served.
pub const N_SUPPORTED: i64 = 1;
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

/// `stop`: a string or at most [`MAX_STOPS`] strings, or null.
pub(super) fn stop() -> Schema {
    let string = || ObjectBuilder::new().schema_type(Type::String);
    OneOfBuilder::new()
        .item(string())
        .item(ArrayBuilder::new().items(string()).max_items(Some(MAX_STOPS)))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .build()
        .into()
}

pub(super) fn n() -> Schema {
    ObjectBuilder::new()
        .schema_type(nullable(Type::Integer))
        .enum_values(Some([Value::from(N_SUPPORTED), Value::Null]))
        .description(Some("Only 1 is supported"))
        .build()
        .into()
}

/// `logprobs`: not supported, so only `false` or null.
pub(super) fn logprobs_off() -> Schema {
    ObjectBuilder::new()
        .schema_type(nullable(Type::Boolean))
        .enum_values(Some([Value::Bool(false), Value::Null]))
        .description(Some("Log probabilities are not supported"))
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

pub(super) fn response_format_text() -> Schema {
    only_default(serde_json::json!({"type": "text"}), "Structured output")
}

pub(super) fn no_tools() -> Schema {
    only_default(serde_json::json!([]), "Tool calling")
}

pub(super) fn tool_choice_none() -> Schema {
    only_default(serde_json::json!("none"), "Tool calling")
}

pub(super) fn no_logit_bias() -> Schema {
    only_default(serde_json::json!({}), "logit_bias")
}

pub(super) fn no_top_logprobs() -> Schema {
    only_default(serde_json::json!(0), "top_logprobs")
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

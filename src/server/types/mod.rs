//! Request and response bodies of every route, as serde types. Their `ToSchema` derives are what
//! `/swagger.json` documents (see `openapi.rs`), so the document and the wire format cannot drift apart.
//!
//! Numeric ranges live once, in the [`Range`] constants (`ranges.rs`, with the schema pieces built from them):
//! the schemas of the fields that carry them are built from the constants (`schema_with`), and
//! `generate::SamplingInput::validate` checks requests against the same constants (`requests.rs` and
//! `responses.rs` hold the bodies). Request types deserialize leniently where the server answers with a more helpful
//! message than serde would (roles, content parts, prompts); their schemas still say exactly what is accepted.
//! This module holds no handler logic.

mod ranges;
mod requests;
mod responses;
mod strict;
mod tokenize;

pub use ranges::*;
pub use requests::*;
pub use responses::*;
pub use strict::*;
pub use tokenize::*;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn integer_fields_take_integral_floats_only() {
        let p: ScoreParameters = serde_json::from_value(json!({"seed": 5.0, "top_k": 3})).expect("valid");
        assert_eq!((p.seed, p.top_k), (Some(5), Some(3)));
        for bad in [
            json!({"seed": 1.5}),
            json!({"seed": -9.3e18}),
            json!({"top_k": "3"}),
            json!({"seed": 1e19}),
        ] {
            assert!(serde_json::from_value::<ScoreParameters>(bad.clone()).is_err(), "{bad}");
        }
        let p: ScoreParameters = serde_json::from_value(json!({"seed": null})).expect("null is unset");
        assert_eq!(p.seed, None);
        // Parsed from text exactly (serde_json's float_roundtrip): the default parser read this as ...070.5.
        let p: ScoreParameters = serde_json::from_str(r#"{"seed": -3819502772004070.0}"#).expect("integral");
        assert_eq!(p.seed, Some(-3_819_502_772_004_070));
    }

    #[test]
    fn ranges_say_their_rule() {
        assert_eq!(TOP_P.rule(), "greater than 0 and at most 1");
        assert!(!TOP_P.contains(0.0) && TOP_P.contains(1.0));
        let e = MAX_TOKENS.check_as("max_new_tokens", Some(0.0)).expect_err("below 1");
        assert_eq!(e.param.as_deref(), Some("max_new_tokens"));
        assert!(e.message.contains("at least 1"), "{}", e.message);
        assert!(TEMPERATURE.check(Some(f64::NAN)).is_err());
        assert!(TEMPERATURE.check(None).is_ok());
    }

    #[test]
    fn stream_chunks_leave_out_what_they_do_not_carry() {
        let chunk = ChatCompletionChunk {
            id: "c".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            system_fingerprint: None,
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta::default(),
                logprobs: None,
                finish_reason: Some(FinishReason::Stop),
            }],
            usage: None,
        };
        let v = serde_json::to_value(chunk).expect("serializes");
        assert!(v.get("usage").is_none(), "{v}");
        assert_eq!(v["system_fingerprint"], Value::Null);
        assert_eq!(v["choices"][0]["delta"], json!({}));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let item =
            serde_json::to_value(ScoreResponse::Text(vec![ScoreTextOutput { text: "t".into() }])).expect("serializes");
        assert_eq!(item, json!([{"0": "t"}]));
    }
}

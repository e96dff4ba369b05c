//! OpenAI chat and text completions: request bodies and where the text and usage sit in the answers.
//!
//! Pure JSON shaping; the HTTP exchange and timing live in the parent module.

use serde_json::{json, Value};

use super::{Piece, Usage};
use crate::cli::{GenParams, Target};
use crate::workload::RequestSpec;

/// The request body; streaming asks for the usage chunk so token counts come from the server.
pub(super) fn body(target: Target, spec: &RequestSpec, p: &GenParams, stream: bool) -> Value {
    let mut b = match target {
        Target::OpenaiCompletions => json!({"prompt": spec.prompt.text()}),
        _ => json!({"messages": spec.prompt.messages()}),
    };
    b["max_tokens"] = json!(spec.max_tokens);
    b["stream"] = json!(stream);
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    if p.ignore_eos {
        b["ignore_eos"] = json!(true);
    }
    if let Some(t) = p.temperature {
        b["temperature"] = json!(t);
    }
    if let Some(m) = &p.model {
        b["model"] = json!(m);
    }
    for (k, v) in &p.extra_body {
        b[k] = v.clone();
    }
    b
}

/// Text of the first choice: `message.content` / `delta.content` for chat, `text` for completions.
fn choice_text(target: Target, choice: &Value, streamed: bool) -> Result<String, String> {
    let field = match (target, streamed) {
        (Target::OpenaiCompletions, _) => choice.get("text"),
        (_, true) => choice.get("delta").and_then(|d| d.get("content")),
        (_, false) => choice.get("message").and_then(|m| m.get("content")),
    };
    match field {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("choice text is not a string: {other}")),
    }
}

fn piece(target: Target, v: &Value, streamed: bool) -> Result<Piece, String> {
    let choices = match v.get("choices") {
        Some(Value::Array(a)) => a.as_slice(),
        None | Some(Value::Null) if streamed => &[],
        _ => return Err(format!("no choices array in {}", truncate(v))),
    };
    let mut text = String::new();
    for c in choices {
        text.push_str(&choice_text(target, c, streamed)?);
    }
    Ok(Piece {
        text,
        usage: Usage::from_json(v),
    })
}

/// One streamed chunk (a usage-only chunk has `choices: []`).
pub(super) fn chunk(target: Target, v: &Value) -> Result<Piece, String> {
    piece(target, v, true)
}

/// A whole (non-streamed) answer.
pub(super) fn whole(target: Target, v: &Value) -> Result<Piece, String> {
    piece(target, v, false)
}

fn truncate(v: &Value) -> String {
    let s = v.to_string();
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Prompt;

    fn params() -> GenParams {
        GenParams {
            max_tokens: 8,
            ignore_eos: true,
            temperature: None,
            model: None,
            stream: true,
            extra_body: Default::default(),
        }
    }

    #[test]
    fn bodies() {
        let spec = RequestSpec {
            prompt: Prompt::Text("hi".into()),
            max_tokens: 8,
        };
        let b = body(Target::OpenaiChat, &spec, &params(), true);
        assert_eq!(b["messages"][0]["content"], "hi");
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert!(b.get("model").is_none());
        let b = body(Target::OpenaiCompletions, &spec, &params(), false);
        assert_eq!(b["prompt"], "hi");
        assert!(b.get("stream_options").is_none());
    }

    #[test]
    fn chunks_and_usage() {
        let c = chunk(Target::OpenaiChat, &json!({"choices": [{"delta": {"content": "ab"}}]})).unwrap();
        assert_eq!(c.text, "ab");
        let c = chunk(
            Target::OpenaiChat,
            &json!({"choices": [{"delta": {"role": "assistant"}}]}),
        )
        .unwrap();
        assert_eq!(c.text, "");
        let u = chunk(
            Target::OpenaiChat,
            &json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 8}}),
        )
        .unwrap();
        assert_eq!(
            u.usage,
            Some(Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(8)
            })
        );
        let t = chunk(
            Target::OpenaiCompletions,
            &json!({"choices": [{"text": "x"}], "usage": null}),
        )
        .unwrap();
        assert_eq!((t.text.as_str(), t.usage), ("x", None));
        assert!(chunk(Target::OpenaiChat, &json!({"choices": [{"delta": {"content": 5}}]})).is_err());
        assert!(whole(Target::OpenaiChat, &json!({"nothing": 1})).is_err());
        let w = whole(
            Target::OpenaiChat,
            &json!({"choices": [{"message": {"content": "yo"}}]}),
        )
        .unwrap();
        assert_eq!(w.text, "yo");
    }
}

//! Azure ML `/score` with the model-catalog chat payload: request body and the answer's text.
//!
//! Pure JSON shaping; the HTTP exchange and timing live in the parent module. Accepts the answer shapes that
//! catalog deployments use: `{"output": text}`, `[{"0": text}]`, `[{"generated_text": text}]`, or a string.

use serde_json::{json, Value};

use super::{Piece, Usage};
use crate::cli::GenParams;
use crate::workload::RequestSpec;

pub(super) fn body(spec: &RequestSpec, p: &GenParams) -> Value {
    let mut params = json!({"max_new_tokens": spec.max_tokens});
    match p.temperature {
        Some(t) => {
            params["temperature"] = json!(t);
            params["do_sample"] = json!(t > 0.0);
        }
        None => params["do_sample"] = json!(false),
    }
    if p.ignore_eos {
        params["ignore_eos"] = json!(true);
    }
    json!({"input_data": {"input_string": spec.prompt.messages(), "parameters": params}})
}

pub(super) fn whole(v: &Value) -> Result<Piece, String> {
    let text = match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("output").and_then(Value::as_str).map(str::to_string),
        Value::Array(a) => a
            .first()
            .and_then(|first| first.get("0").or_else(|| first.get("generated_text")))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    };
    let text = text.ok_or_else(|| {
        format!(
            "no output text in {}",
            v.to_string().chars().take(200).collect::<String>()
        )
    })?;
    Ok(Piece {
        text,
        usage: Usage::from_json(v),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Prompt;

    #[test]
    fn body_and_answers() {
        let p = GenParams {
            max_tokens: 4,
            ignore_eos: true,
            temperature: None,
            model: None,
            stream: false,
            extra_body: Default::default(),
        };
        let b = body(
            &RequestSpec {
                prompt: Prompt::Text("hi".into()),
                max_tokens: 4,
            },
            &p,
        );
        assert_eq!(b["input_data"]["input_string"][0]["role"], "user");
        assert_eq!(b["input_data"]["parameters"]["max_new_tokens"], 4);
        assert_eq!(b["input_data"]["parameters"]["do_sample"], false);
        assert_eq!(whole(&json!({"output": "a"})).unwrap().text, "a");
        assert_eq!(whole(&json!([{"0": "b"}])).unwrap().text, "b");
        assert_eq!(whole(&json!([{"generated_text": "c"}])).unwrap().text, "c");
        assert!(whole(&json!({"message": "x"})).is_err());
    }
}

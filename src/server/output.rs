//! What a chat or completion request asks of its output besides sampling, checked and made ready for the
//! engine: `n` choices, log-probabilities, `logit_bias`, and a grammar from `response_format` or vLLM's
//! `structured_outputs`, compiled off the async runtime (and cached by the model's [`Grammars`]).

use serde_json::Value;

use super::error::ApiError;
use super::generate::OutputControl;
use super::types::{CommonFields, LOGIT_BIAS, MAX_LOGIT_BIAS, N, TOP_LOGPROBS};
use super::Ready;
use crate::grammar::GrammarSpec;

/// The checked output fields of a request.
#[derive(Debug, Default)]
pub struct OutputFields {
    pub n: usize,
    pub logprobs: Option<usize>,
    pub logit_bias: Vec<(u32, f32)>,
    pub grammar: Option<(GrammarSpec, &'static str)>,
    /// `ignore_eos` was asked for (a grammar ends where it accepts, so the two cannot be combined).
    pub ignore_eos: bool,
}

impl CommonFields {
    /// Checks `n`, `logit_bias`, `response_format` and `structured_outputs` (`logprobs` is the route's, as
    /// its shape differs).
    pub fn output(&self, ready: &Ready, logprobs: Option<usize>) -> Result<OutputFields, ApiError> {
        N.check(self.n.map(|n| n as f64))?;
        let n = self.n.map_or(1, |n| n as usize);
        if n > ready.max_n {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be at most {} on this server (--max-n); got {n}", ready.max_n),
            ));
        }
        if let Some(k) = logprobs {
            TOP_LOGPROBS.check(Some(k as f64))?;
        }
        Ok(OutputFields {
            n,
            logprobs,
            logit_bias: logit_bias(self.logit_bias.as_ref(), ready.model.tokenizer.vocab_size())?,
            grammar: grammar(self.response_format.as_ref(), self.structured_outputs.as_ref())?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

impl OutputFields {
    /// Compiles the grammar (cached) and returns what the engine needs; an invalid grammar is a 400 naming
    /// the field it came from.
    pub async fn control(&mut self, ready: &Ready) -> Result<OutputControl, ApiError> {
        if let (true, Some((_, field))) = (self.ignore_eos, &self.grammar) {
            return Err(ApiError::invalid_param(
                "ignore_eos",
                format!("ignore_eos cannot be combined with {field}: a grammar ends the output where it is complete"),
            ));
        }
        let constraint = match self.grammar.take() {
            None => None,
            Some((spec, field)) => {
                let grammars = ready.grammars.clone();
                let metrics = ready.engine_metrics.clone();
                let started = tokio::task::spawn_blocking(move || {
                    let t = std::time::Instant::now();
                    let compiled = grammars.compile(&spec)?;
                    metrics.grammar_compile.observe(t.elapsed().as_secs_f64());
                    compiled.start()
                })
                .await
                .map_err(ApiError::internal)?;
                Some(started.map_err(|e| ApiError::invalid_param(field, e.to_string()))?)
            }
        };
        Ok(OutputControl { n: self.n, constraint })
    }
}

/// `logit_bias`: token id (a decimal string) -> bias in [-100, 100], at most 300 entries, ids in the vocabulary.
fn logit_bias(v: Option<&Value>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |m: String| ApiError::invalid_param("logit_bias", m);
    let map = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad("logit_bias must be an object mapping token ids to biases".into())),
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(bad(format!(
            "logit_bias may have at most {MAX_LOGIT_BIAS} entries; got {}",
            map.len()
        )));
    }
    map.iter()
        .map(|(k, v)| {
            let id: u32 = k
                .parse()
                .map_err(|_| bad(format!("logit_bias key '{k}' is not a token id")))?;
            if id as usize >= vocab {
                return Err(bad(format!(
                    "logit_bias token id {id} is outside the vocabulary (ids 0 to {})",
                    vocab - 1
                )));
            }
            let b = v
                .as_f64()
                .ok_or_else(|| bad(format!("logit_bias[{k}] must be a number")))?;
            LOGIT_BIAS.check(Some(b))?;
            Ok((id, b as f32))
        })
        .collect()
}

/// The grammar `response_format` or `structured_outputs` asks for (at most one of them), with its field name.
fn grammar(
    response_format: Option<&Value>,
    structured: Option<&Value>,
) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    let from_format = response_format
        .and_then(|v| (!v.is_null()).then_some(v))
        .map(format_spec)
        .transpose()?
        .flatten()
        .map(|s| (s, "response_format"));
    let from_structured = structured
        .and_then(|v| (!v.is_null()).then_some(v))
        .map(structured_spec)
        .transpose()?
        .map(|s| (s, "structured_outputs"));
    match (from_format, from_structured) {
        (Some(_), Some(_)) => Err(ApiError::invalid_param(
            "structured_outputs",
            "send either response_format (json_object / json_schema) or structured_outputs, not both",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

fn format_spec(v: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    let bad = |m: &str| ApiError::invalid_param("response_format", m.to_string());
    let kind = v.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarSpec::JsonObject)),
        Some("json_schema") => {
            let js = v
                .get("json_schema")
                .filter(|j| j.is_object())
                .ok_or_else(|| bad("response_format json_schema needs a json_schema object with a schema"))?;
            let schema = js
                .get("schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| bad("response_format.json_schema.schema must be a JSON Schema object"))?;
            let strict = match js.get("strict") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(bad("response_format.json_schema.strict must be a boolean")),
            };
            for key in ["name", "description"] {
                if js.get(key).is_some_and(|v| !v.is_string()) {
                    return Err(bad("response_format.json_schema name and description must be strings"));
                }
            }
            Ok(Some(GrammarSpec::JsonSchema {
                schema: schema.clone(),
                strict,
            }))
        }
        _ => Err(bad("response_format.type must be text, json_object or json_schema")),
    }
}

fn structured_spec(v: &Value) -> Result<GrammarSpec, ApiError> {
    let bad = |m: String| ApiError::invalid_param("structured_outputs", m);
    let Some(obj) = v.as_object() else {
        return Err(bad("structured_outputs must be an object".into()));
    };
    let set: Vec<(&String, &Value)> = obj.iter().filter(|(_, v)| !v.is_null()).collect();
    let [(key, val)] = set.as_slice() else {
        return Err(bad(format!(
            "structured_outputs needs exactly one of json, regex, choice, grammar; got {}",
            if set.is_empty() {
                "none".to_string()
            } else {
                set.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
            }
        )));
    };
    let string = |what: &str| {
        val.as_str()
            .map(str::to_string)
            .ok_or_else(|| bad(format!("structured_outputs.{what} must be a string")))
    };
    match key.as_str() {
        "json" => {
            let schema = match val {
                Value::String(s) => serde_json::from_str(s)
                    .map_err(|e| bad(format!("structured_outputs.json is not valid JSON: {e}")))?,
                other => (*other).clone(),
            };
            if !schema.is_object() {
                return Err(bad("structured_outputs.json must be a JSON Schema object".into()));
            }
            Ok(GrammarSpec::JsonSchema { schema, strict: false })
        }
        "regex" => Ok(GrammarSpec::Regex(string("regex")?)),
        "grammar" => Ok(GrammarSpec::Lark(string("grammar")?)),
        "choice" => {
            let choices: Option<Vec<String>> = val
                .as_array()
                .map(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect())
                .unwrap_or(None);
            match choices {
                Some(c) if !c.is_empty() && c.iter().all(|s| !s.is_empty()) => Ok(GrammarSpec::Choice(c)),
                _ => Err(bad(
                    "structured_outputs.choice must be a non-empty list of non-empty strings".into(),
                )),
            }
        }
        other => Err(bad(format!(
            "structured_outputs.{other} is not supported; use json, regex, choice or grammar"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn logit_bias_is_checked_entry_by_entry() {
        assert_eq!(
            logit_bias(Some(&json!({"5": -100})), 10).expect("ok"),
            vec![(5, -100.0)]
        );
        for bad in [
            json!({"10": 1}),
            json!({"x": 1}),
            json!({"1": 101}),
            json!({"1": "a"}),
            json!([1]),
        ] {
            let e = logit_bias(Some(&bad), 10).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some("logit_bias"), "{bad}");
        }
    }

    #[test]
    fn one_grammar_source_at_most() {
        let text = json!({"type": "text"});
        assert!(grammar(Some(&text), None).expect("ok").is_none());
        let obj = json!({"type": "json_object"});
        assert!(matches!(
            grammar(Some(&obj), None),
            Ok(Some((GrammarSpec::JsonObject, "response_format")))
        ));
        let re = json!({"regex": "[0-9]+"});
        assert!(matches!(
            grammar(None, Some(&re)),
            Ok(Some((GrammarSpec::Regex(_), "structured_outputs")))
        ));
        assert!(grammar(Some(&obj), Some(&re)).is_err());
        for bad in [
            json!({"type": "yaml"}),
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}),
        ] {
            assert!(grammar(Some(&bad), None).is_err(), "{bad}");
        }
        for bad in [
            json!({}),
            json!({"regex": "a", "choice": ["b"]}),
            json!({"choice": []}),
            json!({"xml": "a"}),
        ] {
            assert!(grammar(None, Some(&bad)).is_err(), "{bad}");
        }
    }
}

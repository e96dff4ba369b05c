//! Azure ML scoring routes: liveness `GET /` and `POST /score` with the model-catalog and Hugging Face payloads.
//!
//! Accepted `/score` bodies:
//! - chat: `{"input_data": {"input_string": [{"role", "content"}, ...], "parameters": {...}}}` -> `{"output": text}`
//! - text: `{"input_data": {"input_string": ["prompt", ...], "parameters": {...}}}` -> `[{"0": text}, ...]`
//! - Hugging Face: `{"inputs": "prompt" | ["prompt", ...], "parameters": {...}}` -> `[{"generated_text": text}, ...]`
//!
//! `parameters` maps `max_new_tokens`, `temperature`, `top_p`, `top_k`, `do_sample`, `repetition_penalty`,
//! `seed` (plus `stop`, `ignore_eos`, `return_full_text` for inputs); `do_sample: false` means greedy.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::access::{RequestId, TokenCounts};
use super::error::{ApiError, Dialect};
use super::generate::{self, PromptInput, SamplingInput, StopInput};
use super::json::{string_list, ApiJson};
use super::openai::{convert_messages, MessageIn};
use super::query::ApiQuery;
use super::types::{
    GeneratedText, ScoreChatOutput, ScoreParameters, ScoreResponse, ScoreTextOutput, MAX_TOKENS, TEMPERATURE,
};
use super::{AppState, Ready};

/// `GET /`: liveness, true as soon as the process listens.
pub async fn liveness() -> &'static str {
    "Healthy"
}

const EXPECTED: &str = "expected one of: {\"input_data\": {\"input_string\": [{\"role\": \"user\", \"content\": \"...\"}], \"parameters\": {...}}} (chat), \
{\"input_data\": {\"input_string\": [\"prompt\", ...], \"parameters\": {...}}} (text generation), \
or {\"inputs\": \"prompt\", \"parameters\": {...}} (Hugging Face)";

impl ScoreParameters {
    fn sampling(&self) -> SamplingInput {
        // Hugging Face semantics: do_sample=false is greedy whatever the temperature; unset sampling flags with
        // no temperature are greedy too (transformers' generate default). do_sample=true without a temperature
        // samples at the server's default temperature (--default-temperature).
        let temperature = match self.do_sample {
            Some(false) => Some(0.0),
            Some(true) => self.temperature,
            None => Some(self.temperature.unwrap_or(0.0)),
        };
        SamplingInput {
            max_tokens: self.max_new_tokens.or(self.max_tokens),
            temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            stop: self.stop.clone().map(StopInput::into_vec).unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            max_tokens_name: "max_new_tokens",
            ..Default::default()
        }
    }
}

/// A recognised `/score` payload.
enum Payload {
    Chat(Vec<MessageIn>, ScoreParameters),
    Text(Vec<String>, ScoreParameters),
    HuggingFace(Vec<String>, ScoreParameters),
}

fn bad(msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{msg}; {EXPECTED}"))
}

fn parameters(v: Option<Value>) -> Result<ScoreParameters, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(ScoreParameters::default()),
        Some(p) => {
            let p: ScoreParameters = serde_json::from_value(p).map_err(|e| bad(format!("invalid parameters: {e}")))?;
            // `do_sample: false` replaces the temperature with 0, so check the one that was sent here.
            // Likewise only one of the token limits is used; a wrong value is refused whichever it is.
            TEMPERATURE.check(p.temperature).map_err(|e| bad(e.message))?;
            for (name, v) in [("max_new_tokens", p.max_new_tokens), ("max_tokens", p.max_tokens)] {
                MAX_TOKENS
                    .check_as(name, v.map(|m| m as f64))
                    .map_err(|e| bad(e.message))?;
            }
            Ok(p)
        }
    }
}

fn strings(v: Value, what: &str) -> Result<Vec<String>, ApiError> {
    string_list(v).ok_or_else(|| {
        bad(format!(
            "{what} must be a non-empty string or a list of non-empty strings"
        ))
    })
}

fn parse_payload(body: Value) -> Result<Payload, ApiError> {
    let Value::Object(mut obj) = body else {
        return Err(bad("the body must be a JSON object"));
    };
    if let Some(input_data) = obj.remove("input_data") {
        let Value::Object(mut input) = input_data else {
            return Err(bad("input_data must be an object"));
        };
        let params = parameters(input.remove("parameters"))?;
        let items = match input.remove("input_string") {
            Some(Value::Array(items)) if !items.is_empty() => items,
            Some(Value::Array(_)) => return Err(bad("input_data.input_string must not be empty")),
            Some(_) => return Err(bad("input_data.input_string must be a list")),
            None => return Err(bad("input_data.input_string is missing")),
        };
        if items.iter().all(Value::is_object) {
            let messages =
                serde_json::from_value(Value::Array(items)).map_err(|e| bad(format!("invalid chat message: {e}")))?;
            return Ok(Payload::Chat(messages, params));
        }
        return Ok(Payload::Text(
            strings(Value::Array(items), "input_data.input_string")?,
            params,
        ));
    }
    if let Some(inputs) = obj.remove("inputs") {
        let params = parameters(obj.remove("parameters"))?;
        return Ok(Payload::HuggingFace(strings(inputs, "inputs")?, params));
    }
    Err(bad("unrecognised payload"))
}

/// Generates one whole answer per prompt, all queued together; returns the texts and the summed token counts.
async fn generate_all(
    ready: &Ready,
    rid: &str,
    prompts: Vec<PromptInput>,
    params: &ScoreParameters,
) -> Result<(Vec<String>, TokenCounts), ApiError> {
    let output = generate::OutputControl::default();
    let receivers = generate::start(ready, rid, prompts, &params.sampling(), output).await?;
    let (outs, usage) = generate::collect_all(receivers, ready, 1).await?;
    Ok((outs.into_iter().map(|o| o.text).collect(), usage.token_counts()))
}

async fn score_inner(state: &AppState, rid: &str, body: Value) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    let (body, counts) = match parse_payload(body)? {
        Payload::Chat(messages, params) => {
            let messages = convert_messages(messages).map_err(|e| bad(e.message))?;
            let (mut out, counts) = generate_all(ready, rid, vec![PromptInput::Chat(messages)], &params).await?;
            let output = out.pop().unwrap_or_default();
            (ScoreResponse::Chat(ScoreChatOutput { output }), counts)
        }
        Payload::Text(prompts, params) => {
            let inputs = prompts.into_iter().map(PromptInput::Text).collect();
            let (outs, counts) = generate_all(ready, rid, inputs, &params).await?;
            let items = outs.into_iter().map(|text| ScoreTextOutput { text }).collect();
            (ScoreResponse::Text(items), counts)
        }
        Payload::HuggingFace(prompts, params) => {
            let full = params.return_full_text.unwrap_or(false);
            let inputs = prompts.iter().cloned().map(PromptInput::Text).collect();
            let (outs, counts) = generate_all(ready, rid, inputs, &params).await?;
            let items = prompts
                .iter()
                .zip(outs)
                .map(|(p, t)| GeneratedText {
                    generated_text: if full { format!("{p}{t}") } else { t },
                })
                .collect();
            (ScoreResponse::HuggingFace(items), counts)
        }
    };
    Ok(counts.attach(Json(body).into_response()))
}

/// Runs a scoring call and adds azmlinfsrv's `x-ms-run-function-failed` and `x-ms-run-fn-exec-ms` headers.
async fn run_scoring(state: &AppState, rid: &str, body: Result<Value, ApiError>) -> Response {
    let started = std::time::Instant::now();
    let result = match body {
        Ok(body) => score_inner(state, rid, body).await,
        Err(e) => Err(e),
    };
    let mut resp = result.unwrap_or_else(|e| e.in_dialect(Dialect::AzureMl).into_response());
    let failed = if resp.status().is_server_error() {
        "True"
    } else {
        "False"
    };
    let h = resp.headers_mut();
    h.insert("x-ms-run-function-failed", HeaderValue::from_static(failed));
    h.insert(
        "x-ms-run-fn-exec-ms",
        HeaderValue::from(started.elapsed().as_millis() as u64),
    );
    resp
}

/// `POST /score`.
pub async fn score(State(state): State<AppState>, rid: RequestId, body: Result<ApiJson<Value>, ApiError>) -> Response {
    run_scoring(&state, &rid.0, body.map(|ApiJson(v)| v)).await
}

/// `GET /score?k=v...`: the query parameters become the JSON input, as in azmlinfsrv.
pub async fn score_get(
    State(state): State<AppState>,
    rid: RequestId,
    ApiQuery(params): ApiQuery<serde_json::Map<String, Value>>,
) -> Response {
    run_scoring(&state, &rid.0, Ok(Value::Object(params))).await
}

/// `OPTIONS /score`: 200 (CORS headers come from the CORS layer when `AML_CORS_ORIGINS` is set).
pub async fn score_options() -> StatusCode {
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payload_kinds_are_told_apart() {
        let chat = json!({"input_data": {"input_string": [{"role": "user", "content": "hi"}], "parameters": {"max_new_tokens": 5}}});
        assert!(matches!(parse_payload(chat), Ok(Payload::Chat(m, p)) if m.len() == 1 && p.max_new_tokens == Some(5)));
        let text = json!({"input_data": {"input_string": ["a", "b"]}});
        assert!(matches!(parse_payload(text), Ok(Payload::Text(t, _)) if t.len() == 2));
        let hf = json!({"inputs": "x", "parameters": {"do_sample": false}});
        assert!(matches!(parse_payload(hf), Ok(Payload::HuggingFace(t, _)) if t == ["x"]));
        for b in [
            json!({}),
            json!([1]),
            json!({"input_data": {"input_string": []}}),
            json!({"inputs": 3}),
        ] {
            let e = parse_payload(b).err().expect("rejected");
            assert!(e.message.contains("expected one of"), "{}", e.message);
        }
    }

    #[test]
    fn do_sample_false_is_greedy() {
        let p = ScoreParameters {
            do_sample: Some(false),
            temperature: Some(0.9),
            ..Default::default()
        };
        assert_eq!(p.sampling().temperature, Some(0.0));
        let p = ScoreParameters {
            do_sample: Some(true),
            ..Default::default()
        };
        assert_eq!(p.sampling().temperature, None, "the server default");
    }
}

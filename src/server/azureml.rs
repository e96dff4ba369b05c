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
use serde::de::value::MapAccessDeserializer;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::access::{RequestId, TokenCounts};
use super::error::{ApiError, Dialect};
use super::generate::{self, PromptInput, SamplingInput, StopInput, StopStrings};
use super::json::ApiJson;
use super::openai::{convert_messages, MessageIn};
use super::query::ApiQuery;
use super::types::{
    GeneratedText, ScoreChatOutput, ScoreParameters, ScoreResponse, ScoreTextOutput, MAX_TOKENS, TEMPERATURE,
};
use super::{AppState, Ready};

/// `GET /`: liveness. `200 Healthy` as soon as the process listens, while the model loads and while shutting
/// down; 503 with the reason once only a restart can help (a failed load, a stopped or stalled engine).
pub async fn liveness(State(state): State<AppState>) -> Response {
    match state.broken() {
        None => "Healthy".into_response(),
        Some(why) => ApiError::not_ready(why).in_dialect(Dialect::AzureMl).into_response(),
    }
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
            stop: StopStrings::new(self.stop.clone().map(StopInput::into_vec).unwrap_or_default()),
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

fn parameters(raw: Option<Box<RawValue>>) -> Result<ScoreParameters, ApiError> {
    let Some(raw) = raw else {
        return Ok(ScoreParameters::default());
    };
    let p: Option<ScoreParameters> =
        serde_json::from_str(raw.get()).map_err(|e| bad(format!("invalid parameters: {e}")))?;
    let p = p.unwrap_or_default();
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

/// The top level of a `/score` body. Its parts are kept as raw JSON text and parsed straight into their
/// types, so no JSON tree is built: a tree of many small objects costs tens of times the body's size.
#[derive(Deserialize)]
struct ScoreBody {
    /// The served language model to use (unset: the default), as in `/v1/chat/completions`.
    model: Option<String>,
    input_data: Option<Box<RawValue>>,
    inputs: Option<Box<RawValue>>,
    parameters: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct InputData {
    input_string: Option<Box<RawValue>>,
    parameters: Option<Box<RawValue>>,
}

/// One `input_string` item: a prompt or a chat message (anything else is kept only as "other").
enum ScoreItem {
    Text(String),
    Message(Box<MessageIn>),
    Other,
}

impl<'de> Deserialize<'de> for ScoreItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Item;
        impl<'de> Visitor<'de> for Item {
            type Value = ScoreItem;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a prompt string or a chat message object")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ScoreItem, E> {
                Ok(ScoreItem::Text(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<ScoreItem, E> {
                Ok(ScoreItem::Text(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ScoreItem, A::Error> {
                MessageIn::deserialize(MapAccessDeserializer::new(map)).map(|m| ScoreItem::Message(Box::new(m)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ScoreItem, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ScoreItem::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<ScoreItem, E> {
                Ok(ScoreItem::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<ScoreItem, E> {
                Ok(ScoreItem::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<ScoreItem, E> {
                Ok(ScoreItem::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<ScoreItem, E> {
                Ok(ScoreItem::Other)
            }
            fn visit_unit<E>(self) -> Result<ScoreItem, E> {
                Ok(ScoreItem::Other)
            }
        }
        d.deserialize_any(Item)
    }
}

/// Prompts from `items`: `None` unless every one is a non-empty string.
fn prompts(items: Vec<ScoreItem>) -> Option<Vec<String>> {
    let texts: Vec<String> = items
        .into_iter()
        .map(|i| match i {
            ScoreItem::Text(t) if !t.is_empty() => Some(t),
            _ => None,
        })
        .collect::<Option<_>>()?;
    (!texts.is_empty()).then_some(texts)
}

fn starts_with(raw: &RawValue, c: char) -> bool {
    raw.get().trim_start().starts_with(c)
}

fn strings(raw: &RawValue, what: &str) -> Result<Vec<String>, ApiError> {
    let list = if starts_with(raw, '"') {
        serde_json::from_str::<String>(raw.get())
            .ok()
            .map(|s| vec![ScoreItem::Text(s)])
    } else {
        serde_json::from_str::<Vec<ScoreItem>>(raw.get()).ok()
    };
    list.and_then(prompts).ok_or_else(|| {
        bad(format!(
            "{what} must be a non-empty string or a list of non-empty strings"
        ))
    })
}

/// The payload, and the model it names (`model`, beside `input_data` or `inputs`).
fn parse_payload(body: &RawValue) -> Result<(Option<String>, Payload), ApiError> {
    if !starts_with(body, '{') {
        return Err(bad("the body must be a JSON object"));
    }
    let mut body: ScoreBody = serde_json::from_str(body.get()).map_err(|e| bad(format!("invalid body: {e}")))?;
    let model = body.model.take();
    payload(body).map(|p| (model, p))
}

fn payload(body: ScoreBody) -> Result<Payload, ApiError> {
    if let Some(input_data) = body.input_data {
        // What would be ignored beside input_data is refused, not dropped.
        if body.inputs.is_some() {
            return Err(bad("send either input_data or inputs, not both"));
        }
        if body.parameters.is_some() {
            return Err(bad("with input_data, parameters go inside it (input_data.parameters)"));
        }
        if !starts_with(&input_data, '{') {
            return Err(bad("input_data must be an object"));
        }
        let input: InputData =
            serde_json::from_str(input_data.get()).map_err(|e| bad(format!("invalid input_data: {e}")))?;
        let params = parameters(input.parameters)?;
        let Some(raw) = input.input_string.filter(|r| r.get() != "null") else {
            return Err(bad("input_data.input_string is missing"));
        };
        if !starts_with(&raw, '[') {
            return Err(bad("input_data.input_string must be a list"));
        }
        let items: Vec<ScoreItem> =
            serde_json::from_str(raw.get()).map_err(|e| bad(format!("invalid chat message: {e}")))?;
        if items.is_empty() {
            return Err(bad("input_data.input_string must not be empty"));
        }
        if items.iter().all(|i| matches!(i, ScoreItem::Message(_))) {
            let messages = items
                .into_iter()
                .filter_map(|i| match i {
                    ScoreItem::Message(m) => Some(*m),
                    _ => None,
                })
                .collect();
            return Ok(Payload::Chat(messages, params));
        }
        return prompts(items)
            .map(|p| Payload::Text(p, params))
            .ok_or_else(|| bad("input_data.input_string must be a non-empty string or a list of non-empty strings"));
    }
    if let Some(inputs) = body.inputs {
        let params = parameters(body.parameters)?;
        return Ok(Payload::HuggingFace(strings(&inputs, "inputs")?, params));
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

async fn score_inner(state: &AppState, rid: &str, body: Box<RawValue>) -> Result<Response, ApiError> {
    state.served()?;
    let (model, payload) = parse_payload(&body)?;
    let ready = state.language(model.as_deref())?;
    let (body, counts) = match payload {
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
async fn run_scoring(state: &AppState, rid: &str, body: Result<Box<RawValue>, ApiError>) -> Response {
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
pub async fn score(
    State(state): State<AppState>,
    rid: RequestId,
    body: Result<ApiJson<Box<RawValue>>, ApiError>,
) -> Response {
    run_scoring(&state, &rid.0, body.map(|ApiJson(v)| v)).await
}

/// `GET /score?k=v...`: the query parameters become the JSON input, as in azmlinfsrv.
pub async fn score_get(
    State(state): State<AppState>,
    rid: RequestId,
    ApiQuery(params): ApiQuery<serde_json::Map<String, Value>>,
) -> Response {
    let body = RawValue::from_string(Value::Object(params).to_string()).map_err(ApiError::internal);
    run_scoring(&state, &rid.0, body).await
}

/// `OPTIONS /score`: 200 (CORS headers come from the CORS layer when `AML_CORS_ORIGINS` is set).
pub async fn score_options() -> StatusCode {
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_payload(v: Value) -> Result<Payload, ApiError> {
        super::parse_payload(&RawValue::from_string(v.to_string()).expect("json")).map(|(_, p)| p)
    }

    #[test]
    fn the_model_is_read_beside_either_shape() {
        for body in [
            json!({"model": "b", "input_data": {"input_string": ["a"]}}),
            json!({"model": "b", "inputs": "x"}),
        ] {
            let raw = RawValue::from_string(body.to_string()).expect("json");
            assert_eq!(super::parse_payload(&raw).expect("ok").0.as_deref(), Some("b"));
        }
        let raw = RawValue::from_string(json!({"model": 3, "inputs": "x"}).to_string()).expect("json");
        assert!(super::parse_payload(&raw).is_err());
    }

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
            json!({"input_data": {"input_string": [1, [2], null]}}),
            json!({"input_data": {"input_string": ["a", {"role": "user", "content": "b"}]}}),
            json!({"input_data": {"input_string": [{"role": 3}]}}),
            json!({"input_data": 3}),
            json!({"input_data": {"input_string": ["a"]}, "parameters": {"max_new_tokens": 5}}),
            json!({"input_data": {"input_string": ["a"]}, "inputs": "b"}),
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

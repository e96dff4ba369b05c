//! What the OpenAI and Azure ML routes share between parsing a request and answering it: sampling fields and
//! their validation, prompt preparation off the async runtime, submission to the engine, and collecting a
//! whole answer.

use std::time::{Instant, SystemTime};

use axum::http::StatusCode;
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::sse::Usage;
use super::trace::GenerationTrace;
use super::Ready;
use crate::engine::constraint::Constraint;
use crate::engine::logprobs::Sampled;
pub use crate::engine::text::StopStrings;
use crate::engine::{Completion, Event, FinishReason, GenerateRequest, GenerationParams};
use crate::model::ChatMessage;

pub use super::types::StopInput;
use super::types::{
    GenerationDefaults, FREQUENCY_PENALTY, MAX_STOPS, MAX_STOP_CHARS, MAX_TOKENS, MIN_P, PRESENCE_PENALTY,
    REPETITION_PENALTY, TEMPERATURE, TOP_K, TOP_P,
};

/// Sampling fields as sent, before validation. Both dialects fill this.
#[derive(Debug, Default, Clone)]
pub struct SamplingInput {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop: StopStrings,
    pub ignore_eos: bool,
    /// Validated `logit_bias` entries.
    pub logit_bias: Vec<(u32, f32)>,
    /// Alternatives to report with each token's log-probability (None: no logprobs).
    pub logprobs: Option<usize>,
    /// Name of the max-tokens field in this dialect, for error messages.
    pub max_tokens_name: &'static str,
}

impl SamplingInput {
    /// Validates the fields against the prompt length and the model's context window; a field left out gets
    /// its server default.
    pub fn validate(
        self,
        prompt_tokens: usize,
        context: usize,
        defaults: &GenerationDefaults,
    ) -> Result<GenerationParams, ApiError> {
        let mt = self.max_tokens_name;
        for (range, value) in [
            (TEMPERATURE, self.temperature),
            (TOP_P, self.top_p),
            (MIN_P, self.min_p),
            (PRESENCE_PENALTY, self.presence_penalty),
            (FREQUENCY_PENALTY, self.frequency_penalty),
            (REPETITION_PENALTY, self.repetition_penalty),
            (TOP_K, self.top_k.map(|k| k as f64)),
        ] {
            range.check(value)?;
        }
        if self.stop.len() > MAX_STOPS {
            return Err(ApiError::invalid_param(
                "stop",
                format!("at most {MAX_STOPS} stop strings are accepted; got {}", self.stop.len()),
            ));
        }
        if let Some(long) = self.stop.texts().find(|s| s.chars().count() > MAX_STOP_CHARS) {
            return Err(ApiError::invalid_param(
                "stop",
                format!(
                    "each stop string may have at most {MAX_STOP_CHARS} characters; got one of {}",
                    long.chars().count()
                ),
            ));
        }
        if prompt_tokens >= context {
            return Err(ApiError::bad_request(format!(
                "the prompt has {prompt_tokens} tokens but the model's context window is {context} tokens; shorten the prompt"
            )));
        }
        let room = context - prompt_tokens;
        let max_tokens = match self.max_tokens {
            Some(m) if !MAX_TOKENS.contains(m as f64) => {
                return Err(ApiError::invalid_param(
                    mt,
                    format!("{mt} must be {}; got {m}", MAX_TOKENS.rule()),
                ))
            }
            Some(m) => {
                let m = usize::try_from(m).unwrap_or(usize::MAX);
                if let Some(limit) = defaults.max_tokens_limit.filter(|&l| m > l) {
                    return Err(ApiError::invalid_param(
                        mt,
                        format!("{mt} is {m} but this deployment generates at most {limit} tokens per request (--max-tokens-limit)"),
                    ));
                }
                if m > room {
                    return Err(ApiError::invalid_param(
                        mt,
                        format!(
                            "the prompt has {prompt_tokens} tokens and {mt} is {m}: together more than the model's context window of {context} tokens"
                        ),
                    ));
                }
                m
            }
            None => defaults.max_tokens.min(room),
        };
        Ok(GenerationParams {
            max_tokens,
            temperature: self.temperature.unwrap_or(defaults.temperature) as f32,
            top_p: self.top_p.unwrap_or(defaults.top_p) as f32,
            top_k: self.top_k.map_or(defaults.top_k, |k| k as usize),
            min_p: self.min_p.unwrap_or(defaults.min_p) as f32,
            seed: self.seed.map(|s| s as u64),
            repetition_penalty: self.repetition_penalty.unwrap_or(defaults.repetition_penalty) as f32,
            presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
            stop: self.stop,
            ignore_eos: self.ignore_eos,
            logit_bias: self.logit_bias,
            logprobs: self.logprobs,
        })
    }
}

/// The prompt of a request, before tokenization.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// Renders and tokenizes a prompt on the blocking pool (templates and long prompts take real CPU time). A
/// prompt that surely has more tokens than the context window is refused before it is encoded whole.
pub async fn tokenize(ready: &Ready, prompt: PromptInput) -> Result<Vec<u32>, ApiError> {
    let model = ready.model.clone();
    let content = ready.content_tokens;
    let context = model.config.context_length;
    let too_long = move || {
        ApiError::bad_request(format!(
            "the prompt has more tokens than the model's context window of {context} tokens; shorten the prompt"
        ))
    };
    let ids = tokio::task::spawn_blocking(move || {
        let (text, chat) = match prompt {
            PromptInput::Chat(messages) => (model.render_chat(&messages, true, content)?, true),
            PromptInput::Text(text) => (text, false),
        };
        if model.tokenizer.surely_exceeds(&text, context)? {
            return Ok(None);
        }
        if chat {
            model.encode_chat(&text, content).map(Some)
        } else {
            model.tokenizer.encode_prompt(&text).map(Some)
        }
    })
    .await
    .map_err(ApiError::internal)?;
    let ids = ids
        .map_err(|e| ApiError::bad_request(format!("cannot prepare the prompt: {e}")))?
        .ok_or_else(too_long)?;
    if ids.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    Ok(ids)
}

/// One prepared generation: tokenized prompt and validated parameters.
struct Prepared {
    prompt: Vec<u32>,
    params: GenerationParams,
}

/// Tokenizes and validates one prompt.
async fn prepare(ready: &Ready, prompt: PromptInput, sampling: SamplingInput) -> Result<Prepared, ApiError> {
    let ids = tokenize(ready, prompt).await?;
    let params = sampling.validate(ids.len(), ready.model.config.context_length, &ready.generation)?;
    Ok(Prepared { prompt: ids, params })
}

/// What a request asks of its output besides sampling.
#[derive(Default)]
pub struct OutputControl {
    /// Choices per prompt (at least 1).
    pub n: usize,
    /// The grammar every choice follows, in its start state (forked per prompt).
    pub constraint: Option<Box<dyn Constraint>>,
}

/// Starts `output.n` generations per prompt. Backpressure comes before work: places in the waiting queue are
/// taken for every prompt first (or the request is refused with 429 before anything is rendered or
/// tokenized); then all prompts are prepared, and only when every one is valid are they queued, with the
/// server's request timeout as their deadline. Receivers come back in prompt order, each prompt's choices
/// together (choice index = prompt index * n + choice).
pub async fn start(
    ready: &Ready,
    request_id: &str,
    prompts: Vec<PromptInput>,
    sampling: &SamplingInput,
    output: OutputControl,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    let deadline = Some(Instant::now() + ready.request_timeout);
    let max_waiting = ready.engine.config().max_waiting;
    if prompts.len() > max_waiting {
        return Err(ApiError::invalid_param(
            "prompt",
            format!(
                "the request has {} prompts but at most {max_waiting} can wait at once (--max-waiting); send fewer per request",
                prompts.len()
            ),
        ));
    }
    let slots = ready.engine.reserve(prompts.len())?;
    let mut prepared = Vec::with_capacity(prompts.len());
    for p in prompts {
        prepared.push(prepare(ready, p, sampling.clone()).await?);
    }
    let mut receivers = Vec::new();
    for (slot, p) in slots.into_iter().zip(prepared) {
        let req = GenerateRequest {
            n: output.n.max(1),
            constraint: output.constraint.as_ref().map(|c| c.fork()),
            ..GenerateRequest::new(request_id, p.prompt, p.params, deadline)
        };
        receivers.extend(slot.submit_choices(req)?);
    }
    Ok(receivers)
}

/// A whole answer.
#[derive(Debug)]
pub struct Collected {
    pub text: String,
    /// The sampled tokens with their log-probabilities (with `logprobs` only).
    pub tokens: Vec<Sampled>,
    pub done: Completion,
    /// When the completion was received (for the request's trace).
    pub finished_at: SystemTime,
}

/// Waits for a request to finish and returns its full text. A timeout becomes 504.
pub async fn collect(mut rx: UnboundedReceiver<Event>, ready: &Ready) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(t) => tokens.push(t),
            Event::Text(t) => text.push_str(&t),
            Event::Done(done) if done.reason == FinishReason::Timeout => {
                return Err(timeout_error(ready.request_timeout))
            }
            Event::Done(done) => {
                let finished_at = SystemTime::now();
                return Ok(Collected {
                    text,
                    tokens,
                    done,
                    finished_at,
                });
            }
            Event::Error(msg) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg)),
            Event::Refused(msg) => return Err(ApiError::bad_request(msg)),
        }
    }
    Err(ApiError::not_ready(
        "the inference engine stopped before the request finished",
    ))
}

/// Waits for every answer (together) and returns them in order, with their summed token counts (each
/// prompt's counted once for its `choices_per_prompt` choices), recorded on the request's trace.
pub async fn collect_all(
    receivers: Vec<UnboundedReceiver<Event>>,
    ready: &Ready,
    choices_per_prompt: usize,
) -> Result<(Vec<Collected>, Usage), ApiError> {
    let outs = futures::future::join_all(receivers.into_iter().map(|rx| collect(rx, ready))).await;
    let mut usage = Usage::default();
    let mut trace = GenerationTrace::current(ready);
    let mut collected = Vec::with_capacity(outs.len());
    for (i, out) in outs.into_iter().enumerate() {
        let out = out?;
        usage.add(&out.done, i.is_multiple_of(choices_per_prompt.max(1)));
        trace.choice_done(&out.done, out.finished_at);
        collected.push(out);
    }
    trace.finish(&usage);
    Ok((collected, usage))
}

/// The error for a request that ran past `--request-timeout-ms`.
pub fn timeout_error(timeout: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "request timed out after {} ms (--request-timeout-ms / SCORING_TIMEOUT_MS)",
            timeout.as_millis()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max(max_tokens: usize) -> GenerationDefaults {
        GenerationDefaults {
            max_tokens,
            ..GenerationDefaults::DEFAULT
        }
    }

    #[test]
    fn left_out_fields_get_the_defaults_and_sent_ones_win() {
        let d = GenerationDefaults::DEFAULT;
        let p = input().validate(1, 100, &d).expect("valid");
        assert_eq!((p.top_k, p.top_p, p.min_p, p.temperature), (40, 0.95, 0.05, 1.0));
        let p = SamplingInput {
            top_k: Some(0),
            top_p: Some(1.0),
            min_p: Some(0.0),
            temperature: Some(0.0),
            ..input()
        }
        .validate(1, 100, &d)
        .expect("valid");
        assert_eq!((p.top_k, p.top_p, p.min_p, p.temperature), (0, 1.0, 0.0, 0.0));
    }

    fn input() -> SamplingInput {
        SamplingInput {
            max_tokens_name: "max_tokens",
            ..Default::default()
        }
    }

    #[test]
    fn context_overflow_names_both_numbers() {
        let err = SamplingInput {
            max_tokens: Some(100),
            ..input()
        }
        .validate(50, 120, &max(16))
        .expect_err("too long");
        assert!(
            err.message.contains("50") && err.message.contains("100") && err.message.contains("120"),
            "{}",
            err.message
        );
        let err = input().validate(120, 120, &max(16)).expect_err("prompt fills context");
        assert!(err.message.contains("120 tokens"), "{}", err.message);
    }

    #[test]
    fn max_tokens_over_the_limit_is_refused_naming_field_and_limit() {
        let limited = GenerationDefaults {
            max_tokens_limit: Some(64),
            ..max(64)
        };
        for name in ["max_tokens", "max_completion_tokens", "max_new_tokens"] {
            let err = SamplingInput {
                max_tokens: Some(65),
                max_tokens_name: name,
                ..input()
            }
            .validate(1, 1000, &limited)
            .expect_err("over the limit");
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.param.as_deref(), Some(name));
            assert!(
                err.message.contains("65") && err.message.contains("at most 64"),
                "{}",
                err.message
            );
        }
        let at_limit = SamplingInput {
            max_tokens: Some(64),
            ..input()
        };
        assert_eq!(
            at_limit.validate(1, 1000, &limited).expect("at the limit").max_tokens,
            64
        );
    }

    #[test]
    fn default_max_tokens_fits_the_room_left() {
        assert_eq!(input().validate(100, 120, &max(512)).expect("valid").max_tokens, 20);
    }

    #[test]
    fn out_of_range_fields_are_rejected() {
        for bad in [
            SamplingInput {
                temperature: Some(2.5),
                ..input()
            },
            SamplingInput {
                temperature: Some(-0.1),
                ..input()
            },
            SamplingInput {
                top_p: Some(0.0),
                ..input()
            },
            SamplingInput {
                top_k: Some(-1),
                ..input()
            },
            SamplingInput {
                max_tokens: Some(0),
                ..input()
            },
        ] {
            assert_eq!(
                bad.validate(1, 100, &max(10)).expect_err("invalid").status,
                StatusCode::BAD_REQUEST
            );
        }
    }
}

//! What a request asks of generation: sampling settings and stop conditions, already validated.

use super::text::StopStrings;

/// Validated generation settings for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// Seed for the sampler; the same seed and request give the same output.
    pub seed: Option<u64>,
    /// Multiplicative penalty (HF / llama.cpp style) on tokens seen in the prompt or output; 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty on tokens already generated; 0 disables.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, scaled by how often a token was generated; 0 disables.
    pub frequency_penalty: f32,
    /// Strings that end generation; they are not part of the output.
    pub stop: StopStrings,
    /// Keep generating past the end-of-sequence token (benchmarks).
    pub ignore_eos: bool,
    /// Added to the logits of these token ids before sampling (OpenAI `logit_bias`, each in [-100, 100]).
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each sampled token's log-probability and this many most likely alternatives (None: off).
    pub logprobs: Option<usize>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            stop: StopStrings::default(),
            ignore_eos: false,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

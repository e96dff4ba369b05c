//! A deterministic stand-in backend for the scheduler's unit tests (no model, no candle).
//!
//! Its cache is the list of tokens it was fed, so a test can see exactly what each sequence's "model" saw.
//! The next token is a hash of that whole list: a chunking, cache-reuse or batching bug that feeds a sequence
//! anything but its own tokens in order changes its output. Id 0 is the end-of-sequence token and is never
//! produced unless a test asks for it. Every step's batch is recorded, and a step can be made to fail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::backend::{Backend, BatchEntry, Detokenizer, KvCache, Logits, StepError};
use crate::model::ModelError;

/// Bytes the stub says one cached token costs.
pub const BYTES_PER_TOKEN: usize = 1000;
/// The stub's vocabulary size.
pub const VOCAB: usize = 50;
/// The stub's end-of-sequence id.
pub const EOS: u32 = 0;

/// What one sequence contributed to a recorded step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Position of its first token.
    pub start: usize,
    /// Tokens it contributed.
    pub len: usize,
    pub want_logits: bool,
    /// Whether the scheduler let its row come back as the row's argmax.
    pub argmax_only: bool,
}

/// A stub sequence cache: the tokens fed so far.
#[derive(Debug, Clone)]
pub struct StubKv {
    pub tokens: Vec<u32>,
    max_len: usize,
}

impl KvCache for StubKv {
    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn stored_bytes(&self) -> usize {
        self.tokens.len() * BYTES_PER_TOKEN
    }

    fn shrink_to_len(&mut self) {
        self.max_len = self.tokens.len();
    }

    fn fork(&self) -> Self {
        self.clone()
    }

    fn copy_prefix(&mut self, from: &Self, n: usize) -> bool {
        if n > self.max_len || n > from.tokens.len() {
            return false;
        }
        self.tokens = from.tokens[..n].to_vec();
        true
    }
}

/// The token the stub predicts after `history` (never [`EOS`]).
pub fn next_token(history: &[u32]) -> u32 {
    let h = history
        .iter()
        .fold(17u64, |h, &t| h.wrapping_mul(31).wrapping_add(u64::from(t) + 1));
    1 + (h % (VOCAB as u64 - 1)) as u32
}

/// The tokens a greedy sequence generates after `prompt`, `n` of them.
pub fn expected(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut all = prompt.to_vec();
    for _ in 0..n {
        all.push(next_token(&all));
    }
    all.split_off(prompt.len())
}

/// The stub backend; clones share the step log and the failure switch.
#[derive(Clone, Default)]
pub struct StubBackend {
    pub steps: Arc<Mutex<Vec<Vec<Part>>>>,
    pub fail_next: Arc<AtomicBool>,
    /// Sequences whose history has this length get [`EOS`] next.
    pub eos_at_len: Option<usize>,
}

impl StubBackend {
    /// The recorded steps so far.
    pub fn log(&self) -> Vec<Vec<Part>> {
        self.steps.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Backend for StubBackend {
    type Kv = StubKv;

    fn kv_bytes_per_token(&self) -> usize {
        BYTES_PER_TOKEN
    }

    fn new_kv(&self, _initial: usize, max_len: usize) -> StubKv {
        StubKv {
            tokens: Vec::new(),
            max_len,
        }
    }

    fn step(&self, batch: &mut [BatchEntry<'_, StubKv>], logits: &mut Logits) -> Result<(), StepError> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(StepError("stub step failure".into()));
        }
        let mut parts = Vec::new();
        let mut rows = Vec::new();
        for e in batch.iter_mut() {
            if e.tokens.is_empty() || e.kv.tokens.len() + e.tokens.len() > e.kv.max_len {
                return Err(StepError("chunk empty or past the reserved length".into()));
            }
            parts.push(Part {
                start: e.kv.tokens.len(),
                len: e.tokens.len(),
                want_logits: e.want_logits,
                argmax_only: e.argmax_only,
            });
            e.kv.tokens.extend_from_slice(e.tokens);
            if e.want_logits {
                let next = match self.eos_at_len {
                    Some(n) if e.kv.tokens.len() == n => EOS,
                    _ => next_token(&e.kv.tokens),
                };
                rows.push(next);
            }
        }
        if let Ok(mut steps) = self.steps.lock() {
            steps.push(parts);
        }
        // As the device backend: only the indices when every wanted row takes its argmax.
        if super::backend::argmax_suffices(batch) {
            logits.reset_argmax(rows.len()).copy_from_slice(&rows);
            return Ok(());
        }
        logits.reset(rows.len(), VOCAB).fill(0.0);
        for (row, next) in logits.rows_mut().zip(rows) {
            row[next as usize] = 1.0;
        }
        Ok(())
    }
}

/// Text for stub ids: id `i` is the letter `'a' + i % 26`; [`EOS`] has no text.
pub struct StubText;

impl Detokenizer for StubText {
    fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        Ok(ids
            .iter()
            .filter(|&&i| i != EOS)
            .map(|&i| char::from(b'a' + (i % 26) as u8))
            .collect())
    }

    fn is_stop(&self, id: u32) -> bool {
        id == EOS
    }
}

/// The text the stub's tokens read as.
pub fn text_of(ids: &[u32]) -> String {
    StubText.decode(ids).unwrap_or_default()
}

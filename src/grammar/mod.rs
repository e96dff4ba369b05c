//! Constrained decoding: compiles a request's output constraint (JSON schema, regex, choice, Lark grammar)
//! with llguidance against the model's tokenizer, and starts one [`Constraint`] per sequence from it.
//!
//! One [`Grammars`] per model, shared by the HTTP handlers: [`Grammars::compile`] validates a spec (its
//! [`GrammarError`] is a message for an HTTP 400) and keeps the compiled grammar in a bounded LRU cache, so a
//! schema sent with every request is compiled once; [`Compiled::start`] gives the engine a fresh matcher.
//!
//! JSON output is compact (`,` and `:` separators, no free whitespace), so a small model cannot loop on
//! spaces. llguidance's parser limits (lexer fuel at compile time and per mask, Earley items per mask, grammar
//! size) stay at their defaults: a pathological spec fails to compile, or its request fails, rather than hang.

mod cache;
mod env;
mod matcher;
mod spec;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llguidance::{Matcher, ParserFactory};

use crate::engine::constraint::Constraint;
use crate::model::TextTokenizer;
use cache::Lru;
pub use matcher::GrammarConstraint;
pub use spec::GrammarSpec;

/// Longest compile error message passed on to the client.
const MAX_ERROR_CHARS: usize = 1000;

/// Why a spec cannot be used; the message is meant for the client (HTTP 400), except [`GrammarError::Setup`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GrammarError {
    #[error("invalid JSON schema: {0}")]
    JsonSchema(String),
    #[error("invalid regex: {0}")]
    Regex(String),
    #[error("invalid choice: {0}")]
    Choice(String),
    #[error("invalid grammar: {0}")]
    Lark(String),
    /// The tokenizer could not be turned into llguidance's token trie (a server problem, at startup).
    #[error("constrained decoding is unavailable for this tokenizer: {0}")]
    Setup(String),
}

impl GrammarError {
    fn for_spec(spec: &GrammarSpec, message: impl std::fmt::Display) -> Self {
        let mut m = clean_message(&message.to_string());
        if let Some((cut, _)) = m.char_indices().nth(MAX_ERROR_CHARS) {
            m.truncate(cut);
            m.push_str("...");
        }
        match spec {
            GrammarSpec::JsonObject | GrammarSpec::JsonSchema { .. } => Self::JsonSchema(m),
            GrammarSpec::Regex(_) => Self::Regex(m),
            GrammarSpec::Choice(_) => Self::Choice(m),
            GrammarSpec::Lark(_) => Self::Lark(m),
        }
    }
}

/// An llguidance message without its `<non-verbose/>` marker (left where the parser state would be).
pub(crate) fn clean_message(m: &str) -> String {
    m.replace("<non-verbose/>", "").trim().to_string()
}

/// How one [`Grammars::compile_traced`] call went, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompileInfo {
    /// Whether the compilation came from the cache.
    pub cached: bool,
    /// Seconds spent (the lookup alone when cached).
    pub seconds: f64,
}

/// A compiled grammar: a matcher in its start state, its first mask already computed.
pub struct Compiled {
    matcher: Matcher,
    stop_ids: Arc<[u32]>,
    vocab: usize,
    compile_seconds: f64,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("compile_seconds", &self.compile_seconds)
            .finish_non_exhaustive()
    }
}

impl Compiled {
    /// A new constraint in the grammar's start state, independent of every other.
    pub fn start(&self) -> Result<Box<dyn Constraint>, GrammarError> {
        Ok(Box::new(GrammarConstraint::new(
            self.matcher.clone(),
            self.stop_ids.clone(),
            self.vocab,
        )))
    }

    /// Seconds the compilation took.
    pub fn compile_seconds(&self) -> f64 {
        self.compile_seconds
    }
}

/// One model's grammar compiler and cache. Send + Sync: share it with an `Arc`.
pub struct Grammars {
    factory: ParserFactory,
    stop_ids: Arc<[u32]>,
    vocab: usize,
    cache: Mutex<Lru<Compiled>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.vocab)
            .field("cached", &self.cached())
            .finish_non_exhaustive()
    }
}

impl Grammars {
    /// Builds llguidance's token trie from `tokenizer` (a second or so for a 49k vocabulary) and an empty cache
    /// of at most `cache_capacity` compiled grammars (0 disables caching).
    pub fn new(tokenizer: &TextTokenizer, cache_capacity: usize) -> Result<Self, GrammarError> {
        let env = env::TokenEnv::new(tokenizer).map_err(GrammarError::Setup)?;
        let stop_ids: Arc<[u32]> = toktrie::TokenizerEnv::tok_trie(&env).eos_tokens().into();
        let vocab = tokenizer.vocab_size();
        let tok_env: toktrie::TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new_simple(&tok_env).map_err(|e| GrammarError::Setup(e.to_string()))?;
        factory.quiet();
        // Errors go to clients: without the parser state and the whole grammar in them.
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory,
            stop_ids,
            vocab,
            cache: Mutex::new(Lru::new(cache_capacity)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// Compiles `spec`, or returns its cached compilation.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Arc<Compiled>, GrammarError> {
        self.compile_traced(spec).map(|(c, _)| c)
    }

    /// [`Self::compile`], also saying whether it was cached and how long it took. Errors are not cached.
    pub fn compile_traced(&self, spec: &GrammarSpec) -> Result<(Arc<Compiled>, CompileInfo), GrammarError> {
        let t0 = Instant::now();
        let key = spec.cache_key();
        if let Some(c) = self.lock().get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            let info = CompileInfo {
                cached: true,
                seconds: t0.elapsed().as_secs_f64(),
            };
            return Ok((c, info));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Outside the lock: a slow compile does not hold up other requests' lookups.
        let matcher = self.build(spec)?;
        let seconds = t0.elapsed().as_secs_f64();
        let compiled = Arc::new(Compiled {
            matcher,
            stop_ids: self.stop_ids.clone(),
            vocab: self.vocab,
            compile_seconds: seconds,
        });
        self.lock().insert(key, compiled.clone());
        Ok((compiled, CompileInfo { cached: false, seconds }))
    }

    /// How many compiled grammars the cache holds.
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    /// Cache hits and misses since start.
    pub fn cache_counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru<Compiled>> {
        // The cache holds no invariant a panic could break mid-way: take it back.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Compiles `spec` into a started matcher and computes its first mask (which the clones inherit, and
    /// which finds a grammar that can produce nothing).
    fn build(&self, spec: &GrammarSpec) -> Result<Matcher, GrammarError> {
        let grammar = spec.to_llguidance()?;
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.factory.create_parser(grammar)))
            .map_err(|_| GrammarError::for_spec(spec, "the grammar compiler failed on this input"))?
            .map_err(|e| GrammarError::for_spec(spec, e))?;
        let mut matcher = Matcher::new(Ok(parser));
        for w in matcher.grammar_warnings() {
            tracing::debug!(kind = spec.kind(), warning = %w, "grammar warning");
        }
        matcher.compute_mask().map_err(|e| GrammarError::for_spec(spec, e))?;
        Ok(matcher)
    }
}

#[cfg(test)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Grammars>();
    is::<Compiled>();
}

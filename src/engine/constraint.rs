//! A per-sequence limit on which tokens may come next: the engine's side of constrained decoding.
//!
//! A [`Constraint`] (a compiled grammar's matcher, see `crate::grammar`) says which tokens are allowed before
//! each sample and is told which one was chosen. The scheduler computes the masks of a step's constrained
//! sequences on a second thread while the forward runs, so the batch does not wait for them; the sampler then
//! only sees allowed tokens. End of sequence is allowed only where the grammar accepts.

/// The set of allowed next tokens, one bit per vocabulary id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    bits: Vec<u32>,
    vocab: usize,
}

impl TokenMask {
    /// A mask of `vocab` ids, all disallowed.
    pub fn none(vocab: usize) -> Self {
        Self {
            bits: vec![0; vocab.div_ceil(32)],
            vocab,
        }
    }

    /// A mask over `vocab` ids from 32-bit words (bit `i % 32` of word `i / 32` allows id `i`); missing words
    /// disallow, extra bits beyond `vocab` are ignored.
    pub fn from_words(mut bits: Vec<u32>, vocab: usize) -> Self {
        bits.resize(vocab.div_ceil(32), 0);
        Self { bits, vocab }
    }

    /// Allows `id` (ignored beyond the vocabulary).
    pub fn allow(&mut self, id: u32) {
        if (id as usize) < self.vocab {
            self.bits[id as usize / 32] |= 1 << (id % 32);
        }
    }

    /// Whether `id` is allowed.
    pub fn allows(&self, id: u32) -> bool {
        (id as usize) < self.vocab && self.bits[id as usize / 32] & (1 << (id % 32)) != 0
    }

    /// How many ids are allowed.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Sets every disallowed logit to minus infinity.
    pub fn apply(&self, logits: &mut [f32]) {
        for (i, l) in logits.iter_mut().enumerate() {
            if !self.allows(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// A failure of the constraint itself (a grammar bug or a token it did not expect); the request ends with an
/// error, the batch goes on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("constrained decoding failed: {0}")]
pub struct ConstraintError(pub String);

/// One sequence's grammar state.
pub trait Constraint: Send {
    /// The tokens allowed next. Stop tokens are allowed only where the grammar may end. An empty mask means
    /// the grammar is complete (see [`Constraint::is_finished`]).
    fn mask(&mut self) -> Result<TokenMask, ConstraintError>;
    /// Advances past the sampled `token` (never called with a stop token).
    fn commit(&mut self, token: u32) -> Result<(), ConstraintError>;
    /// Whether the grammar is complete and allows nothing more: generation ends with finish reason `stop`.
    fn is_finished(&self) -> bool;
    /// An independent copy in the same state (for the choices of an `n > 1` request).
    fn fork(&self) -> Box<dyn Constraint>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_allows_only_what_was_allowed() {
        let mut m = TokenMask::none(40);
        m.allow(3);
        m.allow(33);
        m.allow(99);
        assert!(m.allows(3) && m.allows(33) && !m.allows(4) && !m.allows(99));
        assert_eq!(m.count(), 2);
        let mut logits = vec![1.0; 40];
        m.apply(&mut logits);
        assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 2);
        let w = TokenMask::from_words(vec![u32::MAX], 40);
        assert_eq!(w.count(), 32);
    }
}

//! One sequence's grammar state: an llguidance [`Matcher`] behind the engine's [`Constraint`] trait.

use llguidance::Matcher;

use crate::engine::constraint::{Constraint, ConstraintError, TokenMask};

/// A [`Constraint`] driven by an llguidance matcher.
///
/// Where the grammar may end, the mask allows every stop id of the model (llguidance knows them all as its
/// end-of-sequence tokens) and no stop id anywhere else. Once the grammar is complete and allows nothing
/// more, [`Constraint::is_finished`] is true and the mask holds only the stop ids.
pub struct GrammarConstraint {
    matcher: Matcher,
    stop_ids: std::sync::Arc<[u32]>,
    vocab: usize,
}

impl GrammarConstraint {
    pub(crate) fn new(matcher: Matcher, stop_ids: std::sync::Arc<[u32]>, vocab: usize) -> Self {
        Self {
            matcher,
            stop_ids,
            vocab,
        }
    }

    fn error(&self, e: impl std::fmt::Display) -> ConstraintError {
        ConstraintError(super::clean_message(
            &self.matcher.get_error().unwrap_or_else(|| e.to_string()),
        ))
    }
}

impl Constraint for GrammarConstraint {
    fn mask(&mut self) -> Result<TokenMask, ConstraintError> {
        let vob = self.matcher.compute_mask_or_eos().map_err(|e| self.error(e))?;
        let mut mask = TokenMask::from_words(vob.as_slice().to_vec(), self.vocab);
        // llguidance may add only its first EOS id in some lexer states; ending is ending, whichever stop id.
        if self.stop_ids.iter().any(|&s| mask.allows(s)) {
            for &s in self.stop_ids.iter() {
                mask.allow(s);
            }
        }
        Ok(mask)
    }

    fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.matcher.consume_token(token).map_err(|e| self.error(e))
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }

    fn fork(&self) -> Box<dyn Constraint> {
        // A clone has its own parser state; the lexer's lazily built automaton stays shared (a cache).
        Box::new(Self {
            matcher: self.matcher.clone(),
            stop_ids: self.stop_ids.clone(),
            vocab: self.vocab,
        })
    }
}

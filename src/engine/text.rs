//! The text side of a generating sequence: incremental, UTF-8-safe detokenization and stop strings.
//!
//! Tokens are decoded in a sliding window (the ids since the last emitted boundary), so a character split
//! across byte-level tokens is held back until it is complete. Text that could be the start of a stop string
//! is held back too, so a stop string is never emitted, even when it arrives split across tokens.

use super::backend::Detokenizer;
use crate::model::ModelError;

/// Incremental decoder over one sequence's generated ids.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Text that `ids` (all generated ids so far, the newest last) adds, once it forms whole characters.
    pub fn next(&mut self, tok: &dyn Detokenizer, ids: &[u32]) -> Result<String, ModelError> {
        let prefix = tok.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&ids[self.prefix_offset..])?;
        if full.ends_with('\u{FFFD}') || full.len() <= prefix.len() {
            return Ok(String::new());
        }
        let Some(delta) = full.get(prefix.len()..) else {
            return Ok(String::new());
        };
        let delta = delta.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = ids.len();
        Ok(delta)
    }

    /// Whatever is still held back at the end of generation (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self, tok: &dyn Detokenizer, ids: &[u32]) -> Result<String, ModelError> {
        let prefix = tok.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&ids[self.prefix_offset..])?;
        self.prefix_offset = ids.len();
        self.read_offset = ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// What a piece of new text did to the output.
#[derive(Debug, PartialEq, Eq)]
pub enum StopScan {
    /// Text safe to emit now (possibly empty); generation goes on.
    Emit(String),
    /// A stop string was found: emit this text (what preceded it) and finish.
    Stopped(String),
}

/// Holds back text that may turn into a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// A matcher for the same stop strings with nothing held back.
    pub fn fresh(&self) -> Self {
        Self {
            stops: self.stops.clone(),
            pending: String::new(),
        }
    }

    /// Adds new text.
    pub fn push(&mut self, text: &str) -> StopScan {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return StopScan::Emit(std::mem::take(&mut self.pending));
        }
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.pending.truncate(at);
            return StopScan::Stopped(std::mem::take(&mut self.pending));
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let rest = self.pending.split_off(hold);
        StopScan::Emit(std::mem::replace(&mut self.pending, rest))
    }

    /// Text held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_split_across_pieces_is_never_emitted() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("abc E"), StopScan::Emit("abc ".into()));
        assert_eq!(m.push("N"), StopScan::Emit(String::new()));
        assert_eq!(m.push("Dxyz"), StopScan::Stopped(String::new()));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("EN"), StopScan::Emit(String::new()));
        assert_eq!(m.push("x"), StopScan::Emit("ENx".into()));
        assert_eq!(m.push("E"), StopScan::Emit(String::new()));
        assert_eq!(m.flush(), "E");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(&["b".to_string(), "a".to_string()]);
        assert_eq!(m.push("xxab"), StopScan::Stopped("xx".into()));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let mut m = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(m.push("caf"), StopScan::Emit("caf".into()));
        assert_eq!(m.push("é"), StopScan::Emit(String::new()));
        assert_eq!(m.push("?"), StopScan::Emit("é?".into()));
    }
}

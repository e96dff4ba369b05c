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

/// One stop string with its KMP failure table (`fail[i]`: the length of the longest proper prefix of
/// `text[..=i]` that is also its suffix).
#[derive(Debug)]
struct Stop {
    text: String,
    fail: Vec<usize>,
}

impl Stop {
    fn new(text: String) -> Self {
        let b = text.as_bytes();
        let mut fail = vec![0; b.len()];
        let mut k = 0;
        for i in 1..b.len() {
            while k > 0 && b[i] != b[k] {
                k = fail[k - 1];
            }
            if b[i] == b[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Self { text, fail }
    }

    /// The matched-prefix length after reading `byte` with `k` bytes matched.
    fn advance(&self, mut k: usize, byte: u8) -> usize {
        let b = self.text.as_bytes();
        if k == b.len() {
            k = self.fail[k - 1];
        }
        while k > 0 && b[k] != byte {
            k = self.fail[k - 1];
        }
        if b[k] == byte {
            k + 1
        } else {
            0
        }
    }
}

/// A request's stop strings, shared (not copied) by all its prompts and choices.
#[derive(Debug, Clone, Default)]
pub struct StopStrings(std::sync::Arc<[Stop]>);

impl StopStrings {
    /// Empty strings are ignored.
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self(stops.into_iter().filter(|s| !s.is_empty()).map(Stop::new).collect())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stop strings.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|s| s.text.as_str())
    }
}

impl PartialEq for StopStrings {
    fn eq(&self, other: &Self) -> bool {
        self.0.iter().map(|s| &s.text).eq(other.0.iter().map(|s| &s.text))
    }
}

/// Holds back text that may turn into a stop string. Matching is incremental (KMP per stop string): each new
/// byte costs O(1) amortized per stop, however long the stops and the output are, and at most the longest
/// stop's length is held back.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: StopStrings,
    /// Per stop: how many of its bytes the end of the text matches.
    matched: Vec<usize>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &StopStrings) -> Self {
        Self {
            matched: vec![0; stops.len()],
            stops: stops.clone(),
            pending: String::new(),
        }
    }

    /// A matcher for the same stop strings with nothing held back.
    pub fn fresh(&self) -> Self {
        Self::new(&self.stops)
    }

    /// Adds new text.
    pub fn push(&mut self, text: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan::Emit(text.to_string());
        }
        let base = self.pending.len();
        self.pending.push_str(text);
        for (i, &byte) in text.as_bytes().iter().enumerate() {
            // The first stop to complete ends the text; of those completing at once, the longest (earliest).
            let mut done: Option<usize> = None;
            for (k, stop) in self.matched.iter_mut().zip(self.stops.0.iter()) {
                *k = stop.advance(*k, byte);
                if *k == stop.text.len() {
                    done = Some(done.map_or(*k, |d: usize| d.max(*k)));
                }
            }
            if let Some(len) = done {
                let end = base + i + 1;
                self.pending.truncate(end - len);
                return StopScan::Stopped(std::mem::take(&mut self.pending));
            }
        }
        // Hold back the longest suffix that is a prefix of some stop: it starts on a char boundary, as a stop's
        // first byte is.
        let hold = self.matched.iter().copied().max().unwrap_or(0).min(self.pending.len());
        let rest = self.pending.split_off(self.pending.len() - hold);
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

    fn stops(s: &[&str]) -> StopStrings {
        StopStrings::new(s.iter().map(|s| s.to_string()))
    }

    #[test]
    fn stop_split_across_pieces_is_never_emitted() {
        let mut m = StopMatcher::new(&stops(&["END"]));
        assert_eq!(m.push("abc E"), StopScan::Emit("abc ".into()));
        assert_eq!(m.push("N"), StopScan::Emit(String::new()));
        assert_eq!(m.push("Dxyz"), StopScan::Stopped(String::new()));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(&stops(&["END"]));
        assert_eq!(m.push("EN"), StopScan::Emit(String::new()));
        assert_eq!(m.push("x"), StopScan::Emit("ENx".into()));
        assert_eq!(m.push("E"), StopScan::Emit(String::new()));
        assert_eq!(m.flush(), "E");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(&stops(&["b", "a"]));
        assert_eq!(m.push("xxab"), StopScan::Stopped("xx".into()));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let mut m = StopMatcher::new(&stops(&["é!"]));
        assert_eq!(m.push("caf"), StopScan::Emit("caf".into()));
        assert_eq!(m.push("é"), StopScan::Emit(String::new()));
        assert_eq!(m.push("?"), StopScan::Emit("é?".into()));
    }

    #[test]
    fn the_first_stop_to_complete_ends_the_text() {
        let mut m = StopMatcher::new(&stops(&["abcd", "bc"]));
        assert_eq!(m.push("abcd"), StopScan::Stopped("a".into()));
    }

    /// Against a plain search over the whole text, on random texts and stops over a two-letter alphabet (the
    /// worst case for prefix overlaps), pushed in random pieces.
    #[test]
    fn incremental_matching_equals_searching_the_whole_text() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        fn word(next: &mut impl FnMut(u64) -> u64, len: u64) -> String {
            (0..len).map(|_| if next(2) == 0 { 'a' } else { 'b' }).collect()
        }
        for _ in 0..2000 {
            let stops = 1 + next(3);
            let stop_list: Vec<String> = (0..stops)
                .map(|_| {
                    let len = 1 + next(5);
                    word(&mut next, len)
                })
                .collect();
            let len = next(40);
            let text = word(&mut next, len);
            // The earliest end of any stop, and of those, the earliest start.
            let expect = (1..=text.len())
                .find_map(|end| {
                    stop_list
                        .iter()
                        .filter(|s| text[..end].ends_with(s.as_str()))
                        .map(|s| end - s.len())
                        .min()
                })
                .map_or(text.clone(), |start| text[..start].to_string());
            let mut m = StopMatcher::new(&StopStrings::new(stop_list.clone()));
            let mut out = String::new();
            let mut rest = text.as_str();
            let mut stopped = false;
            while !rest.is_empty() && !stopped {
                let cut = (1 + next(4) as usize).min(rest.len());
                match m.push(&rest[..cut]) {
                    StopScan::Emit(t) => out.push_str(&t),
                    StopScan::Stopped(t) => {
                        out.push_str(&t);
                        stopped = true;
                    }
                }
                rest = &rest[cut..];
            }
            if !stopped {
                out.push_str(&m.flush());
            }
            assert_eq!(out, expect, "stops {stop_list:?} text {text:?}");
        }
    }
}

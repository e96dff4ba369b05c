//! SentencePiece-style vocabularies (`tokenizer.ggml.model = llama`, as Gemma and Llama 2 use), tokenized the
//! way llama.cpp's `llm_tokenizer_spm` does, so ids match llama.cpp on the same GGUF
//! (`tests/data/gemma3-tokenizer.json`). Used by [`super::TextTokenizer`]; knows nothing of the server.
//!
//! Encoding, in llama.cpp's order:
//!
//! 1. **Partition.** Control (3), unknown (2) and user-defined (4) tokens are cut out of the raw text first,
//!    longest text first (ties by id), each token's occurrences found left to right in the text not yet cut.
//!    Control and unknown tokens only when special-token parsing is on; user-defined ones always (Gemma's
//!    runs of spaces, newlines and tabs, HTML tags).
//! 2. **Escape.** Each remaining piece gets a leading space if `tokenizer.ggml.add_space_prefix` asks for one
//!    (default true; Gemma: false) and the piece starts the text or follows a token, then every space
//!    becomes U+2581.
//! 3. **Merge.** Starting from single characters, the adjacent pair whose concatenation is the token with the
//!    highest `tokenizer.ggml.scores` entry is merged (leftmost first on a tie), until no pair is a token.
//! 4. **Byte fallback.** A character that is no token is spelled with the `<0xHH>` tokens of its UTF-8 bytes
//!    (or the unknown token where the vocabulary lacks one; with neither, the byte is dropped).
//!
//! One deliberate difference: merges only ever form normal tokens. llama.cpp would also form a byte or control
//! token from typed text whose halves are tokens (`<0x41>` as the byte `A`), which loses the text and would let
//! typed text become a control token even with special-token parsing off.
//!
//! Decoding: U+2581 back to a space in normal tokens, byte tokens reassembled into UTF-8, user-defined tokens
//! as written, control tokens written out only on request. Text holding U+2581 itself comes back with spaces,
//! as with every SentencePiece vocabulary.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use aho_corasick::{AhoCorasick, MatchKind};

use super::ModelError;

/// llama.cpp token types (`llama_token_type`) in `tokenizer.ggml.token_type`.
pub(super) mod token_type {
    pub const NORMAL: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const CONTROL: u32 = 3;
    pub const USER_DEFINED: u32 = 4;
    pub const BYTE: u32 = 6;
}

/// SentencePiece's escaped space.
const SPACE: char = '\u{2581}';

/// The byte a `<0xHH>` byte token stands for.
pub(super) fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    match hex.len() {
        2 => u8::from_str_radix(hex, 16).ok(),
        _ => None,
    }
}

/// What one id decodes to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Piece {
    /// Text with U+2581 for spaces.
    Normal,
    /// One raw byte (`<0xHH>`).
    Byte(u8),
    /// Text as written (user-defined tokens).
    Text,
    /// Control, unknown, unused: written out only on request.
    Special,
}

/// A token cut out of the text before merging.
#[derive(Debug)]
struct Cut {
    id: u32,
    /// Cut only when special-token parsing is on (control and unknown tokens).
    only_parsing_special: bool,
}

/// A SentencePiece-style vocabulary ready to encode and decode.
#[derive(Debug)]
pub struct Spm {
    tokens: Vec<String>,
    pieces: Vec<Piece>,
    /// Merge priority of each id (higher first); NaN refused, -0 read as 0 so that ties are ties.
    scores: Vec<f32>,
    /// The normal tokens by text: what merges may form.
    normal: HashMap<String, u32>,
    /// Per byte value: the token that spells it when no token spells its character.
    byte_ids: [Option<u32>; 256],
    /// Tokens cut out of the text first, longest text first.
    cuts: Vec<Cut>,
    /// Finds which of `cuts` occur in a text at all (pattern i is `cuts[i]`).
    finder: Option<AhoCorasick>,
    add_space_prefix: bool,
}

/// A stretch of the text during partitioning.
#[derive(Clone, Copy, Debug)]
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// One symbol of the text being merged: a byte range of the escaped text, linked to its neighbours.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text, to tell a stale candidate (a side has changed since) from a live one.
    len: usize,
}

impl Ord for Bigram {
    /// The best candidate is the greatest: the higher score, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl Spm {
    /// Builds the vocabulary. `types` and `scores` have one entry per token (the caller checks `types`);
    /// `unk` is `tokenizer.ggml.unknown_token_id` when present.
    pub fn new(
        tokens: Vec<String>,
        types: &[u32],
        scores: Vec<f32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self, ModelError> {
        let n = tokens.len();
        if types.len() != n {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                types.len()
            )));
        }
        if scores.len() != n {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.scores has {} entries for {n} tokens",
                scores.len()
            )));
        }
        if let Some(i) = scores.iter().position(|s| s.is_nan()) {
            return Err(ModelError::Tokenizer(format!("tokenizer.ggml.scores[{i}] is NaN")));
        }
        // -0.0 + 0.0 is 0.0: llama.cpp compares scores with `<`, for which the two are equal.
        let scores = scores.into_iter().map(|s| s + 0.0).collect();
        if let Some(u) = unk.filter(|&u| u as usize >= n) {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.unknown_token_id is {u}, outside the vocabulary of {n} tokens"
            )));
        }

        let mut pieces = Vec::with_capacity(n);
        let mut normal = HashMap::with_capacity(n);
        let mut seen = HashMap::with_capacity(n);
        let mut byte_ids = [None; 256];
        let mut cuts = Vec::new();
        for (i, (text, &ty)) in tokens.iter().zip(types).enumerate() {
            let id = i as u32;
            if let Some(first) = seen.insert(text.as_str(), id) {
                return Err(ModelError::Tokenizer(format!(
                    "duplicate token {text:?}: ids {first} and {id}"
                )));
            }
            let piece = match ty {
                token_type::NORMAL => {
                    normal.insert(text.clone(), id);
                    Piece::Normal
                }
                token_type::BYTE => {
                    let b = byte_token_value(text).ok_or_else(|| {
                        ModelError::Tokenizer(format!("byte token {id} is {text:?}, not of the form <0xHH>"))
                    })?;
                    byte_ids[b as usize].get_or_insert(id);
                    Piece::Byte(b)
                }
                token_type::USER_DEFINED => Piece::Text,
                _ => Piece::Special,
            };
            if matches!(ty, token_type::CONTROL | token_type::UNKNOWN | token_type::USER_DEFINED) && !text.is_empty() {
                cuts.push(Cut {
                    id,
                    only_parsing_special: ty != token_type::USER_DEFINED,
                });
            }
            pieces.push(piece);
        }
        for slot in &mut byte_ids {
            if slot.is_none() {
                *slot = unk;
            }
        }
        cuts.sort_by(|a, b| {
            let len = |c: &Cut| tokens[c.id as usize].len();
            len(b).cmp(&len(a)).then(a.id.cmp(&b.id))
        });
        let finder = match cuts.is_empty() {
            true => None,
            false => Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::Standard)
                    .build(cuts.iter().map(|c| tokens[c.id as usize].as_str()))
                    .map_err(|e| ModelError::Tokenizer(format!("special tokens: {e}")))?,
            ),
        };
        Ok(Self {
            tokens,
            pieces,
            scores,
            normal,
            byte_ids,
            cuts,
            finder,
            add_space_prefix,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the vocabulary is empty (never, once built by the tokenizer).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token's text as stored (U+2581 for spaces).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Whether `id` is written out only on request (control, unknown, unused tokens).
    pub fn is_special(&self, id: u32) -> bool {
        self.pieces.get(id as usize) == Some(&Piece::Special)
    }

    /// The bytes `id` decodes to (special tokens: their text).
    pub fn token_bytes(&self, id: u32) -> Option<Cow<'_, [u8]>> {
        let text = self.tokens.get(id as usize)?;
        Some(match self.pieces[id as usize] {
            Piece::Normal if text.contains(SPACE) => Cow::Owned(text.replace(SPACE, " ").into_bytes()),
            Piece::Byte(b) => Cow::Owned(vec![b]),
            Piece::Normal | Piece::Text | Piece::Special => Cow::Borrowed(text.as_bytes()),
        })
    }

    /// Decodes ids to text, special tokens written out when `with_special`; invalid UTF-8 (a partial
    /// character) becomes U+FFFD. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], with_special: bool) -> Result<String, ModelError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let piece = self.token_bytes(id).ok_or_else(|| {
                ModelError::Tokenizer(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.tokens.len()
                ))
            })?;
            if with_special || !self.is_special(id) {
                bytes.extend_from_slice(&piece);
            }
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Encodes `text` (no BOS): control tokens written in it become their ids when `parse_special`.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut after_token = true;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_token = true;
                }
                Fragment::Text(t) => {
                    let mut escaped = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && after_token {
                        escaped.push(SPACE);
                    }
                    for c in t.chars() {
                        escaped.push(if c == ' ' { SPACE } else { c });
                    }
                    self.merge(&escaped, &mut out);
                    after_token = false;
                }
            }
        }
        out
    }

    /// Cuts the partition tokens out of `text`, longest first, as llama.cpp's `tokenizer_st_partition`.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(text));
        let Some(finder) = &self.finder else {
            return fragments;
        };
        // Only the tokens that occur somewhere can cut; finding them first keeps a long text from being
        // searched once per token of a vocabulary with thousands of them.
        let mut present = vec![false; self.cuts.len()];
        for m in finder.find_overlapping_iter(text) {
            present[m.pattern().as_usize()] = true;
        }
        for (cut, _) in self.cuts.iter().zip(&present).filter(|(_, &p)| p) {
            if cut.only_parsing_special && !parse_special {
                continue;
            }
            let needle = self.tokens[cut.id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(t) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut last = 0;
                for (at, _) in t.match_indices(needle) {
                    if at > last {
                        next.push(Fragment::Text(&t[last..at]));
                    }
                    next.push(Fragment::Token(cut.id));
                    last = at + needle.len();
                }
                if last < t.len() {
                    next.push(Fragment::Text(&t[last..]));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Merges the escaped text by score and appends its ids (llama.cpp's `llm_tokenizer_spm_session`).
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .map(|(start, c)| Symbol {
                start,
                len: c.len_utf8(),
                prev: None,
                next: None,
            })
            .collect();
        let count = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < count).then_some(i + 1);
        }
        let mut queue = BinaryHeap::with_capacity(count);
        let candidate = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (left, right) = (left?, right?);
            let (l, r) = (symbols[left], symbols[right]);
            let merged = &text[l.start..r.start + r.len];
            self.normal.get(merged).map(|&id| Bigram {
                score: self.scores[id as usize],
                left,
                right,
                len: merged.len(),
            })
        };
        for i in 1..count {
            queue.extend(candidate(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.left].next = r.next;
            symbols[b.right].len = 0;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            queue.extend(candidate(&symbols, symbols[b.left].prev, Some(b.left)));
            queue.extend(candidate(&symbols, Some(b.left), symbols[b.left].next));
        }
        let mut at = (count > 0).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.normal.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.byte_ids[b as usize])),
            }
            at = s.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: specials, bytes for 'é' (0xC3 0xA9), and pieces with scores that make the merge
    /// order matter.
    fn vocab(add_space_prefix: bool) -> Spm {
        let entries: &[(&str, u32, f32)] = &[
            ("<unk>", token_type::UNKNOWN, 0.0),
            ("<eos>", token_type::CONTROL, 0.0),
            ("<start>", token_type::CONTROL, 0.0),
            ("\n", token_type::USER_DEFINED, 0.0),
            ("\n\n", token_type::USER_DEFINED, 0.0),
            ("<0xC3>", token_type::BYTE, 0.0),
            ("<0xA9>", token_type::BYTE, 0.0),
            ("▁", token_type::NORMAL, -10.0),
            ("a", token_type::NORMAL, -1.0),
            ("b", token_type::NORMAL, -1.0),
            ("c", token_type::NORMAL, -1.0),
            ("ab", token_type::NORMAL, -5.0),
            ("bc", token_type::NORMAL, -2.0),
            ("abc", token_type::NORMAL, -3.0),
            ("▁a", token_type::NORMAL, -4.0),
            ("<", token_type::NORMAL, -1.0),
            ("s", token_type::NORMAL, -1.0),
            ("<s", token_type::NORMAL, -1.0),
            ("t>", token_type::NORMAL, -1.0),
            ("t", token_type::NORMAL, -1.0),
            (">", token_type::NORMAL, -1.0),
            ("<st", token_type::NORMAL, -1.0),
            ("ar", token_type::NORMAL, -1.0),
            ("r", token_type::NORMAL, -1.0),
            ("<star", token_type::NORMAL, -1.0),
            ("<start>x", token_type::NORMAL, -1.0),
            ("xy", token_type::USER_DEFINED, 0.0),
            ("yzw", token_type::USER_DEFINED, 0.0),
            ("x", token_type::NORMAL, -1.0),
            ("e", token_type::NORMAL, -1.0),
            ("o", token_type::NORMAL, -1.0),
        ];
        let tokens = entries.iter().map(|e| e.0.to_string()).collect();
        let types: Vec<u32> = entries.iter().map(|e| e.1).collect();
        let scores = entries.iter().map(|e| e.2).collect();
        Spm::new(tokens, &types, scores, Some(0), add_space_prefix).expect("builds")
    }

    fn id(v: &Spm, text: &str) -> u32 {
        v.tokens.iter().position(|t| t == text).expect("token") as u32
    }

    #[test]
    fn merges_by_score_not_left_to_right() {
        let v = vocab(false);
        // "bc" (-2) beats "ab" (-5); then "a" + "bc" = "abc" (-3) is a token.
        assert_eq!(v.encode("abc", true), vec![id(&v, "abc")]);
        // Without "abc" reachable: "cab" -> "c" + "ab".
        assert_eq!(v.encode("cab", true), vec![id(&v, "c"), id(&v, "ab")]);
    }

    #[test]
    fn spaces_are_escaped_and_prefixed_only_when_asked() {
        let v = vocab(false);
        assert_eq!(v.encode(" a", true), vec![id(&v, "▁a")]);
        assert_eq!(v.encode("a", true), vec![id(&v, "a")]);
        let p = vocab(true);
        assert_eq!(p.encode("a", true), vec![id(&p, "▁a")]);
        // After a token, the next piece is prefixed again (llama.cpp's `is_prev_special`).
        assert_eq!(p.encode("a<eos>a", true), vec![id(&p, "▁a"), 1, id(&p, "▁a")]);
        assert_eq!(p.decode(&p.encode("a b", true), false).expect("decodes"), " a b");
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_then_unk() {
        let v = vocab(false);
        let ids = v.encode("aéz", true);
        assert_eq!(ids, vec![id(&v, "a"), id(&v, "<0xC3>"), id(&v, "<0xA9>"), 0]);
        assert_eq!(v.decode(&ids, false).expect("decodes"), "aé");
        assert_eq!(v.decode(&ids, true).expect("decodes"), "aé<unk>");
    }

    #[test]
    fn control_tokens_are_cut_only_when_parsing_specials_user_defined_always() {
        let v = vocab(false);
        assert_eq!(v.encode("a<eos>\n\n\na", true), vec![id(&v, "a"), 1, 4, 3, id(&v, "a")]);
        let plain = v.encode("a<eos>\n", false);
        assert!(!plain.contains(&1), "{plain:?}");
        assert_eq!(plain.last(), Some(&3));
        assert_eq!(v.decode(&plain, false).expect("decodes"), "a<eos>\n");
        // A control token's text is never formed by merging, unlike llama.cpp.
        assert!(!v.encode("<start>", false).contains(&2));
    }

    #[test]
    fn longer_tokens_cut_first_even_when_a_shorter_one_starts_earlier() {
        let v = vocab(false);
        // Not leftmost-longest: "yzw" is cut before "xy" is looked for.
        assert_eq!(v.encode("xyzw", true), vec![id(&v, "x"), id(&v, "yzw")]);
        assert_eq!(v.encode("xyxyzw", true), vec![id(&v, "xy"), id(&v, "x"), id(&v, "yzw")]);
        assert_eq!(v.encode("\n\n\n", true), vec![4, 3]);
        assert_eq!(v.encode("<start><start>", true), vec![2, 2]);
    }

    #[test]
    fn hostile_tables_are_errors() {
        let t = || vec!["a".to_string(), "b".to_string()];
        let normal = [token_type::NORMAL, token_type::NORMAL];
        assert!(Spm::new(t(), &normal, vec![0.0], None, false).is_err());
        assert!(Spm::new(t(), &normal[..1], vec![0.0, 0.0], None, false).is_err());
        assert!(Spm::new(t(), &normal, vec![0.0, f32::NAN], None, false).is_err());
        assert!(Spm::new(t(), &normal, vec![0.0, 0.0], Some(2), false).is_err());
        assert!(Spm::new(vec!["a".into(), "a".into()], &normal, vec![0.0, 0.0], None, false).is_err());
        let bad_byte = [token_type::NORMAL, token_type::BYTE];
        assert!(Spm::new(t(), &bad_byte, vec![0.0, 0.0], None, false).is_err());
        let v = Spm::new(t(), &normal, vec![0.0, 0.0], None, false).expect("builds");
        assert!(v.decode(&[5], false).is_err());
        // No byte tokens and no unk: an unknown character is dropped, nothing panics.
        assert_eq!(v.encode("a€b", true), vec![0, 1]);
    }
}

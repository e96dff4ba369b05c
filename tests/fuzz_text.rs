//! The real SmolLM2 and Gemma 3 tokenizers and SmolLM2's chat templates on arbitrary text: encoding then
//! decoding gives the text back byte for byte (control characters, NUL, combining marks, emoji, special-token
//! look-alikes, long runs), except that a character SmolLM2's vocabulary has no tokens for comes back as U+FFFD
//! and Gemma's escaped space U+2581 comes back as a space; the tokens' bytes add up to that text; any id list
//! decodes or fails cleanly; and any messages render or fail with a message, each in bounded time.

mod common;
#[path = "common/fuzz.rs"]
mod fuzz;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use amlserve::model::gguf_header;
use amlserve::model::gguf_meta::Metadata;
use amlserve::model::{ChatMessage, ChatTemplate, TextTokenizer};
use candle_core::quantized::gguf_file;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Longest one encode, decode or render of a generated input may take on two busy cores.
const MAX_CALL: Duration = Duration::from_secs(10);

/// A real tokenizer with what the properties need to know of its vocabulary, from the tokens alone.
struct Real {
    tok: TextTokenizer,
    /// The special tokens' texts.
    specials: Vec<String>,
    /// Per byte value: whether one non-special token spells it.
    spellable: [bool; 256],
}

impl Real {
    fn load(path: std::path::PathBuf) -> (Self, gguf_file::Content) {
        let mut file = std::io::BufReader::new(std::fs::File::open(path).expect("open"));
        let content = gguf_header::read(&mut file).expect("header");
        let tok = TextTokenizer::from_gguf(&content).expect("tokenizer");
        let ids = 0..tok.vocab_size() as u32;
        let specials = ids
            .clone()
            .filter(|&i| tok.is_special(i))
            .filter_map(|i| tok.token_text(i).map(str::to_string))
            .collect();
        let mut spellable = [false; 256];
        for i in ids.filter(|&i| !tok.is_special(i)) {
            if let Some([b]) = tok.token_bytes(i).as_deref() {
                spellable[*b as usize] = true;
            }
        }
        (
            Self {
                tok,
                specials,
                spellable,
            },
            content,
        )
    }

    /// The text the tokenizer can give back for `s`: each character with a byte no single normal token spells
    /// becomes U+FFFD (an oracle independent of the tokenizer's own table).
    fn spellable(&self, s: &str) -> String {
        s.chars()
            .map(|c| match c.to_string().bytes().all(|b| self.spellable[b as usize]) {
                true => c,
                false => '\u{fffd}',
            })
            .collect()
    }

    /// decode(encode(s)) == want, with special tokens written out; without them when `want` holds no special
    /// text; the tokens' bytes add up to it; a prompt is the same ids after the BOS.
    fn round_trips(&self, s: &str, want: &str) -> Result<(), TestCaseError> {
        let tok = &self.tok;
        let ids = timed("encode", || tok.encode(s)).expect("any text encodes");
        let back = timed("decode", || tok.decode_with_special(&ids)).expect("decodes");
        prop_assert_eq!(&back, want);
        if !self.specials.iter().any(|sp| want.contains(sp.as_str())) {
            prop_assert_eq!(tok.decode(&ids).expect("decodes"), want);
        }
        // Streaming and grammars work from each token's bytes: together they are the text.
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| tok.token_bytes(i).expect("an id in range"))
            .collect();
        prop_assert_eq!(bytes, want.as_bytes().to_vec());
        let prompt = tok.encode_prompt(s).expect("encodes");
        let bos = usize::from(tok.add_bos && tok.bos_id.is_some());
        prop_assert_eq!(&prompt[bos..], &ids[..]);
        Ok(())
    }

    /// Any ids, in the vocabulary or not, decode to text or fail with a message.
    fn decodes_or_fails_cleanly(&self, ids: &[u32]) -> Result<(), TestCaseError> {
        let tok = &self.tok;
        for with_special in [false, true] {
            let got = timed("decode", || match with_special {
                true => tok.decode_with_special(ids),
                false => tok.decode(ids),
            });
            if let Err(e) = got {
                prop_assert!(!e.to_string().is_empty());
            }
        }
        for &i in ids {
            prop_assert_eq!(tok.token_bytes(i).is_some(), (i as usize) < tok.vocab_size());
        }
        Ok(())
    }
}

/// The SmolLM2 tokenizer and template source, read from its header (no weights).
fn real() -> &'static (Real, String) {
    static REAL: OnceLock<(Real, String)> = OnceLock::new();
    REAL.get_or_init(|| {
        let (real, content) = Real::load(common::model_path());
        let template = Metadata(&content).string("tokenizer.chat_template").expect("template");
        (real, template)
    })
}

fn tokenizer() -> &'static TextTokenizer {
    &real().0.tok
}

/// The Gemma 3 tokenizer (SentencePiece-style), read from its header.
fn gemma() -> &'static Real {
    static GEMMA: OnceLock<Real> = OnceLock::new();
    GEMMA.get_or_init(|| Real::load(common::gemma_path()).0)
}

/// Runs `f`, failing the case if it takes longer than [`MAX_CALL`].
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    assert!(started.elapsed() < MAX_CALL, "{what} took {:?}", started.elapsed());
    out
}

/// Pieces that are hard for byte-level BPE and special-token matching.
const PIECES: &[&str] = &[
    "\0",
    "\u{1}",
    "\u{7f}",
    "\r\n",
    "\t",
    " ",
    "   ",
    "\n\n\n",
    "e\u{301}",
    "\u{308}\u{308}\u{308}",
    "👩\u{200d}👩\u{200d}👧",
    "🇫🇷",
    "\u{fe0f}",
    "\u{feff}",
    "\u{202e}",
    "\u{fffd}",
    "\u{10ffff}",
    "中文",
    "ÿ",
    "Ġ",
    "Ċ",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_",
    "|>",
    "<",
    "<0x41>",
    "'s",
    "'ll",
    "12345678901234567890",
    "½²³",
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<table>",
    "\u{2581}",
    "\t\t",
    "\n\n",
];

/// Arbitrary text: any characters, the pieces above, and long runs of one piece.
fn text() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        3 => any::<String>(),
        3 => proptest::sample::select(PIECES).prop_map(str::to_string),
        1 => (proptest::sample::select(PIECES), 1usize..2_000).prop_map(|(p, n)| p.repeat(n)),
        1 => (any::<char>(), 1usize..5_000).prop_map(|(c, n)| c.to_string().repeat(n)),
    ];
    proptest::collection::vec(part, 0..8).prop_map(|parts| parts.concat())
}

/// Roles the server passes to templates, and some it would refuse first.
fn role() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(&["system", "user", "assistant"][..]).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

fn messages() -> impl Strategy<Value = Vec<ChatMessage>> {
    proptest::collection::vec(
        (role(), text()).prop_map(|(role, content)| ChatMessage { role, content }),
        0..12,
    )
}

proptest! {
    #![proptest_config(fuzz::config(256))]

    /// decode(encode(s)) == s (up to the characters the vocabulary cannot spell), with special tokens written
    /// out; without them when `s` holds no special text.
    #[test]
    fn encoding_round_trips_any_text(s in text()) {
        let real = &real().0;
        real.round_trips(&s, &real.spellable(&s))?;
    }

    /// The same for Gemma's SentencePiece-style vocabulary, which spells every byte (byte fallback) but reads
    /// U+2581 as its escaped space.
    #[test]
    fn gemma_encoding_round_trips_any_text(s in text()) {
        let gemma = gemma();
        gemma.round_trips(&s, &gemma.spellable(&s).replace('\u{2581}', " "))?;
    }

    /// Any ids, in the vocabulary or not, decode to text or fail with a message.
    #[test]
    fn any_ids_decode_or_fail_cleanly(
        ids in proptest::collection::vec(prop_oneof![4 => 0u32..49_152, 1 => any::<u32>()], 0..64),
    ) {
        real().0.decodes_or_fails_cleanly(&ids)?;
    }

    #[test]
    fn gemma_any_ids_decode_or_fail_cleanly(
        ids in proptest::collection::vec(prop_oneof![4 => 0u32..262_144, 1 => any::<u32>()], 0..64),
    ) {
        gemma().decodes_or_fails_cleanly(&ids)?;
    }

    /// Any messages render with the real template and with ChatML (`--chat-template chatml`), or fail with a message; a render
    /// holds every message's content.
    #[test]
    fn any_messages_render_or_fail_cleanly(msgs in messages(), generation in any::<bool>()) {
        let (real, source) = real();
        let tok = &real.tok;
        for template in [source.as_str(), amlserve::model::chat_template::CHATML_TEMPLATE] {
            let t = ChatTemplate::new(template, "<|im_start|>", "<|im_end|>").expect("compiles");
            match timed("render", || t.render(&msgs, generation)) {
                Ok(text) => {
                    for m in &msgs {
                        prop_assert!(text.contains(&m.content), "{:?} lacks {:?}", text, m.content);
                    }
                    timed("encode", || tok.encode(&text)).expect("a rendered prompt encodes");
                }
                Err(e) => prop_assert!(e.to_string().len() > 10, "{}", e),
            }
        }
    }

    /// Arbitrary template sources compile or fail at load with a message, and render in bounded time.
    #[test]
    fn any_template_source_compiles_or_fails_cleanly(
        source in prop_oneof![
            any::<String>(),
            proptest::collection::vec(
                proptest::sample::select(&[
                    "{%", "%}", "{{", "}}", "{#", "#}", "for m in messages", "endfor", "if", "endif", "else",
                    "m['content']", "messages[0]", "range(100000)", "raise_exception('x')", "|", "trim", "+", "'",
                    "loop.index", "set x = ", "macro f()", "endmacro", "f()", " ", "\n", "-",
                ][..]),
                0..24,
            )
            .prop_map(|v| v.concat()),
        ],
        msgs in messages(),
    ) {
        match ChatTemplate::new(&source, "", "") {
            Ok(t) => {
                if let Err(e) = timed("render", || t.render(&msgs, true)) {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("chat template"), "{}", e),
        }
    }
}

/// Found by `encoding_round_trips_any_text`: SmolLM2 has no token for the byte 0xf1, so U+40000 encoded as
/// three stray continuation bytes (decoded "\u{fffd}\u{fffd}\u{fffd}"), and no token for 0x04, which vanished.
#[test]
fn characters_without_tokens_become_one_replacement_character() {
    let tok = tokenizer();
    for (text, want) in [
        ("\u{40000}", "\u{fffd}"),
        ("a\u{4}b", "a\u{fffd}b"),
        ("x\u{7ffff}\u{1d}y\u{10ffff}😀", "x\u{fffd}\u{fffd}y\u{10ffff}😀"),
    ] {
        let ids = tok.encode(text).expect("encodes");
        assert_eq!(tok.decode(&ids).expect("decodes"), want, "{text:?}");
    }
}

/// A long run of one character encodes and decodes in bounded time (BPE merges are quadratic in a word).
#[test]
fn long_runs_encode_in_bounded_time() {
    for tok in [tokenizer(), &gemma().tok] {
        for piece in ["a", " ", "😀", "\0", "1", "ab", "\n", "<table>"] {
            let s = piece.repeat(50_000);
            let ids = timed("encode", || tok.encode(&s)).expect("encodes");
            assert_eq!(timed("decode", || tok.decode(&ids)).expect("decodes"), s);
        }
    }
}

//! Text tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, or wrapped around a Hugging Face
//! folder's `tokenizer.json` (read in `hf_tokenizer`, built by `TextTokenizer::from_hf`): one API for both.
//!
//! Two families of GGUF vocabularies, by `tokenizer.ggml.model`, both matching llama.cpp (which produced the
//! golden ids in `tests/data`):
//!
//! - `gpt2`: byte-level BPE through Hugging Face's `tokenizers`. The pre-tokenizer is chosen by
//!   `tokenizer.ggml.pre`: for `smollm` every digit is split off on its own before the GPT-2 regex runs, and no
//!   prefix space is added. Special tokens are every token whose type is neither normal nor byte.
//! - `llama`: SentencePiece-style vocabularies with scores (Gemma), in [`super::spm`]. Special tokens are the
//!   control and unknown ones; user-defined tokens (Gemma's whitespace runs, HTML tags) are text that is
//!   always cut out of the input first.
//!
//! Special tokens are parsed out of input text, as llama.cpp does with `parse_special`, and skipped when
//! decoding. Chat content is the exception: see [`super::content_text`] and [`TextTokenizer::encode_rendered`].
//!
//! A byte-level BPE vocabulary may lack the token of a byte (SmolLM2 has none for 0x04, 0x06, 0x13, 0x14, 0x16,
//! 0x1d, nor for 0xf1 and 0xf2, the lead bytes of U+40000..U+BFFFF); BPE then drops that byte silently, and a
//! character would become stray continuation bytes. A character the vocabulary cannot spell is therefore
//! encoded as U+FFFD, so decoding gives back every other character exactly and the loss is visible.
//! SentencePiece-style vocabularies fall back to their `<0xHH>` byte tokens instead.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::content_text::ContentShield;
use super::gguf_meta::Metadata;
use super::spm::{byte_token_value, token_type, Spm};
use super::ModelError;

/// Bytes encoded at a time by [`TextTokenizer::surely_exceeds`].
const COUNT_CHUNK: usize = 16 * 1024;
/// Tokens a cut between two pieces may add, at most.
const CUT_SLACK: usize = 8;

/// How a vocabulary's token texts spell the bytes they stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spelling {
    /// Through GPT-2's byte-to-unicode table (byte-level BPE: GGUF `gpt2`, most `tokenizer.json` files).
    ByteLevel,
    /// SentencePiece's: U+2581 for a space, `<0xHH>` byte tokens (the `tokenizer.json` of Llama 2, Mistral,
    /// Gemma).
    Metaspace,
    /// As written (word-level vocabularies).
    Plain,
}

/// A vocabulary run by Hugging Face's `tokenizers`: byte-level BPE from a GGUF (`gpt2`), or any `tokenizer.json`.
#[derive(Clone)]
struct Bpe {
    inner: Tokenizer,
    /// `inner` with special-token parsing off: special-token text is encoded as ordinary text.
    plain: Tokenizer,
    tokens: Vec<String>,
    /// Per id: whether the token is a byte token (`<0xHH>`).
    byte: Vec<bool>,
    /// Per byte value: whether one normal token spells it, so text made of such bytes encodes without loss
    /// (every byte, for vocabularies that are not byte-level: they fall back to byte tokens or an unknown one).
    spellable: [bool; 256],
    spelling: Spelling,
}

impl Bpe {
    /// The vocabulary around `inner` (special tokens already added), with its copy that parses none.
    fn vocab(
        inner: Tokenizer,
        tokens: Vec<String>,
        byte: Vec<bool>,
        spellable: [bool; 256],
        spelling: Spelling,
    ) -> Vocab {
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Vocab::Bpe(Box::new(Self {
            inner,
            plain,
            tokens,
            byte,
            spellable,
            spelling,
        }))
    }
}

/// Per byte value: whether one of `normal` (a byte-level vocabulary's normal tokens) spells it alone.
fn byte_level_spellable<'a>(normal: impl Iterator<Item = &'a String>) -> [bool; 256] {
    let mut spellable = [false; 256];
    for t in normal {
        if let [b] = raw_bytes(t, false, Spelling::ByteLevel)[..] {
            spellable[b as usize] = true;
        }
    }
    spellable
}

/// The vocabulary proper, by family.
#[derive(Clone)]
enum Vocab {
    Bpe(Box<Bpe>),
    /// SentencePiece-style (`llama`); shared, as the tokenizer is cloned per grammar environment.
    Spm(Arc<Spm>),
}

/// A tokenizer plus the ids the engine needs to know about.
#[derive(Clone)]
pub struct TextTokenizer {
    vocab: Vocab,
    /// The special tokens, for keeping typed control-token text in chat content as text.
    shield: ContentShield,
    /// Per id: whether the token is special (see the module docs for each family).
    special: Vec<bool>,
    /// Beginning-of-sequence token, if the GGUF names one.
    pub bos_id: Option<u32>,
    /// End-of-sequence token from the GGUF.
    pub eos_id: u32,
    /// Whether raw (non-chat) prompts start with the BOS token (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Every id that ends generation: the GGUF's eos/eot ids plus `<|im_end|>`, `<|eot_id|>`, `<|end|>` and
    /// `<end_of_turn>` if present.
    pub stop_ids: Vec<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let byte_level = ByteLevel::new(false, true, true);
    let split_regex = match pre {
        // llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM (and STARCODER/REFACT, same regexes): `\p{N}` then GPT-2.
        "smollm" | "starcoder" | "refact" => Some(r"\p{N}"),
        "gpt2" | "default" => None,
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => Some(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        other => {
            return Err(ModelError::Tokenizer(format!(
                "unsupported tokenizer.ggml.pre '{other}' (supported: smollm, starcoder, refact, gpt2, llama-bpe)"
            )))
        }
    };
    Ok(match split_regex {
        None => byte_level.into(),
        Some(re) if pre.starts_with("llama") || pre == "smaug-bpe" => {
            // The llama-3 regex replaces GPT-2's; byte-level mapping only.
            let split = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        Some(re) => {
            let split = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            Sequence::new(vec![split.into(), byte_level.into()]).into()
        }
    })
}

/// The byte GPT-2's `bytes_to_unicode` table maps to `c`: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes were shifted, in order, to U+0100..U+0143.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let c = c as u32;
    if c < 0x100 {
        return printable(c).then_some(c as u8);
    }
    let n = c.checked_sub(0x100)?;
    (0u32..0x100)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

/// The bytes a normal token's text stands for ([`TextTokenizer::token_bytes`]); `byte_token` for `<0xHH>`.
fn raw_bytes(text: &str, byte_token: bool, spelling: Spelling) -> Vec<u8> {
    if let Some(b) = byte_token.then(|| byte_token_value(text)).flatten() {
        return vec![b];
    }
    match spelling {
        Spelling::ByteLevel => {}
        Spelling::Metaspace => return text.replace('\u{2581}', " ").into_bytes(),
        Spelling::Plain => return text.as_bytes().to_vec(),
    }
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match byte_level_byte(c) {
            Some(b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// `text` with every character that has a byte no token spells replaced by U+FFFD (dropped, should U+FFFD
/// itself be unspellable); borrowed when there is none, the common case.
fn spellable_text<'a>(text: &'a str, spellable: &[bool; 256]) -> Cow<'a, str> {
    if text.bytes().all(|b| spellable[b as usize]) {
        return Cow::Borrowed(text);
    }
    let ok = |c: char| c.encode_utf8(&mut [0; 4]).bytes().all(|b| spellable[b as usize]);
    let replacement = if ok('\u{fffd}') { "\u{fffd}" } else { "" };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match ok(c) {
            true => out.push(c),
            false => out.push_str(replacement),
        }
    }
    Cow::Owned(out)
}

/// `tokenizer.ggml.token_type`: optional, but when present it must type every token (a mistyped table would
/// silently turn special tokens into text). Absent, every token is normal.
fn token_types(md: &Metadata, n: usize) -> Result<Vec<u32>, ModelError> {
    if !md.has("tokenizer.ggml.token_type") {
        return Ok(vec![token_type::NORMAL; n]);
    }
    let types = md.u32_array("tokenizer.ggml.token_type")?;
    if types.len() != n {
        return Err(ModelError::Tokenizer(format!(
            "tokenizer.ggml.token_type has {} entries for {n} tokens",
            types.len()
        )));
    }
    Ok(types)
}

/// The byte-level BPE vocabulary and its special tokens.
fn bpe_vocab(md: &Metadata, tokens: Vec<String>, types: &[u32]) -> Result<(Vocab, Vec<bool>), ModelError> {
    let merges = md
        .string_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge '{m}'")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut inner = Tokenizer::new(bpe);
    let pre = md
        .opt_string("tokenizer.ggml.pre")
        .unwrap_or_else(|| "gpt2".to_string());
    inner.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
    inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));

    let special: Vec<bool> = types
        .iter()
        .map(|&t| !matches!(t, token_type::NORMAL | token_type::BYTE))
        .collect();
    let byte: Vec<bool> = types.iter().map(|&t| t == token_type::BYTE).collect();
    // Byte tokens (`<0xHH>`) do not count: the BPE model here never falls back to them.
    let spellable = byte_level_spellable(
        tokens
            .iter()
            .zip(types)
            .filter(|(_, &ty)| ty == token_type::NORMAL)
            .map(|(t, _)| t),
    );
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&special)
        .filter(|(_, &s)| s)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    inner
        .add_special_tokens(specials)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok((Bpe::vocab(inner, tokens, byte, spellable, Spelling::ByteLevel), special))
}

/// The SentencePiece-style vocabulary and its special tokens.
fn spm_vocab(md: &Metadata, tokens: Vec<String>, types: &[u32]) -> Result<(Vocab, Vec<bool>), ModelError> {
    // Merges go by score: without scores the vocabulary cannot be used as its authors meant.
    let scores = md.f32_array("tokenizer.ggml.scores")?;
    let unk = md.opt_u32("tokenizer.ggml.unknown_token_id");
    // llama.cpp's default for SentencePiece vocabularies when the key is absent.
    let add_space_prefix = md.opt_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let spm = Spm::new(tokens, types, scores, unk, add_space_prefix)?;
    let special = (0..spm.len() as u32).map(|i| spm.is_special(i)).collect();
    Ok((Vocab::Spm(Arc::new(spm)), special))
}

impl Vocab {
    fn token_text(&self, id: u32) -> Option<&str> {
        match self {
            Vocab::Bpe(bpe) => bpe.tokens.get(id as usize).map(String::as_str),
            Vocab::Spm(spm) => spm.token_text(id),
        }
    }
}

/// `id` when it names one of the `n` tokens, else an error naming `what` it is.
fn in_vocab(what: &str, id: u32, n: usize) -> Result<u32, ModelError> {
    match (id as usize) < n {
        true => Ok(id),
        false => Err(ModelError::Tokenizer(format!(
            "{what} is {id}, outside the vocabulary of {n} tokens"
        ))),
    }
}

/// `stops` plus the ids of the end-of-turn tokens chat models use (`<|im_end|>`, `<|eot_id|>`, `<|end|>`,
/// `<end_of_turn>`) where the vocabulary has them, sorted, without repeats.
fn with_turn_ends<'a>(mut stops: Vec<u32>, n: usize, text: impl Fn(usize) -> Option<&'a str>) -> Vec<u32> {
    for name in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
        if let Some(i) = (0..n).find(|&i| text(i) == Some(name)) {
            stops.push(i as u32);
        }
    }
    stops.sort_unstable();
    stops.dedup();
    stops
}

/// What a Hugging Face folder's files say besides the vocabulary (see `hf_tokenizer`).
#[derive(Debug, Clone)]
pub(crate) struct HfTokens {
    pub bos_id: Option<u32>,
    pub eos_id: u32,
    /// Whether raw prompts start with BOS.
    pub add_bos: bool,
    /// More ids that end generation (`generation_config.json`'s `eos_token_id` list...).
    pub stop_ids: Vec<u32>,
    /// How the token texts spell bytes.
    pub spelling: Spelling,
    /// Whether `<0xHH>` tokens are byte tokens (the model's `byte_fallback`).
    pub byte_fallback: bool,
}

impl TextTokenizer {
    /// Wraps a Hugging Face tokenizer. Its special tokens are the added tokens marked `special`; ids from the end
    /// of its vocabulary up to `vocab_size` (the model's embedding rows, often padded past the tokenizer's) are
    /// special padding tokens, `[PAD<id>]`, that decode to nothing.
    pub(crate) fn from_hf(inner: Tokenizer, hf: HfTokens, vocab_size: usize) -> Result<Self, ModelError> {
        let n = inner
            .get_vocab(true)
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        if n == 0 {
            return Err(ModelError::Tokenizer("tokenizer.json has an empty vocabulary".into()));
        }
        if n > vocab_size {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.json has ids up to {}, the model's embedding only {vocab_size} rows",
                n - 1
            )));
        }
        let added = inner.get_added_tokens_decoder();
        let tokens: Vec<String> = (0..vocab_size as u32)
            .map(|i| inner.id_to_token(i).unwrap_or_else(|| format!("[PAD{i}]")))
            .collect();
        let special: Vec<bool> = (0..vocab_size as u32)
            .map(|i| (i as usize) >= n || added.get(&i).is_some_and(|t| t.special))
            .collect();
        let byte: Vec<bool> = tokens
            .iter()
            .zip(&special)
            .map(|(t, &s)| hf.byte_fallback && !s && byte_token_value(t).is_some())
            .collect();
        let spellable = match hf.spelling {
            Spelling::ByteLevel => {
                byte_level_spellable(tokens.iter().zip(&special).filter(|(_, &s)| !s).map(|(t, _)| t))
            }
            _ => [true; 256],
        };
        let shield = ContentShield::new((0..n).filter(|&i| special[i]).map(|i| (tokens[i].clone(), i as u32)))?;
        let in_vocab = |what: &str, id: u32| in_vocab(what, id, n);
        let bos_id = hf.bos_id.map(|id| in_vocab("the BOS token id", id)).transpose()?;
        let eos_id = in_vocab("the EOS token id", hf.eos_id)?;
        let mut stops = vec![eos_id];
        for &id in &hf.stop_ids {
            stops.push(in_vocab("an eos_token_id", id)?);
        }
        let stop_ids = with_turn_ends(stops, n, |i| tokens.get(i).map(String::as_str));
        let vocab = Bpe::vocab(inner, tokens, byte, spellable, hf.spelling);
        Ok(Self {
            vocab,
            shield,
            special,
            bos_id,
            eos_id,
            add_bos: hf.add_bos,
            stop_ids,
        })
    }

    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, ModelError> {
        let md = Metadata(content);
        let kind = md.string("tokenizer.ggml.model")?;
        let tokens = md.string_array("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(ModelError::Tokenizer("tokenizer.ggml.tokens is empty".into()));
        }
        let n = tokens.len();
        let types = token_types(&md, n)?;
        let (vocab, special) = match kind.as_str() {
            "gpt2" => bpe_vocab(&md, tokens, &types)?,
            "llama" => spm_vocab(&md, tokens, &types)?,
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "unsupported tokenizer.ggml.model '{other}': supported are 'gpt2' (byte-level BPE) and \
                     'llama' (SentencePiece-style)"
                )))
            }
        };
        let text = |i: usize| vocab.token_text(i as u32);
        let shield = ContentShield::new(
            special
                .iter()
                .enumerate()
                .filter(|(_, &s)| s)
                .filter_map(|(i, _)| Some((text(i)?.to_string(), i as u32))),
        )?;

        let in_vocab = |key: &str, id: u32| in_vocab(key, id, n);
        let bos_id = md
            .opt_u32("tokenizer.ggml.bos_token_id")
            .map(|id| in_vocab("tokenizer.ggml.bos_token_id", id))
            .transpose()?;
        let eos_id = in_vocab("tokenizer.ggml.eos_token_id", md.u32("tokenizer.ggml.eos_token_id")?)?;
        // llama.cpp's defaults when the key is absent: BOS for SentencePiece vocabularies, none for BPE.
        let add_bos = md
            .opt_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(matches!(vocab, Vocab::Spm(_)));
        let mut stop_ids = vec![eos_id];
        if let Some(eot) = md.opt_u32("tokenizer.ggml.eot_token_id") {
            stop_ids.push(in_vocab("tokenizer.ggml.eot_token_id", eot)?);
        }
        let stop_ids = with_turn_ends(stop_ids, n, text);
        Ok(Self {
            vocab,
            shield,
            special,
            bos_id,
            eos_id,
            add_bos,
            stop_ids,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.special.len()
    }

    /// The text of one token as stored in the vocabulary (byte-level encoded for BPE models, U+2581 for spaces
    /// in SentencePiece-style ones).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.token_text(id)
    }

    /// The raw bytes one token stands for: for BPE its byte-level string mapped back through GPT-2's
    /// byte-to-unicode table (a character outside the table keeps its UTF-8 bytes), for SentencePiece its text
    /// with spaces; the byte of a `<0xHH>` byte token. Special tokens give their text.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let text = self.token_text(id)?;
        match &self.vocab {
            _ if self.is_special(id) => Some(text.as_bytes().to_vec()),
            Vocab::Bpe(bpe) => Some(raw_bytes(
                text,
                bpe.byte.get(id as usize).copied().unwrap_or(false),
                bpe.spelling,
            )),
            Vocab::Spm(spm) => spm.token_bytes(id).map(Cow::into_owned),
        }
    }

    /// Whether `id` is a special token (control tokens such as `<|im_end|>`: neither normal text nor a byte, nor
    /// a SentencePiece user-defined token).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Encodes text exactly as written: special-token text becomes special ids, no BOS is added. A character
    /// the vocabulary cannot spell is encoded as U+FFFD (see the module docs).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(true, text)
    }

    /// Encodes with special-token parsing on or off (BPE: characters the vocabulary cannot spell replaced
    /// first).
    fn encode_with(&self, parse_special: bool, text: &str) -> Result<Vec<u32>, ModelError> {
        match &self.vocab {
            Vocab::Bpe(bpe) => {
                let text = spellable_text(text, &bpe.spellable);
                let tokenizer = if parse_special { &bpe.inner } else { &bpe.plain };
                let enc = tokenizer
                    .encode_fast(text.as_ref(), false)
                    .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
                Ok(enc.get_ids().to_vec())
            }
            Vocab::Spm(spm) => Ok(spm.encode(text, parse_special)),
        }
    }

    /// Chat content with its special-token text masked, to be rendered and then encoded by
    /// [`Self::encode_rendered`].
    pub fn mask_content<'a>(&self, content: &'a str) -> std::borrow::Cow<'a, str> {
        self.shield.mask(content)
    }

    /// Encodes a prompt rendered from masked content: the template's markup becomes special ids, the content
    /// (masked texts put back) is encoded as text. No BOS is added.
    pub fn encode_rendered(&self, rendered: &str) -> Result<Vec<u32>, ModelError> {
        self.shield.encode(rendered, |text| self.encode_with(false, text))
    }

    /// The text of a prompt rendered from masked content, as the model reads it.
    pub fn unmask<'a>(&self, rendered: &'a str) -> std::borrow::Cow<'a, str> {
        self.shield.unmask(rendered)
    }

    /// Whether `text` surely encodes to more than `limit` tokens, found without encoding a long text whole
    /// (which costs far more memory than the text): pieces of [`COUNT_CHUNK`] bytes are encoded one at a time
    /// and counting stops once past the limit. A cut can add a token or two where it splits a word, so each cut
    /// is allowed [`CUT_SLACK`] tokens; a text within the slack of the limit is reported as fitting, and its
    /// whole encoding decides.
    pub fn surely_exceeds(&self, text: &str, limit: usize) -> Result<bool, ModelError> {
        // Every token spans at least one byte; a short text is encoded whole anyway.
        if text.len() <= limit || text.len() <= COUNT_CHUNK {
            return Ok(false);
        }
        let (mut count, mut cuts, mut rest) = (0usize, 0usize, text);
        while !rest.is_empty() {
            let mut end = rest.len().min(COUNT_CHUNK);
            while !rest.is_char_boundary(end) {
                end -= 1;
            }
            count += self.encode(&rest[..end])?.len();
            rest = &rest[end..];
            if !rest.is_empty() {
                cuts += 1;
            }
            if count.saturating_sub(cuts * CUT_SLACK) > limit {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Encodes a raw completion prompt: like [`Self::encode`], with BOS first when the model asks for it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self.with_bos(self.encode(text)?))
    }

    /// `ids` with BOS first when the model asks for it (`tokenizer.ggml.add_bos_token`).
    pub fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            ids.insert(0, bos);
        }
        ids
    }

    /// Decodes ids to text, leaving special tokens out. Invalid UTF-8 (a partial character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.decode_with(ids, false)
    }

    /// Decodes ids to text with special tokens written out (`<|im_start|>`...), as Hugging Face's `decode`
    /// does by default: what `/detokenize` answers.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.decode_with(ids, true)
    }

    fn decode_with(&self, ids: &[u32], with_special: bool) -> Result<String, ModelError> {
        match &self.vocab {
            Vocab::Bpe(bpe) => bpe
                .inner
                .decode(ids, !with_special)
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
            Vocab::Spm(spm) => spm.decode(ids, with_special),
        }
    }

    /// Whether this id ends generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }
}

//! The GGUF loader on corrupt and hostile files: every file either loads into a model that runs, or fails
//! with an error that says what is wrong; never a panic, a hang, or an allocation sized from a corrupt count
//! (the [`alloc_guard`] allocator aborts on any allocation over 128 MiB).
//!
//! Inputs: a tiny complete model written by [`builder`] (with the offset of every count, length, type code,
//! dimension and data offset, so mutations hit fields, not only bytes), its metadata with values swapped for
//! arbitrary ones (tokenizer tables of the wrong type or length, ids out of range, templates that do not
//! compile), and the real SmolLM2 header with bytes flipped, fields overwritten and cuts anywhere.

mod alloc_guard;
mod builder;
#[path = "../common/mod.rs"]
mod common;
#[path = "../common/fuzz.rs"]
mod fuzz;

use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use amlserve::grammar::Grammars;
use amlserve::model::gguf_header;
use amlserve::model::{
    ChatMessage, ContentTokens, LlamaConfig, Model, ModelError, SeqChunk, SeqKv, TextTokenizer, WeightFormat,
};
use builder::Gguf;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::GgmlDType;
use proptest::prelude::*;

#[global_allocator]
static GUARD: alloc_guard::Guard = alloc_guard::Guard;

/// Longest a load (or a refusal) of a tiny file may take on two busy cores.
const MAX_LOAD: Duration = Duration::from_secs(20);

/// A file under the test's own target folder, one per test (tests run in parallel).
fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-gguf-{name}.gguf"))
}

/// Uses a loaded model the way the server does: a prompt rendered, tokenized, run through the forward pass,
/// decoded, and the grammar vocabulary built. A file the loader accepts must not fail later.
fn exercise(model: &Model) {
    let messages = [ChatMessage {
        role: "user".into(),
        content: "hello there".into(),
    }];
    // A template from the file may refuse the messages (raise_exception); that is an error, not a panic.
    let ids = match model.chat_prompt(&messages, true, ContentTokens::Text) {
        Ok((_, ids)) => ids,
        Err(_) => model.tokenizer.encode("hello there").expect("encodes"),
    };
    let ids: Vec<u32> = ids.into_iter().take(model.config.context_length).collect();
    if !ids.is_empty() {
        let mut kv = SeqKv::new(model.config.kv_shape(), ids.len(), ids.len());
        let logits = model
            .cpu()
            .expect("the CPU forward")
            .forward(&mut [SeqChunk {
                kv: &mut kv,
                tokens: &ids,
                want_logits: true,
            }])
            .expect("forward runs on an accepted file");
        assert_eq!(logits.dims(), [1, model.config.vocab_size], "one row of logits");
    }
    let _ = model.tokenizer.decode(&ids).expect("decodes");
    // Refusing the vocabulary is the server's clear load error; a panic here would be a hang at startup.
    if let Err(e) = Grammars::new(&model.tokenizer, 0) {
        assert!(!e.to_string().is_empty());
    }
}

/// Loads `bytes` as a model file: `Ok` after [`exercise`], or the error. Panics (failing the case) on a slow
/// load or an error without a message.
fn load(bytes: &[u8], name: &str) -> Result<(), String> {
    let path = scratch(name);
    std::fs::write(&path, bytes).expect("write scratch file");
    let started = Instant::now();
    let result = Model::load(&path, WeightFormat::Q8_0);
    let took = started.elapsed();
    assert!(took < MAX_LOAD, "load took {took:?}");
    match result {
        Ok(model) => {
            exercise(&model);
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.len() > 20, "an error that says little: {msg:?}");
            Err(msg)
        }
    }
}

/// Overwrites the field `slot` of `g` with `value` (little-endian, cut to the field's width).
fn set(g: &mut Gguf, what: &str, value: u64) {
    let slot = g
        .slots
        .iter()
        .find(|s| s.what == what)
        .unwrap_or_else(|| panic!("no field '{what}'"))
        .clone();
    g.bytes[slot.at..slot.at + slot.width].copy_from_slice(&value.to_le_bytes()[..slot.width]);
}

/// Metadata keys to replace (`Some`) or remove (`None`).
type Changes<'a> = Vec<(&'a str, Option<Value>)>;

/// The tiny model's metadata with each key of `changes` replaced (or removed, with `None`; added when new).
fn with_meta<'a>(changes: &[(&'a str, Option<Value>)]) -> Vec<u8> {
    let mut md: Vec<(&'a str, Value)> = builder::metadata();
    for (key, value) in changes {
        let i = md.iter().position(|(k, _)| k == key);
        match (i, value) {
            (Some(i), Some(v)) => md[i].1 = v.clone(),
            (Some(i), None) => {
                md.remove(i);
            }
            (None, Some(v)) => md.push((key, v.clone())),
            (None, None) => panic!("{key} is not in the tiny model's metadata"),
        }
    }
    builder::write(&md, &builder::tensors(GgmlDType::Q8_0), 32).bytes
}

#[test]
fn the_tiny_model_loads_and_runs_in_every_format() {
    for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let g = builder::tiny_model(dtype);
        load(&g.bytes, "formats").unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
    }
}

/// The tiny model with its vocabulary read as SentencePiece-style (scores, `tokenizer.ggml.model = llama`).
#[test]
fn the_tiny_model_loads_and_runs_with_a_sentencepiece_vocabulary() {
    let n = builder::tokens().len();
    let scores = (0..n).map(|i| Value::F32(-(i as f32))).collect();
    let changes = [
        ("tokenizer.ggml.model", Some(Value::String("llama".into()))),
        ("tokenizer.ggml.scores", Some(Value::Array(scores))),
    ];
    load(&with_meta(&changes), "spm").expect("loads and runs");
}

#[test]
fn the_header_reader_agrees_with_candles_on_the_real_model() {
    let path = common::model_path();
    let ours = gguf_header::read(&mut std::fs::File::open(&path).expect("open")).expect("our reader");
    let theirs = gguf_file::Content::read(&mut std::fs::File::open(&path).expect("open")).expect("candle");
    assert_eq!(ours.tensor_data_offset, theirs.tensor_data_offset);
    assert_eq!(ours.metadata.len(), theirs.metadata.len());
    for (k, v) in &theirs.metadata {
        assert_eq!(format!("{:?}", ours.metadata[k]), format!("{v:?}"), "{k}");
    }
    assert_eq!(ours.tensor_infos.len(), theirs.tensor_infos.len());
    for (name, t) in &theirs.tensor_infos {
        let o = &ours.tensor_infos[name];
        assert_eq!(
            (o.ggml_dtype, o.shape.dims(), o.offset),
            (t.ggml_dtype, t.shape.dims(), t.offset)
        );
    }
}

/// Each hostile header field gets an error naming the problem.
#[test]
fn hostile_header_fields_get_clear_errors() {
    let huge = 1u64 << 60;
    let cases: &[(&str, u64, &str)] = &[
        ("version", 0, "version 0"),
        ("version", 1, "version 1"),
        ("version", 3u32.swap_bytes() as u64, "big-endian"),
        ("tensor count", huge, "tensors"),
        ("metadata count", huge, "metadata entries"),
        ("metadata count", u64::MAX, "metadata entries"),
        ("length of key general.architecture", huge, "more than"),
        ("length of key general.architecture", 1 << 20, "left"),
        ("length of general.architecture", huge, "more than"),
        ("type of general.architecture", 13, "not a GGUF value type"),
        ("length of tokenizer.ggml.tokens", huge, "elements"),
        ("length of tokenizer.ggml.tokens", 1 << 30, "elements"),
        ("element type of tokenizer.ggml.tokens", 99, "not a GGUF value type"),
        ("element type of tokenizer.ggml.tokens", 9, "element"),
        ("value of general.alignment", 0, "general.alignment"),
        ("value of general.alignment", 48, "general.alignment"),
        ("value of tokenizer.ggml.add_bos_token", 2, "bool"),
        ("dimension count of token_embd.weight", 5, "dimensions"),
        ("dimension 0 of token_embd.weight", huge, "no valid size"),
        ("dimension 1 of token_embd.weight", 1 << 40, "past the end"),
        ("dimension 0 of token_embd.weight", 33, "whole blocks"),
        ("type of token_embd.weight", 4, "unknown tensor type 4"),
        ("type of token_embd.weight", 16, "i-quant"),
        ("offset of token_embd.weight", huge, "past the end"),
        ("offset of output_norm.weight", 1 << 20, "past the end"),
        ("offset of output_norm.weight", 33, "alignment"),
    ];
    for &(field, value, needle) in cases {
        let mut g = builder::tiny_model(GgmlDType::Q8_0);
        set(&mut g, field, value);
        let err = load(&g.bytes, "fields").expect_err(field);
        assert!(err.contains(needle), "{field} = {value}: {err:?} lacks {needle:?}");
    }
    let dup = [
        builder::metadata(),
        vec![("general.architecture", Value::String("x".into()))],
    ]
    .concat();
    let err = load(
        &builder::write(&dup, &builder::tensors(GgmlDType::F32), 32).bytes,
        "fields",
    )
    .expect_err("dup");
    assert!(err.contains("appears twice"), "{err}");
    let g = builder::tiny_model(GgmlDType::Q8_0);
    for cut in [0, 3, 7, 15, 23, 40, 200, 2_000, g.bytes.len() / 2, g.bytes.len() - 1] {
        let err = load(&g.bytes[..cut], "cuts").expect_err("truncated");
        assert!(
            err.contains("truncated") || err.contains("not a GGUF"),
            "cut at {cut}: {err}"
        );
    }
}

/// Metadata that parses but cannot make a model gets an error naming the key.
#[test]
fn unusable_metadata_gets_clear_errors() {
    let s = |x: &str| Some(Value::String(x.into()));
    let u = |x: u32| Some(Value::U32(x));
    let strings = |xs: &[&str]| Some(Value::Array(xs.iter().map(|x| Value::String(x.to_string())).collect()));
    let n = builder::tokens().len() as u32;
    let scores = |len: u32, x: f32| Some(Value::Array(vec![Value::F32(x); len as usize]));
    let mut cases: Vec<(Changes, &str)> = vec![
        (vec![("llama.context_length", u(u32::MAX))], "context_length"),
        (vec![("llama.context_length", u(0))], "context_length"),
        (vec![("llama.block_count", u(u32::MAX))], "block_count"),
        (vec![("llama.block_count", u(0))], "block_count"),
        (vec![("llama.block_count", u(3))], "block_count"),
        (vec![("llama.attention.head_count", u(0))], "heads"),
        (vec![("llama.attention.head_count", u(3))], "heads"),
        (vec![("llama.attention.head_count", u(4))], "partial rotary"),
        (vec![("llama.attention.head_count_kv", u(0))], "key/value heads"),
        (vec![("llama.attention.head_count_kv", u(3))], "key/value heads"),
        (vec![("llama.attention.head_count_kv", u(2))], "attn_k"),
        (vec![("llama.rope.freq_base", Some(Value::F32(f32::NAN)))], "freq_base"),
        (
            vec![("llama.attention.layer_norm_rms_epsilon", Some(Value::F32(-1.0)))],
            "epsilon",
        ),
        (vec![("general.architecture", s("gpt2"))], "unsupported architecture"),
        (vec![("general.architecture", None)], "general.architecture"),
        (vec![("tokenizer.ggml.model", s("bert"))], "unsupported tokenizer"),
        (vec![("tokenizer.ggml.model", s("llama"))], "tokenizer.ggml.scores"),
        (
            vec![
                ("tokenizer.ggml.model", s("llama")),
                ("tokenizer.ggml.scores", scores(1, 0.0)),
            ],
            "scores has 1 entries",
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("llama")),
                ("tokenizer.ggml.scores", strings(&["x"])),
            ],
            "tokenizer.ggml.scores",
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("llama")),
                ("tokenizer.ggml.scores", scores(n, f32::NAN)),
            ],
            "NaN",
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("llama")),
                ("tokenizer.ggml.scores", scores(n, 0.0)),
                ("tokenizer.ggml.unknown_token_id", u(n)),
            ],
            "unknown_token_id",
        ),
        (
            vec![("tokenizer.ggml.pre", s("qwen2"))],
            "unsupported tokenizer.ggml.pre",
        ),
        (vec![("tokenizer.ggml.tokens", Some(Value::Array(vec![])))], "empty"),
        (
            vec![("tokenizer.ggml.tokens", Some(Value::U32(5)))],
            "tokenizer.ggml.tokens",
        ),
        (
            vec![("tokenizer.ggml.tokens", Some(Value::Array(vec![Value::U8(1)])))],
            "strings",
        ),
        (
            vec![("tokenizer.ggml.token_type", Some(Value::Array(vec![Value::I32(1)])))],
            "token_type has 1 entries",
        ),
        (vec![("tokenizer.ggml.token_type", strings(&["x"]))], "token_type"),
        (
            vec![("tokenizer.ggml.merges", strings(&["nospace"]))],
            "malformed merge",
        ),
        (vec![("tokenizer.ggml.merges", strings(&["q z"]))], "tokenizer"),
        (
            vec![("tokenizer.ggml.merges", Some(Value::Array(vec![Value::I8(1)])))],
            "merges",
        ),
        (vec![("tokenizer.ggml.bos_token_id", u(n))], "bos_token_id"),
        (vec![("tokenizer.ggml.eos_token_id", u(u32::MAX))], "eos_token_id"),
        (vec![("tokenizer.ggml.eos_token_id", None)], "eos_token_id"),
        (
            vec![("tokenizer.chat_template", s("{% for %}"))],
            "chat template does not compile",
        ),
        (
            vec![("tokenizer.chat_template", s("{{ messages["))],
            "chat template does not compile",
        ),
    ];
    let rope_dim = "llama.rope.dimension_count";
    cases.extend([
        (vec![("llama.attention.head_count", u(64)), (rope_dim, u(1))], "odd"),
        (vec![("llama.embedding_length", u(32)), (rope_dim, u(16))], "token_embd"),
        (vec![("llama.embedding_length", u(u32::MAX)), (rope_dim, None)], "heads"),
    ]);
    for (changes, needle) in cases {
        let shown = format!("{changes:?}");
        let err = load(&with_meta(&changes), "meta").expect_err(&shown);
        assert!(err.contains(needle), "{shown}: {err:?} lacks {needle:?}");
    }
    // A tensor whose shape disagrees with the hyper-parameters is named at load.
    let mut tensors = builder::tensors(GgmlDType::F32);
    let q = tensors.iter_mut().find(|t| t.name == "blk.1.attn_v.weight").expect("v");
    q.dims = vec![64, 64];
    q.values = vec![0.0; 64 * 64];
    let err = load(&builder::write(&builder::metadata(), &tensors, 32).bytes, "meta").expect_err("shape");
    assert!(err.contains("blk.1.attn_v.weight"), "{err}");
}

#[test]
fn a_runaway_template_fails_within_its_fuel() {
    let forever = "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}";
    let path = scratch("fuel");
    let bytes = with_meta(&[("tokenizer.chat_template", Some(Value::String(forever.into())))]);
    std::fs::write(&path, bytes).expect("write");
    let model = Model::load(&path, WeightFormat::Q8_0).expect("loads: the template compiles");
    let started = Instant::now();
    let err = model
        .chat_prompt(&[], true, ContentTokens::Text)
        .expect_err("runs out of fuel");
    assert!(err.to_string().contains("fuel"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
}

/// A hostile value for a field (cut to the field's width: any byte for a one-byte field).
fn hostile() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(31),
        Just(32),
        Just(255),
        Just(1 << 31),
        Just(u32::MAX as u64),
        Just(1 << 32),
        Just(1 << 40),
        Just(1 << 60),
        Just(u64::MAX),
        any::<u64>(),
        0u64..100_000,
    ]
}

/// One change to a file.
#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite field `slot` (an index into the slots, wrapped) with a value.
    Field(usize, u64),
    /// XOR the byte at `offset` (wrapped) with a mask.
    Flip(usize, u8),
    /// Keep only the first `len` bytes (wrapped).
    Cut(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), hostile()).prop_map(|(slot, v)| Mutation::Field(slot, v)),
        3 => (any::<usize>(), 1u8..=255).prop_map(|(o, m)| Mutation::Flip(o, m)),
        1 => any::<usize>().prop_map(Mutation::Cut),
    ]
}

fn apply(g: &mut Gguf, m: &Mutation) {
    match *m {
        Mutation::Field(i, v) => {
            let s = &g.slots[i % g.slots.len()];
            let end = (s.at + s.width).min(g.bytes.len());
            if s.at < end {
                let n = end - s.at;
                g.bytes[s.at..end].copy_from_slice(&v.to_le_bytes()[..n.min(8)]);
            }
        }
        Mutation::Flip(o, mask) if !g.bytes.is_empty() => {
            let n = g.bytes.len();
            g.bytes[o % n] ^= mask;
        }
        Mutation::Flip(..) => {}
        Mutation::Cut(len) => {
            let n = g.bytes.len() + 1;
            g.bytes.truncate(len % n);
        }
    }
}

/// An arbitrary metadata value: every type, arrays of them (nested too), and the tiny model's own tables.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i32>().prop_map(Value::I32),
        prop_oneof![Just(0u32), Just(1), Just(2), Just(u32::MAX), 0u32..300].prop_map(Value::U32),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        any::<f32>().prop_map(Value::F32),
        any::<f64>().prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("{{"),
            Just("{% if %}"),
            Just("{% for m in messages %}{{ m.role }}"),
            Just("gpt2")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    let tables = prop_oneof![
        Just(Value::Array(builder::tokens().into_iter().map(Value::String).collect())),
        proptest::collection::vec(0i32..8, 0..300).prop_map(|v| Value::Array(v.into_iter().map(Value::I32).collect())),
        proptest::collection::vec("[a-zĠ]{1,3} [a-zĠ]{1,3}", 0..8)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::String).collect())),
    ];
    let nested = leaf.prop_recursive(3, 32, 8, |inner| {
        proptest::collection::vec(inner, 0..8).prop_map(|items| {
            // GGUF arrays hold one type: keep the elements of the first's type.
            let code = items.first().map(std::mem::discriminant);
            Value::Array(
                items
                    .into_iter()
                    .filter(|v| Some(std::mem::discriminant(v)) == code)
                    .collect(),
            )
        })
    });
    prop_oneof![3 => nested, 1 => tables]
}

/// The real model's header, its data left out.
fn real_header() -> &'static [u8] {
    static HEADER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HEADER.get_or_init(|| {
        let path = common::model_path();
        let content = gguf_header::read(&mut std::fs::File::open(&path).expect("open")).expect("header");
        let mut bytes = vec![0; content.tensor_data_offset as usize];
        std::fs::File::open(&path)
            .expect("open")
            .read_exact(&mut bytes)
            .expect("read header");
        bytes
    })
}

/// The real file seen through a patched header: `header` in front, zeros up to the real file's length, so the
/// reader's extent checks see a whole file without 98 MB being written per case.
struct Patched<'a> {
    header: &'a [u8],
    len: u64,
    pos: u64,
}

impl Read for Patched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = buf.len().min(left as usize);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = self.header.get(self.pos as usize + i).copied().unwrap_or(0);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Patched<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.len.saturating_add_signed(d),
            SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
        };
        Ok(self.pos)
    }
}

/// Where the real header's fields for `key` are: its type code, and for arrays the element type and length.
fn real_slots() -> Vec<builder::Slot> {
    let header = real_header();
    let keys = [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.chat_template",
        "llama.context_length",
        "llama.block_count",
        "general.architecture",
    ];
    let mut slots = vec![
        builder::Slot {
            at: 8,
            width: 8,
            what: "tensor count".into(),
        },
        builder::Slot {
            at: 16,
            width: 8,
            what: "metadata count".into(),
        },
    ];
    for key in keys {
        let Some(i) = header.windows(key.len()).position(|w| w == key.as_bytes()) else {
            continue;
        };
        let at = i + key.len();
        let field = |at, width, what: &str| builder::Slot {
            at,
            width,
            what: format!("{what} of {key}"),
        };
        slots.push(field(i - 8, 8, "key length"));
        slots.push(field(at, 4, "type"));
        slots.push(field(at + 4, 8, "element type or value"));
        slots.push(field(at + 8, 8, "length"));
    }
    slots
}

/// Reads a (mutated) real header, and on success builds what the loader builds from metadata alone. A header
/// shorter than the real one is a file cut there.
fn read_real(header: &[u8]) -> Result<(), String> {
    let len = match header.len() < real_header().len() {
        true => header.len() as u64,
        false => std::fs::metadata(common::model_path()).expect("stat").len(),
    };
    let started = Instant::now();
    let mut file = Patched { header, len, pos: 0 };
    let result = gguf_header::read(&mut file)
        .map_err(|e| e.to_string())
        .and_then(|content| {
            LlamaConfig::from_gguf(&content).map_err(|e| e.to_string())?;
            let tok = TextTokenizer::from_gguf(&content).map_err(|e: ModelError| e.to_string())?;
            let ids = tok.encode("Hello, world! <|im_start|>").map_err(|e| e.to_string())?;
            tok.decode(&ids).map_err(|e| e.to_string())?;
            Ok(())
        });
    assert!(started.elapsed() < MAX_LOAD, "took {:?}", started.elapsed());
    if let Err(e) = &result {
        assert!(e.len() > 20, "an error that says little: {e:?}");
    }
    result
}

#[test]
fn hostile_fields_of_the_real_header_get_clear_errors() {
    let mut header = real_header().to_vec();
    read_real(&header).expect("the real header reads");
    let slots = real_slots();
    assert!(slots.len() > 20, "the keys were found: {slots:?}");
    for s in &slots {
        for v in [1u64 << 60, u32::MAX as u64, 1 << 30] {
            let saved = header[s.at..s.at + s.width].to_vec();
            header[s.at..s.at + s.width].copy_from_slice(&v.to_le_bytes()[..s.width]);
            let _ = read_real(&header);
            header[s.at..s.at + s.width].copy_from_slice(&saved);
        }
    }
}

proptest! {
    #![proptest_config(fuzz::config(96))]

    /// Field overwrites, byte flips and cuts of the tiny model.
    #[test]
    fn mutated_tiny_models_load_or_fail_clearly(
        q8 in any::<bool>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut g = builder::tiny_model(if q8 { GgmlDType::Q8_0 } else { GgmlDType::F32 });
        for m in &mutations {
            apply(&mut g, m);
        }
        let _ = load(&g.bytes, "mutated");
    }

    /// The tiny model's metadata with keys replaced by arbitrary values, removed, or added.
    #[test]
    fn arbitrary_metadata_loads_or_fails_clearly(
        changes in proptest::collection::vec((any::<usize>(), proptest::option::weighted(0.9, value())), 1..4),
    ) {
        let mut md: Vec<(String, Value)> =
            builder::metadata().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        for (i, v) in changes {
            let i = i % md.len();
            match v {
                Some(v) => md[i].1 = v,
                None => {
                    md.remove(i);
                }
            }
        }
        let md: Vec<(&str, Value)> = md.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let _ = load(&builder::write(&md, &builder::tensors(GgmlDType::Q8_0), 32).bytes, "metadata");
    }
}

proptest! {
    #![proptest_config(fuzz::config(48))]

    /// The real header with fields overwritten, bytes flipped and cuts (tensor data read as zeros).
    #[test]
    fn mutated_real_headers_read_or_fail_clearly(mutations in proptest::collection::vec(mutation(), 1..4)) {
        let mut g = Gguf {
            bytes: real_header().to_vec(),
            slots: real_slots(),
        };
        for m in &mutations {
            apply(&mut g, m);
        }
        let _ = read_real(&g.bytes);
    }
}

/// An in-memory reader is enough for the header: no file needed.
#[test]
fn the_header_reader_takes_any_seekable_reader() {
    let g = builder::tiny_model(GgmlDType::F32);
    let content = gguf_header::read(&mut Cursor::new(&g.bytes)).expect("reads");
    assert_eq!(content.tensor_infos.len(), 2 + 9 * builder::LAYERS);
}

//! Writes small, complete GGUF files for the loader tests (a 2-layer llama with a byte-level BPE vocabulary
//! and a chat template), recording where every count, length, type code, dimension and offset sits, so a test
//! can overwrite exactly that field with a hostile value.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// A header field a mutation can aim at: where it is, how wide, and what it holds.
#[derive(Debug, Clone)]
pub struct Slot {
    pub at: usize,
    pub width: usize,
    pub what: String,
}

/// A written file and its fields.
#[derive(Debug, Clone)]
pub struct Gguf {
    pub bytes: Vec<u8>,
    pub slots: Vec<Slot>,
}

/// One tensor to write: name, shape (candle order: rows, then columns), type and f32 values to quantize.
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    pub values: Vec<f32>,
}

/// ggml's code for a tensor type.
fn dtype_code(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q4K => 12,
        GgmlDType::Q6K => 14,
        GgmlDType::BF16 => 30,
        other => panic!("the builder does not write {other:?}"),
    }
}

/// GGUF's code for a value type.
fn value_code(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
    slots: Vec<Slot>,
}

impl Writer {
    fn slot(&mut self, bytes: &[u8], what: String) {
        self.slots.push(Slot {
            at: self.buf.len(),
            width: bytes.len(),
            what,
        });
        self.buf.extend_from_slice(bytes);
    }

    fn string(&mut self, s: &str, what: &str) {
        self.slot(&(s.len() as u64).to_le_bytes(), format!("length of {what}"));
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// Writes a value; only the first few elements of an array get slots (their shape repeats).
    fn value(&mut self, v: &Value, what: &str, slots: bool) {
        match v {
            Value::U8(x) => self.buf.push(*x),
            Value::I8(x) => self.buf.extend_from_slice(&x.to_le_bytes()),
            Value::U16(x) => self.buf.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => self.buf.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => self.slot(&x.to_le_bytes(), format!("value of {what}")),
            Value::I32(x) => self.buf.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => self.buf.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => self.buf.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => self.buf.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => self.buf.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => self.slot(&[u8::from(*x)], format!("value of {what}")),
            Value::String(s) if slots => self.string(s, what),
            Value::String(s) => {
                self.buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
                self.buf.extend_from_slice(s.as_bytes());
            }
            Value::Array(items) => {
                let code = items.first().map_or(4, value_code);
                self.slot(&code.to_le_bytes(), format!("element type of {what}"));
                self.slot(&(items.len() as u64).to_le_bytes(), format!("length of {what}"));
                let element = format!("an element of {what}");
                for (i, item) in items.iter().enumerate() {
                    self.value(item, &element, slots && i < 2);
                }
            }
        }
    }
}

/// Writes a GGUF v3 file with `metadata` and `tensors` (data aligned to `alignment`).
pub fn write(metadata: &[(&str, Value)], tensors: &[TensorSpec], alignment: usize) -> Gguf {
    let mut w = Writer::default();
    w.buf.extend_from_slice(b"GGUF");
    w.slot(&3u32.to_le_bytes(), "version".into());
    w.slot(&(tensors.len() as u64).to_le_bytes(), "tensor count".into());
    w.slot(&(metadata.len() as u64).to_le_bytes(), "metadata count".into());
    for (key, value) in metadata {
        w.string(key, &format!("key {key}"));
        w.slot(&value_code(value).to_le_bytes(), format!("type of {key}"));
        w.value(value, key, true);
    }
    let mut data = Vec::new();
    for t in tensors {
        let q = QTensor::quantize(
            &Tensor::from_vec(t.values.clone(), t.dims.as_slice(), &Device::Cpu).expect("tensor"),
            t.dtype,
        )
        .expect("quantize");
        let raw = q.data().expect("data");
        data.resize(data.len().next_multiple_of(alignment), 0);
        w.string(&t.name, &format!("tensor name {}", t.name));
        w.slot(
            &(t.dims.len() as u32).to_le_bytes(),
            format!("dimension count of {}", t.name),
        );
        for (i, d) in t.dims.iter().rev().enumerate() {
            w.slot(&(*d as u64).to_le_bytes(), format!("dimension {i} of {}", t.name));
        }
        w.slot(&dtype_code(t.dtype).to_le_bytes(), format!("type of {}", t.name));
        w.slot(&(data.len() as u64).to_le_bytes(), format!("offset of {}", t.name));
        data.extend_from_slice(&raw);
    }
    w.buf.resize(w.buf.len().next_multiple_of(alignment), 0);
    w.buf.extend_from_slice(&data);
    Gguf {
        bytes: w.buf,
        slots: w.slots,
    }
}

/// GPT-2's `bytes_to_unicode`: the character each byte is written as in a byte-level BPE vocabulary.
pub fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                shifted += 1;
                char::from_u32(0xff + shifted).expect("shifted")
            }
        })
        .collect()
}

/// The tiny model's sizes.
pub const HIDDEN: usize = 64;
pub const HEADS: usize = 2;
pub const KV_HEADS: usize = 1;
pub const FFN: usize = 96;
pub const LAYERS: usize = 2;
pub const CONTEXT: usize = 64;

/// Special tokens after the 256 bytes and the merges.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Merges of the tiny vocabulary (each adds one token).
const MERGES: [&str; 6] = ["h e", "l l", "he ll", "Ġ t", "Ġt h", "o Ġ"];

/// A ChatML template that refuses unknown roles, like many real ones.
pub const TEMPLATE: &str = "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}\
{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + \
'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The tiny model's vocabulary: bytes, merged tokens, specials.
pub fn tokens() -> Vec<String> {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
    tokens
}

/// The tiny model's metadata, in file order.
pub fn metadata() -> Vec<(&'static str, Value)> {
    let tokens = tokens();
    let n = tokens.len();
    let types = (0..n)
        .map(|i| Value::I32(if i >= n - SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let s = |x: &str| Value::String(x.into());
    let u = |x: usize| Value::U32(x as u32);
    vec![
        ("general.architecture", s("llama")),
        ("general.alignment", Value::U32(32)),
        ("llama.block_count", u(LAYERS)),
        ("llama.context_length", u(CONTEXT)),
        ("llama.embedding_length", u(HIDDEN)),
        ("llama.feed_forward_length", u(FFN)),
        ("llama.attention.head_count", u(HEADS)),
        ("llama.attention.head_count_kv", u(KV_HEADS)),
        ("llama.rope.dimension_count", u(HIDDEN / HEADS)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(MERGES.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", u(n - 2)),
        ("tokenizer.ggml.eos_token_id", u(n - 1)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", s(TEMPLATE)),
    ]
}

/// Small deterministic weights.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0) * 0.1)
        .collect()
}

/// The tiny model's tensors, matrices in `dtype` (norms stay f32).
pub fn tensors(dtype: GgmlDType) -> Vec<TensorSpec> {
    let vocab = tokens().len();
    let hd = HIDDEN / HEADS;
    let mut seed = 0;
    let mut t = |name: String, dims: Vec<usize>, dtype: GgmlDType| {
        seed += 1;
        let n = dims.iter().product();
        let values = if dims.len() == 1 { vec![1.0; n] } else { values(n, seed) };
        TensorSpec {
            name,
            dims,
            dtype,
            values,
        }
    };
    let mut out = vec![t("token_embd.weight".into(), vec![vocab, HIDDEN], dtype)];
    for i in 0..LAYERS {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        out.push(t(p("attn_norm"), vec![HIDDEN], GgmlDType::F32));
        out.push(t(p("attn_q"), vec![HEADS * hd, HIDDEN], dtype));
        out.push(t(p("attn_k"), vec![KV_HEADS * hd, HIDDEN], dtype));
        out.push(t(p("attn_v"), vec![KV_HEADS * hd, HIDDEN], dtype));
        out.push(t(p("attn_output"), vec![HIDDEN, HEADS * hd], dtype));
        out.push(t(p("ffn_norm"), vec![HIDDEN], GgmlDType::F32));
        out.push(t(p("ffn_gate"), vec![FFN, HIDDEN], dtype));
        out.push(t(p("ffn_up"), vec![FFN, HIDDEN], dtype));
        out.push(t(p("ffn_down"), vec![HIDDEN, FFN], dtype));
    }
    out.push(t("output_norm.weight".into(), vec![HIDDEN], GgmlDType::F32));
    out
}

/// The tiny model as a file.
pub fn tiny_model(dtype: GgmlDType) -> Gguf {
    write(&metadata(), &tensors(dtype), 32)
}

//! Hugging Face model folders (`config.json`, safetensors, `tokenizer.json`...) loaded by our loader and compared,
//! logit by logit over a prompt and 32 greedy tokens, with candle-transformers' non-quantized model of each family
//! (`llama`, `mistral`, `qwen2`, `qwen3`, `gemma3`, `phi3`), fed the same safetensors through a `VarBuilder` and
//! the same `config.json`. The folders are written here: random weights under each family's real Hugging Face
//! tensor names and config keys, shrunk sizes, f32 / bf16 / f16 files, one file or shards with an index, and a
//! small tokenizer.json of the family's kind (byte-level BPE, or SentencePiece-style with byte fallback).
//!
//! Our weights are held as f32 (`--weights f32`: the reference's values, so the comparison is of the forward and
//! the loading, not of quantization; one test runs the default Q8_0 with its own tolerance). Where candle's model
//! departs from Hugging Face's in a way that would hide our bugs or invent some, the reference is run around it:
//! - `mistral` applies its sliding window only in a multi-token step's mask, and there to one key more than
//!   Hugging Face (`j + window < i` masked: `window + 1` keys); its decode steps see every key. So it is run on
//!   the whole sequence every step, without a cache, with a window one smaller in its own config;
//! - `gemma3` runs one token at a time (see `family_forward.rs`).
//!
//! Also: the tokenizer, stop ids and chat template come from the folder's files; a folder nested two levels deep
//! is found and served over HTTP; a bad `config.json` or an unexpected tensor is a clear error.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use amlserve::model::{Forward, Model, SeqChunk, SeqKv, WeightFormat};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::logits::{argmax, compare_whole_and_packed, greedy_reference, noise, OnDevice, Tolerance};
use common::Server;
use serde_json::{json, Value};

/// Embedding rows (`vocab_size`); the tokenizers have fewer tokens, so the last ids are padding.
const VOCAB: usize = 320;
const CONTEXT: usize = 256;
/// Sliding window of the Mistral and Gemma models: the prompt and the generated tokens run well past it.
const WINDOW: usize = 8;
const PROMPT: usize = 12;

/// Our f32 forward against the reference's f32 values: the tolerance of `family_forward.rs` (our KV cache is
/// bf16, and sums run in another order). Seen (2026-12-04): relative RMS 0.001 to 0.006, max |diff| 0.02 to 0.08.
const F32_TOLERANCE: Tolerance = Tolerance {
    max_abs: 0.3,
    max_rel_rms: 0.03,
};

/// A synthetic model's sizes.
#[derive(Clone, Copy)]
struct Dims {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
}

const SMALL: Dims = Dims {
    layers: 3,
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    ffn: 128,
};

/// Tensors by Hugging Face name, generated in a fixed order.
struct Weights {
    tensors: Vec<(String, Tensor)>,
    seed: u64,
}

impl Weights {
    fn add(&mut self, name: &str, shape: &[usize], scale: f32, offset: f32) {
        self.seed += 1;
        let n = shape.iter().product();
        let v: Vec<f32> = noise(n, self.seed, scale).into_iter().map(|x| x + offset).collect();
        let t = Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor");
        self.tensors.push((name.to_string(), t));
    }

    /// A projection from `cols` to `rows` values keeping activations near unit size.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) {
        self.add(name, &[rows, cols], (3.0 / cols as f32).sqrt(), 0.0);
    }
}

/// The weights of `arch` (`llama`, `mistral`, `qwen2`, `qwen3`, `gemma3`, `phi3`) under its Hugging Face names.
/// Norms are near 1 as the model computes them: Gemma stores `w` for its `1 + w`.
fn weights(arch: &str, d: Dims, tied: bool) -> Vec<(String, Tensor)> {
    let mut w = Weights {
        tensors: Vec::new(),
        seed: 100,
    };
    let norm_offset = if arch == "gemma3" { 0.0 } else { 1.0 };
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    w.add("model.embed_tokens.weight", &[VOCAB, d.hidden], 1.0, 0.0);
    w.add("model.norm.weight", &[d.hidden], 0.2, norm_offset);
    if !tied {
        let scale = 3.0 * (3.0 / d.hidden as f32).sqrt();
        w.add("lm_head.weight", &[VOCAB, d.hidden], scale, 0.0);
    }
    for i in 0..d.layers {
        let t = |n: &str| format!("model.layers.{i}.{n}");
        let mut norms = vec!["input_layernorm.weight", "post_attention_layernorm.weight"];
        if arch == "gemma3" {
            norms.extend(["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]);
        }
        for n in norms {
            w.add(&t(n), &[d.hidden], 0.2, norm_offset);
        }
        if arch == "phi3" {
            w.matrix(&t("self_attn.qkv_proj.weight"), q + 2 * kv, d.hidden);
            w.matrix(&t("mlp.gate_up_proj.weight"), 2 * d.ffn, d.hidden);
        } else {
            w.matrix(&t("self_attn.q_proj.weight"), q, d.hidden);
            w.matrix(&t("self_attn.k_proj.weight"), kv, d.hidden);
            w.matrix(&t("self_attn.v_proj.weight"), kv, d.hidden);
            w.matrix(&t("mlp.gate_proj.weight"), d.ffn, d.hidden);
            w.matrix(&t("mlp.up_proj.weight"), d.ffn, d.hidden);
        }
        w.matrix(&t("self_attn.o_proj.weight"), d.hidden, q);
        w.matrix(&t("mlp.down_proj.weight"), d.hidden, d.ffn);
        if arch == "qwen2" {
            w.add(&t("self_attn.q_proj.bias"), &[q], 0.5, 0.0);
            w.add(&t("self_attn.k_proj.bias"), &[kv], 0.5, 0.0);
            w.add(&t("self_attn.v_proj.bias"), &[kv], 0.5, 0.0);
        }
        if matches!(arch, "qwen3" | "gemma3") {
            w.add(&t("self_attn.q_norm.weight"), &[d.head_dim], 0.2, norm_offset);
            w.add(&t("self_attn.k_norm.weight"), &[d.head_dim], 0.2, norm_offset);
        }
    }
    w.tensors
}

/// The `config.json` keys every family shares (transformers' names).
fn base_config(arch: &str, model_type: &str, d: Dims) -> Value {
    json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": d.hidden,
        "intermediate_size": d.ffn,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "vocab_size": VOCAB,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
    })
}

// ---- tokenizers -----------------------------------------------------------------------------------------------

/// GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for themselves, the others for U+0100 on.
fn byte_char(b: u8) -> char {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    if printable(u32::from(b)) {
        return char::from(b);
    }
    let n = (0..u32::from(b)).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(0x100 + n).expect("char")
}

/// An added token as tokenizer.json lists it.
fn added(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special})
}

/// A post-processor that puts `bos` before a sequence.
fn bos_template(bos: &str, id: usize) -> Value {
    json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}}})
}

/// A byte-level BPE tokenizer.json (as Qwen's, Llama 3's, SmolLM's): the 256 byte characters, a few merges,
/// then `specials`; with `bos`, a post-processor adding it (Llama 3's).
fn byte_level_tokenizer(specials: &[&str], bos: Option<&str>) -> Value {
    let merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("Ġ", "a"),
        ("e", "r"),
        ("o", "n"),
        ("Ġ", "s"),
        ("r", "e"),
        ("a", "t"),
        ("Ġ", "c"),
        ("e", "n"),
        ("in", "g"),
        ("Ġ", "w"),
        ("o", "r"),
        ("l", "l"),
    ];
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), json!(vocab.len()));
    }
    for (a, b) in merges {
        vocab.insert(format!("{a}{b}"), json!(vocab.len()));
    }
    let first = vocab.len();
    let added_tokens: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| added(first + i, s, true))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let post = match bos {
        Some(b) => {
            let id = first + specials.iter().position(|s| *s == b).expect("bos among the specials");
            json!({"type": "Sequence", "processors": [byte_level.clone(), bos_template(b, id)]})
        }
        None => byte_level.clone(),
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    })
}

/// A SentencePiece-style BPE tokenizer.json (as Gemma's, Mistral's): `specials` first, the 256 `<0xHH>` byte
/// tokens, `▁` and the lowercase letters, a few merges; spaces become `▁`, bytes outside the vocabulary fall
/// back to byte tokens, and `bos` is added by the post-processor.
fn metaspace_tokenizer(specials: &[&str], bos: &str) -> Value {
    let merges = [
        ("▁", "t"),
        ("h", "e"),
        ("▁t", "he"),
        ("i", "n"),
        ("▁", "a"),
        ("e", "r"),
        ("o", "n"),
        ("▁", "s"),
        ("r", "e"),
        ("a", "t"),
        ("▁", "w"),
        ("l", "l"),
    ];
    let mut vocab = serde_json::Map::new();
    for s in specials {
        vocab.insert(s.to_string(), json!(vocab.len()));
    }
    for b in 0..=255u8 {
        vocab.insert(format!("<0x{b:02X}>"), json!(vocab.len()));
    }
    for c in std::iter::once('▁').chain('a'..='z') {
        vocab.insert(c.to_string(), json!(vocab.len()));
    }
    for (a, b) in merges {
        vocab.insert(format!("{a}{b}"), json!(vocab.len()));
    }
    let added_tokens: Vec<Value> = specials.iter().enumerate().map(|(i, s)| added(i, s, true)).collect();
    let bos_id = specials.iter().position(|s| *s == bos).expect("bos among the specials");
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null,
        "post_processor": bos_template(bos, bos_id),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": specials.iter().find(|s| **s == "<unk>"),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    })
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

// ---- folders --------------------------------------------------------------------------------------------------

/// A folder removed when dropped.
struct Folder(PathBuf);

impl Folder {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("amlserve-hf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What goes into a folder.
struct Spec {
    config: Value,
    weights: Vec<(String, Tensor)>,
    /// The safetensors dtype.
    dtype: DType,
    /// 1: `model.safetensors`; more: shards and `model.safetensors.index.json`.
    shards: usize,
    tokenizer: Value,
    tokenizer_config: Option<Value>,
    generation_config: Option<Value>,
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).expect("json")).expect("write json");
}

/// Writes `spec` into `dir` as `save_pretrained` lays a folder out.
fn write_folder(dir: &Path, spec: &Spec) {
    std::fs::create_dir_all(dir).expect("mkdir");
    write_json(&dir.join("config.json"), &spec.config);
    write_json(&dir.join("tokenizer.json"), &spec.tokenizer);
    if let Some(c) = &spec.tokenizer_config {
        write_json(&dir.join("tokenizer_config.json"), c);
    }
    if let Some(g) = &spec.generation_config {
        write_json(&dir.join("generation_config.json"), g);
    }
    let file_name = |i: usize| match spec.shards {
        1 => "model.safetensors".to_string(),
        n => format!("model-{:05}-of-{n:05}.safetensors", i + 1),
    };
    let mut weight_map = serde_json::Map::new();
    for shard in 0..spec.shards {
        let part: HashMap<String, Tensor> = spec
            .weights
            .iter()
            .enumerate()
            .filter(|(i, _)| i % spec.shards == shard)
            .map(|(_, (n, t))| {
                weight_map.insert(n.clone(), json!(file_name(shard)));
                (n.clone(), t.to_dtype(spec.dtype).expect("dtype"))
            })
            .collect();
        candle_core::safetensors::save(&part, dir.join(file_name(shard))).expect("save safetensors");
    }
    if spec.shards > 1 {
        write_json(
            &dir.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": 0}, "weight_map": weight_map}),
        );
    }
}

/// The reference's view of the folder: every safetensors file, read whole, values as f32.
fn reference_weights(dir: &Path) -> VarBuilder<'static> {
    let mut all = HashMap::new();
    for entry in std::fs::read_dir(dir).expect("folder") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            all.extend(candle_core::safetensors::load(&path, &Device::Cpu).expect("safetensors"));
        }
    }
    VarBuilder::from_tensors(all, DType::F32, &Device::Cpu)
}

/// The reference's own reading of the folder's `config.json`.
fn reference_config<T: serde::de::DeserializeOwned>(dir: &Path) -> T {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config.json")).expect("reference config")
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 37 + 11) % 280).collect()
}

fn input(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids")
}

/// The last row of a reference's logits (`[1, vocab]` or `[1, 1, vocab]`).
fn last_row(t: candle_core::Result<Tensor>) -> Vec<f32> {
    let v = t
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("reference logits");
    v[v.len() - VOCAB..].to_vec()
}

/// Loads the folder with our loader (weights as f32) and compares it with the reference's greedy run.
fn compare_with_reference(name: &str, dir: &Path, prompt: &[u32], forward: impl FnMut(&[u32], usize) -> Vec<f32>) {
    let (want, generated) = greedy_reference(prompt, forward);
    let model = Model::load(dir, WeightFormat::F32).expect("our loader reads the folder");
    let ours = model.cpu().expect("the CPU forward");
    assert_eq!(ours.config.vocab_size, VOCAB);
    compare_whole_and_packed(name, ours, prompt, &want, &generated, &F32_TOLERANCE);
    // The device forward (here on candle's CPU backend) reads the same folder.
    let info = amlserve::model::device::DeviceInfo::cpu();
    let model = Model::load_on(dir, WeightFormat::F32, Some((&Device::Cpu, info))).expect("the device forward");
    let Forward::Device(device, _) = &model.forward else {
        panic!("not the device forward")
    };
    let on_device = OnDevice::new(device);
    let name = format!("{name} (device forward)");
    compare_whole_and_packed(&name, &on_device, prompt, &want, &generated, &F32_TOLERANCE);
}

// ---- the families -------------------------------------------------------------------------------------------

fn llama_folder(dir: &Path) {
    let mut config = base_config("LlamaForCausalLM", "llama", SMALL);
    config["rope_theta"] = json!(10_000.0);
    // Llama 3.1's rotary scaling, with a context short enough that some frequencies fall between the bounds.
    config["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    config["bos_token_id"] = json!(272);
    config["eos_token_id"] = json!([273, 274]);
    let specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"];
    write_folder(
        dir,
        &Spec {
            config,
            weights: weights("llama", SMALL, false),
            dtype: DType::F32,
            shards: 1,
            tokenizer: byte_level_tokenizer(&specials, Some("<|begin_of_text|>")),
            tokenizer_config: Some(json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})),
            generation_config: Some(json!({"bos_token_id": 272, "eos_token_id": [273, 274]})),
        },
    );
}

/// A reference that keeps its own cache: `forward(model, ids, position)`.
fn llama_reference(dir: &Path) -> impl FnMut(&[u32], usize) -> Vec<f32> {
    use candle_transformers::models::llama;
    let cfg = reference_config::<llama::LlamaConfig>(dir).into_config(false);
    let model = llama::Llama::load(reference_weights(dir), &cfg).expect("reference");
    let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).expect("cache");
    move |ids, pos| last_row(model.forward(&input(ids), pos, &mut cache))
}

#[test]
fn llama_with_llama3_rope_scaling_matches_candles_llama() {
    let dir = Folder::new("llama");
    llama_folder(dir.path());
    compare_with_reference("llama", dir.path(), &prompt(PROMPT), llama_reference(dir.path()));
}

#[test]
fn llama_at_the_default_q8_0_stays_close_to_candles_f32_llama() {
    let dir = Folder::new("llama-q8");
    llama_folder(dir.path());
    let prompt = prompt(PROMPT);
    let (want, generated) = greedy_reference(&prompt, llama_reference(dir.path()));
    let f32_bytes = Model::load(dir.path(), WeightFormat::F32).expect("f32").weight_bytes();
    let model = Model::load(dir.path(), WeightFormat::Q8_0).expect("q8_0");
    // Q8_0 holds 34 bytes per 32 values: the matrices (and embedding) really were requantized.
    assert!(
        model.weight_bytes() * 3 < f32_bytes,
        "{} vs {f32_bytes}",
        model.weight_bytes()
    );
    // Quantized weights and activations. Seen (2026-12-04): relative RMS 0.029, max |diff| 0.31, 32 of 33 greedy
    // tokens the same (the other a near tie).
    let tol = Tolerance {
        max_abs: 0.5,
        max_rel_rms: 0.05,
    };
    let ours = model.cpu().expect("cpu");
    compare_whole_and_packed("llama q8_0", ours, &prompt, &want, &generated, &tol);
}

#[test]
fn mistral_with_a_sliding_window_in_sharded_bf16_matches_candles_mistral() {
    use candle_transformers::models::mistral;
    let dir = Folder::new("mistral");
    let mut config = base_config("MistralForCausalLM", "mistral", SMALL);
    config["rope_theta"] = json!(1_000_000.0);
    config["sliding_window"] = json!(WINDOW);
    config["head_dim"] = Value::Null; // as Mistral's own files write it
    config["bos_token_id"] = json!(1);
    config["eos_token_id"] = json!(2);
    write_folder(
        dir.path(),
        &Spec {
            config,
            weights: weights("mistral", SMALL, false),
            dtype: DType::BF16,
            shards: 3,
            tokenizer: metaspace_tokenizer(&["<s>", "</s>", "<unk>"], "<s>"),
            tokenizer_config: Some(json!({"add_bos_token": true, "bos_token": "<s>", "eos_token": "</s>"})),
            generation_config: None,
        },
    );
    // See the module docs: the whole sequence every step, the window one smaller in candle's terms.
    let mut cfg: mistral::Config = reference_config(dir.path());
    cfg.sliding_window = Some(WINDOW - 1);
    let mut reference = mistral::Model::new(&cfg, reference_weights(dir.path())).expect("reference");
    let mut seq = Vec::new();
    let prompt = prompt(PROMPT);
    assert!(prompt.len() > WINDOW);
    compare_with_reference("mistral", dir.path(), &prompt, |ids, _| {
        seq.extend_from_slice(ids);
        reference.clear_kv_cache();
        last_row(reference.forward(&input(&seq), 0))
    });
}

#[test]
fn qwen2_with_qkv_biases_tied_and_sharded_f16_matches_candles_qwen2() {
    use candle_transformers::models::qwen2;
    let dir = Folder::new("qwen2");
    let mut config = base_config("Qwen2ForCausalLM", "qwen2", SMALL);
    config["rope_theta"] = json!(1_000_000.0);
    config["tie_word_embeddings"] = json!(true);
    config["sliding_window"] = json!(CONTEXT);
    config["max_window_layers"] = json!(SMALL.layers);
    config["use_sliding_window"] = json!(false);
    config["eos_token_id"] = json!(274);
    write_folder(
        dir.path(),
        &Spec {
            config,
            weights: weights("qwen2", SMALL, true),
            dtype: DType::F16,
            shards: 2,
            tokenizer: byte_level_tokenizer(&["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None),
            tokenizer_config: Some(json!({"bos_token": null, "eos_token": "<|im_end|>", "chat_template": CHATML})),
            generation_config: Some(json!({"eos_token_id": [274, 272]})),
        },
    );
    let cfg: qwen2::Config = reference_config(dir.path());
    let mut reference = qwen2::ModelForCausalLM::new(&cfg, reference_weights(dir.path())).expect("reference");
    compare_with_reference("qwen2", dir.path(), &prompt(PROMPT), |ids, pos| {
        last_row(reference.forward(&input(ids), pos))
    });
}

#[test]
fn qwen3_with_qk_norms_and_wide_heads_matches_candles_qwen3() {
    use candle_transformers::models::qwen3;
    let dir = Folder::new("qwen3");
    // Heads of 32: q is 128 wide on a hidden size of 64.
    let d = Dims { head_dim: 32, ..SMALL };
    let mut config = base_config("Qwen3ForCausalLM", "qwen3", d);
    config["head_dim"] = json!(d.head_dim);
    config["rope_theta"] = json!(1_000_000.0);
    config["attention_bias"] = json!(false);
    config["tie_word_embeddings"] = json!(true);
    config["sliding_window"] = Value::Null;
    config["max_window_layers"] = json!(d.layers);
    config["use_sliding_window"] = json!(false);
    config["eos_token_id"] = json!(274);
    write_folder(
        dir.path(),
        &Spec {
            config,
            weights: weights("qwen3", d, true),
            dtype: DType::F32,
            shards: 1,
            tokenizer: byte_level_tokenizer(&["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None),
            tokenizer_config: Some(json!({"eos_token": "<|im_end|>", "chat_template": CHATML})),
            generation_config: None,
        },
    );
    let cfg: qwen3::Config = reference_config(dir.path());
    let mut reference = qwen3::ModelForCausalLM::new(&cfg, reference_weights(dir.path())).expect("reference");
    compare_with_reference("qwen3", dir.path(), &prompt(PROMPT), |ids, pos| {
        last_row(reference.forward(&input(ids), pos))
    });
}

#[test]
fn phi3_with_fused_projections_matches_candles_phi3() {
    use candle_transformers::models::phi3;
    let dir = Folder::new("phi3");
    let mut config = base_config("Phi3ForCausalLM", "phi3", SMALL);
    config["rope_theta"] = json!(10_000.0);
    config["rope_scaling"] = Value::Null;
    config["rms_norm_eps"] = json!(1e-5);
    // Wider than the sequences here: candle's phi3 has no window to compare one with (Mistral's test does).
    config["sliding_window"] = json!(2047);
    config["original_max_position_embeddings"] = json!(CONTEXT);
    config["bos_token_id"] = json!(1);
    config["eos_token_id"] = json!(2);
    write_folder(
        dir.path(),
        &Spec {
            config,
            weights: weights("phi3", SMALL, false),
            dtype: DType::BF16,
            shards: 1,
            tokenizer: metaspace_tokenizer(&["<unk>", "<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>"], "<s>"),
            tokenizer_config: Some(json!({"add_bos_token": false, "bos_token": "<s>", "eos_token": "<|end|>"})),
            generation_config: Some(json!({"eos_token_id": [2, 3]})),
        },
    );
    let cfg: phi3::Config = reference_config(dir.path());
    let mut reference = phi3::Model::new(&cfg, reference_weights(dir.path())).expect("reference");
    compare_with_reference("phi3", dir.path(), &prompt(PROMPT), |ids, pos| {
        last_row(reference.forward(&input(ids), pos))
    });
}

/// Seven layers: five sliding (window 8), one global, one sliding; heads of 32 on a hidden size of 64.
const GEMMA: Dims = Dims {
    layers: 7,
    head_dim: 32,
    ..SMALL
};

fn gemma_config() -> Value {
    let mut config = base_config("Gemma3ForCausalLM", "gemma3_text", GEMMA);
    let c = config.as_object_mut().expect("object");
    c.remove("hidden_act");
    for (k, v) in [
        ("head_dim", json!(GEMMA.head_dim)),
        ("hidden_activation", json!("gelu_pytorch_tanh")),
        ("attention_bias", json!(false)),
        ("rope_theta", json!(1_000_000.0)),
        ("rope_local_base_freq", json!(10_000.0)),
        ("rope_scaling", Value::Null),
        ("query_pre_attn_scalar", json!(GEMMA.head_dim)),
        ("sliding_window", json!(WINDOW)),
        ("sliding_window_pattern", json!(6)),
        ("final_logit_softcapping", Value::Null),
        ("attn_logit_softcapping", Value::Null),
        ("tie_word_embeddings", json!(true)),
        ("bos_token_id", json!(2)),
        ("eos_token_id", json!([1, 4])),
    ] {
        c.insert(k.to_string(), v);
    }
    config
}

fn gemma_tokenizer_files() -> (Value, Value, Value) {
    let tokenizer = metaspace_tokenizer(
        &["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<unk>"],
        "<bos>",
    );
    // The list form of chat_template, as some tokenizer_config.json files have it.
    let config = json!({"add_bos_token": true, "bos_token": "<bos>", "eos_token": "<eos>",
        "chat_template": [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": GEMMA_TEMPLATE}]});
    (tokenizer, config, json!({"eos_token_id": [1, 4]}))
}

#[test]
fn gemma3_with_sliding_windows_and_offset_norms_matches_candles_gemma3() {
    use candle_transformers::models::gemma3;
    let dir = Folder::new("gemma3");
    let (tokenizer, tokenizer_config, generation_config) = gemma_tokenizer_files();
    write_folder(
        dir.path(),
        &Spec {
            config: gemma_config(),
            weights: weights("gemma3", GEMMA, true),
            dtype: DType::BF16,
            shards: 2,
            tokenizer,
            tokenizer_config: Some(tokenizer_config),
            generation_config: Some(generation_config),
        },
    );
    let cfg: gemma3::Config = reference_config(dir.path());
    let mut reference = gemma3::Model::new(false, &cfg, reference_weights(dir.path())).expect("reference");
    let prompt = prompt(PROMPT);
    assert!(prompt.len() > WINDOW);
    compare_with_reference("gemma3", dir.path(), &prompt, |ids, pos| {
        // Token by token: see `family_forward.rs`.
        let mut row = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            row = last_row(reference.forward(&input(&[id]), pos + i));
        }
        row
    });
}

/// Greedy tokens of our forward, as the server picks them (stop ids end the run).
fn our_greedy(model: &Model, prompt: &[u32], max: usize) -> Vec<u32> {
    let llama = model.cpu().expect("cpu");
    let mut kv = SeqKv::new(llama.config.kv_shape(), 8, prompt.len() + max);
    let mut next = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max {
        let mut chunk = [SeqChunk {
            kv: &mut kv,
            tokens: &next,
            want_logits: true,
        }];
        let logits = llama
            .forward(&mut chunk)
            .and_then(|l| l.to_vec2::<f32>())
            .expect("forward");
        let id = argmax(&logits[0]) as u32;
        if model.tokenizer.is_stop(id) {
            break;
        }
        out.push(id);
        next = vec![id];
    }
    out
}

#[test]
fn a_multimodal_gemma3_serves_its_text_model() {
    let (tokenizer, tokenizer_config, generation_config) = gemma_tokenizer_files();
    let text = Folder::new("gemma3-text");
    let spec = |config: Value, weights: Vec<(String, Tensor)>| Spec {
        config,
        weights,
        dtype: DType::F32,
        shards: 1,
        tokenizer: tokenizer.clone(),
        tokenizer_config: Some(tokenizer_config.clone()),
        generation_config: Some(generation_config.clone()),
    };
    let plain = weights("gemma3", GEMMA, true);
    write_folder(text.path(), &spec(gemma_config(), plain.clone()));
    // The same model as transformers 4.50 saves Gemma3ForConditionalGeneration: the text model's keys in
    // text_config (transformers' defaults for the rest), its tensors under `language_model.model.`, and a
    // vision tower beside it that a text forward leaves unread.
    let mut text_config = gemma_config();
    for k in ["architectures", "tie_word_embeddings", "bos_token_id", "eos_token_id"] {
        text_config.as_object_mut().expect("object").remove(k);
    }
    let config = json!({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text_config, "eos_token_id": [1, 4], "vision_config": {"hidden_size": 16}});
    let mut multimodal: Vec<(String, Tensor)> = plain
        .into_iter()
        .map(|(n, t)| (n.replacen("model.", "language_model.model.", 1), t))
        .collect();
    let tower = Tensor::zeros((16, 16), DType::F32, &Device::Cpu).expect("tensor");
    multimodal.push((
        "vision_tower.vision_model.embeddings.patch_embedding.weight".into(),
        tower,
    ));
    let both = Folder::new("gemma3-multimodal");
    write_folder(both.path(), &spec(config, multimodal));

    let a = Model::load(text.path(), WeightFormat::F32).expect("text model");
    let b = Model::load(both.path(), WeightFormat::F32).expect("multimodal model's text part");
    let generated: Vec<u32> = (0..8u32).map(|i| (i * 29 + 3) % 280).collect();
    let run = |m: &Model| common::logits::ours(m.cpu().expect("cpu"), &prompt(PROMPT), &[], &generated, None);
    assert!(run(&a) == run(&b), "the same logits, bit for bit");
}

// ---- tokenizer and template -----------------------------------------------------------------------------------

#[test]
fn the_tokenizer_stop_ids_and_chat_template_come_from_the_folders_files() {
    let (tokenizer, tokenizer_config, generation_config) = gemma_tokenizer_files();
    let dir = Folder::new("gemma3-tokenizer");
    write_folder(
        dir.path(),
        &Spec {
            config: gemma_config(),
            weights: weights("gemma3", Dims { layers: 1, ..GEMMA }, true),
            dtype: DType::F32,
            shards: 1,
            tokenizer,
            tokenizer_config: Some(tokenizer_config),
            generation_config: Some(generation_config),
        },
    );
    let mut config = gemma_config();
    config["num_hidden_layers"] = json!(1);
    write_json(&dir.path().join("config.json"), &config);
    let model = Model::load(dir.path(), WeightFormat::F32).expect("loads");
    let t = &model.tokenizer;
    // <pad> <eos> <bos> <start_of_turn> <end_of_turn> <unk>, then the byte tokens.
    assert_eq!((t.bos_id, t.eos_id, t.add_bos), (Some(2), 1, true));
    assert_eq!(t.stop_ids, [1, 4], "eos, generation_config's list and <end_of_turn>");
    assert_eq!(t.vocab_size(), VOCAB, "padded to the embedding's rows");
    assert!(t.is_special(3) && t.is_special(VOCAB as u32 - 1) && !t.is_special(10));
    let pad = VOCAB as u32 - 1;
    assert_eq!(t.token_text(pad), Some(format!("[PAD{pad}]").as_str()));
    assert_eq!(t.decode(&[pad]).expect("decode"), "", "padding decodes to nothing");

    let ids = t.encode_prompt("the cat sat").expect("encode");
    assert_eq!(ids[0], 2, "BOS first: add_bos_token");
    assert_eq!(t.decode(&ids).expect("decode"), "the cat sat");
    let the = t.encode(" the").expect("encode")[0];
    assert_eq!(t.token_text(the), Some("▁the"));
    assert_eq!(t.token_bytes(the).as_deref(), Some(&b" the"[..]), "metaspace spelling");
    // A character outside the vocabulary falls back to its UTF-8 bytes, and decodes back.
    let e = t.encode("é").expect("encode");
    assert_eq!(e.len(), 2, "two byte tokens: {e:?}");
    assert_eq!(t.decode(&e).expect("decode"), "é");
    let with_specials = t.encode("<start_of_turn>user").expect("encode");
    assert_eq!(with_specials[0], 3, "special-token text is the special token");

    let messages = [amlserve::model::ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    let rendered = model
        .template
        .as_ref()
        .expect("the default template")
        .render(&messages, true)
        .expect("render");
    assert_eq!(
        rendered,
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    );

    // A byte-level tokenizer with Llama 3's post-processor: BOS from the template, no tokenizer_config key.
    let llama = Folder::new("llama-tokenizer");
    llama_folder(llama.path());
    let model = Model::load(llama.path(), WeightFormat::F32).expect("loads");
    let t = &model.tokenizer;
    assert_eq!((t.bos_id, t.eos_id, t.add_bos), (Some(272), 274, true));
    assert_eq!(t.stop_ids, [273, 274]);
    assert!(
        model.template.is_none(),
        "no chat_template: chat is refused unless --chat-template names one"
    );
    let ids = t.encode_prompt("the weather").expect("encode");
    assert_eq!(ids[0], 272);
    assert_eq!(t.token_bytes(ids[1]).as_deref(), Some(&b"t"[..]));
    assert_eq!(t.decode(&ids).expect("decode"), "the weather");
}

// ---- errors ---------------------------------------------------------------------------------------------------

/// Loading `dir` fails with an error that says `want`.
fn assert_refused(dir: &Path, want: &str) {
    let err = Model::load(dir, WeightFormat::F32).expect_err("refused").to_string();
    assert!(err.contains(want), "wanted '{want}' in: {err}");
}

#[test]
fn a_bad_config_or_an_unexpected_tensor_is_a_clear_error() {
    let dir = Folder::new("bad");
    llama_folder(dir.path());
    let good: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).expect("read")).expect("json");
    let with = |key: &str, value: Value| {
        let mut c = good.clone();
        match value {
            Value::Null => {
                c.as_object_mut().expect("object").remove(key);
            }
            v => c[key] = v,
        }
        write_json(&dir.path().join("config.json"), &c);
    };
    with("num_hidden_layers", Value::Null);
    assert_refused(dir.path(), "config.json: `num_hidden_layers` is missing");
    with("architectures", json!(["FalconForCausalLM"]));
    assert_refused(dir.path(), "architecture 'FalconForCausalLM' is not supported");
    with("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}));
    assert_refused(dir.path(), "rope_scaling: rope type 'yarn' is not supported");
    with("attention_bias", json!(true));
    assert_refused(dir.path(), "`attention_bias: true` is not supported");
    with("num_attention_heads", json!(3));
    assert_refused(
        dir.path(),
        "config.json: `hidden_size` 64 does not split into 3 attention heads",
    );
    std::fs::write(dir.path().join("config.json"), b"{not json").expect("write");
    assert_refused(dir.path(), "config.json: not JSON");
    write_json(&dir.path().join("config.json"), &good);
    Model::load(dir.path(), WeightFormat::F32).expect("the good config loads");

    // A tensor the forward would skip (an output bias): refused, named.
    let mut w = weights("llama", SMALL, false);
    let bias = Tensor::zeros(SMALL.hidden, DType::F32, &Device::Cpu).expect("tensor");
    w.push(("model.layers.1.self_attn.o_proj.bias".into(), bias));
    let extra = Folder::new("bad-tensor");
    llama_folder(extra.path());
    let save = |w: &[(String, Tensor)], path: &Path| {
        let map: HashMap<String, Tensor> = w.iter().cloned().collect();
        candle_core::safetensors::save(&map, path.join("model.safetensors")).expect("save");
    };
    save(&w, extra.path());
    assert_refused(
        extra.path(),
        "tensor model.layers.1.self_attn.o_proj.bias is not one LlamaForCausalLM computes",
    );
    // A tensor of the wrong shape, named as the folder names it.
    let mut w = weights("llama", SMALL, false);
    let k = w
        .iter_mut()
        .find(|(n, _)| n == "model.layers.2.self_attn.k_proj.weight")
        .expect("k");
    k.1 = Tensor::zeros((8, SMALL.hidden), DType::F32, &Device::Cpu).expect("tensor");
    save(&w, extra.path());
    assert_refused(
        extra.path(),
        "tensor 'model.layers.2.self_attn.k_proj.weight' has shape [8, 64]",
    );
    // A missing one.
    let w: Vec<_> = weights("llama", SMALL, false)
        .into_iter()
        .filter(|(n, _)| n != "model.layers.0.mlp.down_proj.weight")
        .collect();
    save(&w, extra.path());
    assert_refused(extra.path(), "no tensor 'model.layers.0.mlp.down_proj.weight'");
}

// ---- served ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_folder_nested_two_levels_deep_is_found_and_served_over_http() {
    let root = Folder::new("served");
    let dir = root.path().join("org").join("tiny-qwen");
    let mut config = base_config("Qwen2ForCausalLM", "qwen2", SMALL);
    config["tie_word_embeddings"] = json!(true);
    write_folder(
        &dir,
        &Spec {
            config,
            weights: weights("qwen2", SMALL, true),
            dtype: DType::BF16,
            shards: 1,
            tokenizer: byte_level_tokenizer(&["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None),
            tokenizer_config: Some(json!({"eos_token": "<|im_end|>", "chat_template": CHATML})),
            generation_config: None,
        },
    );
    let root_arg = root.path().to_str().expect("utf-8 path");
    let s = Server::start(&["--model", root_arg, "--embedding-model", "none"]).await;
    let models = s.get_json("/v1/models").await;
    assert_eq!(common::listed(&models, "id"), ["tiny-qwen"], "{models}");

    let (code, body) = s
        .post(
            "/v1/completions",
            json!({"prompt": "the cat", "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    // "the cat": `t` `he` `Ġc` `at`, no BOS (Qwen's post-processor adds none).
    assert_eq!(body["usage"]["prompt_tokens"], 4, "{body}");
    // The server's greedy text is our forward's, at the server's default weights (Q8_0).
    let model = Model::load(&dir, WeightFormat::Q8_0).expect("loads");
    let prompt = model.tokenizer.encode_prompt("the cat").expect("encode");
    let want = model.tokenizer.decode(&our_greedy(&model, &prompt, 8)).expect("decode");
    assert_eq!(body["choices"][0]["text"], want, "{body}");

    let (code, chat) = s.post("/v1/chat/completions", common::chat("hi", 4)).await;
    assert_eq!(code, 200, "chat with the folder's template: {chat}");
    // <|im_start|> user \n h i <|im_end|> \n <|im_start|> assistant \n, as the template renders and ours encodes.
    let (_, want) = model
        .chat_prompt(
            &[amlserve::model::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            true,
            Default::default(),
        )
        .expect("prompt");
    assert_eq!(chat["usage"]["prompt_tokens"], want.len(), "{chat}");
}

//! Our batched forward on every supported family against candle-transformers' own implementation of that
//! family, logit by logit, on small synthetic GGUFs this test writes: random weights under each family's real
//! tensor names and metadata keys (the names llama.cpp's converter gives them), shrunk sizes, f32 storage.
//!
//! References: `quantized_llama`, `quantized_qwen2`, `quantized_qwen3` and `quantized_phi3` read the same
//! GGUF. For Gemma 3 the reference is candle-transformers' `gemma3` (the Hugging Face layout, fed the same
//! weights through a `VarBuilder`, its norms as Hugging Face stores them: the GGUF's minus one), because
//! `quantized_gemma3` departs from Gemma 3 in two ways that would hide our bugs or invent some: its MLP uses
//! SiLU where Gemma uses GELU-tanh, and its decode steps ignore the sliding window. `gemma3` is fed one token
//! at a time: its sliding layers' cache fails on a multi-token step (a non-contiguous `slice_set`), and its
//! prefill mask admits one key more than its decode cache does (the decode cache counts as Hugging Face and
//! llama.cpp do, and so do we). The Gemma model has a window of 8 and runs 44 positions.
//!
//! Both our forwards, the CPU one and the device one (what `--device cuda` runs, here on candle's CPU backend),
//! run the prompt whole and in two chunks packed with another sequence. The weights are f32, the reference's
//! values (the quantized kernels are compared on the real model in `reference_forward.rs`).

mod common;

use std::collections::HashMap;

use amlserve::model::device::DeviceLlama;
use amlserve::model::{Llama, WeightFormat};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::logits::{compare_whole_and_packed, greedy_reference, noise, OnDevice, Tolerance};

const VOCAB: usize = 320;
const CONTEXT: usize = 256;
/// Prompt length (Gemma's runs past its window of 8).
const PROMPT: usize = 6;
const GEMMA_PROMPT: usize = 12;

/// A synthetic model: its family's hyper-parameters.
#[derive(Clone, Copy)]
struct Dims {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
}

/// Weights by GGUF name, as `[rows, cols]` (or `[len]`) f32 tensors, generated in a fixed order.
struct Weights {
    tensors: Vec<(String, Tensor)>,
    seed: u64,
}

impl Weights {
    fn new() -> Self {
        Self {
            tensors: Vec::new(),
            seed: 1,
        }
    }

    fn add(&mut self, name: &str, shape: &[usize], scale: f32) {
        self.add_offset(name, shape, scale, 0.0);
    }

    /// Values `offset + noise(scale)`: norms near 1.
    fn add_offset(&mut self, name: &str, shape: &[usize], scale: f32, offset: f32) {
        self.seed += 1;
        let n = shape.iter().product();
        let v: Vec<f32> = noise(n, self.seed, scale).into_iter().map(|x| x + offset).collect();
        let t = Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor");
        self.tensors.push((name.to_string(), t));
    }

    /// A projection from `cols` to `rows` values keeping activations near unit size.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) {
        self.add(name, &[rows, cols], (3.0 / cols as f32).sqrt());
    }

    fn get(&self, name: &str) -> &Tensor {
        &self.tensors.iter().find(|(n, _)| n == name).expect(name).1
    }
}

/// The weights of a family's blocks under its GGUF names.
fn weights(arch: &str, d: Dims) -> Weights {
    let mut w = Weights::new();
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    w.add("token_embd.weight", &[VOCAB, d.hidden], 1.0);
    w.add_offset("output_norm.weight", &[d.hidden], 0.2, 1.0);
    if arch != "gemma3" {
        w.add(
            "output.weight",
            &[VOCAB, d.hidden],
            3.0 * (3.0 / d.hidden as f32).sqrt(),
        );
    }
    for i in 0..d.layers {
        let t = |n: &str| format!("blk.{i}.{n}");
        w.add_offset(&t("attn_norm.weight"), &[d.hidden], 0.2, 1.0);
        w.add_offset(&t("ffn_norm.weight"), &[d.hidden], 0.2, 1.0);
        if arch == "phi3" {
            w.matrix(&t("attn_qkv.weight"), q + 2 * kv, d.hidden);
            w.matrix(&t("ffn_up.weight"), 2 * d.ffn, d.hidden);
        } else {
            w.matrix(&t("attn_q.weight"), q, d.hidden);
            w.matrix(&t("attn_k.weight"), kv, d.hidden);
            w.matrix(&t("attn_v.weight"), kv, d.hidden);
            w.matrix(&t("ffn_gate.weight"), d.ffn, d.hidden);
            w.matrix(&t("ffn_up.weight"), d.ffn, d.hidden);
        }
        w.matrix(&t("attn_output.weight"), d.hidden, q);
        w.matrix(&t("ffn_down.weight"), d.hidden, d.ffn);
        if arch == "qwen2" {
            w.add(&t("attn_q.bias"), &[q], 0.5);
            w.add(&t("attn_k.bias"), &[kv], 0.5);
            w.add(&t("attn_v.bias"), &[kv], 0.5);
        }
        if matches!(arch, "qwen3" | "gemma3") {
            w.add_offset(&t("attn_q_norm.weight"), &[d.head_dim], 0.2, 1.0);
            w.add_offset(&t("attn_k_norm.weight"), &[d.head_dim], 0.2, 1.0);
        }
        if arch == "gemma3" {
            w.add_offset(&t("post_attention_norm.weight"), &[d.hidden], 0.2, 1.0);
            w.add_offset(&t("post_ffw_norm.weight"), &[d.hidden], 0.2, 1.0);
        }
    }
    w
}

/// Writes the GGUF of `arch` with `weights` and `extra` metadata (keys under `<arch>.`, but `general.*`).
fn write_gguf(arch: &str, d: Dims, w: &Weights, extra: &[(&str, Value)]) -> Scratch {
    let key = |k: &str| format!("{arch}.{k}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), Value::U32(d.layers as u32)),
        (key("embedding_length"), Value::U32(d.hidden as u32)),
        (key("feed_forward_length"), Value::U32(d.ffn as u32)),
        (key("attention.head_count"), Value::U32(d.heads as u32)),
        (key("attention.head_count_kv"), Value::U32(d.kv_heads as u32)),
        (key("context_length"), Value::U32(CONTEXT as u32)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (key("rope.dimension_count"), Value::U32(d.head_dim as u32)),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array((0..VOCAB).map(|i| Value::String(format!("t{i}"))).collect()),
        ),
    ];
    md.extend(extra.iter().map(|(k, v)| {
        let k = if k.starts_with("general.") {
            k.to_string()
        } else {
            key(k)
        };
        (k, v.clone())
    }));
    let qt: Vec<(String, QTensor)> = w
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).expect("f32 qtensor")))
        .collect();
    let file = Scratch(std::env::temp_dir().join(format!("amlserve-{arch}-{}.gguf", std::process::id())));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&file.0).expect("temp file"));
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut out, &md_refs, &t_refs).expect("write gguf");
    drop(out);
    file
}

/// A file removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn read(path: &std::path::Path) -> (gguf_file::Content, std::fs::File) {
    let mut file = std::fs::File::open(path).expect("open gguf");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    (content, file)
}

/// The last row of a reference's logits (`[1, vocab]` or `[1, 1, vocab]`).
fn last_row(t: candle_core::Result<Tensor>) -> Vec<f32> {
    let t = t.expect("reference forward");
    let v = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("logits");
    v[v.len() - VOCAB..].to_vec()
}

fn input(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids")
}

/// Compares our forward on `path` with the reference's rows and tokens, whole and packed.
fn check_family(name: &str, path: &std::path::Path, prompt: &[u32], want: &[Vec<f32>], generated: &[u32]) {
    // The reference's values; our bf16 KV cache and summation order differ. Seen (2026-12-04): relative RMS
    // 0.003 to 0.006, max |diff| 0.03 to 0.05 on logits spread ~3 wide, at most one greedy token of 33 apart
    // (a near tie).
    let tol = Tolerance {
        max_abs: 0.3,
        max_rel_rms: 0.03,
    };
    let (content, mut file) = read(path);
    let model = Llama::load(&content, &mut file, WeightFormat::F32).expect("our model");
    compare_whole_and_packed(name, &model, prompt, want, generated, &tol);
    // The device forward (what `--device cuda` runs) on candle's CPU backend, against the same reference.
    let (content, mut file) = read(path);
    let device = DeviceLlama::load(&content, &mut file, WeightFormat::F32, &Device::Cpu).expect("device model");
    // CUDA graphs (`--cuda-graphs`) are refused off CUDA, with the reason.
    let why = device.enable_decode_graphs(4, 64).expect_err("no graphs off CUDA");
    assert!(why.contains("not CUDA"), "{name}: {why}");
    let on_device = OnDevice::new(&device);
    compare_whole_and_packed(
        &format!("{name} (device forward)"),
        &on_device,
        prompt,
        want,
        generated,
        &tol,
    );
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 37 + 11) % VOCAB as u32).collect()
}

const SMALL: Dims = Dims {
    layers: 3,
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    ffn: 128,
};

/// Writes the synthetic GGUF of `arch`, builds the reference from it with `build`, runs it greedily through
/// `forward(reference, ids [1, n], position)` and compares ours with it.
fn compare_with_reference<R>(
    arch: &str,
    d: Dims,
    extra: &[(&str, Value)],
    build: impl FnOnce(gguf_file::Content, &mut std::fs::File) -> candle_core::Result<R>,
    mut forward: impl FnMut(&mut R, &Tensor, usize) -> candle_core::Result<Tensor>,
) {
    let w = weights(arch, d);
    let file = write_gguf(arch, d, &w, extra);
    let (content, mut f) = read(file.path());
    let mut reference = build(content, &mut f).expect("reference");
    let prompt = prompt(PROMPT);
    let (want, generated) = greedy_reference(&prompt, |ids, pos| last_row(forward(&mut reference, &input(ids), pos)));
    check_family(arch, file.path(), &prompt, &want, &generated);
}

#[test]
fn llama_matches_candles_quantized_llama() {
    use candle_transformers::models::quantized_llama::ModelWeights;
    compare_with_reference(
        "llama",
        SMALL,
        &[("rope.freq_base", Value::F32(10_000.0))],
        |c, f| ModelWeights::from_gguf(c, f, &Device::Cpu),
        |m, x, pos| m.forward(x, pos),
    );
}

#[test]
fn qwen2_with_qkv_biases_matches_candles_quantized_qwen2() {
    use candle_transformers::models::quantized_qwen2::ModelWeights;
    compare_with_reference(
        "qwen2",
        SMALL,
        &[("rope.freq_base", Value::F32(1_000_000.0))],
        |c, f| ModelWeights::from_gguf(c, f, &Device::Cpu),
        |m, x, pos| m.forward(x, pos),
    );
}

#[test]
fn qwen3_with_qk_norms_and_wide_heads_matches_candles_quantized_qwen3() {
    use candle_transformers::models::quantized_qwen3::ModelWeights;
    // Heads of 32: q is 128 wide on a hidden size of 64.
    let extra = [
        ("rope.freq_base", Value::F32(1_000_000.0)),
        ("attention.key_length", Value::U32(32)),
        ("attention.value_length", Value::U32(32)),
        ("general.dtype", Value::U32(0)), // f32 compute in the reference (its default is f16)
    ];
    compare_with_reference(
        "qwen3",
        Dims { head_dim: 32, ..SMALL },
        &extra,
        |c, f| ModelWeights::from_gguf(c, f, &Device::Cpu),
        |m, x, pos| m.forward(x, pos),
    );
}

#[test]
fn phi3_with_fused_projections_matches_candles_quantized_phi3() {
    use candle_transformers::models::quantized_phi3::ModelWeights;
    compare_with_reference(
        "phi3",
        SMALL,
        &[("rope.freq_base", Value::F32(10_000.0))],
        |c, f| ModelWeights::from_gguf(false, c, f, &Device::Cpu),
        |m, x, pos| m.forward(x, pos),
    );
}

#[test]
fn gemma3_with_sliding_windows_matches_candles_gemma3() {
    use candle_transformers::models::gemma3;
    // Seven layers: five sliding (window 8), one global, one sliding; heads of 32 on a hidden size of 64.
    let d = Dims {
        layers: 7,
        head_dim: 32,
        ..SMALL
    };
    let window = 8;
    let w = weights("gemma3", d);
    let extra = [
        ("rope.freq_base", Value::F32(1_000_000.0)),
        ("attention.key_length", Value::U32(32)),
        ("attention.value_length", Value::U32(32)),
        ("attention.sliding_window", Value::U32(window as u32)),
    ];
    let file = write_gguf("gemma3", d, &w, &extra);

    // The same weights under Hugging Face's names; Gemma's norms computing `1 + w` store `w`.
    let mut hf: HashMap<String, Tensor> = HashMap::new();
    let norm = |t: &Tensor| (t - 1.0).expect("norm");
    hf.insert("model.embed_tokens.weight".into(), w.get("token_embd.weight").clone());
    hf.insert("model.norm.weight".into(), norm(w.get("output_norm.weight")));
    for i in 0..d.layers {
        let g = |n: &str| w.get(&format!("blk.{i}.{n}"));
        let p = |n: &str| format!("model.layers.{i}.{n}");
        for (ours, theirs) in [
            ("attn_q.weight", "self_attn.q_proj.weight"),
            ("attn_k.weight", "self_attn.k_proj.weight"),
            ("attn_v.weight", "self_attn.v_proj.weight"),
            ("attn_output.weight", "self_attn.o_proj.weight"),
            ("ffn_gate.weight", "mlp.gate_proj.weight"),
            ("ffn_up.weight", "mlp.up_proj.weight"),
            ("ffn_down.weight", "mlp.down_proj.weight"),
        ] {
            hf.insert(p(theirs), g(ours).clone());
        }
        for (ours, theirs) in [
            ("attn_norm.weight", "input_layernorm.weight"),
            ("post_attention_norm.weight", "post_attention_layernorm.weight"),
            ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
            ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
            ("attn_q_norm.weight", "self_attn.q_norm.weight"),
            ("attn_k_norm.weight", "self_attn.k_norm.weight"),
        ] {
            hf.insert(p(theirs), norm(g(ours)));
        }
    }
    let cfg = gemma3::Config {
        attention_bias: false,
        head_dim: d.head_dim,
        hidden_activation: candle_nn::Activation::GeluPytorchTanh,
        hidden_size: d.hidden,
        intermediate_size: d.ffn,
        num_attention_heads: d.heads,
        num_hidden_layers: d.layers,
        num_key_value_heads: d.kv_heads,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_local_base_freq: 10_000.0,
        vocab_size: VOCAB,
        final_logit_softcapping: None,
        attn_logit_softcapping: None,
        query_pre_attn_scalar: d.head_dim,
        sliding_window: window,
        sliding_window_pattern: 6,
        max_position_embeddings: CONTEXT,
    };
    let vb = candle_nn::VarBuilder::from_tensors(hf, DType::F32, &Device::Cpu);
    let mut reference = gemma3::Model::new(false, &cfg, vb).expect("reference");
    // Token by token: see the module docs.
    let prompt = prompt(GEMMA_PROMPT);
    assert!(prompt.len() > window);
    let (want, generated) = greedy_reference(&prompt, |ids, pos| {
        let mut row = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            row = last_row(reference.forward(&input(&[id]), pos + i));
        }
        row
    });
    check_family("gemma3", file.path(), &prompt, &want, &generated);
}

//! One transformer block's weights, loaded from any [`TensorSource`] (a GGUF, a Hugging Face folder) for any
//! [`Family`], and the shape checks that run before any of them is read.

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use super::arch::{Family, LlamaConfig};
use super::source::{TensorShapes, TensorSource};
use super::weights::{unpermute_rope_rows, FusedLinear, Linear, WeightFormat};
use super::ModelError;

/// The fewest tensors any family's block has (phi3: norms, fused qkv, output, fused gate/up, down).
const MIN_TENSORS_PER_BLOCK: usize = 6;

/// A block's tensors as read from the source, before a forward converts the matrices to its own form (the CPU
/// forward's [`Block`], the device forward's uploaded layer): the one place that knows each family's tensor
/// names and layouts.
pub(crate) struct BlockTensors {
    pub attn_norm: Tensor,
    /// The query, key and value projections in that order (phi3: one fused matrix), query and key rows in the
    /// half-split rotary layout.
    pub qkv: Vec<QTensor>,
    /// Biases of q, k and v, side by side (qwen2).
    pub qkv_bias: Option<Vec<f32>>,
    /// RMS norm weights applied to each query and each key head (qwen3, gemma3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub wo: QTensor,
    /// Norm of the attention's output before the residual add (gemma3).
    pub post_attn_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
    /// The gate and up projections, in that order (phi3: one matrix holding the gate's rows, then up's).
    pub gate_up: Vec<QTensor>,
    /// Width of each of gate and up.
    pub ffn_width: usize,
    pub w_down: QTensor,
    /// Norm of the MLP's output before the residual add (gemma3).
    pub post_ffn_norm: Option<Tensor>,
}

fn name(i: usize, t: &str) -> String {
    format!("blk.{i}.{t}")
}

/// Reads `names`, un-permuting the rows of those flagged as rotated (see `weights::unpermute_rope_rows`).
fn read_parts(
    src: &mut dyn TensorSource,
    names: &[(&str, bool)],
    head_dim: usize,
    format: WeightFormat,
) -> Result<Vec<QTensor>, ModelError> {
    names
        .iter()
        .map(|&(name, rope)| {
            let t = src.tensor(name, format)?;
            if rope {
                unpermute_rope_rows(t, head_dim)
            } else {
                Ok(t)
            }
        })
        .collect()
}

/// Rows of a matrix tensor.
fn rows(t: &QTensor) -> Result<usize, ModelError> {
    Ok(t.shape().dims2()?.0)
}

impl BlockTensors {
    /// Reads block `i` (shapes checked by [`check_shapes`]).
    pub fn read(
        src: &mut dyn TensorSource,
        cfg: &LlamaConfig,
        i: usize,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        let fam = cfg.family;
        let t = |n: &str| name(i, n);
        let (hd, rope) = (cfg.head_dim, src.interleaved_rope());
        let (qkv, gate_up, ffn_width) = if fam.fused_projections() {
            let qkv = read_parts(src, &[(&t("attn_qkv.weight"), false)], hd, format)?;
            let gate_up = read_parts(src, &[(&t("ffn_up.weight"), false)], hd, format)?;
            let width = rows(&gate_up[0])? / 2;
            (qkv, gate_up, width)
        } else {
            let (q, k, v) = (t("attn_q.weight"), t("attn_k.weight"), t("attn_v.weight"));
            let qkv = read_parts(src, &[(&q, rope), (&k, rope), (&v, false)], hd, format)?;
            let (gate, up) = (t("ffn_gate.weight"), t("ffn_up.weight"));
            let gate_up = read_parts(src, &[(&gate, false), (&up, false)], hd, format)?;
            let width = rows(&gate_up[0])?;
            (qkv, gate_up, width)
        };
        let qkv_bias = if src.contains(&t("attn_q.bias")) {
            // Permuted like their weights where the file's rows are interleaved.
            let mut bias = |n: &str| -> Result<Vec<f32>, ModelError> {
                let b = src.vec(&t(n))?;
                Ok(if rope && n != "attn_v.bias" {
                    unpermute_rope_values(&b, hd)
                } else {
                    b
                })
            };
            let mut b = bias("attn_q.bias")?;
            b.extend(bias("attn_k.bias")?);
            b.extend(bias("attn_v.bias")?);
            Some(b)
        } else {
            None
        };
        let qk_norm = if fam.qk_norm() {
            Some((src.vec(&t("attn_q_norm.weight"))?, src.vec(&t("attn_k_norm.weight"))?))
        } else {
            None
        };
        let mut post =
            |n: &str| -> Result<Option<Tensor>, ModelError> { fam.post_norms().then(|| src.f32(&t(n))).transpose() };
        let (post_attn_norm, post_ffn_norm) = (post("post_attention_norm.weight")?, post("post_ffw_norm.weight")?);
        Ok(Self {
            attn_norm: src.f32(&t("attn_norm.weight"))?,
            qkv,
            qkv_bias,
            qk_norm,
            wo: src.tensor(&t("attn_output.weight"), format)?,
            post_attn_norm,
            ffn_norm: src.f32(&t("ffn_norm.weight"))?,
            gate_up,
            ffn_width,
            w_down: src.tensor(&t("ffn_down.weight"), format)?,
            post_ffn_norm,
        })
    }
}

/// A block's weights for the CPU forward, in the forward's order (see [`BlockTensors`] for each field).
pub(crate) struct Block {
    pub attn_norm: Tensor,
    /// Query, key and value projections, side by side per token.
    pub qkv: FusedLinear,
    pub qkv_bias: Option<Vec<f32>>,
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub wo: Linear,
    pub post_attn_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
    /// Gate and up projections (the gate's rows, then up's).
    pub gate_up: FusedLinear,
    pub ffn_width: usize,
    pub w_down: Linear,
    pub post_ffn_norm: Option<Tensor>,
}

impl Block {
    /// Loads block `i` (shapes checked by [`check_shapes`]).
    pub fn load(
        src: &mut dyn TensorSource,
        cfg: &LlamaConfig,
        i: usize,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        let t = BlockTensors::read(src, cfg, i, format)?;
        Ok(Self {
            attn_norm: t.attn_norm,
            qkv: FusedLinear::new(t.qkv, format)?,
            qkv_bias: t.qkv_bias,
            qk_norm: t.qk_norm,
            wo: Linear::new(t.wo, format)?,
            post_attn_norm: t.post_attn_norm,
            ffn_norm: t.ffn_norm,
            gate_up: FusedLinear::new(t.gate_up, format)?,
            ffn_width: t.ffn_width,
            w_down: Linear::new(t.w_down, format)?,
            post_ffn_norm: t.post_ffn_norm,
        })
    }

    /// Bytes held by the matrix weights.
    pub fn bytes(&self) -> usize {
        self.qkv.bytes() + self.gate_up.bytes() + self.wo.bytes() + self.w_down.bytes()
    }
}

/// [`super::weights::unpermute_rope_rows`] for a vector with one value per row (a bias).
fn unpermute_rope_values(v: &[f32], head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    v.chunks(head_dim)
        .flat_map(|head| (0..head.len()).map(move |j| head[if j < half { 2 * j } else { 2 * (j - half) + 1 }]))
        .collect()
}

/// Fails unless tensor `name` is in the file with shape `dims` (candle's order: rows, then columns).
fn expect_shape<S: TensorShapes + ?Sized>(content: &S, name: &str, dims: &[usize]) -> Result<(), ModelError> {
    let found = content
        .dims(name)
        .ok_or_else(|| ModelError::Metadata(format!("no tensor {} in {}", content.describe(name), content.kind())))?;
    if found != dims {
        return Err(ModelError::Metadata(format!(
            "tensor {} has shape {found:?}, the hyper-parameters need {dims:?}",
            content.describe(name)
        )));
    }
    Ok(())
}

/// The row count of tensor `name`, when it has rows.
fn rows_of<S: TensorShapes + ?Sized>(content: &S, name: &str) -> Result<usize, ModelError> {
    content
        .dims(name)
        .and_then(|dims| dims.first().copied())
        .filter(|&w| w > 0)
        .ok_or_else(|| ModelError::Metadata(format!("tensor {} is missing or empty", content.describe(name))))
}

/// Checks every weight's shape against the hyper-parameters before any is read, so a file whose tensors
/// disagree with its metadata fails at load with the tensor named, not inside a matmul at the first request.
pub(crate) fn check_shapes<S: TensorShapes + ?Sized>(content: &S, cfg: &LlamaConfig) -> Result<(), ModelError> {
    let tensors = content.count();
    if cfg.n_layer > tensors / MIN_TENSORS_PER_BLOCK {
        return Err(ModelError::Metadata(format!(
            "block_count {} needs at least {MIN_TENSORS_PER_BLOCK} tensors per block; the file has {tensors} \
             tensors",
            cfg.n_layer
        )));
    }
    let (hidden, vocab, hd) = (cfg.hidden, cfg.vocab_size, cfg.head_dim);
    expect_shape(content, "token_embd.weight", &[vocab, hidden])?;
    if content.contains("output.weight") {
        expect_shape(content, "output.weight", &[vocab, hidden])?;
    }
    expect_shape(content, "output_norm.weight", &[hidden])?;
    if content.contains("rope_freqs.weight") {
        expect_shape(content, "rope_freqs.weight", &[hd / 2])?;
    }
    for i in 0..cfg.n_layer {
        check_block(content, cfg, i).map_err(|e| match e {
            ModelError::Metadata(m) => {
                ModelError::Metadata(format!("{m} (block {i} of the {} that block_count gives)", cfg.n_layer))
            }
            other => other,
        })?;
    }
    Ok(())
}

/// [`check_shapes`] for block `i`.
fn check_block<S: TensorShapes + ?Sized>(content: &S, cfg: &LlamaConfig, i: usize) -> Result<(), ModelError> {
    let (hidden, hd) = (cfg.hidden, cfg.head_dim);
    let (q_rows, kv_rows) = (cfg.q_width(), cfg.kv_width());
    let fam = cfg.family;
    let t = |n: &str| name(i, n);
    let mut norms = vec!["attn_norm.weight", "ffn_norm.weight"];
    if fam.post_norms() {
        norms.extend(["post_attention_norm.weight", "post_ffw_norm.weight"]);
    }
    for norm in norms {
        expect_shape(content, &t(norm), &[hidden])?;
    }
    if fam.qk_norm() {
        expect_shape(content, &t("attn_q_norm.weight"), &[hd])?;
        expect_shape(content, &t("attn_k_norm.weight"), &[hd])?;
    }
    if fam == Family::Qwen2 || content.contains(&t("attn_q.bias")) {
        expect_shape(content, &t("attn_q.bias"), &[q_rows])?;
        expect_shape(content, &t("attn_k.bias"), &[kv_rows])?;
        expect_shape(content, &t("attn_v.bias"), &[kv_rows])?;
    }
    expect_shape(content, &t("attn_output.weight"), &[hidden, q_rows])?;
    let ffn = if fam.fused_projections() {
        expect_shape(content, &t("attn_qkv.weight"), &[q_rows + 2 * kv_rows, hidden])?;
        let both = rows_of(content, &t("ffn_up.weight"))?;
        if both % 2 != 0 {
            return Err(ModelError::Metadata(format!(
                "tensor {} has {both} rows: it should hold the gate's and up's, as many each",
                content.describe(&t("ffn_up.weight"))
            )));
        }
        expect_shape(content, &t("ffn_up.weight"), &[both, hidden])?;
        both / 2
    } else {
        expect_shape(content, &t("attn_q.weight"), &[q_rows, hidden])?;
        expect_shape(content, &t("attn_k.weight"), &[kv_rows, hidden])?;
        expect_shape(content, &t("attn_v.weight"), &[kv_rows, hidden])?;
        let ffn = rows_of(content, &t("ffn_gate.weight"))?;
        expect_shape(content, &t("ffn_gate.weight"), &[ffn, hidden])?;
        expect_shape(content, &t("ffn_up.weight"), &[ffn, hidden])?;
        ffn
    };
    expect_shape(content, &t("ffn_down.weight"), &[hidden, ffn])?;
    Ok(())
}

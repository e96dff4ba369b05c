//! How the GGUF's matrix weights are held in memory for matmuls: the `--weights` policy.
//!
//! Measured on the 2-core AVX-512 dev machine with SmolLM2-135M (Q4_1 as stored), see README "Performance":
//! candle's Q4_1 dot product is scalar, so the stored format is the slowest; Q8_0 has SIMD kernels and is the
//! fastest for a few rows (decode); f32 runs on gemm, fastest for many rows (prefill, big decode batches).
//! `auto` keeps both and picks per matmul by the number of rows in the step.

use std::borrow::Cow;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::ModelError;

/// Storage format for the matrix weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Q8_0 (as `q8_0`) for steps of few tokens plus an f32 copy for steps of many: fastest, most memory.
    #[default]
    Auto,
    /// Requantize 4/5-bit legacy blocks (Q4_0, Q4_1, Q5_0, Q5_1) to Q8_0; keep K-quants and Q8_0 as stored.
    #[value(name = "q8_0")]
    Q8_0,
    /// Keep every tensor as stored in the GGUF (smallest; Q4_1 has no SIMD kernel in candle).
    Stored,
    /// Dequantize to f32 and use gemm (fastest prefill, most memory).
    F32,
    /// Dequantize to f16 and use gemm.
    F16,
}

/// Reorders the rows of each head from llama.cpp's interleaved rotary layout (pairs `2i, 2i+1`) to the
/// half-split layout (pairs `i, i + d/2`), so the projection output can be rotated in place with
/// `rope_thd` on `[tokens, heads, head_dim]` without transposes. Queries and keys are permuted the same way, so
/// every dot product between them, and thus attention, is unchanged. Works on raw blocks: exact for any type.
fn unpermute_rope_rows(t: QTensor, head_dim: usize) -> Result<QTensor, ModelError> {
    let (rows, cols) = t.shape().dims2()?;
    let dtype = t.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = t.data()?;
    if rows % head_dim != 0 || data.len() != rows * row_bytes {
        return Err(ModelError::Metadata(format!(
            "attention weight of shape {rows}x{cols} does not split into heads of {head_dim}"
        )));
    }
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for head in 0..rows / head_dim {
        for j in 0..head_dim {
            let src = head * head_dim + if j < half { 2 * j } else { 2 * (j - half) + 1 };
            out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
        }
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// Loads a 2-D matrix weight from the GGUF in `format`. `rope_head_dim` reorders a query/key projection (see
/// [`unpermute_rope_rows`]).
pub fn load_linear<R: std::io::Read + std::io::Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    name: &str,
    format: WeightFormat,
    rope_head_dim: Option<usize>,
    min_rows_f32: usize,
) -> Result<Linear, ModelError> {
    let mut t = content.tensor(reader, name, &Device::Cpu)?;
    if let Some(hd) = rope_head_dim {
        t = unpermute_rope_rows(t, hd)?;
    }
    Linear::new(t, format, min_rows_f32)
}

/// Converts a loaded tensor to the (single) matmul form for `format`.
fn to_matmul(t: QTensor, format: WeightFormat) -> Result<QMatMul, ModelError> {
    let is_float = matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    Ok(match format {
        _ if is_float => QMatMul::Tensor(t.dequantize(&Device::Cpu)?),
        WeightFormat::Stored => QMatMul::QTensor(t.into()),
        WeightFormat::Q8_0 | WeightFormat::Auto => {
            let legacy = matches!(
                t.dtype(),
                GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
            );
            if legacy {
                let f = t.dequantize(&Device::Cpu)?;
                QMatMul::QTensor(QTensor::quantize(&f, GgmlDType::Q8_0)?.into())
            } else {
                QMatMul::QTensor(t.into())
            }
        }
        WeightFormat::F32 => QMatMul::Tensor(t.dequantize(&Device::Cpu)?),
        WeightFormat::F16 => QMatMul::TensorF16(t.dequantize_f16(&Device::Cpu)?),
    })
}

/// A matrix weight, possibly in two forms: a quantized one for steps with few rows and an f32 one (gemm) for
/// steps with at least `min_rows_f32` rows.
pub struct Linear {
    small: QMatMul,
    large: Option<QMatMul>,
    min_rows_f32: usize,
}

impl Linear {
    /// Converts `t` per `format`; `auto` keeps the Q8_0 form and an f32 copy.
    pub fn new(t: QTensor, format: WeightFormat, min_rows_f32: usize) -> Result<Self, ModelError> {
        let large = match format {
            WeightFormat::Auto => Some(QMatMul::Tensor(t.dequantize(&Device::Cpu)?)),
            _ => None,
        };
        Ok(Self {
            small: to_matmul(t, format)?,
            large,
            min_rows_f32,
        })
    }

    /// `x` (`[rows, in]`) times the weight transposed: `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        use candle_core::Module;
        match &self.large {
            Some(l) if x.dim(0)? >= self.min_rows_f32 => l.forward(x),
            _ => self.small.forward(x),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        matmul_bytes(&self.small) + self.large.as_ref().map_or(0, matmul_bytes)
    }
}

/// Bytes a matmul weight occupies in memory.
pub fn matmul_bytes(m: &QMatMul) -> usize {
    match m {
        QMatMul::QTensor(t) => t.storage_size_in_bytes(),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() * t.dtype().size_in_bytes(),
    }
}

/// Dequantizes a tensor to f32 (norm weights, the embedding table).
pub fn load_f32<R: std::io::Read + std::io::Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    name: &str,
) -> Result<Tensor, ModelError> {
    Ok(content.tensor(reader, name, &Device::Cpu)?.dequantize(&Device::Cpu)?)
}

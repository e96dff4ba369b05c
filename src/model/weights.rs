//! How the GGUF's matrix weights are held in memory for matmuls: the `--weights` policy.
//!
//! Measured on the 2-core AVX-512 dev machine with SmolLM2-135M (Q4_1 as stored), see README "Performance":
//! candle's Q4_1 dot product is scalar, so the stored format is the slowest. Q8_0 is the default, fastest for
//! single streams, prompts and batches alike: on CPUs with AVX-512 VNNI it runs on our kernel
//! ([`super::vnni_q8`]), elsewhere on candle's SIMD kernels (its tiled VNNI kernel on AVX-VNNI CPUs, with rows
//! zero-padded to a multiple of 256). f32 runs on gemm (4x the memory, slower here).

use std::borrow::Cow;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::vnni_q8::{self, Vnni, VnniQ8};
use super::ModelError;

/// Storage format for the matrix weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Requantize every other block type (Q4_0 ... Q5_1, the K-quants) to Q8_0: one kernel for every matrix,
    /// and one whose result for a row does not depend on the other rows. candle's K-quant kernels choose by
    /// row count (Q6_K: one kernel for a single row, another for several; Q4_K: AMX from 32 rows), so with
    /// them a request's output would depend on what shares its step. A Hugging Face folder's float matrices are
    /// quantized to Q8_0 too.
    #[default]
    #[value(name = "q8_0")]
    Q8_0,
    /// Keep every tensor as stored in the GGUF (smallest; Q4_1 has no SIMD kernel in candle; with K-quants,
    /// greedy output may differ with what shares a step, see `q8_0`). A Hugging Face folder's float matrices
    /// are multiplied in f32.
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
pub(crate) fn unpermute_rope_rows(t: QTensor, head_dim: usize) -> Result<QTensor, ModelError> {
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

/// Stacks the rows of same-typed 2-D tensors with equal row width into one tensor (raw blocks: exact).
/// `None` when the types or widths differ.
pub(crate) fn concat_rows(parts: &[QTensor]) -> Result<Option<QTensor>, ModelError> {
    let dtype = parts[0].dtype();
    let cols = parts[0].shape().dims2()?.1;
    let mut rows = 0;
    let mut data = Vec::new();
    for p in parts {
        let (r, c) = p.shape().dims2()?;
        if p.dtype() != dtype || c != cols {
            return Ok(None);
        }
        rows += r;
        data.extend_from_slice(&p.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(data), &Device::Cpu, dtype)?;
    Ok(Some(QTensor::new(storage, (rows, cols))?))
}

/// Several projections of the same input (q, k, v; or gate, up), multiplied as one matrix when their weights
/// share a type: one input quantization and one kernel call instead of several.
pub struct FusedLinear {
    linears: Vec<Linear>,
    /// Output width of each projection.
    widths: Vec<usize>,
}

impl FusedLinear {
    /// The projections `parts` (same input width) as one matmul where their types allow stacking their rows,
    /// else one each.
    pub(crate) fn new(parts: Vec<QTensor>, format: WeightFormat) -> Result<Self, ModelError> {
        let widths = parts
            .iter()
            .map(|p| p.shape().dims2().map(|d| d.0))
            .collect::<Result<Vec<_>, _>>()?;
        let linears = match concat_rows(&parts)? {
            Some(all) => vec![Linear::new(all, format)?],
            None => parts
                .into_iter()
                .map(|p| Linear::new(p, format))
                .collect::<Result<_, _>>()?,
        };
        Ok(Self { linears, widths })
    }

    /// Output width of each projection.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// All outputs side by side, as plain rows `[rows, sum of widths]`.
    pub fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Vec<f32>> {
        let y = match self.linears.as_slice() {
            [one] => return one.forward_rows(x),
            many => Tensor::cat(
                &many
                    .iter()
                    .map(|l| l.forward(x))
                    .collect::<candle_core::Result<Vec<_>>>()?,
                1,
            )?,
        };
        y.flatten_all()?.to_vec1::<f32>()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.linears.iter().map(Linear::bytes).sum()
    }
}

/// Converts a loaded tensor to the (single) matmul form for `format`. A float tensor stays float: f16 with
/// `--weights f16`, else f32 (a GGUF stored in floats asks for them; a Hugging Face folder's float matrices were
/// converted for `format` as they were read, see `hf_folder`).
fn to_matmul(t: QTensor, format: WeightFormat) -> Result<QMatMul, ModelError> {
    let is_float = matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    Ok(match format {
        _ if is_float && format != WeightFormat::F16 => QMatMul::Tensor(t.dequantize(&Device::Cpu)?),
        WeightFormat::Stored => QMatMul::QTensor(t.into()),
        WeightFormat::Q8_0 if t.dtype() == GgmlDType::Q8_0 => QMatMul::QTensor(t.into()),
        WeightFormat::Q8_0 => {
            let f = t.dequantize(&Device::Cpu)?;
            QMatMul::QTensor(QTensor::quantize(&f, GgmlDType::Q8_0)?.into())
        }
        WeightFormat::F32 => QMatMul::Tensor(t.dequantize(&Device::Cpu)?),
        WeightFormat::F16 => QMatMul::TensorF16(t.dequantize_f16(&Device::Cpu)?),
    })
}

/// Converts a loaded tensor to the matmul form for `format`, on `device` (weights are converted on the host and
/// uploaded once).
pub fn to_device_matmul(t: QTensor, format: WeightFormat, device: &Device) -> Result<QMatMul, ModelError> {
    Ok(match to_matmul(t, format)? {
        QMatMul::QTensor(q) => {
            let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
            QMatMul::QTensor(QTensor::new(storage, q.shape())?.into())
        }
        QMatMul::Tensor(t) => QMatMul::Tensor(t.to_device(device)?),
        QMatMul::TensorF16(t) => QMatMul::TensorF16(t.to_device(device)?),
    })
}

/// Row width candle's register-tiled VNNI Q8_0 kernel needs (`repack_x86`: k a multiple of 256, n of 16).
const VNNI_K: usize = 256;
const VNNI_N: usize = 16;

/// Pads each Q8_0 row with zero blocks up to `k_padded` columns. Zero blocks (scale 0, values 0) add nothing to
/// any dot product, so `x` padded with zeros times this weight is exactly `x` times the original.
fn pad_q8_0_rows(t: &QTensor, k_padded: usize) -> Result<QTensor, ModelError> {
    let (n, k) = t.shape().dims2()?;
    let bs = GgmlDType::Q8_0.type_size();
    let (row, padded_row) = (k / 32 * bs, k_padded / 32 * bs);
    let data = t.data()?;
    let mut out = vec![0u8; n * padded_row];
    for (dst, src) in out.chunks_exact_mut(padded_row).zip(data.chunks_exact(row)) {
        dst[..row].copy_from_slice(src);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, GgmlDType::Q8_0)?;
    Ok(QTensor::new(storage, (n, k_padded))?)
}

/// A matrix weight. Q8_0 weights run on [`VnniQ8`] where the CPU has AVX-512 VNNI (measured against candle's
/// tiled kernel on padded rows, 2 threads: batch-16 decode 850 -> 1,150 tok/s, single stream 200 -> 250,
/// prefill 1,600 -> 2,550, and logits closer to f32). On CPUs with only AVX-VNNI ([`Vnni::Avx256`]), Q8_0
/// weights whose row width does not suit candle's tiled kernel are zero-padded so it applies (inputs are padded
/// to match; one thread: batch 16 from 135 to 408 tok/s). Either kernel's result for a row does not depend on
/// the other rows, so batching changes no output.
pub struct Linear {
    kernel: Kernel,
}

enum Kernel {
    /// Our AVX-512 VNNI Q8_0 kernel (no padding).
    Vnni(VnniQ8),
    /// candle's matmul, on inputs zero-padded from `.0` to `.1` columns when set.
    Candle(QMatMul, Option<(usize, usize)>),
}

impl Linear {
    /// Converts `t` per `format`.
    pub fn new(t: QTensor, format: WeightFormat) -> Result<Self, ModelError> {
        let matmul = to_matmul(t, format)?;
        if let QMatMul::QTensor(q) = &matmul {
            if q.dtype() == GgmlDType::Q8_0 {
                let (n, k) = q.shape().dims2()?;
                if let Some(v) = VnniQ8::new(&q.data()?, n, k) {
                    return Ok(Self {
                        kernel: Kernel::Vnni(v),
                    });
                }
            }
        }
        let mut pad_to = None;
        let matmul = match matmul {
            QMatMul::QTensor(q) if q.dtype() == GgmlDType::Q8_0 && vnni_q8::vnni() == Some(Vnni::Avx256) => {
                let (n, k) = q.shape().dims2()?;
                if k % VNNI_K != 0 && n % VNNI_N == 0 {
                    let kp = k.div_ceil(VNNI_K) * VNNI_K;
                    pad_to = Some((k, kp));
                    QMatMul::QTensor(pad_q8_0_rows(&q, kp)?.into())
                } else {
                    QMatMul::QTensor(q)
                }
            }
            other => other,
        };
        Ok(Self {
            kernel: Kernel::Candle(matmul, pad_to),
        })
    }

    /// `x` (`[rows, in]`) times the weight transposed: `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        use candle_core::Module;
        match &self.kernel {
            Kernel::Vnni(v) => Tensor::from_vec(vnni_rows(v, x)?, (x.dim(0)?, v.rows()), x.device()),
            Kernel::Candle(matmul, Some((k, kp))) => matmul.forward(&x.pad_with_zeros(1, 0, kp - k)?),
            Kernel::Candle(matmul, None) => matmul.forward(x),
        }
    }

    /// The same product as plain rows `[rows * out]` (no tensor round trip on our kernel).
    pub fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Vec<f32>> {
        match &self.kernel {
            Kernel::Vnni(v) => vnni_rows(v, x),
            Kernel::Candle(..) => self.forward(x)?.flatten_all()?.to_vec1::<f32>(),
        }
    }

    /// The same product written into `out` (`[rows * out]`, every value overwritten).
    pub fn forward_into(&self, x: &Tensor, out: &mut [f32]) -> candle_core::Result<()> {
        match &self.kernel {
            Kernel::Vnni(v) => {
                check_cols(v, x)?;
                v.matmul_into(&x.flatten_all()?.to_vec1::<f32>()?, out);
            }
            Kernel::Candle(..) => copy_to_slice(&self.forward(x)?, out)?,
        }
        Ok(())
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.kernel {
            Kernel::Vnni(v) => v.bytes(),
            Kernel::Candle(m, _) => matmul_bytes(m),
        }
    }
}

/// `x` (`[rows, cols]`, f32) times `v` transposed, after checking the width.
fn vnni_rows(v: &VnniQ8, x: &Tensor) -> candle_core::Result<Vec<f32>> {
    check_cols(v, x)?;
    Ok(v.matmul(&x.flatten_all()?.to_vec1::<f32>()?))
}

fn check_cols(v: &VnniQ8, x: &Tensor) -> candle_core::Result<()> {
    let (_, cols) = x.dims2()?;
    if cols != v.cols() {
        candle_core::bail!("matmul input has {cols} columns, the weight {}", v.cols())
    }
    Ok(())
}

/// Copies an f32 CPU tensor's values, in row-major order, into `out` (which must hold exactly as many).
pub fn copy_to_slice(t: &Tensor, out: &mut [f32]) -> candle_core::Result<()> {
    if t.elem_count() != out.len() {
        candle_core::bail!("{} values for a buffer of {}", t.elem_count(), out.len())
    }
    let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("copy_to_slice wants a CPU tensor")
    };
    let start = layout.start_offset();
    out.copy_from_slice(&cpu.as_slice::<f32>()?[start..start + out.len()]);
    Ok(())
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

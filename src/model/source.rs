//! Where a model's tensors come from, behind one small interface, so the block loader, the shape checks and
//! [`super::Llama::load_from`] are written once for every kind of model file: a GGUF ([`GgufSource`]) or a
//! Hugging Face folder ([`super::hf_folder::HfSource`]).
//!
//! Tensors are asked for by their GGUF names (`blk.{i}.attn_q.weight`, `token_embd.weight`...), whatever the
//! source stores; a source translates names and values (Gemma's norm offset, say) itself, and says whether its
//! query and key rows are in llama.cpp's interleaved rotary layout. Knows nothing of the forward pass.

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};

use super::weights::WeightFormat;
use super::ModelError;

/// The names and shapes of a source's tensors: all that the shape checks read.
pub(crate) trait TensorShapes {
    /// The shape of tensor `name` (candle's order: rows, then columns), when the source has it.
    fn dims(&self, name: &str) -> Option<&[usize]>;

    /// How many tensors the source holds.
    fn count(&self) -> usize;

    /// What the source is called in errors ("the GGUF").
    fn kind(&self) -> &'static str;

    /// Tensor `name` as the source's own files name it, for errors.
    fn describe(&self, name: &str) -> String {
        format!("'{name}'")
    }

    fn contains(&self, name: &str) -> bool {
        self.dims(name).is_some()
    }
}

/// A source of tensors, read one at a time.
pub(crate) trait TensorSource: TensorShapes {
    /// Reads tensor `name`. A GGUF gives it as stored (`format` is applied later, by `weights::Linear`); a source
    /// of float weights may convert its matrices for `format` here (Hugging Face folders: Q8_0 by default).
    /// Vectors (norms, biases) come as f32 either way.
    fn tensor(&mut self, name: &str, format: WeightFormat) -> Result<QTensor, ModelError>;

    /// Whether the query and key rows are in llama.cpp's interleaved rotary layout (pairs `2i, 2i+1`) and must be
    /// un-permuted to the half-split layout the forward rotates (see `weights::unpermute_rope_rows`).
    fn interleaved_rope(&self) -> bool;

    /// Tensor `name` as f32 values (norms, biases, the rotary factors).
    fn f32(&mut self, name: &str) -> Result<Tensor, ModelError> {
        Ok(self.tensor(name, WeightFormat::F32)?.dequantize(&Device::Cpu)?)
    }

    /// Tensor `name` flattened to a vector of f32.
    fn vec(&mut self, name: &str) -> Result<Vec<f32>, ModelError> {
        Ok(self.f32(name)?.flatten_all()?.to_vec1()?)
    }
}

impl TensorShapes for gguf_file::Content {
    fn dims(&self, name: &str) -> Option<&[usize]> {
        self.tensor_infos.get(name).map(|info| info.shape.dims())
    }

    fn count(&self) -> usize {
        self.tensor_infos.len()
    }

    fn kind(&self) -> &'static str {
        "the GGUF"
    }
}

/// An open GGUF file.
pub(crate) struct GgufSource<'a, R> {
    pub content: &'a gguf_file::Content,
    pub reader: &'a mut R,
    /// Whether the file's query and key rows are interleaved: llama.cpp's converter permutes those of the llama
    /// architecture, and only those ([`super::arch::Family::interleaved_rope`]).
    pub interleaved_rope: bool,
}

impl<R> TensorShapes for GgufSource<'_, R> {
    fn dims(&self, name: &str) -> Option<&[usize]> {
        self.content.dims(name)
    }

    fn count(&self) -> usize {
        self.content.count()
    }

    fn kind(&self) -> &'static str {
        self.content.kind()
    }
}

impl<R: std::io::Read + std::io::Seek> TensorSource for GgufSource<'_, R> {
    fn tensor(&mut self, name: &str, _format: WeightFormat) -> Result<QTensor, ModelError> {
        Ok(self.content.tensor(self.reader, name, &Device::Cpu)?)
    }

    fn interleaved_rope(&self) -> bool {
        self.interleaved_rope
    }
}

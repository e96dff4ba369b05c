//! A Hugging Face model folder's weights as a [`TensorSource`]: the safetensors tensors under the GGUF names the
//! loader asks for (`model.layers.{i}.self_attn.q_proj.weight` is `blk.{i}.attn_q.weight`), converted as they
//! are read.
//!
//! What differs from a GGUF of the same model, as llama.cpp's converter would have changed it:
//! - query and key rows are in Hugging Face's half-split rotary layout, which is the forward's: they are used
//!   as they are (a GGUF's llama rows are interleaved and un-permuted at load);
//! - Gemma's RMS norms compute `x * (1 + w)` and store `w`: one is added to every Gemma norm weight here (q/k
//!   norms included), giving the GGUF form the forward expects;
//! - Llama 3's rotary factors are not a tensor but `rope_scaling` keys: they are served as `rope_freqs.weight`;
//! - float matrices (F32, F16, BF16) are converted for `--weights` as they are read: Q8_0 by default (a matrix
//!   whose rows do not split into blocks of 32 stays f32), f16 or f32 when asked; `stored` multiplies them in
//!   f32. Vectors (norms, biases) are f32.
//!
//! Every tensor in the files must be one the forward reads (or a known leftover such as `rotary_emb.inv_freq`,
//! or a multimodal model's vision tower): a tensor we would silently skip (an output bias, say) means the
//! model computes something our forward does not, and the folder is refused with the tensor named.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::arch::Family;
use super::hf_config::HfConfig;
use super::safetensors_files::SafetensorsFiles;
use super::source::{TensorShapes, TensorSource};
use super::weights::WeightFormat;
use super::ModelError;

/// Where a multimodal Gemma 3 keeps its text model, by transformers version (4.50: the first; 4.52 on: the
/// second), and its output projection.
const MULTIMODAL_PREFIXES: [(&str, &str); 2] = [
    ("language_model.model.", "language_model.lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
];

/// Parts of a multimodal checkpoint that a text-only forward leaves unread.
const MULTIMODAL_SKIPPED: [&str; 4] = [
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
];

/// Block tensor names: (GGUF suffix, Hugging Face suffix) for `family`.
fn block_names(family: Family) -> Vec<(&'static str, &'static str)> {
    let mut names = vec![
        ("attn_norm.weight", "input_layernorm.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_q.bias", "self_attn.q_proj.bias"),
        ("attn_k.bias", "self_attn.k_proj.bias"),
        ("attn_v.bias", "self_attn.v_proj.bias"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_gate.weight", "mlp.gate_proj.weight"),
        ("ffn_down.weight", "mlp.down_proj.weight"),
    ];
    if family.qk_norm() {
        names.extend([
            ("attn_q_norm.weight", "self_attn.q_norm.weight"),
            ("attn_k_norm.weight", "self_attn.k_norm.weight"),
        ]);
    }
    match family {
        Family::Gemma3 => names.extend([
            ("post_attention_norm.weight", "post_attention_layernorm.weight"),
            ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
            ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
            ("ffn_up.weight", "mlp.up_proj.weight"),
        ]),
        Family::Phi3 => names.extend([
            ("attn_qkv.weight", "self_attn.qkv_proj.weight"),
            ("ffn_up.weight", "mlp.gate_up_proj.weight"),
            ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ]),
        _ => names.extend([
            ("ffn_norm.weight", "post_attention_layernorm.weight"),
            ("ffn_up.weight", "mlp.up_proj.weight"),
        ]),
    }
    names
}

/// Tensors in Hugging Face checkpoints that hold nothing the forward needs.
fn is_leftover(suffix: &str) -> bool {
    suffix.ends_with("rotary_emb.inv_freq")
}

/// What the loader does with one tensor of the files.
enum Role {
    /// Reads it under this GGUF name.
    Read(String),
    /// Leaves it unread: nothing the forward needs.
    Unread,
    /// Nothing it knows: a part of the model the forward does not compute.
    Unknown,
}

/// The role of the text model's tensor `rest` (its name after the prefix: `layers.0.mlp.up_proj.weight`).
fn text_model_role(rest: &str, blocks: &[(&str, &str)]) -> Role {
    match rest {
        "embed_tokens.weight" => return Role::Read("token_embd.weight".into()),
        "norm.weight" => return Role::Read("output_norm.weight".into()),
        _ => {}
    }
    let Some((i, suffix)) = rest.strip_prefix("layers.").and_then(|r| r.split_once('.')) else {
        return Role::Unknown;
    };
    if i.parse::<usize>().is_err() {
        return Role::Unknown;
    }
    match blocks.iter().find(|(_, h)| *h == suffix) {
        Some((g, _)) => Role::Read(format!("blk.{i}.{g}")),
        None if is_leftover(suffix) => Role::Unread,
        None => Role::Unknown,
    }
}

/// The tensors of a Hugging Face folder under GGUF names.
pub(crate) struct HfSource {
    files: SafetensorsFiles,
    family: Family,
    /// GGUF name -> Hugging Face name, for every tensor the forward may read.
    names: HashMap<String, String>,
    /// The text model's prefix (`model.`), to name missing tensors in errors.
    prefix: String,
    /// Llama 3's rotary factors, served as `rope_freqs.weight`, and their shape.
    rope_factors: Option<(Vec<f32>, [usize; 1])>,
}

impl HfSource {
    /// Reads the safetensors headers of `dir` and maps every tensor to its GGUF name.
    pub fn open(dir: &Path, hf: &HfConfig) -> Result<Self, ModelError> {
        let files = SafetensorsFiles::open(dir)?;
        let family = hf.config.family;
        let (prefix, lm_head) = if hf.multimodal {
            MULTIMODAL_PREFIXES
                .iter()
                .find(|(p, _)| files.dims(&format!("{p}embed_tokens.weight")).is_some())
                .copied()
                .ok_or_else(|| {
                    ModelError::Folder(format!(
                        "{}: no text model's token embedding (language_model.model.embed_tokens.weight or \
                         model.language_model.embed_tokens.weight) in the safetensors files",
                        dir.display()
                    ))
                })?
        } else {
            ("model.", "lm_head.weight")
        };
        let blocks = block_names(family);
        let mut names = HashMap::new();
        let mut unused = Vec::new();
        for hf_name in files.names() {
            let role = if hf_name == lm_head {
                // Tied: the embedding is the output projection, as transformers ties them.
                match hf.tie_embeddings {
                    true => Role::Unread,
                    false => Role::Read("output.weight".into()),
                }
            } else if let Some(rest) = hf_name.strip_prefix(prefix) {
                text_model_role(rest, &blocks)
            } else if hf.multimodal && MULTIMODAL_SKIPPED.iter().any(|p| hf_name.starts_with(p)) {
                Role::Unread
            } else {
                Role::Unknown
            };
            match role {
                Role::Read(gguf) => {
                    names.insert(gguf, hf_name.to_string());
                }
                Role::Unread => {}
                Role::Unknown => unused.push(hf_name.to_string()),
            }
        }
        if !unused.is_empty() {
            unused.sort();
            let more = unused.len().saturating_sub(3);
            unused.truncate(3);
            return Err(ModelError::Folder(format!(
                "{}: tensor {}{} is not one {} computes with in amlserve's forward (a feature it does not run?)",
                dir.display(),
                unused.join(", "),
                if more > 0 {
                    format!(" (and {more} more)")
                } else {
                    String::new()
                },
                hf.architecture
            )));
        }
        let rope_factors = hf.rope_factors.clone().map(|f| {
            let n = f.len();
            (f, [n])
        });
        Ok(Self {
            files,
            family,
            names,
            prefix: prefix.to_string(),
            rope_factors,
        })
    }

    /// The Hugging Face name the GGUF name `name` has, present or not (for errors).
    fn hf_name(&self, name: &str) -> String {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let p = &self.prefix;
        match name {
            "token_embd.weight" => format!("{p}embed_tokens.weight"),
            "output_norm.weight" => format!("{p}norm.weight"),
            "output.weight" => "lm_head.weight".into(),
            _ => {
                let block = name.strip_prefix("blk.").and_then(|r| r.split_once('.'));
                let found = block.and_then(|(i, suffix)| {
                    block_names(self.family)
                        .iter()
                        .find(|(g, _)| *g == suffix)
                        .map(|(_, h)| format!("{p}layers.{i}.{h}"))
                });
                found.unwrap_or_else(|| name.to_string())
            }
        }
    }
}

impl TensorShapes for HfSource {
    fn dims(&self, name: &str) -> Option<&[usize]> {
        if name == "rope_freqs.weight" {
            return self.rope_factors.as_ref().map(|(_, d)| &d[..]);
        }
        self.files.dims(self.names.get(name)?)
    }

    fn count(&self) -> usize {
        self.names.len()
    }

    fn kind(&self) -> &'static str {
        "the safetensors files"
    }

    fn describe(&self, name: &str) -> String {
        format!("'{}'", self.hf_name(name))
    }
}

impl TensorSource for HfSource {
    fn tensor(&mut self, name: &str, format: WeightFormat) -> Result<QTensor, ModelError> {
        if let (Some((f, _)), "rope_freqs.weight") = (&self.rope_factors, name) {
            return Ok(QTensor::quantize(
                &Tensor::new(f.as_slice(), &Device::Cpu)?,
                GgmlDType::F32,
            )?);
        }
        let hf_name = self.names.get(name).ok_or_else(|| {
            ModelError::Folder(format!("no tensor '{}' in the safetensors files", self.hf_name(name)))
        })?;
        let t = self.files.load(hf_name)?;
        if t.rank() == 1 {
            let mut t = t.to_dtype(DType::F32)?;
            if self.family == Family::Gemma3 && name.ends_with("norm.weight") {
                t = (t + 1.0)?;
            }
            return Ok(QTensor::quantize(&t, GgmlDType::F32)?);
        }
        let cols = t.dims().last().copied().unwrap_or(0);
        let dtype = match format {
            WeightFormat::Q8_0 if cols.is_multiple_of(GgmlDType::Q8_0.block_size()) => GgmlDType::Q8_0,
            WeightFormat::Q8_0 | WeightFormat::F32 => GgmlDType::F32,
            WeightFormat::F16 => GgmlDType::F16,
            WeightFormat::Stored => match t.dtype() {
                DType::F16 => GgmlDType::F16,
                DType::BF16 => GgmlDType::BF16,
                _ => GgmlDType::F32,
            },
        };
        Ok(QTensor::quantize(&t, dtype)?)
    }

    fn interleaved_rope(&self) -> bool {
        false
    }
}

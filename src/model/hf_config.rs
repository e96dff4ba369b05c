//! A Hugging Face `config.json` read into the one model description every family shares ([`LlamaConfig`]),
//! plus what the folder's tensor source needs: tied embeddings, Llama 3's rotary factors, whether the text model
//! sits inside a multimodal one.
//!
//! Keys are read as transformers' config classes read them: a key left out takes the class's default where it
//! has a sensible one (`num_key_value_heads` = `num_attention_heads`, `rms_norm_eps`, `rope_theta`...; Gemma 3's
//! text config has a default for every key, and `Gemma3ForConditionalGeneration` files rely on them); the sizes
//! of the other families must be present. Anything our forward does not compute (another architecture, a
//! `rope_scaling` kind, biases on the output projection, logit soft-capping, a quantized checkpoint...) is
//! refused with the key named, never served approximately.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::arch::{Family, LlamaConfig, GEMMA3_GLOBAL_EVERY, GEMMA3_LOCAL_ROPE_BASE};
use super::ModelError;

/// The architectures served, as `config.json`'s `architectures` names them.
pub const ARCHITECTURES: [&str; 7] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Phi3ForCausalLM",
];

/// transformers' `Gemma3TextConfig` defaults (a multimodal Gemma 3's `text_config` lists only what differs).
fn gemma3_defaults() -> Map<String, Value> {
    let v = json!({
        "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// What `config.json` says about the model.
#[derive(Debug, Clone)]
pub struct HfConfig {
    pub config: LlamaConfig,
    /// The architecture as the file names it (`Qwen2ForCausalLM`).
    pub architecture: String,
    /// Whether the text model is part of a multimodal one (its tensors under another prefix).
    pub multimodal: bool,
    /// Whether the output projection is the token embedding (`tie_word_embeddings`).
    pub tie_embeddings: bool,
    /// Llama 3's per-frequency rotary factors (`rope_scaling.rope_type: llama3`), as llama.cpp's converter
    /// computes them for `rope_freqs.weight`.
    pub rope_factors: Option<Vec<f32>>,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`: one id or a list.
    pub eos_token_ids: Vec<u32>,
}

/// The keys of one JSON object, with defaults, and errors that name the file and the key.
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    defaults: Map<String, Value>,
    /// Where the keys are, for errors: `.../config.json` or `.../config.json: text_config`.
    at: String,
}

impl Keys<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> ModelError {
        ModelError::Folder(format!("{}: {msg}", self.at))
    }

    /// The key's value; `null` counts as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj
            .get(key)
            .filter(|v| !v.is_null())
            .or_else(|| self.defaults.get(key))
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("`{key}` is missing")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.err(format!("`{key}` is {v}, not a whole number")))
            })
            .transpose()
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` is {v}, not a number"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` is {v}, not true or false"))),
        }
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// Fails when `key` is set to something other than absent/null/`ok`'s accepted values.
    fn refuse_unless(&self, key: &str, ok: impl Fn(&Value) -> bool, why: &str) -> Result<(), ModelError> {
        match self.get(key) {
            Some(v) if !ok(v) => Err(self.err(format!("`{key}: {v}` is not supported: {why}"))),
            _ => Ok(()),
        }
    }
}

/// The family and whether it is the multimodal wrapper, for an architecture name (or a `model_type`).
fn family_of(arch: &str) -> Option<(Family, bool)> {
    Some(match arch {
        "LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral" => (Family::Llama, false),
        "Qwen2ForCausalLM" | "qwen2" => (Family::Qwen2, false),
        "Qwen3ForCausalLM" | "qwen3" => (Family::Qwen3, false),
        "Gemma3ForCausalLM" | "gemma3_text" => (Family::Gemma3, false),
        "Gemma3ForConditionalGeneration" | "gemma3" => (Family::Gemma3, true),
        "Phi3ForCausalLM" | "phi3" => (Family::Phi3, false),
        _ => return None,
    })
}

/// One id or a list of ids (`eos_token_id`).
pub(crate) fn ids(v: Option<&Value>) -> Vec<u32> {
    let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match v {
        Some(Value::Array(a)) => a.iter().filter_map(one).collect(),
        Some(v) => one(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// Rotary settings: the global layers' base and linear scale, Llama 3's factors, and (Gemma 3) the sliding
/// layers' base.
struct Rope {
    base: f64,
    scale: f64,
    factors: Option<Vec<f32>>,
    local_base: Option<f64>,
}

/// Llama 3's factor per rotary frequency, as llama.cpp's converter writes `rope_freqs.weight` (and transformers'
/// `_compute_llama3_parameters` divides the frequencies by).
fn llama3_factors(base: f64, head_dim: usize, s: &Keys) -> Result<Vec<f32>, ModelError> {
    let factor = s.f64_or("factor", 8.0)?;
    let low = s.f64_or("low_freq_factor", 1.0)?;
    let high = s.f64_or("high_freq_factor", 4.0)?;
    let old_context = s.f64_or("original_max_position_embeddings", 8192.0)?;
    if !(factor > 0.0 && low > 0.0 && high > low && old_context > 0.0) {
        return Err(s.err(format!(
            "llama3 rotary scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0 (factor {factor}, \
             low_freq_factor {low}, high_freq_factor {high})"
        )));
    }
    let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = f64::from(1.0 / (base as f32).powf(2.0 * i as f32 / head_dim as f32));
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect())
}

/// Reads `rope_theta` and `rope_scaling` (transformers 4.x), or `rope_parameters` (5.x; Gemma 3's has one entry
/// per layer kind).
fn rope(k: &Keys, family: Family, head_dim: usize) -> Result<Rope, ModelError> {
    let (global, local) = match k.get("rope_parameters").and_then(Value::as_object) {
        Some(p) if p.contains_key("full_attention") => (
            p.get("full_attention")
                .and_then(Value::as_object)
                .map(|o| nested_keys(k, o, "rope_parameters.full_attention")),
            p.get("sliding_attention")
                .and_then(Value::as_object)
                .map(|o| nested_keys(k, o, "rope_parameters.sliding_attention")),
        ),
        Some(p) => (Some(nested_keys(k, p, "rope_parameters")), None),
        None => (None, None),
    };
    let default_base = if family == Family::Gemma3 {
        1_000_000.0
    } else {
        10_000.0
    };
    let base = k.f64_or("rope_theta", default_base)?;
    let base = match &global {
        Some(g) => g.f64_or("rope_theta", base)?,
        None => base,
    };
    let scaling = match (global, k.get("rope_scaling")) {
        (Some(g), _) => Some(g),
        (None, None) => None,
        (None, Some(Value::Object(o))) => Some(nested_keys(k, o, "rope_scaling")),
        (None, Some(v)) => return Err(k.err(format!("`rope_scaling` is {v}, not an object"))),
    };
    let (mut scale, mut factors) = (1.0, None);
    if let Some(s) = &scaling {
        match s.str("rope_type").or_else(|| s.str("type")).unwrap_or("default") {
            "default" => {}
            "linear" => {
                scale = s.f64_or("factor", 1.0)?;
                if !(scale.is_finite() && scale > 0.0) {
                    return Err(s.err(format!("`factor` {scale} is not a positive number")));
                }
            }
            "llama3" => factors = Some(llama3_factors(base, head_dim, s)?),
            other => {
                return Err(s.err(format!(
                    "rope type '{other}' is not supported (default, linear and llama3 are)"
                )))
            }
        }
    }
    let local_base = match &local {
        Some(l) => Some(l.f64_or("rope_theta", GEMMA3_LOCAL_ROPE_BASE.into())?),
        None if family == Family::Gemma3 => Some(k.f64_or("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE.into())?),
        None => None,
    };
    Ok(Rope {
        base,
        scale,
        factors,
        local_base,
    })
}

/// The keys of `obj`, an object nested in `k` under `path`.
fn nested_keys<'a>(k: &Keys, obj: &'a Map<String, Value>, path: &str) -> Keys<'a> {
    Keys {
        obj,
        defaults: Map::new(),
        at: format!("{}: {path}", k.at),
    }
}

impl HfConfig {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let json: Value = serde_json::from_slice(&text)
            .map_err(|e| ModelError::Folder(format!("{}: not JSON: {e}", path.display())))?;
        let top = json
            .as_object()
            .ok_or_else(|| ModelError::Folder(format!("{}: not a JSON object", path.display())))?;
        Self::from_json(top, &path.display().to_string())
    }

    /// Reads a parsed `config.json`; `at` names it in errors.
    pub fn from_json(top: &Map<String, Value>, at: &str) -> Result<Self, ModelError> {
        let outer = Keys {
            obj: top,
            defaults: Map::new(),
            at: at.to_string(),
        };
        let architecture = match outer.get("architectures") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_str).map(str::to_string),
            Some(v) => return Err(outer.err(format!("`architectures` is {v}, not a list of names"))),
            None => outer.str("model_type").map(str::to_string),
        }
        .ok_or_else(|| outer.err("`architectures` is missing (and no `model_type` says what the model is)"))?;
        let (family, multimodal) = family_of(&architecture).ok_or_else(|| {
            outer.err(format!(
                "architecture '{architecture}' is not supported: amlserve serves {} folders (or a GGUF)",
                ARCHITECTURES.join(", ")
            ))
        })?;
        if let Some(q) = outer.get("quantization_config") {
            let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("unknown");
            return Err(outer.err(format!(
                "`quantization_config` ({method}) is not supported: serve the float checkpoint (amlserve quantizes \
                 it at load, --weights) or a GGUF"
            )));
        }
        let text_config;
        let k = if multimodal {
            text_config = top
                .get("text_config")
                .and_then(Value::as_object)
                .ok_or_else(|| outer.err("`text_config` is missing: the text model's settings are in it"))?;
            Keys {
                obj: text_config,
                defaults: gemma3_defaults(),
                at: format!("{at}: text_config"),
            }
        } else {
            Keys {
                obj: top,
                defaults: if family == Family::Gemma3 {
                    gemma3_defaults()
                } else {
                    Map::new()
                },
                at: at.to_string(),
            }
        };
        refuse_unsupported(&k, family, &architecture)?;

        let n_head = k.usize("num_attention_heads")?;
        let hidden = k.usize("hidden_size")?;
        let head_dim = match k.opt_usize("head_dim")? {
            Some(d) => d,
            None if n_head > 0 && hidden.is_multiple_of(n_head) => hidden / n_head,
            None => {
                return Err(k.err(format!(
                    "`hidden_size` {hidden} does not split into {n_head} attention heads (and `head_dim` is missing)"
                )))
            }
        };
        k.usize("intermediate_size")?;
        let rope = rope(&k, family, head_dim)?;
        if rope.local_base.is_some_and(|b| b != f64::from(GEMMA3_LOCAL_ROPE_BASE)) {
            return Err(k.err(format!(
                "a sliding-layer rope base other than {GEMMA3_LOCAL_ROPE_BASE} (`rope_local_base_freq`) is not supported"
            )));
        }
        let sliding_window = match family {
            Family::Gemma3 => Some(k.usize("sliding_window")?),
            Family::Phi3 => k.opt_usize("sliding_window")?,
            Family::Llama if architecture == "MistralForCausalLM" || k.str("model_type") == Some("mistral") => {
                k.opt_usize("sliding_window")?
            }
            _ => None,
        }
        .filter(|&w| w > 0);
        let query_scale = match family {
            Family::Gemma3 => k.usize("query_pre_attn_scalar")?,
            _ => head_dim,
        };
        let config = LlamaConfig {
            family,
            n_layer: k.usize("num_hidden_layers")?,
            n_head,
            n_kv_head: k.opt_usize("num_key_value_heads")?.unwrap_or(n_head),
            head_dim,
            hidden,
            context_length: k.usize("max_position_embeddings")?,
            rope_base: rope.base as f32,
            rope_scale: rope.scale as f32,
            rms_eps: k.f64_or("rms_norm_eps", if family == Family::Phi3 { 1e-5 } else { 1e-6 })?,
            vocab_size: k.usize("vocab_size")?,
            sliding_window,
            global_every: (family == Family::Gemma3).then_some(GEMMA3_GLOBAL_EVERY),
            attn_scale: 1.0 / (query_scale.max(1) as f32).sqrt(),
            embed_scale: (family == Family::Gemma3).then(|| (hidden as f32).sqrt()),
        };
        config.check().map_err(|m| k.err(m))?;
        // The multimodal config keeps tie_word_embeddings and the token ids at its top level.
        let tie_default = family == Family::Gemma3;
        let tie_embeddings = match outer.get("tie_word_embeddings") {
            Some(_) => outer.bool_or("tie_word_embeddings", tie_default)?,
            None => k.bool_or("tie_word_embeddings", tie_default)?,
        };
        let token = |key: &str| outer.get(key).or_else(|| k.obj.get(key).filter(|v| !v.is_null()));
        Ok(Self {
            config,
            architecture,
            multimodal,
            tie_embeddings,
            rope_factors: rope.factors,
            bos_token_id: ids(token("bos_token_id")).first().copied(),
            eos_token_ids: ids(token("eos_token_id")),
        })
    }
}

/// Refuses the settings of `k` our forward does not compute.
fn refuse_unsupported(k: &Keys, family: Family, architecture: &str) -> Result<(), ModelError> {
    let is_false = |v: &Value| v == &Value::Bool(false);
    let no_bias = "amlserve's forward has no biases on these projections";
    if family != Family::Qwen2 {
        k.refuse_unless("attention_bias", is_false, no_bias)?;
    }
    k.refuse_unless("mlp_bias", is_false, no_bias)?;
    match family {
        Family::Gemma3 => {
            let act = k.str("hidden_activation").or_else(|| k.str("hidden_act"));
            if act.is_some_and(|a| a != "gelu_pytorch_tanh") {
                return Err(k.err(format!(
                    "`hidden_activation: {}` is not supported (gelu_pytorch_tanh is)",
                    act.unwrap_or_default()
                )));
            }
            let soft = "logit soft-capping (Gemma 2) is not computed";
            k.refuse_unless("final_logit_softcapping", |_| false, soft)?;
            k.refuse_unless("attn_logit_softcapping", |_| false, soft)?;
            k.refuse_unless(
                "sliding_window_pattern",
                |v| v.as_u64() == Some(GEMMA3_GLOBAL_EVERY as u64),
                "one global layer after every five sliding ones is",
            )?;
            k.refuse_unless("use_bidirectional_attention", is_false, "attention is causal here")?;
            if let Some(Value::Array(types)) = k.get("layer_types") {
                let pattern = types.iter().enumerate().all(|(i, t)| {
                    let global = (i + 1) % GEMMA3_GLOBAL_EVERY == 0;
                    t.as_str() == Some(if global { "full_attention" } else { "sliding_attention" })
                });
                if !pattern {
                    return Err(k.err(
                        "`layer_types` is not supported: one full_attention layer after every five \
                         sliding_attention ones is",
                    ));
                }
            }
        }
        _ => {
            let act = k.str("hidden_act");
            if act.is_some_and(|a| a != "silu" && a != "swish") {
                return Err(k.err(format!(
                    "`hidden_act: {}` is not supported for {architecture} (silu is)",
                    act.unwrap_or_default()
                )));
            }
        }
    }
    if matches!(family, Family::Qwen2 | Family::Qwen3) {
        k.refuse_unless(
            "use_sliding_window",
            is_false,
            "Qwen's per-layer sliding windows are not computed",
        )?;
    }
    if family == Family::Phi3 {
        k.refuse_unless(
            "partial_rotary_factor",
            |v| v.as_f64() == Some(1.0),
            "partial rotary embeddings are not computed",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(v: Value) -> Result<HfConfig, ModelError> {
        HfConfig::from_json(v.as_object().expect("object"), "config.json")
    }

    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        })
    }

    #[test]
    fn llama_keys_become_the_shared_description() {
        let c = read(llama()).expect("reads");
        let cfg = &c.config;
        assert_eq!(
            (cfg.family, cfg.n_layer, cfg.n_head, cfg.n_kv_head),
            (Family::Llama, 2, 4, 2)
        );
        assert_eq!(
            (cfg.head_dim, cfg.hidden, cfg.vocab_size, cfg.context_length),
            (16, 64, 300, 256)
        );
        assert_eq!((cfg.rope_base, cfg.rope_scale, cfg.rms_eps), (500_000.0, 1.0, 1e-5));
        assert!(cfg.sliding_window.is_none() && !c.tie_embeddings && c.rope_factors.is_none());
    }

    #[test]
    fn every_refusal_names_its_key() {
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "architectures",
                json!(["BertModel"]),
                "architecture 'BertModel' is not supported",
            ),
            ("num_hidden_layers", Value::Null, "`num_hidden_layers` is missing"),
            (
                "rope_scaling",
                json!({"rope_type": "yarn", "factor": 4.0}),
                "rope type 'yarn'",
            ),
            ("attention_bias", json!(true), "`attention_bias: true` is not supported"),
            ("hidden_act", json!("gelu"), "`hidden_act: gelu`"),
            (
                "quantization_config",
                json!({"quant_method": "gptq"}),
                "`quantization_config` (gptq)",
            ),
            ("hidden_size", json!(-3), "`hidden_size` is -3, not a whole number"),
        ];
        for (key, value, want) in cases {
            let mut v = llama();
            v[key] = value;
            let err = read(v).expect_err(key).to_string();
            assert!(err.contains(want), "{key}: {err}");
        }
    }

    #[test]
    fn llama3_rope_scaling_gives_llamacpps_factors() {
        let mut v = llama();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let f = read(v).expect("reads").rope_factors.expect("factors");
        assert_eq!(f.len(), 8);
        // Short wavelengths are kept, the longest are divided by the whole factor, the middle is smoothed.
        assert_eq!(f[0], 1.0);
        assert_eq!(f[7], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
    }

    #[test]
    fn a_multimodal_gemma_reads_its_text_config_with_transformers_defaults() {
        let v = json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [1, 106],
            "text_config": {"hidden_size": 2560, "num_hidden_layers": 34, "intermediate_size": 10240,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 1024},
        });
        let c = read(v).expect("reads");
        assert!(c.multimodal && c.tie_embeddings);
        assert_eq!(c.eos_token_ids, [1, 106]);
        let cfg = &c.config;
        assert_eq!(
            (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size),
            (8, 4, 256, 262_208)
        );
        assert_eq!((cfg.sliding_window, cfg.rope_scale), (Some(1024), 8.0));
        assert_eq!(cfg.layer_rope(0), (10_000.0, 1.0));
        assert_eq!(cfg.layer_rope(5), (1_000_000.0, 8.0));
        let err = read(json!({"architectures": ["Gemma3ForConditionalGeneration"]})).expect_err("no text_config");
        assert!(err.to_string().contains("`text_config` is missing"), "{err}");
    }
}

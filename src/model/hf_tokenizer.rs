//! A Hugging Face folder's tokenizer and chat template: `tokenizer.json` through the `tokenizers` crate, behind
//! the same [`TextTokenizer`] API as a GGUF's, with what the folder's other files say about it.
//!
//! - BOS and EOS: `tokenizer_config.json`'s `bos_token` / `eos_token` (a string or `{"content": ...}`), else
//!   `generation_config.json`'s, else `config.json`'s `bos_token_id` / `eos_token_id`.
//! - Whether raw prompts start with BOS: `tokenizer_config.json`'s `add_bos_token`, else whether the
//!   post-processor's template for one sequence starts with the BOS token (Llama 3's does; Qwen's adds none).
//! - What ends generation: the EOS token, every id of `generation_config.json`'s and `config.json`'s
//!   `eos_token_id` (one id or a list), and the usual end-of-turn tokens.
//! - The chat template: `chat_template.jinja` beside the tokenizer (transformers 4.43 on), else
//!   `tokenizer_config.json`'s `chat_template`, a string or a list of `{name, template}` whose `default` entry is
//!   used. None: chat requests are refused unless `--chat-template` names one.
//!
//! How token texts spell bytes (for grammars and logprobs) is read from the decoder: byte-level, SentencePiece's
//! metaspace (with `<0xHH>` byte tokens when the model has `byte_fallback`), or plain text.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use super::hf_config::{ids, HfConfig};
use super::tokenizer::{HfTokens, Spelling, TextTokenizer};
use super::ModelError;

/// A JSON file of the folder, if it is there.
fn optional_json(dir: &Path, name: &str) -> Result<Option<Value>, ModelError> {
    let path = dir.join(name);
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ModelError::Folder(format!("{}: not JSON: {e}", path.display())))
}

/// A special token's text as `tokenizer_config.json` gives it: a string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// Whether `v` (a decoder or pre-tokenizer, possibly a `Sequence`) is or holds one of type `kind`.
fn has_component(v: &Value, kind: &str, list: &str) -> bool {
    match v["type"].as_str() {
        Some(t) if t == kind => true,
        Some("Sequence") => v[list]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| has_component(i, kind, list))),
        _ => false,
    }
}

/// How the vocabulary's texts spell bytes, from the decoder (and the pre-tokenizer).
fn spelling(json: &Value) -> Spelling {
    let decoder = &json["decoder"];
    let replaces_metaspace = decoder["decoders"].as_array().is_some_and(|d| {
        d.iter()
            .any(|d| d["type"] == "Replace" && d["pattern"]["String"] == "\u{2581}")
    });
    if has_component(decoder, "ByteLevel", "decoders")
        || has_component(&json["pre_tokenizer"], "ByteLevel", "pretokenizers")
    {
        Spelling::ByteLevel
    } else if has_component(decoder, "Metaspace", "decoders") || replaces_metaspace {
        Spelling::Metaspace
    } else {
        Spelling::Plain
    }
}

/// Whether the post-processor's template for a single sequence starts with the special token `bos`.
fn template_adds(post: &Value, bos: &str) -> bool {
    match post["type"].as_str() {
        Some("TemplateProcessing") => post["single"]
            .as_array()
            .and_then(|s| s.first())
            .is_some_and(|first| first["SpecialToken"]["id"] == bos),
        Some("Sequence") => post["processors"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| template_adds(p, bos))),
        _ => false,
    }
}

/// The chat template source: `chat_template.jinja`, else `tokenizer_config.json`'s.
fn chat_template(dir: &Path, config: Option<&Value>) -> Result<Option<String>, ModelError> {
    let file = dir.join("chat_template.jinja");
    if file.is_file() {
        return std::fs::read_to_string(&file)
            .map(Some)
            .map_err(|source| ModelError::Io { path: file, source });
    }
    match config.and_then(|c| c.get("chat_template")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(|t| Some(t.to_string()))
            .ok_or_else(|| {
                ModelError::Template(format!(
                    "{}: chat_template is a list without a 'default' entry",
                    dir.join("tokenizer_config.json").display()
                ))
            }),
        Some(other) => Err(ModelError::Template(format!(
            "{}: chat_template is {other}, neither a template nor a list of them",
            dir.join("tokenizer_config.json").display()
        ))),
    }
}

/// The tokenizer of `dir` with its ids padded to `vocab_size`, and its chat template's source.
pub(crate) fn load(
    dir: &Path,
    hf: &HfConfig,
    vocab_size: usize,
) -> Result<(TextTokenizer, Option<String>), ModelError> {
    let path = dir.join("tokenizer.json");
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::Tokenizer(format!("{}: not JSON: {e}", path.display())))?;
    let inner = Tokenizer::from_bytes(&bytes).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
    let config = optional_json(dir, "tokenizer_config.json")?;
    let generation = optional_json(dir, "generation_config.json")?;
    let (config, generation) = (config.as_ref(), generation.as_ref());

    let id_of = |key: &str| -> Result<Option<u32>, ModelError> {
        match token_text(config.and_then(|c| c.get(key))) {
            None => Ok(None),
            Some(text) => inner.token_to_id(text).map(Some).ok_or_else(|| {
                ModelError::Tokenizer(format!(
                    "tokenizer_config.json: {key} '{text}' is not in tokenizer.json's vocabulary"
                ))
            }),
        }
    };
    let generation_ids = |key: &str| ids(generation.and_then(|g| g.get(key)));
    let bos_id = match id_of("bos_token")? {
        Some(id) => Some(id),
        None => generation_ids("bos_token_id").first().copied().or(hf.bos_token_id),
    };
    let generation_eos = generation_ids("eos_token_id");
    let eos_id = match id_of("eos_token")? {
        Some(id) => id,
        None => generation_eos
            .first()
            .or(hf.eos_token_ids.first())
            .copied()
            .ok_or_else(|| {
                ModelError::Tokenizer(format!(
                    "{}: no end-of-sequence token: tokenizer_config.json has no eos_token, and neither \
                     generation_config.json nor config.json an eos_token_id",
                    dir.display()
                ))
            })?,
    };
    let add_bos = match config.and_then(|c| c.get("add_bos_token")).and_then(Value::as_bool) {
        Some(b) => b,
        None => bos_id
            .and_then(|id| inner.id_to_token(id))
            .is_some_and(|bos| template_adds(&json["post_processor"], &bos)),
    };
    let mut stop_ids = generation_eos;
    stop_ids.extend(&hf.eos_token_ids);
    let tokens = HfTokens {
        bos_id,
        eos_id,
        add_bos,
        stop_ids,
        spelling: spelling(&json),
        byte_fallback: json["model"]["byte_fallback"] == true,
    };
    let tokenizer = TextTokenizer::from_hf(inner, tokens, vocab_size)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
    Ok((tokenizer, chat_template(dir, config)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spelling_follows_the_decoder() {
        let byte_level = json!({"decoder": {"type": "ByteLevel"}});
        let sentencepiece = json!({"decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]}});
        let llama3 = json!({"decoder": null, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split"}, {"type": "ByteLevel"}]}});
        assert_eq!(spelling(&byte_level), Spelling::ByteLevel);
        assert_eq!(spelling(&sentencepiece), Spelling::Metaspace);
        assert_eq!(spelling(&llama3), Spelling::ByteLevel);
        assert_eq!(spelling(&json!({"decoder": {"type": "WordPiece"}})), Spelling::Plain);
    }

    #[test]
    fn a_bos_first_template_adds_bos() {
        let llama3 = json!({"type": "Sequence", "processors": [{"type": "ByteLevel"}, {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}]});
        assert!(template_adds(&llama3, "<|begin_of_text|>"));
        assert!(!template_adds(&llama3, "<s>"));
        assert!(!template_adds(&json!({"type": "ByteLevel"}), "<|begin_of_text|>"));
    }

    #[test]
    fn the_chat_template_list_form_uses_its_default_entry() {
        let dir = std::env::temp_dir().join(format!("amlserve-hf-tmpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let list =
            json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(chat_template(&dir, Some(&list)).expect("list"), Some("D".into()));
        let no_default = json!({"chat_template": [{"name": "tool_use", "template": "T"}]});
        let err = chat_template(&dir, Some(&no_default)).expect_err("no default");
        assert!(err.to_string().contains("without a 'default' entry"), "{err}");
        assert_eq!(chat_template(&dir, Some(&json!({}))).expect("none"), None);
        std::fs::write(dir.join("chat_template.jinja"), "J").expect("write");
        assert_eq!(chat_template(&dir, Some(&list)).expect("file"), Some("J".into()));
        std::fs::remove_dir_all(&dir).ok();
    }
}

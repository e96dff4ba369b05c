//! Finding the model: an explicit path, else `AZUREML_MODEL_DIR`, else the default download location. A folder
//! is searched (a few levels deep, as Azure ML mounts models under `<name>/<version>/...`) for a `.gguf` file,
//! else for a Hugging Face folder (`config.json` beside `.safetensors` weights). A search that finds both serves
//! the GGUF and reports the folder it passed over, for the log.

use std::path::{Path, PathBuf};

use super::safetensors_files;

/// How deep a model folder is searched.
const MAX_DEPTH: usize = 4;

/// No model was found; lists every place that was looked at.
#[derive(Debug, thiserror::Error)]
#[error(
    "no model found (a .gguf file, or a Hugging Face folder: config.json with .safetensors weights and \
     tokenizer.json); searched: {}",
    .searched.join(", ")
)]
pub struct ModelNotFound {
    pub searched: Vec<String>,
}

/// What [`resolve`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// A `.gguf` file or a Hugging Face folder.
    pub path: PathBuf,
    /// A Hugging Face folder the search found too, passed over for the GGUF.
    pub passed_over: Option<PathBuf>,
}

/// The folder's entries, sorted (so the search does not depend on the file system's order).
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

fn find_gguf(dir: &Path, depth: usize) -> Option<PathBuf> {
    let entries = entries(dir);
    let is_gguf = |p: &PathBuf| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if let Some(f) = entries.iter().find(|p| is_gguf(p)) {
        return Some(f.clone());
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|d| find_gguf(d, depth - 1))
}

/// Whether `dir` is a Hugging Face language model folder: `config.json` and safetensors weights, and not a
/// sentence-transformers folder (`modules.json`: an embedding model, served by `--embedding-model`).
pub fn is_hf_folder(dir: &Path) -> bool {
    dir.join("config.json").is_file() && !dir.join("modules.json").is_file() && safetensors_files::has_weights(dir)
}

fn find_hf_folder(dir: &Path, depth: usize) -> Option<PathBuf> {
    if is_hf_folder(dir) {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    entries(dir)
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|d| find_hf_folder(d, depth - 1))
}

/// Resolves the first candidate that is a file, or a folder holding a `.gguf` or a Hugging Face folder.
/// Candidates are tried in order; `None` entries are skipped.
pub fn resolve(candidates: &[(&str, Option<PathBuf>)]) -> Result<Found, ModelNotFound> {
    let mut searched = Vec::new();
    for (source, path) in candidates {
        let Some(path) = path else { continue };
        if path.is_file() {
            return Ok(Found {
                path: path.clone(),
                passed_over: None,
            });
        }
        if path.is_dir() {
            let hf = find_hf_folder(path, MAX_DEPTH);
            if let Some(f) = find_gguf(path, MAX_DEPTH) {
                return Ok(Found {
                    path: f,
                    passed_over: hf,
                });
            }
            if let Some(dir) = hf {
                return Ok(Found {
                    path: dir,
                    passed_over: None,
                });
            }
            searched.push(format!(
                "{} (from {source}: a folder with neither a .gguf nor a Hugging Face model)",
                path.display()
            ));
        } else {
            searched.push(format!("{} (from {source}: does not exist)", path.display()));
        }
    }
    Err(ModelNotFound { searched })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("amlserve-files-{tag}-{}", std::process::id()))
    }

    /// A Hugging Face folder as the search sees it (the files need not be valid).
    fn hf_folder(dir: &Path) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("config.json"), b"{}").expect("write");
        std::fs::write(dir.join("model.safetensors"), b"").expect("write");
    }

    #[test]
    fn finds_nested_gguf_and_reports_misses() {
        let dir = scratch("gguf");
        let nested = dir.join("m/1");
        std::fs::create_dir_all(&nested).expect("mkdir");
        std::fs::write(nested.join("x.gguf"), b"").expect("write");
        let found = resolve(&[("a", Some(dir.join("missing"))), ("b", Some(dir.clone()))]).expect("found");
        assert_eq!(found.path, nested.join("x.gguf"));
        assert_eq!(found.passed_over, None);
        let err = resolve(&[("--model", Some(dir.join("missing")))]).expect_err("none");
        assert!(
            err.to_string().contains("missing (from --model: does not exist)"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn finds_a_nested_hugging_face_folder_and_prefers_a_gguf_beside_it() {
        let dir = scratch("hf");
        let nested = dir.join("name/2");
        hf_folder(&nested);
        // A sentence-transformers folder is an embedding model, not a language model.
        hf_folder(&dir.join("a-embeddings"));
        std::fs::write(dir.join("a-embeddings/modules.json"), b"[]").expect("write");
        let found = resolve(&[("AZUREML_MODEL_DIR", Some(dir.clone()))]).expect("found");
        assert_eq!(found.path, nested);
        std::fs::write(nested.join("model.gguf"), b"").expect("write");
        let found = resolve(&[("AZUREML_MODEL_DIR", Some(dir.clone()))]).expect("found");
        assert_eq!(found.path, nested.join("model.gguf"));
        assert_eq!(found.passed_over, Some(nested.clone()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).expect("mkdir");
        let err = resolve(&[("--model", Some(dir.clone()))]).expect_err("empty");
        assert!(
            err.to_string().contains("neither a .gguf nor a Hugging Face model"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! Finding the model file: an explicit path, else `AZUREML_MODEL_DIR`, else the default download location.
//! A folder is searched (a few levels deep, as Azure ML mounts models under `<name>/<version>/...`) for a `.gguf`.

use std::path::{Path, PathBuf};

/// How deep a model folder is searched.
const MAX_DEPTH: usize = 4;

/// No model file was found; lists every place that was looked at.
#[derive(Debug, thiserror::Error)]
#[error("no .gguf model found; searched: {}", .searched.join(", "))]
pub struct ModelNotFound {
    pub searched: Vec<String>,
}

fn find_gguf(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
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

/// Resolves the first candidate that is a file, or a folder holding a `.gguf`. Candidates are tried in order;
/// `None` entries are skipped.
pub fn resolve(candidates: &[(&str, Option<PathBuf>)]) -> Result<PathBuf, ModelNotFound> {
    let mut searched = Vec::new();
    for (source, path) in candidates {
        let Some(path) = path else { continue };
        if path.is_file() {
            return Ok(path.clone());
        }
        if path.is_dir() {
            if let Some(f) = find_gguf(path, MAX_DEPTH) {
                return Ok(f);
            }
            searched.push(format!("{} (from {source}: a folder with no .gguf)", path.display()));
        } else {
            searched.push(format!("{} (from {source}: does not exist)", path.display()));
        }
    }
    Err(ModelNotFound { searched })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_gguf_and_reports_misses() {
        let dir = std::env::temp_dir().join(format!("amlserve-files-{}", std::process::id()));
        let nested = dir.join("m/1");
        std::fs::create_dir_all(&nested).expect("mkdir");
        std::fs::write(nested.join("x.gguf"), b"").expect("write");
        let found = resolve(&[("a", Some(dir.join("missing"))), ("b", Some(dir.clone()))]).expect("found");
        assert_eq!(found, nested.join("x.gguf"));
        let err = resolve(&[("--model", Some(dir.join("missing")))]).expect_err("none");
        assert!(
            err.to_string().contains("missing (from --model: does not exist)"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

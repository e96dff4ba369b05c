//! The `.safetensors` files of a Hugging Face folder, read one tensor at a time: one file (`model.safetensors`),
//! or the shards that `model.safetensors.index.json` lists.
//!
//! Only each file's header (a little-endian u64 length, then JSON: `name -> {dtype, shape, data_offsets}`) is
//! kept in memory; a tensor's bytes are read when it is asked for, so loading holds one float tensor beside
//! the converted weights, never a whole checkpoint. No memory map (the crate forbids `unsafe`). The headers are
//! input: a shape whose size disagrees with its byte range, a range past the end of the file or a header
//! larger than [`MAX_HEADER_BYTES`] is refused before anything is allocated for it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::ModelError;

/// Largest header accepted (the `safetensors` crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    /// Index into [`SafetensorsFiles::files`].
    file: usize,
    /// The dtype as the header spells it (`F32`, `BF16`, `I64`...).
    dtype: String,
    shape: Vec<usize>,
    /// Absolute offset of the first byte in the file.
    start: u64,
    len: usize,
}

/// The tensors of one folder's safetensors files.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, File)>,
    tensors: HashMap<String, Entry>,
}

impl std::fmt::Debug for SafetensorsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFiles")
            .field("files", &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Folder(format!("{}: {msg}", path.display()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The dtypes that can be read as weights.
fn float_dtype(dtype: &str) -> Option<DType> {
    Some(match dtype {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        _ => return None,
    })
}

/// Bytes per value of every dtype a header may name, to check its byte ranges.
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// The safetensors files of `dir`: those the index names, else `model.safetensors`, else every `*.safetensors`.
fn file_names(dir: &Path) -> Result<Vec<String>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read(&index).map_err(io(&index))?;
        let json: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(&index, e))?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| bad(&index, "no `weight_map` object"))?;
        let mut names: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(&index, format!("`weight_map.{tensor}` is not a file name")))?;
            // Shards sit beside the index: a path elsewhere is not one.
            if file.contains(['/', '\\']) || file == ".." || file.is_empty() {
                return Err(bad(
                    &index,
                    format!("`weight_map.{tensor}`: '{file}' is not a file in this folder"),
                ));
            }
            if !names.iter().any(|n| n == file) {
                names.push(file.to_string());
            }
        }
        names.sort();
        return Ok(names);
    }
    if dir.join("model.safetensors").is_file() {
        return Ok(vec!["model.safetensors".into()]);
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    Ok(names)
}

/// Whether `dir` holds safetensors weights.
pub fn has_weights(dir: &Path) -> bool {
    file_names(dir).is_ok_and(|n| !n.is_empty())
}

/// Reads the header of `path`: its tensors, offsets made absolute and checked against the file's length.
fn read_header(path: &Path, file: &mut File, index: usize) -> Result<Vec<(String, Entry)>, ModelError> {
    let file_len = file.metadata().map_err(io(path))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io(path))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n > file_len.saturating_sub(8) {
        return Err(bad(
            path,
            format!("a header of {n} bytes in a file of {file_len}: not a safetensors file"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io(path))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(path, format!("header: {e}")))?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut out = Vec::with_capacity(json.len());
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let field = |what: &str| bad(path, format!("tensor '{name}': {what}"));
        let dtype = info["dtype"].as_str().ok_or_else(|| field("no dtype"))?.to_string();
        let size = dtype_size(&dtype).ok_or_else(|| field(&format!("unknown dtype {dtype}")))?;
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .ok_or_else(|| field("no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| field("a shape that is not a list of sizes"))?;
        let offsets: Vec<u64> = info["data_offsets"]
            .as_array()
            .map(|o| o.iter().filter_map(serde_json::Value::as_u64).collect())
            .unwrap_or_default();
        let [begin, end] = offsets[..] else {
            return Err(field("data_offsets is not [begin, end]"));
        };
        let want = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| field("a shape too large"))?;
        if end < begin || end > data_len || (end - begin) as usize != want {
            return Err(field(&format!(
                "bytes {begin}..{end} of {data_len} do not hold a {dtype} tensor of shape {shape:?}"
            )));
        }
        out.push((
            name,
            Entry {
                file: index,
                dtype,
                shape,
                start: data_start + begin,
                len: want,
            },
        ));
    }
    Ok(out)
}

impl SafetensorsFiles {
    /// Opens the safetensors files of `dir` and reads their headers.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let names = file_names(dir)?;
        if names.is_empty() {
            return Err(ModelError::Folder(format!("{}: no .safetensors file", dir.display())));
        }
        let mut files = Vec::with_capacity(names.len());
        let mut tensors = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let mut file = File::open(&path).map_err(io(&path))?;
            for (tensor, entry) in read_header(&path, &mut file, i)? {
                if tensors.insert(tensor.clone(), entry).is_some() {
                    return Err(bad(&path, format!("tensor '{tensor}' is in two files")));
                }
            }
            files.push((path, file));
        }
        Ok(Self { files, tensors })
    }

    /// The shape of tensor `name`, if there is one.
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// Every tensor name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Reads tensor `name` (F32, F16 or BF16) as stored.
    pub fn load(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::Folder(format!("no tensor '{name}' in the safetensors files")))?;
        let (path, file) = &mut self.files[entry.file];
        let dtype = float_dtype(&entry.dtype).ok_or_else(|| {
            bad(
                path,
                format!(
                    "tensor '{name}' is {}: float weights (F32, F16, BF16) are read, not quantized checkpoints",
                    entry.dtype
                ),
            )
        })?;
        let mut bytes = vec![0u8; entry.len];
        file.seek(SeekFrom::Start(entry.start)).map_err(io(path))?;
        file.read_exact(&mut bytes).map_err(io(path))?;
        Ok(Tensor::from_raw_buffer(&bytes, dtype, &entry.shape, &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("amlserve-st-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn reads_tensors_from_shards_named_by_the_index() {
        let dir = scratch("shards");
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .and_then(|t| t.reshape((2, 3)))
            .expect("a");
        let b = Tensor::arange(0f32, 4.0, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("b");
        candle_core::safetensors::save(&HashMap::from([("a", a.clone())]), dir.join("m-1.safetensors")).expect("save");
        candle_core::safetensors::save(&HashMap::from([("b", b.clone())]), dir.join("m-2.safetensors")).expect("save");
        let index = serde_json::json!({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
        let mut st = SafetensorsFiles::open(&dir).expect("open");
        assert_eq!(st.dims("a"), Some(&[2usize, 3][..]));
        let got: Vec<Vec<f32>> = st.load("a").and_then(|t| Ok(t.to_vec2()?)).expect("a");
        assert_eq!(got, a.to_vec2::<f32>().expect("a"));
        let got = st.load("b").expect("b");
        assert_eq!(got.dtype(), DType::BF16);
        assert!(st.load("c").is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn refuses_headers_that_lie() {
        let dir = scratch("lies");
        let header = br#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 16]);
        std::fs::write(dir.join("model.safetensors"), &bytes).expect("write");
        let err = SafetensorsFiles::open(&dir).expect_err("shape and bytes disagree");
        assert!(err.to_string().contains("tensor 'w'"), "{err}");
        std::fs::write(dir.join("model.safetensors"), u64::MAX.to_le_bytes()).expect("write");
        let err = SafetensorsFiles::open(&dir).expect_err("header longer than the file");
        assert!(err.to_string().contains("not a safetensors file"), "{err}");
        let index = serde_json::json!({"weight_map": {"w": "../elsewhere.safetensors"}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
        let err = SafetensorsFiles::open(&dir).expect_err("a shard outside the folder");
        assert!(err.to_string().contains("not a file in this folder"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

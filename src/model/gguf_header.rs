//! Bounded reader for a GGUF file's header (metadata table and tensor table), producing candle's `Content`.
//!
//! The model file is input like any other: a truncated download, a flipped bit or a hostile file must get an
//! error that says what is wrong and where, never a panic or an allocation sized from a corrupt count. candle's
//! own `Content::read` bounds most lengths by the file size, but divides by `general.alignment` (zero panics),
//! multiplies tensor dimensions unchecked, leaves tensor extents to the first read, and lets one metadata array
//! claim a decoded value (32 bytes) per byte of the file. This reader checks every count and length against the
//! bytes left before allocating, caps the decoded metadata at [`MAX_METADATA_VALUES`] values and strings at
//! [`MAX_STRING_BYTES`], and checks each tensor's dimensions, type and extent against the file, so the
//! `Content` it returns can be read tensor by tensor without surprises.
//!
//! Knows the container format only; what the keys and tensors mean is `gguf_meta`'s and `llama`'s business.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

/// Most metadata values decoded in all (array elements included). The largest real tables hold under a
/// million (Llama 3: 128k tokens, 280k merges, 128k types; Gemma 3: 262k tokens, scores and types); a decoded
/// value takes 32 bytes, so this bounds the table at 64 MiB plus the string bytes, whatever the file claims.
pub const MAX_METADATA_VALUES: usize = 1 << 21;

/// Longest metadata string (a key, a token, a chat template). Templates run to tens of kilobytes.
pub const MAX_STRING_BYTES: u64 = 1 << 24;

/// Deepest nesting of arrays inside arrays (real files nest at most once).
const MAX_ARRAY_DEPTH: usize = 8;

/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// Tensor data alignment when `general.alignment` is absent (the GGUF default).
const DEFAULT_ALIGNMENT: u64 = 32;

/// What is wrong with a file's header, and the byte offset where reading stopped.
#[derive(Debug, thiserror::Error)]
#[error("{message} (at byte {offset})")]
pub struct HeaderError {
    pub offset: u64,
    pub message: String,
}

/// GGUF value type codes (`gguf_type`), with the fewest bytes one value of the type takes on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl Kind {
    fn from_code(code: u32) -> Option<Self> {
        use Kind::*;
        [U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64]
            .get(code as usize)
            .copied()
    }

    /// Fewest bytes one value takes on disk (a string: its length; an array: its element type and length).
    fn min_bytes(self) -> u64 {
        match self {
            Kind::U8 | Kind::I8 | Kind::Bool => 1,
            Kind::U16 | Kind::I16 => 2,
            Kind::U32 | Kind::I32 | Kind::F32 => 4,
            Kind::U64 | Kind::I64 | Kind::F64 | Kind::String => 8,
            Kind::Array => 12,
        }
    }
}

/// ggml tensor type codes candle can hold (`ggml_type`); the others are named in the error.
fn ggml_dtype(code: u32) -> Result<GgmlDType, String> {
    Ok(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        16..=23 | 29 => return Err(format!("tensor type {code} (an i-quant) is not supported")),
        24..=28 => return Err(format!("tensor type {code} (an integer or f64 type) is not supported")),
        _ => return Err(format!("unknown tensor type {code}")),
    })
}

/// A reader that knows its position and how many bytes are left, and counts decoded metadata values.
struct Bounded<R> {
    inner: R,
    pos: u64,
    end: u64,
    values: usize,
}

impl<R: Read> Bounded<R> {
    fn error(&self, message: impl Into<String>) -> HeaderError {
        HeaderError {
            offset: self.pos,
            message: message.into(),
        }
    }

    fn left(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes are in the file.
    fn need(&self, n: u64, what: &str) -> Result<(), HeaderError> {
        if n > self.left() {
            return Err(self.error(format!(
                "{what} needs {n} bytes but the file has {} left: truncated or corrupt",
                self.left()
            )));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], HeaderError> {
        self.need(N as u64, what)?;
        let mut buf = [0; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.error(format!("cannot read {what}: {e}")))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, HeaderError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, HeaderError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, HeaderError> {
        let len = self.u64(what)?;
        if len > MAX_STRING_BYTES {
            return Err(self.error(format!(
                "{what} claims {len} bytes, more than the {MAX_STRING_BYTES} allowed"
            )));
        }
        self.need(len, what)?;
        let mut bytes = vec![0; len as usize];
        self.inner
            .read_exact(&mut bytes)
            .map_err(|e| self.error(format!("cannot read {what}: {e}")))?;
        self.pos += len;
        // Some writers NUL-terminate; some strings are not valid UTF-8 (candle reads them the same way).
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// One more decoded value, within [`MAX_METADATA_VALUES`].
    fn count_value(&mut self) -> Result<(), HeaderError> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(self.error(format!("the metadata holds more than {MAX_METADATA_VALUES} values")));
        }
        Ok(())
    }

    fn kind(&mut self, what: &str) -> Result<Kind, HeaderError> {
        let code = self.u32(what)?;
        Kind::from_code(code).ok_or_else(|| self.error(format!("{what} is {code}, not a GGUF value type")))
    }

    /// One value of `kind`; `what` names it in errors ("the value of 'key'"), `key` is its entry's key.
    fn value(&mut self, kind: Kind, key: &str, what: &str, depth: usize) -> Result<Value, HeaderError> {
        self.count_value()?;
        Ok(match kind {
            Kind::U8 => Value::U8(self.array::<1>(what)?[0]),
            Kind::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            Kind::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            Kind::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            Kind::U32 => Value::U32(self.u32(what)?),
            Kind::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            Kind::U64 => Value::U64(self.u64(what)?),
            Kind::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            Kind::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            Kind::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            Kind::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.error(format!("{what} is a bool of byte {b}, not 0 or 1"))),
            },
            Kind::String => Value::String(self.string(what)?),
            Kind::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.error(format!("'{key}' nests arrays more than {MAX_ARRAY_DEPTH} deep")));
                }
                let item = self.kind(&format!("the element type of '{key}'"))?;
                let len = self.u64(&format!("the length of '{key}'"))?;
                let min = len.saturating_mul(item.min_bytes());
                if min > self.left() {
                    return Err(self.error(format!(
                        "'{key}' claims {len} elements ({min} bytes at least) but the file has {} left: truncated or \
                         corrupt",
                        self.left()
                    )));
                }
                if len > (MAX_METADATA_VALUES - self.values) as u64 {
                    return Err(self.error(format!(
                        "'{key}' claims {len} elements: the metadata may hold at most {MAX_METADATA_VALUES} values"
                    )));
                }
                let what = format!("an element of '{key}'");
                // Grown as elements arrive rather than reserved from the claimed length.
                let mut items = Vec::new();
                for _ in 0..len {
                    items.push(self.value(item, key, &what, depth + 1)?);
                }
                Value::Array(items)
            }
        })
    }
}

/// `name` for an error message: cut to 80 characters, as a corrupt file's names can be megabytes long.
fn short(name: &str) -> String {
    match name.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &name[..i]),
        None => name.to_string(),
    }
}

/// The alignment of the tensor data: `general.alignment`, a power of two, or 32 when absent.
fn alignment(metadata: &HashMap<String, Value>) -> Result<u64, String> {
    let Some(v) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let n = match *v {
        Value::U8(x) => u64::from(x),
        Value::U16(x) => u64::from(x),
        Value::U32(x) => u64::from(x),
        Value::U64(x) => x,
        Value::I8(x) => u64::try_from(x).unwrap_or(0),
        Value::I16(x) => u64::try_from(x).unwrap_or(0),
        Value::I32(x) => u64::try_from(x).unwrap_or(0),
        Value::I64(x) => u64::try_from(x).unwrap_or(0),
        _ => 0,
    };
    if !n.is_power_of_two() || n > 1 << 30 {
        return Err(format!(
            "general.alignment is {v:?}; it must be a power of two of at most 2^30"
        ));
    }
    Ok(n)
}

/// One tensor-table entry, checked: at most four dimensions, a known type whose blocks tile each row, and a
/// byte size that does not overflow.
fn tensor_info<R: Read>(r: &mut Bounded<R>, name: &str) -> Result<(TensorInfo, u64), HeaderError> {
    let n_dims = r.u32(&format!("the dimension count of tensor '{name}'"))?;
    if n_dims > MAX_DIMS {
        return Err(r.error(format!(
            "tensor '{name}' has {n_dims} dimensions; ggml tensors have at most {MAX_DIMS}"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        let d = r.u64(&format!("a dimension of tensor '{name}'"))?;
        dims.push(usize::try_from(d).map_err(|_| r.error(format!("tensor '{name}' has dimension {d}")))?);
    }
    let code = r.u32(&format!("the type of tensor '{name}'"))?;
    let dtype = ggml_dtype(code).map_err(|e| r.error(format!("tensor '{name}': {e}")))?;
    let offset = r.u64(&format!("the data offset of tensor '{name}'"))?;
    let elems = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let bytes = elems
        .filter(|_| dims.first().is_none_or(|&row| row.is_multiple_of(dtype.block_size())))
        .and_then(|n| (n / dtype.block_size()).checked_mul(dtype.type_size()))
        .and_then(|b| u64::try_from(b).ok())
        .ok_or_else(|| {
            r.error(format!(
                "tensor '{name}' of shape {dims:?} and type {dtype:?} has no valid size (rows must be whole \
                 blocks of {} values)",
                dtype.block_size()
            ))
        })?;
    // GGUF lists the fastest-varying dimension first; candle's shapes put it last.
    dims.reverse();
    let info = TensorInfo {
        ggml_dtype: dtype,
        shape: dims.into(),
        offset,
    };
    Ok((info, bytes))
}

/// Reads and checks the header of the GGUF file `reader` is positioned at the start of. The tensors' data is
/// not read, only checked to lie inside the file.
pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Content, HeaderError> {
    let io = |offset, e: std::io::Error| HeaderError {
        offset,
        message: format!("cannot read the file: {e}"),
    };
    let start = reader.stream_position().map_err(|e| io(0, e))?;
    let end = reader.seek(SeekFrom::End(0)).map_err(|e| io(0, e))?;
    reader.seek(SeekFrom::Start(start)).map_err(|e| io(0, e))?;
    let mut r = Bounded {
        inner: reader,
        pos: start,
        end,
        values: 0,
    };
    let magic: [u8; 4] = r.array("the GGUF magic")?;
    if &magic != b"GGUF" {
        return Err(r.error(format!("not a GGUF file (it starts with {magic:02x?}, not \"GGUF\")")));
    }
    let version = r.u32("the GGUF version")?;
    let magic = match version {
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        1 => return Err(r.error("GGUF version 1 is not supported (nor by llama.cpp): convert the model again")),
        v if (2..=3).contains(&v.swap_bytes()) => {
            return Err(r.error("a big-endian GGUF file: only little-endian files are supported"))
        }
        v => return Err(r.error(format!("GGUF version {v} is not supported (2 and 3 are)"))),
    };
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // Each metadata entry takes a key length, a type and a value of one byte at least; each tensor entry a
    // name length, a dimension count, a type and an offset.
    let (min_kv, min_tensor) = (8 + 4 + 1, 8 + 4 + 4 + 8);
    let min = kv_count
        .saturating_mul(min_kv)
        .saturating_add(tensor_count.saturating_mul(min_tensor));
    if min > r.left() {
        return Err(r.error(format!(
            "the header claims {tensor_count} tensors and {kv_count} metadata entries ({min} bytes at least) \
             but the file has {} left: truncated or corrupt",
            r.left()
        )));
    }

    let mut metadata = HashMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("metadata key {i}"))?;
        let shown = short(&key);
        let kind = r.kind(&format!("the type of '{shown}'"))?;
        let value = r.value(kind, &shown, &format!("the value of '{shown}'"), 0)?;
        if metadata.insert(key, value).is_some() {
            return Err(r.error(format!("metadata key '{shown}' appears twice")));
        }
    }

    let mut tensor_infos = HashMap::new();
    let mut extents = Vec::new();
    for i in 0..tensor_count {
        let name = r.string(&format!("the name of tensor {i}"))?;
        let shown = short(&name);
        let (info, bytes) = tensor_info(&mut r, &shown)?;
        extents.push((shown.clone(), info.offset, bytes));
        if tensor_infos.insert(name, info).is_some() {
            return Err(r.error(format!("tensor '{shown}' appears twice")));
        }
    }

    let align = alignment(&metadata).map_err(|m| r.error(m))?;
    let data_start = r.pos.div_ceil(align) * align;
    for (name, offset, bytes) in extents {
        if !offset.is_multiple_of(align) {
            return Err(r.error(format!(
                "tensor '{name}' starts at data offset {offset}, not a multiple of the alignment {align}"
            )));
        }
        let fits = data_start
            .checked_add(offset)
            .and_then(|s| s.checked_add(bytes))
            .is_some_and(|e| e <= end);
        if !fits {
            return Err(r.error(format!(
                "tensor '{name}' ({bytes} bytes at data offset {offset}) runs past the end of the file ({end} \
                 bytes): truncated or corrupt"
            )));
        }
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset: data_start,
    })
}

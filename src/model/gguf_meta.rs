//! Typed access to GGUF metadata with errors that name the missing or mistyped key.

use candle_core::quantized::gguf_file::{Content, Value};

use super::ModelError;

/// A borrowed view of a GGUF file's metadata table.
pub struct Metadata<'a>(pub &'a Content);

fn as_u32(v: &Value) -> Option<u32> {
    Some(match v {
        Value::U8(x) => u32::from(*x),
        Value::I8(x) => u32::try_from(*x).ok()?,
        Value::U16(x) => u32::from(*x),
        Value::I16(x) => u32::try_from(*x).ok()?,
        Value::U32(x) => *x,
        Value::I32(x) => u32::try_from(*x).ok()?,
        Value::U64(x) => u32::try_from(*x).ok()?,
        Value::I64(x) => u32::try_from(*x).ok()?,
        _ => return None,
    })
}

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value, ModelError> {
        self.0
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Metadata(format!("GGUF metadata has no '{key}'")))
    }

    fn mistyped(key: &str, want: &str) -> ModelError {
        ModelError::Metadata(format!("GGUF metadata '{key}' is not {want}"))
    }

    /// Whether the table has `key` at all (whatever its type).
    pub fn has(&self, key: &str) -> bool {
        self.0.metadata.contains_key(key)
    }

    /// A required string value.
    pub fn string(&self, key: &str) -> Result<String, ModelError> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            _ => Err(Self::mistyped(key, "a string")),
        }
    }

    /// An optional string value (absent or mistyped reads as `None`).
    pub fn opt_string(&self, key: &str) -> Option<String> {
        self.string(key).ok()
    }

    /// A required unsigned integer.
    pub fn u32(&self, key: &str) -> Result<u32, ModelError> {
        as_u32(self.get(key)?).ok_or_else(|| Self::mistyped(key, "an unsigned integer"))
    }

    /// An optional unsigned integer.
    pub fn opt_u32(&self, key: &str) -> Option<u32> {
        self.u32(key).ok()
    }

    /// A required float (integers are accepted too).
    pub fn f32(&self, key: &str) -> Result<f32, ModelError> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            v => as_u32(v)
                .map(|x| x as f32)
                .ok_or_else(|| Self::mistyped(key, "a number")),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key).ok()? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// A required array of strings.
    pub fn string_array(&self, key: &str) -> Result<Vec<String>, ModelError> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(Self::mistyped(key, "an array of strings")),
                })
                .collect(),
            _ => Err(Self::mistyped(key, "an array")),
        }
    }

    /// A required array of floats (integers are accepted too, as llama.cpp reads int32 scores).
    pub fn f32_array(&self, key: &str) -> Result<Vec<f32>, ModelError> {
        let as_f32 = |v: &Value| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            Value::I8(x) => Some(f32::from(*x)),
            Value::I16(x) => Some(f32::from(*x)),
            Value::I32(x) => Some(*x as f32),
            Value::I64(x) => Some(*x as f32),
            v => as_u32(v).map(|x| x as f32),
        };
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| as_f32(v).ok_or_else(|| Self::mistyped(key, "an array of numbers")))
                .collect(),
            _ => Err(Self::mistyped(key, "an array")),
        }
    }

    /// A required array of unsigned integers.
    pub fn u32_array(&self, key: &str) -> Result<Vec<u32>, ModelError> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| as_u32(v).ok_or_else(|| Self::mistyped(key, "an array of integers")))
                .collect(),
            _ => Err(Self::mistyped(key, "an array")),
        }
    }
}

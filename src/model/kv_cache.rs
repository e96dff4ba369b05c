//! Per-sequence key/value cache for the batched llama forward.
//!
//! Each sequence owns plain `f32` buffers, one for keys and one for values per layer, laid out token-major
//! (`[capacity, n_kv_heads, head_dim]`) so appending a step's rows is one contiguous copy and attention reads
//! them in place. Buffers start at the size the caller expects to need soon and grow by doubling up to the
//! sequence's reserved maximum, so a step never copies the whole cache (amortised O(1) per token). Sequences
//! never share buffers, so attention cannot see another sequence's keys. The engine accounts for the reserved
//! maximum against its memory budget.

/// Shape of one token's keys (or values) in one layer.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    pub n_layer: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Floats per token per layer, for keys (or values).
    pub fn row(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Bytes one token occupies across all layers, keys and values.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.n_layer * self.row() * std::mem::size_of::<f32>()
    }
}

/// The cache of one sequence.
#[derive(Debug, Clone)]
pub struct SeqKv {
    shape: KvShape,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    max_len: usize,
}

/// The cache would pass the sequence's reserved length.
#[derive(Debug, thiserror::Error)]
#[error("kv cache overflow: {needed} tokens > reserved {max_len}")]
pub struct KvOverflow {
    pub needed: usize,
    pub max_len: usize,
}

impl SeqKv {
    /// A cache that will hold at most `max_len` tokens, with room for `initial` allocated now.
    pub fn new(shape: KvShape, initial: usize, max_len: usize) -> Self {
        let capacity = initial.clamp(1, max_len.max(1));
        let buf = || (0..shape.n_layer).map(|_| vec![0f32; capacity * shape.row()]).collect();
        Self {
            shape,
            keys: buf(),
            values: buf(),
            len: 0,
            capacity,
            max_len,
        }
    }

    /// Tokens stored so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `extra` more tokens, doubling the buffers when needed.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<(), KvOverflow> {
        let needed = self.len + extra;
        if needed > self.max_len {
            return Err(KvOverflow {
                needed,
                max_len: self.max_len,
            });
        }
        if needed > self.capacity {
            let new_cap = needed.max(self.capacity * 2).min(self.max_len);
            let floats = new_cap * self.shape.row();
            for b in self.keys.iter_mut().chain(self.values.iter_mut()) {
                b.resize(floats, 0.0);
            }
            self.capacity = new_cap;
        }
        Ok(())
    }

    /// Writes `t` tokens' keys and values (`[t, n_kv_heads, head_dim]` each) after the stored tokens of `layer`.
    /// [`Self::reserve`] must have made room; call [`Self::advance`] once every layer has been written.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let at = self.len * self.shape.row();
        self.keys[layer][at..at + k.len()].copy_from_slice(k);
        self.values[layer][at..at + v.len()].copy_from_slice(v);
    }

    /// Keys and values of `layer` for the first `n` tokens.
    pub(crate) fn layer(&self, layer: usize, n: usize) -> (&[f32], &[f32]) {
        let end = n * self.shape.row();
        (&self.keys[layer][..end], &self.values[layer][..end])
    }

    /// Marks `t` appended tokens as stored.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Starts this empty cache with the first `n` tokens of `from` (same shape), as if they had been computed
    /// here: a token's keys and values depend only on the tokens before it.
    pub fn copy_prefix(&mut self, from: &SeqKv, n: usize) -> Result<(), KvOverflow> {
        debug_assert!(self.is_empty() && n <= from.len);
        self.reserve(n)?;
        let floats = n * self.shape.row();
        for (dst, src) in self.keys.iter_mut().zip(&from.keys) {
            dst[..floats].copy_from_slice(&src[..floats]);
        }
        for (dst, src) in self.values.iter_mut().zip(&from.values) {
            dst[..floats].copy_from_slice(&src[..floats]);
        }
        self.len = n;
        Ok(())
    }

    /// Frees the room beyond the stored tokens (for a cache kept only to be read).
    pub fn shrink_to_len(&mut self) {
        let floats = self.len * self.shape.row();
        for b in self.keys.iter_mut().chain(self.values.iter_mut()) {
            b.truncate(floats);
            b.shrink_to_fit();
        }
        self.capacity = self.len;
        self.max_len = self.len;
    }

    /// Bytes the stored tokens occupy.
    pub fn stored_bytes(&self) -> usize {
        self.len * self.shape.bytes_per_token()
    }
}

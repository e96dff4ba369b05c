//! Per-sequence key/value cache for the batched llama forward.
//!
//! Each sequence owns one buffer per layer for keys and one for values, laid out token-major
//! (`[capacity, n_kv_heads, head_dim]`) so appending a step's rows is one contiguous copy. Buffers start at the
//! size the caller expects to need soon and grow by doubling up to the sequence's reserved maximum, so a step
//! never copies the whole cache (amortised O(1) per token). Sequences never share buffers, so attention cannot
//! see another sequence's keys. The engine accounts for the reserved maximum against its memory budget.

use candle_core::{DType, Device, Tensor};

/// Shape of one token's keys (or values) in one layer.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    pub n_layer: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Bytes one token occupies across all layers, keys and values (f32).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.n_layer * self.n_kv_head * self.head_dim * DType::F32.size_in_bytes()
    }
}

/// The cache of one sequence.
#[derive(Debug)]
pub struct SeqKv {
    shape: KvShape,
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
    max_len: usize,
}

impl SeqKv {
    /// A cache that will hold at most `max_len` tokens, with room for `initial` allocated now.
    pub fn new(shape: KvShape, initial: usize, max_len: usize) -> candle_core::Result<Self> {
        let capacity = initial.clamp(1, max_len.max(1));
        let layers = (0..shape.n_layer)
            .map(|_| {
                let k = Tensor::zeros((capacity, shape.n_kv_head, shape.head_dim), DType::F32, &Device::Cpu)?;
                let v = Tensor::zeros((capacity, shape.n_kv_head, shape.head_dim), DType::F32, &Device::Cpu)?;
                Ok((k, v))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            shape,
            layers,
            len: 0,
            capacity,
            max_len,
        })
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
    pub(crate) fn reserve(&mut self, extra: usize) -> candle_core::Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            candle_core::bail!("kv cache overflow: {needed} tokens > reserved {}", self.max_len)
        }
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = needed.max(self.capacity * 2).min(self.max_len);
        let s = self.shape;
        for (k, v) in &mut self.layers {
            for t in [k, v] {
                let bigger = Tensor::zeros((new_cap, s.n_kv_head, s.head_dim), DType::F32, &Device::Cpu)?;
                if self.len > 0 {
                    bigger.slice_set(&t.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
                }
                *t = bigger;
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Writes `k`, `v` (`[t, n_kv_heads, head_dim]`) after the stored tokens of `layer` and returns views of
    /// all keys and values including them. [`Self::reserve`] must have made room; call [`Self::advance`] once
    /// every layer has been written.
    pub(crate) fn append(&self, layer: usize, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let t = k.dim(0)?;
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(k, 0, self.len)?;
        vc.slice_set(v, 0, self.len)?;
        Ok((kc.narrow(0, 0, self.len + t)?, vc.narrow(0, 0, self.len + t)?))
    }

    /// Marks `t` appended tokens as stored.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

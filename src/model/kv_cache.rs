//! Per-sequence key/value cache for the batched llama forward, in bf16 and in the layout attention reads.
//!
//! Keys and values are rounded to bf16 once, when a step writes them (round to nearest even), which halves the
//! cache next to f32: every decode step reads a sequence's whole cache, so its size is the step's memory
//! traffic at long contexts. They are stored in blocks of [`BLOCK_TOKENS`] tokens per layer and kv head, laid
//! out for `vdpbf16ps`, which multiplies pairs of bf16 values and adds both products to one f32 lane:
//!
//! - a key block is `[head_dim / 2][16 tokens]` 32-bit words, each word two neighbouring dimensions of one
//!   token, so one 512-bit load is a dimension pair of 16 keys and the query's pair is broadcast against it;
//! - a value block is `[8 token pairs][head_dim]` words, each word one dimension of two neighbouring tokens,
//!   so one load is 16 dimensions of a token pair and the two attention weights are broadcast against it.
//!
//! `head_dim` is padded with zeros to a multiple of 16 ([`KvShape::padded_dim`]). Buffers start at the size the
//! caller expects to need soon and grow by doubling up to the sequence's reserved maximum, so a step never
//! copies the whole cache (amortised O(1) per token). Sequences never share buffers, so attention cannot see
//! another sequence's keys. The engine accounts for the reserved maximum against its memory budget
//! ([`KvShape::bytes_for`], whole blocks).

/// Tokens per block: one 512-bit register of f32 scores.
pub const BLOCK_TOKENS: usize = 16;

/// Shape of one token's keys (or values) in one layer.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    pub n_layer: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Floats per token per layer for keys (or values), as the forward computes them.
    pub fn row(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// The head size as stored: a multiple of 16, the padding zero.
    pub fn padded_dim(&self) -> usize {
        padded_dim(self.head_dim)
    }

    /// 32-bit words one block of one kv head occupies, for keys (or values).
    pub(crate) fn block_words(&self) -> usize {
        block_words(self.head_dim)
    }

    /// Bytes one token occupies across all layers, keys and values (bf16).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.n_layer * self.n_kv_head * self.padded_dim() * 2
    }

    /// Bytes a cache of `tokens` tokens holds: whole blocks.
    pub fn bytes_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS * self.bytes_per_token()
    }

    /// Words of one kv head's keys (or values) in one layer for `blocks` blocks.
    fn head_words(&self, blocks: usize) -> usize {
        blocks * self.block_words()
    }
}

/// A head size as the cache stores it: rounded up to a multiple of 16 (one register of values).
pub(crate) fn padded_dim(head_dim: usize) -> usize {
    head_dim.div_ceil(16) * 16
}

/// 32-bit words one block of one kv head occupies, for keys (or values), at head size `head_dim`.
pub(crate) fn block_words(head_dim: usize) -> usize {
    BLOCK_TOKENS / 2 * padded_dim(head_dim)
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits. NaN stays NaN.
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// The f32 a bf16 stands for (exact).
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Writes `b` into the low (`high == false`) or high half of `word`.
fn set_half(word: &mut u32, high: bool, b: u16) {
    let shift = if high { 16 } else { 0 };
    *word = (*word & !(0xffff << shift)) | (u32::from(b) << shift);
}

/// One layer of one sequence's cache as attention reads it: per kv head, `len` tokens in whole blocks, block
/// `b` at words `b * block_words`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub keys: &'a [Vec<u32>],
    pub values: &'a [Vec<u32>],
    pub len: usize,
}

/// The cache of one sequence.
#[derive(Debug, Clone)]
pub struct SeqKv {
    shape: KvShape,
    /// `[layer * n_kv_head + kv head]`: each head's blocks contiguous, so attention streams them in order.
    keys: Vec<Vec<u32>>,
    values: Vec<Vec<u32>>,
    len: usize,
    /// Tokens the buffers hold room for: whole blocks, except where `max_len` ends inside one.
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
        let words = shape.head_words(capacity.div_ceil(BLOCK_TOKENS));
        let buf = || {
            (0..shape.n_layer * shape.n_kv_head)
                .map(|_| vec![0u32; words])
                .collect()
        };
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
            let words = self.shape.head_words(new_cap.div_ceil(BLOCK_TOKENS));
            for b in self.keys.iter_mut().chain(self.values.iter_mut()) {
                b.resize(words, 0);
            }
            self.capacity = new_cap;
        }
        Ok(())
    }

    /// Writes `t` tokens' keys and values (`[t, n_kv_heads, head_dim]` each, f32) after the stored tokens of
    /// `layer`, rounded to bf16. [`Self::reserve`] must have made room; call [`Self::advance`] once every layer
    /// has been written.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let s = self.shape;
        let (d, bw) = (s.head_dim, s.block_words());
        let pd = s.padded_dim();
        let heads = layer * s.n_kv_head..(layer + 1) * s.n_kv_head;
        let (keys, values) = (&mut self.keys[heads.clone()], &mut self.values[heads]);
        for (i, (kt, vt)) in k.chunks_exact(s.row()).zip(v.chunks_exact(s.row())).enumerate() {
            let pos = self.len + i;
            let (block, slot) = (pos / BLOCK_TOKENS, pos % BLOCK_TOKENS);
            let base = block * bw;
            for (h, (keys, values)) in keys.iter_mut().zip(values.iter_mut()).enumerate() {
                let (kh, vh) = (&kt[h * d..(h + 1) * d], &vt[h * d..(h + 1) * d]);
                for (x, (&kx, &vx)) in kh.iter().zip(vh).enumerate() {
                    set_half(&mut keys[base + x / 2 * BLOCK_TOKENS + slot], x % 2 == 1, to_bf16(kx));
                    set_half(&mut values[base + slot / 2 * pd + x], slot % 2 == 1, to_bf16(vx));
                }
            }
        }
    }

    /// Layer `layer` as attention reads it, for the first `n` tokens.
    pub(crate) fn layer(&self, layer: usize, n: usize) -> KvView<'_> {
        debug_assert!(n <= self.capacity);
        let heads = layer * self.shape.n_kv_head..(layer + 1) * self.shape.n_kv_head;
        KvView {
            keys: &self.keys[heads.clone()],
            values: &self.values[heads],
            len: n,
        }
    }

    /// Keys and values (`[n_kv_heads, head_dim]` each) of token `pos` in `layer`, back in f32.
    #[cfg(test)]
    pub(crate) fn token(&self, layer: usize, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let s = self.shape;
        let (block, slot, bw, pd) = (pos / BLOCK_TOKENS, pos % BLOCK_TOKENS, s.block_words(), s.padded_dim());
        let half = |w: u32, high: bool| from_bf16((if high { w >> 16 } else { w }) as u16);
        let mut k = Vec::new();
        let mut v = Vec::new();
        for h in 0..s.n_kv_head {
            let (keys, values) = (
                &self.keys[layer * s.n_kv_head + h],
                &self.values[layer * s.n_kv_head + h],
            );
            for x in 0..s.head_dim {
                k.push(half(keys[block * bw + x / 2 * BLOCK_TOKENS + slot], x % 2 == 1));
                v.push(half(values[block * bw + slot / 2 * pd + x], slot % 2 == 1));
            }
        }
        (k, v)
    }

    /// Marks `t` appended tokens as stored.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Starts this empty cache with the first `n` tokens of `from` (same shape), as if they had been computed
    /// here: a token's keys and values depend only on the tokens before it. The last block is copied whole;
    /// its slots past `n` are overwritten before attention reads them.
    pub fn copy_prefix(&mut self, from: &SeqKv, n: usize) -> Result<(), KvOverflow> {
        debug_assert!(self.is_empty() && n <= from.len);
        self.reserve(n)?;
        let words = self.shape.head_words(n.div_ceil(BLOCK_TOKENS));
        for (dst, src) in self.keys.iter_mut().zip(&from.keys) {
            dst[..words].copy_from_slice(&src[..words]);
        }
        for (dst, src) in self.values.iter_mut().zip(&from.values) {
            dst[..words].copy_from_slice(&src[..words]);
        }
        self.len = n;
        Ok(())
    }

    /// Frees the room beyond the stored tokens' blocks (for a cache kept only to be read).
    pub fn shrink_to_len(&mut self) {
        let words = self.shape.head_words(self.len.div_ceil(BLOCK_TOKENS));
        for b in self.keys.iter_mut().chain(self.values.iter_mut()) {
            b.truncate(words);
            b.shrink_to_fit();
        }
        self.capacity = self.len;
        self.max_len = self.len;
    }

    /// Bytes the stored tokens occupy (whole blocks).
    pub fn stored_bytes(&self) -> usize {
        self.shape.bytes_for(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        for x in [0.0f32, -0.0, 1.0, -2.5, 1e-30, 3.0e38, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(from_bf16(to_bf16(x)), half::bf16::from_f32(x).to_f32(), "{x}");
        }
        let mut seed = 1u32;
        for _ in 0..100_000 {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let x = f32::from_bits(seed);
            if x.is_nan() {
                assert!(from_bf16(to_bf16(x)).is_nan());
            } else {
                assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x:e}");
            }
        }
    }

    #[test]
    fn tokens_read_back_as_written_across_blocks_and_growth() {
        let shape = KvShape {
            n_layer: 2,
            n_kv_head: 3,
            head_dim: 10,
        };
        let mut kv = SeqKv::new(shape, 3, 100);
        // Stored values are the bf16 roundings of what was written.
        let value = |pos: usize, j: usize, sign: f32| from_bf16(to_bf16(sign * (pos * 64 + j) as f32 * 1.001));
        for (chunk, layer_t) in [5usize, 1, 17, 30].into_iter().enumerate() {
            kv.reserve(layer_t).expect("room");
            for layer in 0..2 {
                let k: Vec<f32> = (0..layer_t * shape.row())
                    .map(|j| value(kv.len() + j / shape.row(), j % shape.row(), 1.0))
                    .collect();
                let v: Vec<f32> = k.iter().map(|x| -x - layer as f32).collect();
                kv.append(layer, &k, &v);
            }
            kv.advance(layer_t);
            assert!(kv.stored_bytes() >= kv.len() * shape.bytes_per_token(), "chunk {chunk}");
        }
        let mut copy = SeqKv::new(shape, 1, 60);
        copy.copy_prefix(&kv, 40).expect("room");
        for (cache, n) in [(&kv, 53), (&copy, 40)] {
            for pos in 0..n {
                for layer in 0..2 {
                    let (k, v) = cache.token(layer, pos);
                    let want: Vec<f32> = (0..shape.row()).map(|j| value(pos, j, 1.0)).collect();
                    assert_eq!(k, want, "pos {pos}");
                    let want_v: Vec<f32> = want.iter().map(|x| from_bf16(to_bf16(-x - layer as f32))).collect();
                    assert_eq!(v, want_v, "pos {pos}");
                }
            }
        }
    }
}

//! The device KV cache: one pool of fixed-size blocks per layer, shared by every sequence.
//!
//! A layer's pool is a `[blocks * BLOCK, 2 * kv_row]` tensor on the device (a slot holds one token's keys, then
//! its values); a sequence ([`PagedKv`]) holds a table of block ids and takes blocks as it grows, so sequences of
//! any length share one allocation made at start. Blocks are reference-counted: a fork (a choice of an `n > 1`
//! request) and a prefix-cache hit share the blocks they start with instead of copying them, and a shared block
//! is copied only when a sequence is about to write into it (its last, partly filled block). Once full, a block
//! never changes, so sharing it is safe.
//!
//! The pool is sized at start from the KV budget; the engine's admission keeps reservations within that budget,
//! and the pool holds a margin beyond it for the partly filled blocks and copies on write.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::super::KvShape;

/// Tokens per block.
pub const BLOCK: usize = 16;

/// Free blocks and reference counts.
#[derive(Debug)]
struct Blocks {
    free: Vec<u32>,
    refs: Vec<u32>,
}

/// The block pools of every layer.
pub struct KvPool {
    /// Per layer, `[slots, 2 * kv_row]`.
    layers: Vec<Tensor>,
    shape: KvShape,
    dtype: DType,
    blocks: Mutex<Blocks>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("blocks", &self.n_blocks())
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

/// The pool has no free block left.
#[derive(Debug, thiserror::Error)]
#[error("the KV cache pool ({blocks} blocks of {BLOCK} tokens) is full")]
pub struct PoolFull {
    pub blocks: usize,
}

impl KvPool {
    /// Bytes one token's keys and values take across all layers in `dtype`.
    pub fn bytes_per_token(shape: KvShape, dtype: DType) -> usize {
        2 * shape.n_layer * shape.row() * dtype.size_in_bytes()
    }

    /// A pool of `n_blocks` blocks per layer on `device`, zeroed.
    pub fn new(shape: KvShape, dtype: DType, n_blocks: usize, device: &Device) -> candle_core::Result<Arc<Self>> {
        let n_blocks = n_blocks.clamp(1, u32::MAX as usize / BLOCK);
        let layers = (0..shape.n_layer)
            .map(|_| Tensor::zeros((n_blocks * BLOCK, 2 * shape.row()), dtype, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Arc::new(Self {
            layers,
            shape,
            dtype,
            blocks: Mutex::new(Blocks {
                free: (0..n_blocks as u32).rev().collect(),
                refs: vec![0; n_blocks],
            }),
        }))
    }

    /// Layer `i`'s pool tensor.
    pub fn layer(&self, i: usize) -> &Tensor {
        &self.layers[i]
    }

    /// Blocks per layer.
    pub fn n_blocks(&self) -> usize {
        self.layers.first().map_or(0, |t| t.dims()[0] / BLOCK)
    }

    /// Blocks no sequence holds.
    pub fn free_blocks(&self) -> usize {
        self.lock().free.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Blocks> {
        // A panic while holding the lock leaves only counters behind; they stay usable.
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Result<u32, PoolFull> {
        let mut b = self.lock();
        let id = b.free.pop().ok_or(PoolFull { blocks: b.refs.len() })?;
        b.refs[id as usize] = 1;
        Ok(id)
    }

    fn share(&self, ids: &[u32]) {
        let mut b = self.lock();
        for &id in ids {
            b.refs[id as usize] += 1;
        }
    }

    fn release(&self, ids: &[u32]) {
        let mut b = self.lock();
        for &id in ids {
            let r = &mut b.refs[id as usize];
            *r = r.saturating_sub(1);
            if *r == 0 {
                b.free.push(id);
            }
        }
    }

    fn is_shared(&self, id: u32) -> bool {
        self.lock().refs[id as usize] > 1
    }

    /// Copies block `from` to block `to` in every layer.
    fn copy_block(&self, from: u32, to: u32) -> candle_core::Result<()> {
        for t in &self.layers {
            let src = t.narrow(0, from as usize * BLOCK, BLOCK)?.copy()?;
            t.slice_set(&src, 0, to as usize * BLOCK)?;
        }
        Ok(())
    }
}

/// One sequence's cache: a block table into the shared [`KvPool`].
pub struct PagedKv {
    pool: Arc<KvPool>,
    blocks: Vec<u32>,
    len: usize,
    max_len: usize,
}

impl std::fmt::Debug for PagedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKv")
            .field("len", &self.len)
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl PagedKv {
    /// An empty cache that may grow to `max_len` tokens.
    pub fn new(pool: Arc<KvPool>, max_len: usize) -> Self {
        Self {
            pool,
            blocks: Vec::new(),
            len: 0,
            max_len,
        }
    }

    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block table.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Bytes of the blocks this cache holds (shared blocks count for each holder).
    pub fn stored_bytes(&self) -> usize {
        self.blocks.len() * BLOCK * KvPool::bytes_per_token(self.pool.shape, self.pool.dtype)
    }

    /// Makes room for `n` more tokens: takes blocks as needed and gives the sequence its own copy of a shared
    /// block it is about to write into. Returns the slot of each new token.
    pub fn prepare(&mut self, n: usize) -> candle_core::Result<Vec<u32>> {
        if self.len + n > self.max_len {
            candle_core::bail!("{} tokens past {} exceed the {} reserved", n, self.len, self.max_len)
        }
        if n > 0 && !self.len.is_multiple_of(BLOCK) {
            let last = self.len / BLOCK;
            let id = self.blocks[last];
            if self.pool.is_shared(id) {
                let own = self.pool.take().map_err(candle_core::Error::wrap)?;
                if let Err(e) = self.pool.copy_block(id, own) {
                    self.pool.release(&[own]);
                    return Err(e);
                }
                self.pool.release(&[id]);
                self.blocks[last] = own;
            }
        }
        while self.blocks.len() * BLOCK < self.len + n {
            let id = self.pool.take().map_err(candle_core::Error::wrap)?;
            self.blocks.push(id);
        }
        Ok((self.len..self.len + n)
            .map(|p| self.blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32)
            .collect())
    }

    /// Counts `n` tokens written by a step as stored.
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.blocks.len() * BLOCK);
    }

    /// Gives back the blocks beyond the stored tokens.
    pub fn shrink_to_len(&mut self) {
        let keep = self.len.div_ceil(BLOCK);
        if self.blocks.len() > keep {
            self.pool.release(&self.blocks[keep..]);
            self.blocks.truncate(keep);
        }
    }

    /// Starts this empty cache with the first `n` tokens of `from`, sharing its blocks. False when `n` is more
    /// than `from` holds or this cache may hold, or this cache is not empty.
    pub fn copy_prefix(&mut self, from: &PagedKv, n: usize) -> bool {
        if !self.blocks.is_empty() || n > from.len || n > self.max_len || !Arc::ptr_eq(&self.pool, &from.pool) {
            return false;
        }
        let shared = &from.blocks[..n.div_ceil(BLOCK)];
        self.pool.share(shared);
        self.blocks = shared.to_vec();
        self.len = n;
        true
    }

    /// A cache with the same tokens and reserved length, sharing every block.
    pub fn fork(&self) -> Self {
        self.pool.share(&self.blocks);
        Self {
            pool: self.pool.clone(),
            blocks: self.blocks.clone(),
            len: self.len,
            max_len: self.max_len,
        }
    }
}

impl Drop for PagedKv {
    fn drop(&mut self) {
        self.pool.release(&self.blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> Arc<KvPool> {
        let shape = KvShape {
            n_layer: 2,
            n_kv_head: 1,
            head_dim: 2,
        };
        KvPool::new(shape, DType::F32, blocks, &Device::Cpu).expect("pool")
    }

    fn row(pool: &KvPool, slot: u32) -> Vec<f32> {
        pool.layer(0).get(slot as usize).and_then(|r| r.to_vec1()).expect("row")
    }

    fn write(pool: &KvPool, slot: u32, v: f32) {
        let t = Tensor::new(&[[v; 4]], &Device::Cpu).expect("t");
        pool.layer(0).slice_set(&t, 0, slot as usize).expect("set");
    }

    #[test]
    fn blocks_are_taken_as_needed_and_given_back() {
        let p = pool(4);
        let mut kv = PagedKv::new(p.clone(), 100);
        let slots = kv.prepare(20).expect("room");
        assert_eq!(slots.len(), 20);
        assert_eq!(kv.blocks().len(), 2);
        assert_eq!(p.free_blocks(), 2);
        kv.advance(20);
        assert!(kv.prepare(100).is_err(), "past the reserved length");
        drop(kv);
        assert_eq!(p.free_blocks(), 4);
    }

    #[test]
    fn a_full_pool_is_an_error_not_a_panic() {
        let p = pool(1);
        let mut kv = PagedKv::new(p, 100);
        assert!(kv.prepare(BLOCK).is_ok());
        kv.advance(BLOCK);
        let e = kv.prepare(1).expect_err("full");
        assert!(e.to_string().contains("full"), "{e}");
    }

    #[test]
    fn forks_share_blocks_and_copy_the_partial_one_on_write() {
        let p = pool(8);
        let mut a = PagedKv::new(p.clone(), 64);
        let slots = a.prepare(BLOCK + 3).expect("room");
        for (i, &s) in slots.iter().enumerate() {
            write(&p, s, i as f32);
        }
        a.advance(BLOCK + 3);
        let mut b = a.fork();
        assert_eq!(p.free_blocks(), 6, "the fork took no block");
        let next = b.prepare(1).expect("room");
        assert_ne!(b.blocks()[1], a.blocks()[1], "the written block was copied");
        assert_eq!(b.blocks()[0], a.blocks()[0], "the full block stays shared");
        write(&p, next[0], 99.0);
        // b's copy holds a's first three tokens of the block; a's block is untouched by b's write.
        let b_slot = b.blocks()[1] * BLOCK as u32;
        assert_eq!(row(&p, b_slot + 2)[0], (BLOCK + 2) as f32);
        assert_eq!(row(&p, a.blocks()[1] * BLOCK as u32 + 3)[0], 0.0);
        drop(a);
        drop(b);
        assert_eq!(p.free_blocks(), 8);
    }

    #[test]
    fn a_prefix_shares_whole_and_partial_blocks() {
        let p = pool(8);
        let mut a = PagedKv::new(p.clone(), 64);
        a.prepare(40).expect("room");
        a.advance(40);
        let mut b = PagedKv::new(p.clone(), 64);
        assert!(b.copy_prefix(&a, 20));
        assert_eq!(b.len(), 20);
        assert_eq!(b.blocks(), &a.blocks()[..2]);
        let mut c = PagedKv::new(p.clone(), 10);
        assert!(!c.copy_prefix(&a, 20), "more than c may hold");
        b.prepare(1).expect("room");
        assert_ne!(b.blocks()[1], a.blocks()[1]);
        a.shrink_to_len();
        drop((a, b, c));
        assert_eq!(p.free_blocks(), 8);
    }
}

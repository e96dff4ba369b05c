//! Causal grouped-query attention of each sequence's new tokens over its own bf16 KV cache: tiled, with an
//! online softmax (flash-attention style), on candle's barrier pool.
//!
//! Work items are (sequence, kv head, block of up to [`QUERY_BLOCK`] queries); an item's rows are its
//! queries times the query heads sharing that kv head, so a long prompt splits into many items and every
//! core works on it, and a decode step has one item per sequence and kv head. An item walks the keys in
//! blocks of [`KEY_BLOCK`]; for each block it runs every tile of up to [`TILE_ROWS`] rows, so the block's keys
//! and values (16 KiB at head size 64) are read from memory once and stay in L1 while the tiles use them.
//! Per row it keeps the running maximum score, the running sum of weights and the unnormalised output
//! (flash attention's recurrence), so no score row of the whole context is ever materialised.
//!
//! Scores and weighted sums run on `vdpbf16ps` (AVX512_BF16) where the CPU has it ([`kernel_avx512`]): queries
//! and attention weights are rounded to bf16 like the cache, products are exact and sums are f32. Elsewhere a
//! portable kernel ([`kernel_portable`]) computes the same recurrence in scalar f32. A row's arithmetic does
//! not depend on which other rows share its tile or its step (keys are blocked at absolute positions, and a
//! row's blocks run in order), so outputs do not depend on batching or on how a prompt is chunked.
//!
//! Written here rather than as candle tensor ops because a decode step attends one query per sequence: built
//! from ~20 small tensor ops per sequence and layer, the op overhead dominated the step at batch 16. It runs on
//! candle's pool ([`super::par`]) because a second pool (rayon) spinning beside it starved it on 2 cores.

use super::kv_cache::{block_words, padded_dim, KvView, BLOCK_TOKENS};
use super::par;

/// One sequence's part of a step: `t` new queries at positions `start..start + t`, attending to the first
/// `start + t` cached keys and values.
pub struct AttnTask<'a> {
    /// Queries, `[t, n_head, head_dim]`, already rotated and scaled.
    pub q: &'a [f32],
    pub t: usize,
    pub start: usize,
    /// The sequence's cache for this layer, holding at least `start + t` tokens.
    pub kv: KvView<'a>,
}

/// Shape of the attention, and how far back a query sees.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Sliding-window attention: a query at position `p` sees the keys at `p + 1 - window ..= p` (`window`
    /// keys, itself included, as llama.cpp and Hugging Face count). `None`: every earlier key.
    pub window: Option<usize>,
}

/// Keys per online-softmax update: four cache blocks.
pub const KEY_BLOCK: usize = 4 * BLOCK_TOKENS;
/// Rows (query, head) per tile: their scores for one key block (4 x 4 registers) stay in registers.
pub const TILE_ROWS: usize = 4;
/// Queries per work item.
pub const QUERY_BLOCK: usize = 16;

/// One tile's inputs for one key block, as both kernels take them.
struct Tile<'a> {
    /// Each row's query as bf16 pairs (`padded_dim / 2` words per row, `rows` rows).
    q: &'a [u32],
    /// Each row's last visible key position (its own position).
    limits: &'a [usize],
    /// Each row's first visible key position (0 without a sliding window).
    lows: &'a [usize],
    /// The cache blocks of this key block for the item's kv head: up to 4 of `block_words` words each.
    keys: [&'a [u32]; 4],
    values: [&'a [u32]; 4],
    /// Position of the first key of the block.
    first_key: usize,
    /// Head size as stored.
    pd: usize,
}

/// Each row's running state: unnormalised output (`padded_dim` values), maximum score, sum of weights.
struct RowState<'a> {
    o: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
}

/// Which kernel runs, decided once from the CPU's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 F and BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// Scalar f32, any CPU.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512bf16")
            {
                return Self::Avx512Bf16;
            }
        }
        Self::Portable
    }

    /// Runs one tile over one key block: `rows` rows, `blocks` (1..=4) cache blocks.
    fn run(self, tile: &Tile<'_>, state: RowState<'_>, rows: usize, blocks: usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => kernel_avx512::run(tile, state, rows, blocks),
            _ => kernel_portable::run(tile, state, rows, blocks),
        }
    }
}

/// `x` as bf16 pairs: word `i` holds values `2i` (low half) and `2i + 1`, padded with zeros to `words`.
fn bf16_pairs(x: &[f32], words: usize, out: &mut Vec<u32>) {
    use super::kv_cache::to_bf16;
    for w in 0..words {
        let at = |i: usize| x.get(i).map_or(0, |&v| u32::from(to_bf16(v)));
        out.push(at(2 * w) | (at(2 * w + 1) << 16));
    }
}

/// Up to 4 blocks of `words` words each from block `first` on; empty past `blocks`.
fn blocks_of(data: &[u32], first: usize, blocks: usize, words: usize) -> [&[u32]; 4] {
    std::array::from_fn(|j| {
        let b = first + j;
        if b < blocks {
            &data[b * words..][..words]
        } else {
            &[]
        }
    })
}

/// One work item: queries `q0..q1` of `task`, query heads of kv head `kv_head`. `out[i]` receives query
/// `q0 + i`'s output for those heads (`group * head_dim` values).
fn run_item(
    kernel: Kernel,
    task: &AttnTask<'_>,
    s: AttnShape,
    kv_head: usize,
    (q0, q1): (usize, usize),
    out: &mut [&mut [f32]],
) {
    let (d, pd, bw) = (s.head_dim, padded_dim(s.head_dim), block_words(s.head_dim));
    let group = s.n_head / s.n_kv_head;
    let rows = (q1 - q0) * group;
    let mut q = Vec::with_capacity(rows * pd / 2);
    let mut limits = Vec::with_capacity(rows);
    let mut lows = Vec::with_capacity(rows);
    // Rows query-major, so their limits and lows never decrease along a tile.
    for i in q0..q1 {
        for g in 0..group {
            let h = kv_head * group + g;
            bf16_pairs(&task.q[(i * s.n_head + h) * d..][..d], pd / 2, &mut q);
            let pos = task.start + i;
            limits.push(pos);
            lows.push(s.window.map_or(0, |w| (pos + 1).saturating_sub(w)));
        }
    }
    let mut o = vec![0f32; rows * pd];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let last = task.start + q1 - 1;
    // Key blocks before every row's window hold nothing any row sees. A row's result does not depend on
    // which blocks this skips: a block it sees none of changes nothing (weights 0, scale 1).
    for kb in lows[0] / KEY_BLOCK..=last / KEY_BLOCK {
        let first_key = kb * KEY_BLOCK;
        let first_block = first_key / BLOCK_TOKENS;
        let cache_blocks = task.kv.len.div_ceil(BLOCK_TOKENS);
        let keys = blocks_of(&task.kv.keys[kv_head], first_block, cache_blocks, bw);
        let values = blocks_of(&task.kv.values[kv_head], first_block, cache_blocks, bw);
        for t0 in (0..rows).step_by(TILE_ROWS) {
            let t1 = (t0 + TILE_ROWS).min(rows);
            // Rows that see no key of this block are a prefix of the tile (limits rise along it): skip them.
            let Some(a) = (t0..t1).find(|&r| limits[r] >= first_key) else {
                continue;
            };
            let blocks = ((limits[t1 - 1] - first_key) / BLOCK_TOKENS + 1).min(4);
            let tile = Tile {
                q: &q[a * pd / 2..t1 * pd / 2],
                limits: &limits[a..t1],
                lows: &lows[a..t1],
                keys,
                values,
                first_key,
                pd,
            };
            let state = RowState {
                o: &mut o[a * pd..t1 * pd],
                m: &mut m[a..t1],
                l: &mut l[a..t1],
            };
            kernel.run(&tile, state, t1 - a, blocks);
        }
    }
    for (r, (o, l)) in o.chunks_exact(pd).zip(&l).enumerate() {
        let (i, g) = (r / group, r % group);
        let inv = 1.0 / l;
        for (y, x) in out[i][g * d..(g + 1) * d].iter_mut().zip(o) {
            *y = x * inv;
        }
    }
}

/// Attention for every task; returns `[sum of t, n_head * head_dim]` in task order.
pub fn attend(tasks: &[AttnTask<'_>], s: AttnShape) -> Vec<f32> {
    attend_with(Kernel::detect(), tasks, s)
}

/// [`attend`] on a chosen kernel.
pub fn attend_with(kernel: Kernel, tasks: &[AttnTask<'_>], s: AttnShape) -> Vec<f32> {
    let group_width = s.n_head / s.n_kv_head * s.head_dim;
    let mut y = vec![0f32; tasks.iter().map(|t| t.t).sum::<usize>() * s.n_head * s.head_dim];
    // One piece per (query row, kv head): the outputs of that kv head's query heads, contiguous in the row.
    let mut slots: Vec<Option<&mut [f32]>> = y.chunks_mut(group_width.max(1)).map(Some).collect();
    let mut pieces = Vec::new();
    let mut items = Vec::new();
    let mut row0 = 0;
    for (ti, task) in tasks.iter().enumerate() {
        for h in 0..s.n_kv_head {
            for q0 in (0..task.t).step_by(QUERY_BLOCK) {
                let q1 = (q0 + QUERY_BLOCK).min(task.t);
                pieces.push(
                    (q0..q1)
                        .filter_map(|i| slots[(row0 + i) * s.n_kv_head + h].take())
                        .collect::<Vec<_>>(),
                );
                items.push((ti, h, q0, q1));
            }
        }
        row0 += task.t;
    }
    par::for_each_disjoint(pieces.into_iter(), |item, mut out| {
        let (ti, h, q0, q1) = items[item];
        run_item(kernel, &tasks[ti], s, h, (q0, q1), &mut out);
    });
    y
}

/// The recurrence in scalar f32 for any CPU; the AVX-512 kernel's arithmetic, without bf16 rounding of the
/// attention weights.
mod kernel_portable {
    use super::{RowState, Tile, BLOCK_TOKENS};
    use crate::model::kv_cache::from_bf16;

    fn lo(w: u32) -> f32 {
        from_bf16(w as u16)
    }

    fn hi(w: u32) -> f32 {
        from_bf16((w >> 16) as u16)
    }

    pub(super) fn run(tile: &Tile<'_>, state: RowState<'_>, rows: usize, blocks: usize) {
        let (pd, n) = (tile.pd, blocks * BLOCK_TOKENS);
        let mut p = vec![0f32; n];
        for r in 0..rows {
            let q = &tile.q[r * pd / 2..(r + 1) * pd / 2];
            let visible = (tile.limits[r] + 1 - tile.first_key).min(n);
            let low = tile.lows[r].saturating_sub(tile.first_key).min(visible);
            if low == visible {
                continue; // The row's window starts after this block.
            }
            for (j, pj) in p.iter_mut().enumerate().take(visible).skip(low) {
                let keys = tile.keys[j / BLOCK_TOKENS];
                let slot = j % BLOCK_TOKENS;
                *pj = q
                    .iter()
                    .enumerate()
                    .map(|(k, &w)| {
                        let kw = keys[k * BLOCK_TOKENS + slot];
                        lo(w) * lo(kw) + hi(w) * hi(kw)
                    })
                    .sum();
            }
            let m_old = state.m[r];
            let m_new = p[low..visible].iter().copied().fold(m_old, f32::max);
            let scale = (m_old - m_new).exp();
            let mut sum = 0.0;
            for x in &mut p[low..visible] {
                *x = (*x - m_new).exp();
                sum += *x;
            }
            state.m[r] = m_new;
            state.l[r] = state.l[r] * scale + sum;
            let o = &mut state.o[r * pd..(r + 1) * pd];
            o.iter_mut().for_each(|x| *x *= scale);
            for (j, &w) in p[..visible].iter().enumerate().skip(low) {
                let values = tile.values[j / BLOCK_TOKENS];
                let (pair, high) = ((j % BLOCK_TOKENS) / 2, j % 2 == 1);
                for (x, ox) in o.iter_mut().enumerate() {
                    let vw = values[pair * pd + x];
                    *ox += w * if high { hi(vw) } else { lo(vw) };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod kernel_avx512 {
    //! The SIMD intrinsics, called only after [`super::Kernel::detect`] has found the features they are compiled
    //! for. Every load reads inside a slice checked here: key loads are 16 words at `k * 16` for
    //! `k < pd / 2` of a `pd * 8`-word block; value loads are 16 words at `pair * pd + c * 16` for `pair < 8`,
    //! `c < pd / 16`; row state loads and stores are 16 floats at `c * 16` of a `pd`-float row.
    use std::arch::x86_64::*;

    use super::{RowState, Tile, BLOCK_TOKENS, TILE_ROWS};

    /// Checks the CPU's features (a cached lookup) and every slice's length, then runs the tile.
    pub(super) fn run(tile: &Tile<'_>, state: RowState<'_>, rows: usize, blocks: usize) {
        let pd = tile.pd;
        assert!(
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512bf16")
                && pd.is_multiple_of(16)
                && tile.q.len() == rows * pd / 2
                && state.o.len() == rows * pd
                && state.m.len() == rows
                && tile.limits.len() == rows
                && tile.lows.len() == rows
                && (1..=4).contains(&blocks)
                && tile.keys[..blocks]
                    .iter()
                    .chain(&tile.values[..blocks])
                    .all(|b| b.len() == pd * 8)
        );
        macro_rules! dispatch {
            ($($r:literal),*) => {
                // SAFETY: the features and lengths were checked above.
                unsafe { match (rows, blocks) {
                    $(($r, 1) => tile_rb::<$r, 1>(tile, state),
                      ($r, 2) => tile_rb::<$r, 2>(tile, state),
                      ($r, 3) => tile_rb::<$r, 3>(tile, state),
                      ($r, _) => tile_rb::<$r, 4>(tile, state),)*
                    _ => unreachable!("a tile has 1..=4 rows"),
                } }
            };
        }
        dispatch!(1, 2, 3, 4)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn bcast(w: u32) -> __m512bh {
        // SAFETY: same size, any bit pattern is a valid vector.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(w as i32)) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load_bh(p: *const u32) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
    }

    /// `exp(x)` for `x <= 0` (lanes below -87 may come out as tiny values or zero; callers mask them).
    /// Range reduction by `ln 2` in two parts, then a degree-6 Taylor polynomial on `|r| <= ln(2) / 2`
    /// (relative error under 2e-7) and `vscalefps` for the power of two. `exp(0)` is exactly 1.
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile_rb<const R: usize, const B: usize>(tile: &Tile<'_>, state: RowState<'_>) {
        const { assert!(R <= TILE_ROWS && B <= 4) };
        let pd = tile.pd;
        let half = pd / 2;
        // Scores: s[r][b] holds row r's scores against the 16 keys of block b.
        let mut s = [[_mm512_setzero_ps(); B]; R];
        let kp: [*const u32; B] = std::array::from_fn(|b| tile.keys[b].as_ptr());
        let qp = tile.q.as_ptr();
        for k in 0..half {
            let kv: [__m512bh; B] = std::array::from_fn(|b| load_bh(kp[b].add(k * BLOCK_TOKENS)));
            for (r, row) in s.iter_mut().enumerate() {
                let q = bcast(*qp.add(r * half + k));
                for (acc, keys) in row.iter_mut().zip(&kv) {
                    *acc = _mm512_dpbf16_ps(*acc, q, *keys);
                }
            }
        }
        // Online softmax per row; weights rounded to bf16 pairs, and their sum taken from the rounded values.
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut pw = [[0u32; 32]; R];
        let mut scale = [0f32; R];
        for r in 0..R {
            let limit = (tile.limits[r] - tile.first_key) as i32;
            // Past every key of the tile when the row's window starts after this block.
            let low = tile.lows[r].saturating_sub(tile.first_key).min(4 * BLOCK_TOKENS) as i32;
            let mut mask = [0 as __mmask16; B];
            let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
            for b in 0..B {
                let pos = _mm512_add_epi32(lane, _mm512_set1_epi32((b * BLOCK_TOKENS) as i32));
                mask[b] = _mm512_cmple_epi32_mask(pos, _mm512_set1_epi32(limit))
                    & _mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32(low));
                mx = _mm512_mask_max_ps(mx, mask[b], mx, s[r][b]);
            }
            let m_old = state.m[r];
            let m_new = m_old.max(_mm512_reduce_max_ps(mx));
            // A row that has seen no key yet, and sees none here, keeps its (empty) state as it is.
            scale[r] = if m_new == f32::NEG_INFINITY {
                1.0
            } else {
                (m_old - m_new).exp()
            };
            let mv = _mm512_set1_ps(m_new);
            let p: [__m512; B] = std::array::from_fn(|b| _mm512_maskz_mov_ps(mask[b], exp(_mm512_sub_ps(s[r][b], mv))));
            let mut sum = _mm512_setzero_ps();
            for pair in 0..B.div_ceil(2) {
                let (a, b) = (
                    p[2 * pair],
                    if 2 * pair + 1 < B {
                        p[2 * pair + 1]
                    } else {
                        _mm512_setzero_ps()
                    },
                );
                let bh = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
                _mm512_storeu_si512(pw[r][pair * 16..].as_mut_ptr().cast(), bh);
                let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bh));
                let odd = _mm512_castsi512_ps(_mm512_and_si512(bh, _mm512_set1_epi32(0xffff_0000u32 as i32)));
                sum = _mm512_add_ps(sum, _mm512_add_ps(even, odd));
            }
            state.m[r] = m_new;
            state.l[r] = state.l[r] * scale[r] + _mm512_reduce_add_ps(sum);
        }
        // Weighted sum of values, 64 output values (4 registers per row) at a time.
        let vp: [*const u32; B] = std::array::from_fn(|b| tile.values[b].as_ptr());
        let op = state.o.as_mut_ptr();
        let mut c0 = 0;
        while c0 < pd / 16 {
            let cs = (pd / 16 - c0).min(4);
            match cs {
                4 => mix::<R, B, 4>(&vp, &pw, &scale, op, pd, c0),
                3 => mix::<R, B, 3>(&vp, &pw, &scale, op, pd, c0),
                2 => mix::<R, B, 2>(&vp, &pw, &scale, op, pd, c0),
                _ => mix::<R, B, 1>(&vp, &pw, &scale, op, pd, c0),
            }
            c0 += cs;
        }
    }

    /// `o[r][c0 * 16..(c0 + C) * 16] = o * scale[r] + sum over key pairs of weights x values`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn mix<const R: usize, const B: usize, const C: usize>(
        vp: &[*const u32; B],
        pw: &[[u32; 32]; R],
        scale: &[f32; R],
        op: *mut f32,
        pd: usize,
        c0: usize,
    ) {
        let mut acc: [[__m512; C]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|c| {
                _mm512_mul_ps(
                    _mm512_loadu_ps(op.add(r * pd + (c0 + c) * 16)),
                    _mm512_set1_ps(scale[r]),
                )
            })
        });
        for b in 0..B {
            for pair in 0..BLOCK_TOKENS / 2 {
                let v: [__m512bh; C] = std::array::from_fn(|c| load_bh(vp[b].add(pair * pd + (c0 + c) * 16)));
                for r in 0..R {
                    let w = bcast(pw[r][b * 8 + pair]);
                    for c in 0..C {
                        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, v[c]);
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                _mm512_storeu_ps(op.add(r * pd + (c0 + c) * 16), *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::{from_bf16, to_bf16, KvShape, SeqKv};

    /// Naive reference in f64 on the bf16-rounded keys and values: softmax(q k^T) v with an explicit causal limit.
    fn reference(q: &[f32], t: usize, start: usize, k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
        let window = s.window.unwrap_or(usize::MAX);
        let d = s.head_dim;
        let row = s.n_kv_head * d;
        let r = |x: f32| f64::from(from_bf16(to_bf16(x)));
        let mut y = vec![0f32; t * s.n_head * d];
        for i in 0..t {
            for h in 0..s.n_head {
                let kv = h / (s.n_head / s.n_kv_head);
                let q = &q[(i * s.n_head + h) * d..][..d];
                let n = start + i + 1;
                let first = n.saturating_sub(window);
                let sc: Vec<f64> = (first..n)
                    .map(|j| (0..d).map(|x| f64::from(q[x]) * r(k[j * row + kv * d + x])).sum())
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for x in 0..d {
                    let o: f64 = (first..n).map(|j| e[j - first] / z * r(v[j * row + kv * d + x])).sum();
                    y[(i * s.n_head + h) * d + x] = o as f32;
                }
            }
        }
        y
    }

    /// Deterministic pseudo-random values in [-scale, scale).
    fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// A cache of `n` tokens with the given keys and values, written in chunks of `chunk`.
    fn cache(shape: KvShape, k: &[f32], v: &[f32], chunk: usize) -> SeqKv {
        let row = shape.row();
        let n = k.len() / row;
        let mut kv = SeqKv::new(shape, 1, n);
        let mut at = 0;
        while at < n {
            let t = chunk.min(n - at);
            kv.reserve(t).expect("room");
            kv.append(0, &k[at * row..(at + t) * row], &v[at * row..(at + t) * row]);
            kv.advance(t);
            at += t;
        }
        kv
    }

    /// Checks max |ours - reference| over `(start, t)` tasks on every kernel this CPU has (measured: at most
    /// 3.5e-3 on outputs of size ~0.3, from rounding queries and weights to bf16).
    fn check(s: AttnShape, shapes: &[(usize, usize)], seed: u64, tol: f32) {
        let shape = KvShape {
            n_layer: 1,
            n_kv_head: s.n_kv_head,
            head_dim: s.head_dim,
        };
        let row = shape.row();
        // Queries scaled as the forward scales them, keys and values of unit size: scores spread over a few units.
        let data: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(n, &(start, t))| {
                let seed = seed * 100 + n as u64;
                let k = noise((start + t) * row, seed + 1, 2.0);
                let v = noise((start + t) * row, seed + 2, 1.0);
                let q = noise(t * s.n_head * s.head_dim, seed + 3, 2.0 / (s.head_dim as f32).sqrt());
                let kv = cache(shape, &k, &v, 7 + n);
                (q, k, v, kv)
            })
            .collect();
        let tasks: Vec<AttnTask<'_>> = shapes
            .iter()
            .zip(&data)
            .map(|(&(start, t), (q, _, _, kv))| AttnTask {
                q,
                t,
                start,
                kv: kv.layer(0, start + t),
            })
            .collect();
        let want: Vec<f32> = shapes
            .iter()
            .zip(&data)
            .flat_map(|(&(start, t), (q, k, v, _))| reference(q, t, start, k, v, s))
            .collect();
        for kernel in [Kernel::Portable, Kernel::detect()] {
            let got = attend_with(kernel, &tasks, s);
            assert_eq!(got.len(), want.len());
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < tol, "{kernel:?} {s:?} {shapes:?}: max |diff| {worst}");
        }
    }

    #[test]
    fn matches_a_reference_with_gqa_causality_and_odd_head_sizes() {
        // Head sizes: full 64-value groups, single vectors, padding. Several sequences per call, as a step packs
        // them: a prefill chunk, a decode step, a first chunk, one crossing key blocks.
        for head_dim in [12, 64, 72, 136] {
            for (n_head, n_kv_head) in [(4, 2), (3, 1), (5, 5)] {
                let s = AttnShape {
                    n_head,
                    n_kv_head,
                    head_dim,
                    window: None,
                };
                check(s, &[(5, 3), (9, 1), (0, 4), (60, 37)], head_dim as u64, 1e-2);
            }
        }
    }

    #[test]
    fn matches_a_reference_at_lengths_up_to_5000() {
        let s = AttnShape {
            n_head: 9,
            n_kv_head: 3,
            head_dim: 64,
            window: None,
        };
        for (i, len) in [1usize, 2, 15, 16, 17, 63, 64, 65, 129, 1000, 4999]
            .into_iter()
            .enumerate()
        {
            // The last few queries of a long prefill, and a decode step at the end.
            let t = len.min(19);
            check(s, &[(len - t, t), (len - 1, 1)], 7 + i as u64, 1e-2);
        }
    }

    #[test]
    fn a_rows_output_does_not_depend_on_its_tile_or_chunking() {
        // The same 300 queries attended as one task, in chunks of 1, 13 and 64 queries, and decode-style one by
        // one beside another sequence: identical bits.
        let s = AttnShape {
            n_head: 6,
            n_kv_head: 2,
            head_dim: 64,
            window: None,
        };
        let shape = KvShape {
            n_layer: 1,
            n_kv_head: 2,
            head_dim: 64,
        };
        let n = 300;
        let k = noise(n * shape.row(), 1, 2.0);
        let v = noise(n * shape.row(), 2, 1.0);
        let q = noise(n * s.n_head * 64, 3, 0.25);
        let kv = cache(shape, &k, &v, 64);
        let other = cache(shape, &v, &k, 64);
        let width = s.n_head * 64;
        let whole = attend(
            &[AttnTask {
                q: &q,
                t: n,
                start: 0,
                kv: kv.layer(0, n),
            }],
            s,
        );
        for chunk in [1, 13, 64] {
            let mut got = Vec::new();
            for start in (0..n).step_by(chunk) {
                let t = chunk.min(n - start);
                let task = AttnTask {
                    q: &q[start * width..(start + t) * width],
                    t,
                    start,
                    kv: kv.layer(0, start + t),
                };
                let neighbour = AttnTask {
                    q: &q[..width],
                    t: 1,
                    start: 100,
                    kv: other.layer(0, 101),
                };
                got.extend_from_slice(&attend(&[neighbour, task], s)[width..]);
            }
            assert!(got == whole, "chunks of {chunk} differ from the whole prompt");
        }
    }

    #[test]
    fn a_sliding_window_hides_the_keys_before_it() {
        // Windows inside a key block, on block edges, wider than the text; tasks whose windows start after
        // whole tiles' worth of keys, prefill chunks and decode steps.
        for window in [1, 5, 16, 64, 100, 1000] {
            let s = AttnShape {
                n_head: 4,
                n_kv_head: 2,
                head_dim: 64,
                window: Some(window),
            };
            check(s, &[(0, 40), (150, 30), (299, 1), (63, 2), (7, 9)], window as u64, 1e-2);
        }
    }
}

//! Causal grouped-query attention of one sequence's new tokens over its own KV cache, in plain Rust.
//!
//! Written here rather than as candle tensor ops because a decode step attends one query per sequence: built
//! from ~20 small tensor ops per sequence and layer, the op overhead dominated the step at batch 16. Work is
//! split over (query, head) pairs on candle's own barrier pool ([`super::par`]), the pool its quantized matmuls use:
//! a second pool (rayon) spinning beside it starved it and made Q8_0 steps 20x slower on 2 cores. The inner
//! loops use explicit 8-lane vectors (`wide`, AVX2 + FMA here), a head's 64 values per pass over the keys, and
//! accumulators that stay in registers (auto-vectorized loops came out 2-4 lanes wide, and value sums read back
//! from memory for every key).

use wide::f32x8;

use super::par;

/// One sequence's part of a step: `t` new queries at positions `start..start + t`, attending to the first
/// `start + t` cached keys and values.
pub struct AttnTask<'a> {
    /// Queries, `[t, n_head, head_dim]`, already rotated and scaled.
    pub q: &'a [f32],
    pub t: usize,
    pub start: usize,
    /// Cached keys and values, `[start + t, n_kv_head, head_dim]`.
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// Shape of the attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// Vector width of the inner loops ([`f32x8`]: one AVX2 register).
const LANES: usize = 8;
/// Vectors of a head handled in one pass over the keys: 64 values, whose accumulators fit in registers.
const BLOCK: usize = 8;

/// One kv head's rows in a token-major cache: row `j` starts at `data[j * stride + offset]`.
#[derive(Clone, Copy)]
struct HeadRows<'a> {
    data: &'a [f32],
    stride: usize,
    offset: usize,
}

impl<'a> HeadRows<'a> {
    /// `C` vectors of row `j`, starting at vector `first`.
    fn vectors<const C: usize>(&self, j: usize, first: usize) -> &'a [[f32; LANES]; C] {
        let start = j * self.stride + self.offset + first * LANES;
        self.data[start..start + C * LANES]
            .as_chunks::<LANES>()
            .0
            .first_chunk::<C>()
            .expect("C vectors were sliced")
    }

    /// Scalar `x` of row `j`.
    fn at(&self, j: usize, x: usize) -> f32 {
        self.data[j * self.stride + self.offset + x]
    }
}

/// Adds the dot products of `q` (vectors `first..first + C` of the query) with each key to `scores`. Each key's
/// multiply-adds form one short chain (`C` long, unrolled) and keys are independent, so the processor overlaps
/// consecutive keys.
fn add_scores<const C: usize>(q: &[[f32; LANES]; C], keys: HeadRows<'_>, first: usize, scores: &mut [f32]) {
    let q = q.map(f32x8::new);
    for (j, s) in scores.iter_mut().enumerate() {
        let k = keys.vectors::<C>(j, first);
        let mut acc = f32x8::ZERO;
        for c in 0..C {
            acc = q[c].mul_add(f32x8::new(k[c]), acc);
        }
        *s += acc.reduce_add();
    }
}

/// `out = sum_j p[j] * values[j]` over vectors `first..first + C` of the rows: one accumulator per vector, so each
/// row's `C` multiply-adds are independent.
fn weighted_sum<const C: usize>(p: &[f32], values: HeadRows<'_>, first: usize, out: &mut [[f32; LANES]]) {
    let mut acc = [f32x8::ZERO; C];
    for (j, &w) in p.iter().enumerate() {
        let v = values.vectors::<C>(j, first);
        let w = f32x8::splat(w);
        for c in 0..C {
            acc[c] = f32x8::new(v[c]).mul_add(w, acc[c]);
        }
    }
    for (o, a) in out[first..first + C].iter_mut().zip(acc) {
        *o = a.to_array();
    }
}

/// `scores[j] = q . keys[j]`, in blocks of [`BLOCK`] vectors, then single vectors, then scalars.
fn scores(q: &[f32], keys: HeadRows<'_>, scores: &mut [f32]) {
    scores.fill(0.0);
    let (qv, tail) = q.as_chunks::<LANES>();
    let mut first = 0;
    for block in qv.chunks_exact(BLOCK) {
        add_scores::<BLOCK>(block.first_chunk().expect("a full block"), keys, first, scores);
        first += BLOCK;
    }
    for v in &qv[first..] {
        add_scores::<1>(std::array::from_ref(v), keys, first, scores);
        first += 1;
    }
    for (x, &qx) in tail.iter().enumerate() {
        for (j, s) in scores.iter_mut().enumerate() {
            *s += qx * keys.at(j, first * LANES + x);
        }
    }
}

/// `out = sum_j p[j] * values[j]`, blocked like [`scores`].
fn mix_values(p: &[f32], values: HeadRows<'_>, out: &mut [f32]) {
    let (ov, tail) = out.as_chunks_mut::<LANES>();
    let full = ov.len() / BLOCK * BLOCK;
    for first in (0..full).step_by(BLOCK) {
        weighted_sum::<BLOCK>(p, values, first, ov);
    }
    for first in full..ov.len() {
        weighted_sum::<1>(p, values, first, ov);
    }
    let base = ov.len() * LANES;
    for (x, o) in tail.iter_mut().enumerate() {
        *o = p.iter().enumerate().map(|(j, w)| w * values.at(j, base + x)).sum();
    }
}

/// Replaces each score `x` by `exp(x - max)` (8 lanes at a time) and returns their sum.
fn exp_shifted(p: &mut [f32]) -> f32 {
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (chunks, tail) = p.as_chunks_mut::<LANES>();
    let mut sum = f32x8::ZERO;
    for c in chunks {
        let e = (f32x8::new(*c) - f32x8::splat(max)).exp();
        sum += e;
        *c = e.to_array();
    }
    let mut total = sum.reduce_add();
    for x in tail {
        *x = (*x - max).exp();
        total += *x;
    }
    total
}

/// Output of query head `h` for query `i` of `task` into `out` (`head_dim` values).
fn head_row(task: &AttnTask<'_>, s: AttnShape, i: usize, h: usize, out: &mut [f32]) {
    let d = s.head_dim;
    let kv_h = h / (s.n_head / s.n_kv_head);
    let rows = |data| HeadRows {
        data,
        stride: s.n_kv_head * d,
        offset: kv_h * d,
    };
    let q = &task.q[(i * s.n_head + h) * d..][..d];
    SCORES.with_borrow_mut(|p| {
        // `scores` overwrites every element it is given, so the buffer is only grown, never cleared.
        if p.len() < task.start + i + 1 {
            p.resize(task.start + i + 1, 0.0);
        }
        let p = &mut p[..task.start + i + 1];
        scores(q, rows(task.k), p);
        let sum = exp_shifted(p);
        mix_values(p, rows(task.v), out);
        let inv = 1.0 / sum;
        out.iter_mut().for_each(|x| *x *= inv);
    });
}

thread_local! {
    /// Each pool thread's score buffer, reused across (query, head) items instead of allocated for each.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Attention for every task; returns `[sum of t, n_head * head_dim]` in task order. Each (query, head) pair
/// writes its own `head_dim` values of the output in place.
pub fn attend(tasks: &[AttnTask<'_>], s: AttnShape) -> Vec<f32> {
    // Output rows start at each task's first row; pieces are `head_dim` values of one (row, head).
    let width = s.n_head;
    let mut y = vec![0f32; tasks.iter().map(|t| t.t).sum::<usize>() * s.n_head * s.head_dim];
    let mut slots: Vec<Option<&mut [f32]>> = y.chunks_mut(s.head_dim.max(1)).map(Some).collect();
    // Work order as the loops of a single-threaded attention would run: task by task, then head by head, then
    // query by query. A run of items is then one head of one sequence over consecutive queries (its keys and
    // values stay in cache through a long prefill) or, in decode, every head of one sequence (one cache).
    // Row-major runs cycled through all heads and cost ~10% of a 512-token prefill.
    let mut pieces = Vec::with_capacity(slots.len());
    let mut items = Vec::with_capacity(slots.len());
    let mut row0 = 0;
    for (ti, task) in tasks.iter().enumerate() {
        for h in 0..s.n_head {
            for i in 0..task.t {
                pieces.extend(slots[(row0 + i) * width + h].take());
                items.push((ti, i, h));
            }
        }
        row0 += task.t;
    }
    par::for_each_disjoint(pieces.into_iter(), |item, out| {
        let (ti, i, h) = items[item];
        head_row(&tasks[ti], s, i, h, out);
    });
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive reference: softmax(q k^T) v with an explicit causal limit.
    fn reference(task: &AttnTask<'_>, s: AttnShape) -> Vec<f32> {
        let d = s.head_dim;
        let row = s.n_kv_head * d;
        let mut y = vec![0f32; task.t * s.n_head * d];
        for i in 0..task.t {
            for h in 0..s.n_head {
                let kv = h / (s.n_head / s.n_kv_head);
                let q = &task.q[(i * s.n_head + h) * d..][..d];
                let n = task.start + i + 1;
                let sc: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..d)
                            .map(|x| f64::from(q[x]) * f64::from(task.k[j * row + kv * d + x]))
                            .sum()
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for x in 0..d {
                    let v: f64 = (0..n).map(|j| e[j] / z * f64::from(task.v[j * row + kv * d + x])).sum();
                    y[(i * s.n_head + h) * d + x] = v as f32;
                }
            }
        }
        y
    }

    #[test]
    fn matches_a_naive_reference_with_gqa_and_causality() {
        // Head sizes exercise full 64-value blocks, single vectors and scalar tails.
        for head_dim in [12, 64, 72, 136] {
            let s = AttnShape {
                n_head: 4,
                n_kv_head: 2,
                head_dim,
            };
            let f = |n: usize, seed: f32| (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect::<Vec<f32>>();
            // Several sequences in one call (a prefill chunk, a decode step, a first chunk), as a step packs them.
            let shapes = [(5, 3), (9, 1), (0, 4)];
            let data: Vec<_> = shapes
                .iter()
                .enumerate()
                .map(|(n, &(start, t))| {
                    let seed = n as f32;
                    (
                        f(t * s.n_head * s.head_dim, 0.1 + seed),
                        f((start + t) * s.n_kv_head * s.head_dim, 0.7 + seed),
                        f((start + t) * s.n_kv_head * s.head_dim, 1.3 + seed),
                    )
                })
                .collect();
            let tasks: Vec<AttnTask<'_>> = shapes
                .iter()
                .zip(&data)
                .map(|(&(start, t), (q, k, v))| AttnTask { q, t, start, k, v })
                .collect();
            let got = attend(&tasks, s);
            let want: Vec<f32> = tasks.iter().flat_map(|task| reference(task, s)).collect();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "head_dim {head_dim}: {a} vs {b}");
            }
        }
    }
}

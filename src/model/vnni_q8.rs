//! Q8_0 matrix times f32 activations with AVX-512 VNNI, for any row width that is a multiple of 32.
//!
//! candle's tiled VNNI kernel needs the row width to be a multiple of 256 (its activations are quantized in
//! 256-value blocks), so SmolLM2's 576-wide matrices had to be zero-padded to 768: a quarter of those matrices'
//! multiply-adds (a fifth of a step's) were on zeros. This kernel quantizes activations in 32-value blocks,
//! like the weights, so nothing is padded.
//!
//! Layout: weights are repacked into tiles of 16 output rows x one 32-value block, interleaved so one 64-byte
//! load holds 4 consecutive weights of each of the 16 rows; `vpdpbusd` then multiplies them with 4 activation
//! bytes broadcast to every lane, 64 multiply-adds per instruction. `vpdpbusd` takes unsigned times signed
//! bytes, so activations are stored offset by +128 and each tile carries `128 * sum(weights)` per row to take
//! the offset back out. Each 32-block's integer sum is scaled by the weight's and the activation's scales and
//! accumulated in f32, as llama.cpp's Q8_0 dot product does. Work is split over (16-row tile, up to 8
//! activation rows) units on candle's barrier pool.
//!
//! The only `unsafe` in amlserve: SIMD intrinsics (called only after the CPU features are checked at
//! construction) and writes of disjoint output blocks from the pool's threads.
#![allow(unsafe_code)]

use std::sync::Mutex;

use wide::{f32x8, i32x8};

/// Output rows per tile (one 512-bit register of i32 or f32).
const TILE_N: usize = 16;
/// Values per quantization block.
const BLOCK: usize = 32;
/// Activation rows per work unit (their accumulators stay in registers).
const MAX_M: usize = 8;

/// 16 rows x 32 values of weights, their scales and offset corrections.
#[repr(C, align(64))]
struct Tile {
    /// `[group of 4 values (8)][row (16)][value (4)]`.
    qs: [i8; BLOCK * TILE_N],
    scale: [f32; TILE_N],
    /// `128 * sum of the row's 32 weights`.
    corr: [i32; TILE_N],
}

/// A Q8_0 matrix `[n, k]` repacked for the kernel.
pub struct VnniQ8 {
    n: usize,
    k: usize,
    /// `[n / 16][k / 32]`.
    tiles: Vec<Tile>,
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl VnniQ8 {
    /// Repacks raw Q8_0 blocks (per block: f16 scale, 32 i8) of an `[n, k]` matrix. `None` when the CPU lacks
    /// the instructions or the shape does not tile (`n % 16`, `k % 32`, `k > 0`).
    pub fn new(data: &[u8], n: usize, k: usize) -> Option<Self> {
        const BLOCK_BYTES: usize = 2 + BLOCK;
        let kb = k / BLOCK;
        if !available()
            || k == 0
            || !n.is_multiple_of(TILE_N)
            || !k.is_multiple_of(BLOCK)
            || data.len() != n * kb * BLOCK_BYTES
        {
            return None;
        }
        let mut tiles = Vec::with_capacity(n / TILE_N * kb);
        for nt in 0..n / TILE_N {
            for b in 0..kb {
                let mut tile = Tile {
                    qs: [0; BLOCK * TILE_N],
                    scale: [0.0; TILE_N],
                    corr: [0; TILE_N],
                };
                for r in 0..TILE_N {
                    let at = ((nt * TILE_N + r) * kb + b) * BLOCK_BYTES;
                    let block = &data[at..at + BLOCK_BYTES];
                    tile.scale[r] = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                    let q = block[2..].iter().map(|&x| x as i8);
                    tile.corr[r] = 128 * q.clone().map(i32::from).sum::<i32>();
                    for (j, v) in q.enumerate() {
                        tile.qs[(j / 4 * TILE_N + r) * 4 + j % 4] = v;
                    }
                }
                tiles.push(tile);
            }
        }
        Some(Self { n, k, tiles })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<Tile>()
    }

    /// `x` (`[m, k]`, row-major) times the matrix transposed: `[m, n]`.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let m = x.len() / k;
        let acts = quantize(x, m, k);
        let mut out = vec![0f32; m * n];
        let dst = out.as_mut_ptr() as usize;
        let m_units = m.div_ceil(MAX_M);
        let units = n / TILE_N * m_units;
        candle_core::utils::barrier_pool().execute_chunked(units, |range| {
            for u in range {
                let (nt, m0) = (u / m_units, u % m_units * MAX_M);
                let rows = (m - m0).min(MAX_M);
                // SAFETY: `available()` held at construction; unit (nt, m0) writes only the 16 columns of tile
                // nt in rows m0..m0 + rows of `out`, which no other unit writes, and `out` outlives the pool call.
                unsafe { kernel::unit(self, &acts, nt, m0, rows, dst as *mut f32) };
            }
        });
        out
    }
}

/// Activations quantized per 32-value block: bytes offset by +128 and one scale per block.
struct Acts {
    q: Vec<u8>,
    d: Vec<f32>,
}

/// Quantizes each row of `x` (`[m, k]`) in 32-value blocks (rows shared out on the pool).
fn quantize(x: &[f32], m: usize, k: usize) -> Acts {
    let kb = k / BLOCK;
    let mut q = vec![0u8; m * k];
    let mut d = vec![0f32; m * kb];
    let slots: Vec<Mutex<(&mut [u8], &mut [f32])>> = q.chunks_mut(k).zip(d.chunks_mut(kb)).map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(m, |range| {
        for r in range {
            if let Ok(mut slot) = slots[r].lock() {
                let (qr, dr) = &mut *slot;
                quantize_row(&x[r * k..(r + 1) * k], qr, dr);
            }
        }
    });
    drop(slots);
    Acts { q, d }
}

fn quantize_row(x: &[f32], q: &mut [u8], d: &mut [f32]) {
    // `k` is a multiple of 32: whole blocks of four 8-lane vectors, no tail.
    let (xv, qv) = (x.as_chunks::<8>().0, q.as_chunks_mut::<8>().0);
    let limit = f32x8::splat(127.0);
    for ((xb, qb), db) in xv.chunks_exact(4).zip(qv.chunks_exact_mut(4)).zip(d.iter_mut()) {
        let v: [f32x8; 4] = std::array::from_fn(|i| f32x8::new(xb[i]));
        let amax = v
            .iter()
            .fold(f32x8::ZERO, |a, x| a.fast_max(x.abs()))
            .to_array()
            .into_iter()
            .fold(0f32, f32::max);
        *db = amax / 127.0;
        let inv = f32x8::splat(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        for (vi, o) in v.iter().zip(qb.iter_mut()) {
            // Clamped: with a subnormal `amax`, `inv` is infinite and the product saturates.
            let r = (*vi * inv).fast_max(-limit).fast_min(limit).fast_round_int() + i32x8::splat(128);
            *o = r.to_array().map(|b| b as u8);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{Acts, VnniQ8, BLOCK, MAX_M, TILE_N};

    /// Rows `m0..m0 + rows` (at most 8) of the output times tile column `nt`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `dst` must point to an `[m, n]` f32 buffer.
    pub(super) unsafe fn unit(w: &VnniQ8, a: &Acts, nt: usize, m0: usize, rows: usize, dst: *mut f32) {
        match rows {
            8 => unit_m::<8>(w, a, nt, m0, dst),
            7 => unit_m::<7>(w, a, nt, m0, dst),
            6 => unit_m::<6>(w, a, nt, m0, dst),
            5 => unit_m::<5>(w, a, nt, m0, dst),
            4 => unit_m::<4>(w, a, nt, m0, dst),
            3 => unit_m::<3>(w, a, nt, m0, dst),
            2 => unit_m::<2>(w, a, nt, m0, dst),
            _ => unit_m::<1>(w, a, nt, m0, dst),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn unit_m<const M: usize>(w: &VnniQ8, a: &Acts, nt: usize, m0: usize, dst: *mut f32) {
        const { assert!(M <= MAX_M) };
        let (k, kb) = (w.k, w.k / BLOCK);
        let tiles = &w.tiles[nt * kb..(nt + 1) * kb];
        let qa = &a.q[m0 * k..(m0 + M) * k];
        let da = &a.d[m0 * kb..(m0 + M) * kb];
        let mut acc = [_mm512_setzero_ps(); M];
        for (b, tile) in tiles.iter().enumerate() {
            // Two accumulators per row (even and odd groups) halve the dependency chain of vpdpbusd.
            let mut even = [_mm512_setzero_si512(); M];
            let mut odd = [_mm512_setzero_si512(); M];
            for g in (0..BLOCK / 4).step_by(2) {
                let w0 = _mm512_loadu_si512(tile.qs.as_ptr().add(g * TILE_N * 4).cast());
                let w1 = _mm512_loadu_si512(tile.qs.as_ptr().add((g + 1) * TILE_N * 4).cast());
                for i in 0..M {
                    let at = qa.as_ptr().add(i * k + b * BLOCK + g * 4);
                    let a0 = _mm512_set1_epi32(at.cast::<i32>().read_unaligned());
                    let a1 = _mm512_set1_epi32(at.add(4).cast::<i32>().read_unaligned());
                    even[i] = _mm512_dpbusd_epi32(even[i], a0, w0);
                    odd[i] = _mm512_dpbusd_epi32(odd[i], a1, w1);
                }
            }
            let corr = _mm512_loadu_si512(tile.corr.as_ptr().cast());
            let scale = _mm512_loadu_ps(tile.scale.as_ptr());
            for i in 0..M {
                let sum = _mm512_sub_epi32(_mm512_add_epi32(even[i], odd[i]), corr);
                let s = _mm512_mul_ps(scale, _mm512_set1_ps(da[i * kb + b]));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, acc[i]);
            }
        }
        for (i, v) in acc.iter().enumerate() {
            _mm512_storeu_ps(dst.add((m0 + i) * w.n + nt * TILE_N), *v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{Acts, VnniQ8};

    /// Never called: [`super::available`] is false off x86-64.
    pub(super) unsafe fn unit(_: &VnniQ8, _: &Acts, _: usize, _: usize, _: usize, _: *mut f32) {
        unreachable!("no VNNI kernel on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scale of block `b` (as f16 stores it).
    fn scale(b: usize) -> f32 {
        half::f16::from_f32(0.01 * (1 + b % 3) as f32).to_f32()
    }

    /// Q8_0 blocks for an `[n, k]` matrix from a value function (scales from [`scale`]).
    fn q8_0(n: usize, k: usize, f: impl Fn(usize, usize) -> i8) -> Vec<u8> {
        let mut out = Vec::new();
        for r in 0..n {
            for b in 0..k / BLOCK {
                out.extend_from_slice(&half::f16::from_f32(scale(b)).to_le_bytes());
                out.extend((0..BLOCK).map(|j| f(r, b * BLOCK + j) as u8));
            }
        }
        out
    }

    #[test]
    fn matches_a_float_reference_without_padding() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let (n, k) = (48, 96); // k not a multiple of 256
        let wv = |r: usize, c: usize| ((r * 31 + c * 17) % 255) as i8;
        let w = VnniQ8::new(&q8_0(n, k, wv), n, k).expect("tiles");
        for m in [1, 3, 8, 11] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.37).sin()).collect();
            let y = w.matmul(&x);
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                for c in 0..n {
                    let wf = |j: usize| f32::from(wv(c, j)) * scale(j / BLOCK);
                    let want: f32 = (0..k).map(|j| xr[j] * wf(j)).sum();
                    // Each activation is rounded to within half its block's step (amax / 127).
                    let bound: f32 = (0..k)
                        .map(|j| {
                            let b = j / BLOCK * BLOCK;
                            let amax = xr[b..b + BLOCK].iter().fold(0f32, |a, v| a.max(v.abs()));
                            amax / 254.0 * wf(j).abs()
                        })
                        .sum();
                    let got = y[r * n + c];
                    assert!(
                        (got - want).abs() <= bound * 1.01 + 1e-4,
                        "m {m} row {r} col {c}: {got} vs {want}"
                    );
                    // With the same quantized activations, the integer sums are exact.
                    let (mut q, mut d) = (vec![0u8; k], vec![0f32; k / BLOCK]);
                    quantize_row(xr, &mut q, &mut d);
                    let exact: f32 = (0..k / BLOCK)
                        .map(|b| {
                            let dot: i32 = (b * BLOCK..(b + 1) * BLOCK)
                                .map(|j| (i32::from(q[j]) - 128) * i32::from(wv(c, j)))
                                .sum();
                            dot as f32 * d[b] * scale(b)
                        })
                        .sum();
                    assert!(
                        (got - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                        "{got} vs exact {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn tiny_blocks_saturate_instead_of_wrapping() {
        let x = [3e-39f32; BLOCK]; // subnormal: 127 / amax is infinite
        let (mut q, mut d) = ([0u8; BLOCK], [0f32; 1]);
        quantize_row(&x, &mut q, &mut d);
        assert!(q.iter().all(|&b| b == 255), "{q:?}");
        quantize_row(&[0.0; BLOCK], &mut q, &mut d);
        assert!(q.iter().all(|&b| b == 128) && d[0] == 0.0);
    }

    #[test]
    fn refuses_shapes_that_do_not_tile() {
        assert!(VnniQ8::new(&q8_0(8, 64, |_, _| 1), 8, 64).is_none());
        assert!(VnniQ8::new(&[0u8; 10], 16, 64).is_none());
    }
}

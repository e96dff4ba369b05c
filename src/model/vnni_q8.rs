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
//! accumulated in f32, as llama.cpp's Q8_0 dot product does. Work is split over column spans of whole tiles
//! (each span for every activation row) on candle's barrier pool ([`super::par`]), so a thread reuses each
//! weight tile for all rows (up to 16 at once) while it is in cache; tiles are prefetched a column ahead and
//! live in huge pages ([`crate::allocator::advise_huge_pages`]).
//!
//! One of the few `unsafe` places in amlserve (with the attention kernel and the allocator settings): the SIMD intrinsics, called only after [`vnni`] has found the features they
//! are compiled for. Their stores go to bounds-checked 16-value slices of the output.
#![allow(unsafe_code)]

use wide::{f32x8, i32x8};

use super::par;

/// Output rows per tile (one 512-bit register of i32 or f32).
const TILE_N: usize = 16;
/// Values per quantization block.
const BLOCK: usize = 32;
/// Activation rows per work unit: each weight tile is read once for all of them. At 16 the integer sums fill
/// half the 32 vector registers and the float accumulators spill to L1, which costs less than reading the tile
/// column twice (Gemma's 262,144 x 640 output projection at 16 rows: 31 -> 23 ms on one thread).
const MAX_M: usize = 16;

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

/// The 8-bit dot-product (VNNI) instructions this CPU has, which decide the kernel Q8_0 weights run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vnni {
    /// AVX-512 F and VNNI, the features [`VnniQ8`]'s kernel is compiled for: it runs every Q8_0 matrix whose
    /// output rows are a multiple of 16.
    Avx512,
    /// AVX2 and AVX-VNNI (256-bit) without AVX-512 VNNI: candle's tiled Q8_0 kernel (its `X86Level::AvxVnni`),
    /// which needs rows a multiple of 256 values.
    Avx256,
}

/// Which VNNI kernel this CPU runs, if any. The one place the model checks CPU features.
pub fn vnni() -> Option<Vnni> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni") {
            return Some(Vnni::Avx512);
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("avxvnni") {
            return Some(Vnni::Avx256);
        }
    }
    None
}

impl VnniQ8 {
    /// Repacks raw Q8_0 blocks (per block: f16 scale, 32 i8) of an `[n, k]` matrix. `None` when the CPU lacks
    /// the instructions or the shape does not tile (`n % 16`, `k % 32`, `k > 0`).
    pub fn new(data: &[u8], n: usize, k: usize) -> Option<Self> {
        const BLOCK_BYTES: usize = 2 + BLOCK;
        let kb = k / BLOCK;
        if vnni() != Some(Vnni::Avx512)
            || k == 0
            || !n.is_multiple_of(TILE_N)
            || !k.is_multiple_of(BLOCK)
            || data.len() != n * kb * BLOCK_BYTES
        {
            return None;
        }
        let mut tiles = Vec::with_capacity(n / TILE_N * kb);
        crate::allocator::advise_huge_pages(tiles.spare_capacity_mut());
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
        let mut out = vec![0f32; x.len() / self.k * self.n];
        self.matmul_into(x, &mut out);
        out
    }

    /// [`Self::matmul`] into `out` (`[m, n]`, every value overwritten).
    pub fn matmul_into(&self, x: &[f32], out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let m = x.len() / k;
        assert_eq!(out.len(), m * n, "matmul output size");
        if m == 0 {
            return;
        }
        let acts = quantize(x, m, k);
        // Pieces: a span of whole tiles' columns in every output row, about `target_pieces` spans.
        let tiles = n / TILE_N;
        let span_tiles = tiles.div_ceil(par::target_pieces()).max(1);
        let mut rows: Vec<_> = out.chunks_mut(n).map(|r| r.chunks_mut(span_tiles * TILE_N)).collect();
        let spans: Vec<Vec<&mut [f32]>> = (0..tiles.div_ceil(span_tiles))
            .map(|_| rows.iter_mut().map(|r| r.next().expect("a span per row")).collect())
            .collect();
        par::for_each_disjoint(spans.into_iter(), |s, mut span| {
            // Row groups of equal size (17 rows: 9 + 8, not 16 + 1).
            let group = m.div_ceil(m.div_ceil(MAX_M));
            for t in 0..span[0].len() / TILE_N {
                for m0 in (0..m).step_by(group) {
                    let dst = &mut span[m0..(m0 + group).min(m)];
                    // SAFETY: `new` returned `Some` only where `vnni()` found AVX-512 F and VNNI.
                    unsafe { kernel::unit(self, &acts, s * span_tiles + t, m0, dst, t) };
                }
            }
        });
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
    par::for_each_disjoint(q.chunks_mut(k).zip(d.chunks_mut(kb)), |r, (qr, dr)| {
        quantize_row(&x[r * k..(r + 1) * k], qr, dr);
    });
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

    use super::{Acts, Tile, VnniQ8, BLOCK, MAX_M, TILE_N};

    /// Activation rows `m0..m0 + dst.len()` (at most 16) times tile column `nt`; row `i`'s 16 results go to
    /// `dst[i][t * 16..(t + 1) * 16]`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and VNNI.
    pub(super) unsafe fn unit(w: &VnniQ8, a: &Acts, nt: usize, m0: usize, dst: &mut [&mut [f32]], t: usize) {
        macro_rules! by_rows {
            ($($m:literal)*) => {
                match dst.len() {
                    $($m => unit_m::<$m>(w, a, nt, m0, dst, t),)*
                    other => unreachable!("{other} rows in one unit"),
                }
            };
        }
        by_rows!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
    }

    /// From 4 rows on, a unit asks the cache for the next tile column's tiles (`k / 32` tiles on) while it
    /// computes: the tiles stream from memory in order, but with this much work per tile the hardware
    /// prefetchers alone left the kernel waiting on them (8 rows: 19 -> 15 ms per call with huge pages and
    /// this, 262,144 x 640 on one thread). Below 4 rows they keep up, and the prefetches only cost.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn unit_m<const M: usize>(w: &VnniQ8, a: &Acts, nt: usize, m0: usize, dst: &mut [&mut [f32]], t: usize) {
        const { assert!(M <= MAX_M) };
        // Below 4 rows, two sums per row (even and odd groups) halve vpdpbusd's dependency chain; from 4 rows on
        // the rows' own chains keep the unit busy.
        let split = M < 4;
        let (k, kb) = (w.k, w.k / BLOCK);
        let tiles = &w.tiles[nt * kb..(nt + 1) * kb];
        let ahead = w.tiles.get((nt + 1) * kb..(nt + 2) * kb).unwrap_or(&[]);
        let qa = &a.q[m0 * k..(m0 + M) * k];
        let da = &a.d[m0 * kb..(m0 + M) * kb];
        let mut acc = [_mm512_setzero_ps(); M];
        // Reads stay inside the checked slices: `qa` holds M rows of k bytes, and row i reads 4 bytes at
        // b * 32 + g * 4 (g <= 7), inside its block b; the weight loads are 64 bytes at g * 64 (g <= 7) of the
        // 512-byte `tile.qs`. Prefetches only hint and never fault; they stay inside `ahead` anyway.
        for (b, tile) in tiles.iter().enumerate() {
            if let Some(next) = ahead.get(b).filter(|_| M >= 4) {
                let next: *const Tile = next;
                for line in (0..size_of::<Tile>()).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(next.cast::<i8>().add(line));
                }
            }
            // Each row's integer sum starts at minus the offset correction, so nothing is left to subtract.
            let neg = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(tile.corr.as_ptr().cast()));
            let mut sum = [neg; M];
            let mut odd = [_mm512_setzero_si512(); M];
            for g in 0..BLOCK / 4 {
                let wv = _mm512_loadu_si512(tile.qs.as_ptr().add(g * TILE_N * 4).cast());
                for i in 0..M {
                    let at = qa.as_ptr().add(i * k + b * BLOCK + g * 4);
                    let av = _mm512_set1_epi32(at.cast::<i32>().read_unaligned());
                    if split && g % 2 == 1 {
                        odd[i] = _mm512_dpbusd_epi32(odd[i], av, wv);
                    } else {
                        sum[i] = _mm512_dpbusd_epi32(sum[i], av, wv);
                    }
                }
            }
            let scale = _mm512_loadu_ps(tile.scale.as_ptr());
            for i in 0..M {
                let total = if split {
                    _mm512_add_epi32(sum[i], odd[i])
                } else {
                    sum[i]
                };
                let s = _mm512_mul_ps(scale, _mm512_set1_ps(da[i * kb + b]));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), s, acc[i]);
            }
        }
        for (row, v) in dst.iter_mut().zip(&acc) {
            // A checked slice of exactly 16 floats: the 512-bit store stays inside it.
            _mm512_storeu_ps(row[t * TILE_N..(t + 1) * TILE_N].as_mut_ptr(), *v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{Acts, VnniQ8};

    /// Never called: [`super::vnni`] finds no AVX-512 off x86-64.
    pub(super) unsafe fn unit(_: &VnniQ8, _: &Acts, _: usize, _: usize, _: &mut [&mut [f32]], _: usize) {
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

    /// Test weights: value of row `r`, column `c`.
    fn wv(r: usize, c: usize) -> i8 {
        ((r * 31 + c * 17) % 255) as i8
    }

    /// Test activations, `[m, k]`.
    fn acts(m: usize, k: usize) -> Vec<f32> {
        (0..m * k).map(|i| ((i as f32) * 0.37).sin()).collect()
    }

    /// Checks `y` (`[m, n]`) against the float product of `x` and the [`wv`] weights. Each activation may be
    /// off by half its block's quantization step (amax / 127), times `slack` for a scale stored as f16.
    fn assert_near_float(x: &[f32], y: &[f32], n: usize, k: usize, slack: f32) {
        for (r, (xr, yr)) in x.chunks(k).zip(y.chunks(n)).enumerate() {
            for (c, &got) in yr.iter().enumerate() {
                let wf = |j: usize| f32::from(wv(c, j)) * scale(j / BLOCK);
                let want: f32 = (0..k).map(|j| xr[j] * wf(j)).sum();
                let bound: f32 = (0..k)
                    .map(|j| {
                        let b = j / BLOCK * BLOCK;
                        let amax = xr[b..b + BLOCK].iter().fold(0f32, |a, v| a.max(v.abs()));
                        amax / 254.0 * wf(j).abs()
                    })
                    .sum();
                assert!(
                    (got - want).abs() <= bound * slack + 1e-4,
                    "row {r} col {c}: {got} vs {want} (bound {bound})"
                );
            }
        }
    }

    /// `[n, k]` with k not a multiple of 256 (candle's tiled kernel would need padding), n two tiles and more.
    const N: usize = 48;
    const K: usize = 96;
    const MS: [usize; 7] = [1, 3, 8, 11, 16, 17, 40];

    #[test]
    fn kernel_matches_a_float_reference_and_exact_integer_sums() {
        if vnni() != Some(Vnni::Avx512) {
            // Said outside the test harness's capture, so the skip shows in a passing run.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED vnni_q8 kernel test: this CPU lacks AVX-512 F + VNNI (found {:?}); the portable path \
                 is tested by candle_q8_0_fallback_matches_the_float_reference and quantized_rows_round_to_nearest",
                vnni()
            );
            assert!(
                VnniQ8::new(&q8_0(N, K, wv), N, K).is_none(),
                "no kernel without the instructions"
            );
            return;
        }
        let w = VnniQ8::new(&q8_0(N, K, wv), N, K).expect("tiles");
        for m in MS {
            let x = acts(m, K);
            let y = w.matmul(&x);
            assert_eq!(y.len(), m * N);
            assert_near_float(&x, &y, N, K, 1.01);
            // With the same quantized activations, the integer sums are exact.
            for (xr, yr) in x.chunks(K).zip(y.chunks(N)) {
                let (mut q, mut d) = (vec![0u8; K], vec![0f32; K / BLOCK]);
                quantize_row(xr, &mut q, &mut d);
                for (c, &got) in yr.iter().enumerate() {
                    let exact: f32 = (0..K / BLOCK)
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
        assert!(w.matmul(&[]).is_empty());
    }

    /// The path every CPU without our kernel takes (through [`crate::model::weights::Linear`]); run here on
    /// every CPU.
    #[test]
    fn candle_q8_0_fallback_matches_the_float_reference() {
        use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
        use candle_core::{Device, Module, Tensor};
        let storage =
            QStorage::from_data(std::borrow::Cow::Owned(q8_0(N, K, wv)), &Device::Cpu, GgmlDType::Q8_0).unwrap();
        let qmm = QMatMul::from_qtensor(QTensor::new(storage, (N, K)).unwrap()).unwrap();
        for m in MS {
            let x = acts(m, K);
            let xt = Tensor::from_vec(x.clone(), (m, K), &Device::Cpu).unwrap();
            let y = qmm
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // candle stores each activation block's scale as f16: up to 127 * 2^-11 of a step more.
            assert_near_float(&x, &y, N, K, 1.15);
        }
    }

    #[test]
    fn quantized_rows_round_to_nearest() {
        let x = acts(1, K);
        let (mut q, mut d) = (vec![0u8; K], vec![0f32; K / BLOCK]);
        quantize_row(&x, &mut q, &mut d);
        for (j, (&v, &b)) in x.iter().zip(&q).enumerate() {
            let step = d[j / BLOCK];
            let back = (f32::from(b) - 128.0) * step;
            assert!((back - v).abs() <= step * 0.5001, "value {j}: {v} came back as {back}");
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

//! Inputs for checking the device forward's kernels against their CPU implementations (`model::device::ops`):
//! steps of random sequences over a paged pool, the attention cases, and deterministic rows for the element-wise
//! kernels. Shared by the GPU test (`tests/device_forward.rs`, CUDA builds) and the CPU emulation of the kernels
//! (`tests/kernels_emulated.rs`), so both check the same things.

use amlserve::model::arch::Activation;
use amlserve::model::device::ops::{GatedAct, Heads, PagedAttention, Rotary, StepMeta, StoreKv};
use amlserve::model::device::paged::BLOCK;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// One step's inputs: a packed batch of sequences over a pool of shuffled blocks.
pub struct Step {
    pub heads: Heads,
    pub tokens: usize,
    pub seqs: usize,
    /// Leading sequences of one token (decode rows).
    pub singles: usize,
    /// `StepMeta::build`'s metadata.
    pub meta: Vec<u32>,
    /// `[tokens, heads.width()]`, uniform in [-1, 1).
    pub qkv: Vec<f32>,
    /// The rotary table `[ctx, head_dim]` (random values: the kernels only read it).
    pub table: Vec<f32>,
    pub ctx: usize,
    /// The pool `[slots, 2 * kv_row]` before rounding to bf16.
    pub pool: Vec<f32>,
    pub slots: usize,
}

impl Step {
    /// What the ops read of the step besides its metadata.
    pub fn meta(&self) -> StepMeta {
        StepMeta {
            tokens: self.tokens,
            seqs: self.seqs,
            singles: self.singles,
        }
    }
}

/// A step of `seqs` (cached tokens, new tokens) with a random block table each, from `seed`.
pub fn step(heads: Heads, seqs: &[(usize, usize)], seed: u64) -> Step {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ctx = seqs.iter().map(|(s, t)| s + t).max().unwrap_or(1);
    let n_blocks: usize = seqs.iter().map(|(s, t)| (s + t).div_ceil(BLOCK)).sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let (mut positions, mut slots, mut seq_of, mut tables) = (vec![], vec![], vec![], vec![]);
    let mut next = 0;
    for (si, &(start, t)) in seqs.iter().enumerate() {
        let blocks = ids[next..next + (start + t).div_ceil(BLOCK)].to_vec();
        next += blocks.len();
        for p in start..start + t {
            positions.push(p as u32);
            slots.push(blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32);
            seq_of.push(si);
        }
        tables.push(blocks);
    }
    let table_refs: Vec<&[u32]> = tables.iter().map(Vec::as_slice).collect();
    let meta = StepMeta::build(&positions, &slots, &seq_of, &table_refs);
    let tokens = positions.len();
    let mut rand = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
    Step {
        heads,
        tokens,
        seqs: seqs.len(),
        singles: seqs.iter().take_while(|s| s.1 == 1).count(),
        meta,
        qkv: rand(tokens * heads.width()),
        table: rand(ctx * heads.head_dim),
        ctx,
        pool: rand(n_blocks * BLOCK * 2 * heads.kv_row()),
        slots: n_blocks * BLOCK,
    }
}

/// The rope's query scale the cases use.
pub const Q_SCALE: f32 = 0.125;

/// Runs the ops store (keys rotated) and attention (queries rotated; with a sliding `window` if given) on `dev`
/// over one step's inputs; returns (pool, out).
pub fn run_ops(dev: &Device, s: &Step, window: Option<usize>) -> (Tensor, Tensor) {
    let heads = s.heads;
    let step = s.meta();
    let qkv = Tensor::from_slice(&s.qkv, (s.tokens, heads.width()), dev).expect("qkv");
    let table = Tensor::from_slice(&s.table, (s.ctx, heads.head_dim), dev).expect("rope");
    let pool = Tensor::from_slice(&s.pool, (s.slots, 2 * heads.kv_row()), dev)
        .and_then(|t| t.to_dtype(DType::BF16))
        .expect("pool");
    let meta = Tensor::from_slice(&s.meta, s.meta.len(), dev).expect("meta");
    let rotary = Rotary {
        table: &table,
        q_scale: Q_SCALE,
    };
    pool.inplace_op3(
        &qkv,
        &meta,
        &StoreKv {
            meta: step,
            heads,
            rotary,
        },
    )
    .expect("store");
    let out = qkv
        .apply_op3_no_bwd(
            &pool,
            &meta,
            &PagedAttention {
                meta: step,
                heads,
                window,
                rotary,
            },
        )
        .expect("attention");
    (pool, out)
}

/// SmolLM2's heads (9 query heads over 3 kv heads of 64).
pub const SMOLLM2: Heads = Heads {
    n_head: 9,
    n_kv_head: 3,
    head_dim: 64,
};
/// Gemma 3 270M's (4 over 1 of 256).
pub const GEMMA3: Heads = Heads {
    n_head: 4,
    n_kv_head: 1,
    head_dim: 256,
};
/// No grouping, a head an odd multiple of 32 wide.
pub const ODD: Heads = Heads {
    n_head: 8,
    n_kv_head: 8,
    head_dim: 96,
};
/// Llama 3's grouping and head (4 query heads a kv head, 128 wide): the tiled kernel's 8-token tiles.
pub const LLAMA3: Heads = Heads {
    n_head: 8,
    n_kv_head: 2,
    head_dim: 128,
};
/// Narrow rows: the tiled kernel reads 64 keys at a time.
pub const NARROW: Heads = Heads {
    n_head: 2,
    n_kv_head: 2,
    head_dim: 64,
};
/// A head of 80 (not a multiple of 32: a warp spans two rows).
pub const HEAD80: Heads = Heads {
    n_head: 4,
    n_kv_head: 2,
    head_dim: 80,
};
/// Eight query heads to a kv head, 128 wide: the most outputs the grouped kernel keeps in a lane's registers.
pub const GROUP8: Heads = Heads {
    n_head: 16,
    n_kv_head: 2,
    head_dim: 128,
};
/// A head of 192: the last of the grouped kernel's four pairs of dimensions a lane is only partly used.
pub const HEAD192: Heads = Heads {
    n_head: 4,
    n_kv_head: 2,
    head_dim: 192,
};

/// One attention case: the heads, the step's (cached tokens, new tokens) per sequence, the sliding window.
pub struct AttentionCase {
    pub heads: Heads,
    pub seqs: Vec<(usize, usize)>,
    pub window: Option<usize>,
}

/// The attention cases: each head shape over a mixed step, a decode-only step (whose keys the per-row kernel
/// splits into runs) and decode rows followed by prompt chunks (as the scheduler packs a step), each without a
/// window and with windows narrower and wider than the kernels' key tiles (Gemma 3's local layers).
pub fn attention_cases() -> Vec<AttentionCase> {
    // (cached tokens, new tokens) per sequence: decode steps, a prompt, chunks at long positions; then a step of
    // a few decode tokens only, short and long contexts.
    let mixed = vec![(0, 5), (290, 1), (17, 40), (650, 3), (0, 1), (1200, 64)];
    let decode = vec![(290, 1), (4999, 1), (0, 1), (37, 1), (1200, 1)];
    let then_prompts = vec![(290, 1), (1200, 1), (37, 1), (0, 48), (650, 20)];
    let mut cases = Vec::new();
    for h in [SMOLLM2, GEMMA3, ODD, LLAMA3, NARROW, HEAD80, GROUP8, HEAD192] {
        for seqs in [&mixed, &decode, &then_prompts] {
            for window in [None, Some(37), Some(512)] {
                cases.push(AttentionCase {
                    heads: h,
                    seqs: seqs.clone(),
                    window,
                });
            }
        }
    }
    cases
}

/// Deterministic values in [lo, lo + span) from a seed, for the element-wise kernels.
pub fn ramp(seed: usize, n: usize, span: f32, lo: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 7919) % 1000) as f32 / 1000.0 * span + lo)
        .collect()
}

/// The per-head norm cases: qwen3's (head 128, GQA) and Gemma 3's (head 256).
pub const NORMED_HEADS: [Heads; 2] = [
    Heads {
        n_head: 16,
        n_kv_head: 8,
        head_dim: 128,
    },
    GEMMA3,
];

/// Relative L2 distance of `a` from `b`; panics on non-finite values.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    assert!(num.is_finite(), "non-finite values");
    (num / den.max(1e-30)).sqrt()
}

/// A Q8_0 projection case: `rows` rows of `k` activations against `n` output columns.
pub struct Q8Case {
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    /// The weights `[n, k]` before quantizing; each row's magnitude cycles through 1, 1e-3 (block scales in
    /// f16's subnormal range), 0 (scale 0) and 100.
    pub weights: Vec<f32>,
    /// `[rows, k]`.
    pub x: Vec<f32>,
    /// `[rows, 2k]`: each row a gate, then an up projection (the gated cases' input).
    pub gate_up: Vec<f32>,
}

/// The Q8_0 cases' inputs: plain rows, and the MLP's gated rows of each activation.
pub const Q8_GATES: [Option<Activation>; 3] = [None, Some(Activation::Silu), Some(Activation::GeluTanh)];

/// The shapes of the Q8_0 cases: rows for each kernel (1, 2, up to 4, up to 8), each kernel's full rows, the widths
/// of SmolLM2's projections (576, 1536) and a few blocks (32, 64, 96, 128); column counts that leave a warp part
/// of its columns.
pub const Q8_SHAPES: [(usize, usize, usize); 6] = [
    (1, 37, 576),
    (2, 21, 96),
    (3, 8, 64),
    (4, 19, 128),
    (8, 13, 1536),
    (5, 4, 32),
];

impl Q8Case {
    pub fn new((rows, n, k): (usize, usize, usize)) -> Self {
        let mut weights = ramp(7, n * k, 2.0, -1.0);
        for (c, row) in weights.chunks_exact_mut(k).enumerate() {
            let scale = [1.0, 1e-3, 0.0, 100.0][c % 4];
            row.iter_mut().for_each(|w| *w *= scale);
        }
        Self {
            rows,
            n,
            k,
            weights,
            x: ramp(11, rows * k, 4.0, -2.0),
            gate_up: ramp(13, rows * 2 * k, 8.0, -4.0),
        }
    }

    /// What the kernel reads: `x`, or with a gate `gate_up`.
    pub fn input(&self, gate: Option<Activation>) -> &[f32] {
        if gate.is_some() {
            &self.gate_up
        } else {
            &self.x
        }
    }

    /// The rows the weights multiply: `x`, or with a gate act(gate) * up of `gate_up` (by the CPU op).
    pub fn multiplied(&self, gate: Option<Activation>) -> Vec<f32> {
        match gate {
            None => self.x.clone(),
            Some(act) => Tensor::from_slice(&self.gate_up, (self.rows, 2 * self.k), &Device::Cpu)
                .and_then(|t| t.apply_op1_no_bwd(&GatedAct { width: self.k, act }))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("gated rows"),
        }
    }

    /// The weights quantized to Q8_0 on `dev`.
    pub fn quantized(&self, dev: &Device) -> candle_core::quantized::QTensor {
        Tensor::from_slice(&self.weights, (self.n, self.k), &Device::Cpu)
            .and_then(|w| {
                candle_core::quantized::QTensor::quantize_onto(&w, candle_core::quantized::GgmlDType::Q8_0, dev)
            })
            .expect("Q8_0 weights")
    }

    /// The product of `x` (`[rows, k]`) with the quantized weights, in f64 (rows `[rows, n]`): what a kernel that
    /// reads the activations as they are computes, to rounding.
    pub fn exact(&self, x: &[f32]) -> Vec<f32> {
        let w: Vec<f32> = self
            .quantized(&Device::Cpu)
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("dequantized");
        let (n, k) = (self.n, self.k);
        (0..self.rows * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                let dot: f64 = (0..k).map(|j| f64::from(x[r * k + j]) * f64::from(w[c * k + j])).sum();
                dot as f32
            })
            .collect()
    }
}

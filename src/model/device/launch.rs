//! Launch geometry of `kernels.cu`'s kernels: each kernel's grid, block and dynamic shared memory, and how many
//! runs split-K attention cuts a token's keys into. Plain arithmetic with no CUDA types, so the CUDA launcher
//! (`super::cuda`) and the CPU emulation of the kernels (`kernel-emu`, `tests/kernels_emulated.rs`) launch with
//! the same numbers.

use super::ops::{Heads, StepMeta};
use crate::model::arch::Activation;

/// Threads per attention block (kernels.cu's `ATTN_THREADS`).
pub const ATTN_THREADS: u32 = 256;
/// Keys an attention block scores at a time (kernels.cu's `ATTN_TILE`).
pub const ATTN_TILE: u32 = 256;
/// The widest head the attention kernel takes: four dimensions per thread (kernels.cu's `MAX_DIMS_PER_THREAD`).
pub const MAX_HEAD_DIM: usize = 4 * ATTN_THREADS as usize;
/// The most runs a token's keys are split into (split-K attention).
pub const MAX_SPLITS: usize = 16;

/// A kernel launch's shape: grid `(x, y, z)`, threads per block (1-D blocks only) and dynamic shared bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub shared: u32,
}

impl Dims {
    fn new(grid: (usize, usize, usize), block: u32, shared: u32) -> Self {
        // Grids are sized by tokens, heads and splits, far below u32::MAX.
        Self {
            grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block,
            shared,
        }
    }
}

/// `amlserve_store_kv_bf16`: a block per token.
pub fn store_kv(tokens: usize) -> Dims {
    Dims::new((tokens, 1, 1), 128, 0)
}

/// Whether the attention kernel takes these heads.
pub fn attention_supports(h: Heads) -> bool {
    h.head_dim <= MAX_HEAD_DIM
        && h.head_dim.is_multiple_of(2)
        && h.n_kv_head > 0
        && h.n_head.is_multiple_of(h.n_kv_head)
}

/// Warps a multiprocessor should have from a step's attention for split-K not to split further: two blocks of the
/// per-row kernel's 8 warps.
const SPLIT_WARPS_PER_SM: usize = 16;

/// How many runs to split each token's keys into on a GPU of `sms` multiprocessors when each token takes `blocks`
/// blocks of `warps` warps (the per-row kernel: a block of 8 per query head; the grouped one: 4 per kv head):
/// enough for the step's blocks to give each multiprocessor `SPLIT_WARPS_PER_SM` warps (a decode step of a few
/// sequences needs many runs), 1 when the step's own blocks already do.
pub fn attention_splits(sms: usize, tokens: usize, blocks: usize, warps: usize) -> usize {
    (SPLIT_WARPS_PER_SM * sms.max(1))
        .div_ceil((tokens * blocks * warps).max(1))
        .clamp(1, MAX_SPLITS)
}

/// Warps per block of the grouped attention kernels (kernels.cu's `GROUPED_WARPS`).
pub const GROUPED_WARPS: u32 = 4;

/// The grouped attention kernel for these heads (`amlserve_grouped_attention_bf16_{64,128,256}`, by the widest
/// head each takes), or `None` where it does not take them: a head a multiple of 8 wide (keys are read 16 bytes at
/// a time) up to 256, and at most 8 query heads to a kv head (4 above 128 wide), whose outputs a lane keeps in
/// registers.
pub fn grouped_kernel(h: Heads) -> Option<&'static str> {
    if !attention_supports(h) || !h.head_dim.is_multiple_of(8) {
        return None;
    }
    let (name, max_group) = match h.head_dim {
        0..=64 => ("amlserve_grouped_attention_bf16_64", 8),
        65..=128 => ("amlserve_grouped_attention_bf16_128", 8),
        129..=256 => ("amlserve_grouped_attention_bf16_256", 4),
        _ => return None,
    };
    (h.n_head / h.n_kv_head <= max_group).then_some(name)
}

/// `amlserve_grouped_attention_bf16_*`: a block per (token, kv head, split). Shared memory: the group's queries,
/// each warp's probabilities for its 32 keys and their slots, and each warp's maxima, sums and outputs.
pub fn grouped_attention(tokens: usize, h: Heads, splits: usize) -> Dims {
    let (g, hd, w) = ((h.n_head / h.n_kv_head) as u32, h.head_dim as u32, GROUPED_WARPS);
    let floats = g * hd + w * (g + 1) * 32 + 2 * w * g + w * g * hd;
    Dims::new((tokens, h.n_kv_head, splits), 32 * w, 4 * floats)
}

/// `amlserve_paged_attention_bf16`: a block per (token, query head, split). Shared memory: the query, the tile's
/// scores, the reduction's 32 floats, each thread group's partial output and the tile's slots.
pub fn attention(tokens: usize, h: Heads, splits: usize) -> Dims {
    let groups = (ATTN_THREADS / h.head_dim as u32).max(1);
    Dims::new(
        (tokens, h.n_head, splits),
        ATTN_THREADS,
        (h.head_dim as u32 * (1 + groups) + 2 * ATTN_TILE + 32) * 4,
    )
}

/// `amlserve_prefill_attention_bf16`'s shape: a block per (tile of `qt` tokens from token `first`, kv head),
/// reading `kt` keys at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiled {
    pub dims: Dims,
    pub first: usize,
    pub qt: usize,
    pub kt: usize,
}

/// Outputs one thread of the tiled kernel accumulates (kernels.cu's `TILE_OUT_PER_THREAD`).
pub const TILE_OUT_PER_THREAD: usize = 16;
/// The most tokens a tile of the tiled kernel takes.
const TILE_TOKENS: usize = 16;
/// Shared memory a block may take without asking for more (48 KiB).
const SHARED_BYTES: usize = 48 * 1024;
/// Tokens per sequence, on average, from which the tokens after a step's leading single tokens are read a tile
/// of keys at a time.
pub const TILED_MIN_RUN: usize = 8;
/// The fewest keys a tile must take for the launcher to choose the tiled kernel: each tile costs the block five
/// barriers, so wide heads (Gemma's 256, whose tiles fit 8 keys in shared memory; 128 with a group of 4: 16) keep
/// the per-row kernel until a GPU measures otherwise.
pub const TILED_MIN_KEYS: usize = 32;

/// Which of our kernels a thread's steps may use: all by default (benchmarks and tests compare each with what it
/// replaces: the per-row attention kernel, which takes every shape, and candle's Q8_0 matmul).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernels {
    /// Prompt chunks read a tile of keys at a time (`amlserve_prefill_attention_bf16`).
    pub tiled: bool,
    /// Tokens read one at a time read each key once for all the query heads of its kv head
    /// (`amlserve_grouped_attention_bf16_*`), rather than once per query head.
    pub grouped: bool,
    /// Steps of up to [`Q8_MAX_ROWS`] tokens multiply Q8_0 weights by `amlserve_q8_0_rows_*` (one launch a
    /// projection; for up to [`Q8_GATED_MAX_ROWS`] the MLP's activation read into its down projection), rather
    /// than by candle's kernels (two: the activations quantized, then multiplied).
    pub q8_rows: bool,
}

impl Kernels {
    pub const ALL: Self = Self {
        tiled: true,
        grouped: true,
        q8_rows: true,
    };
    /// Tokens read one at a time grouped, no tiles.
    pub const GROUPED: Self = Self {
        tiled: false,
        ..Self::ALL
    };
    pub const PER_ROW: Self = Self {
        tiled: false,
        grouped: false,
        ..Self::ALL
    };
    /// Every kernel of ours but the Q8_0 one: candle's quantized matmuls at every size.
    pub const CANDLE_Q8: Self = Self {
        q8_rows: false,
        ..Self::ALL
    };
    /// The attention kernel sets benchmarks and the GPU test compare, each named by the kernel a prompt chunk
    /// takes under it.
    pub const ATTENTION_SETS: [(&'static str, Self); 3] = [
        ("tiled", Self::ALL),
        ("grouped", Self::GROUPED),
        ("per row", Self::PER_ROW),
    ];
}

thread_local! {
    static KERNELS: std::cell::Cell<Kernels> = const { std::cell::Cell::new(Kernels::ALL) };
}

/// The kernels the steps this thread runs may use (the engine's thread keeps them all).
pub fn set_kernels(k: Kernels) {
    KERNELS.with(|c| c.set(k));
}

/// The kernels this thread's steps may use.
pub fn kernels() -> Kernels {
    KERNELS.with(|c| c.get())
}

/// How a step's attention runs: tokens `0..per_row` one at a time (their keys split into `splits` runs), by the
/// grouped kernel when `grouped`, else by the per-row one; the tiled kernel over the rest, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    pub per_row: usize,
    pub splits: usize,
    pub grouped: bool,
    pub tiled: Option<Tiled>,
}

impl AttentionPlan {
    /// The kernel that reads tokens `0..per_row` and its launch shape (both kernels take the same arguments).
    pub fn row_kernel(&self, h: Heads) -> (&'static str, Dims) {
        match grouped_kernel(h).filter(|_| self.grouped) {
            Some(name) => (name, grouped_attention(self.per_row, h, self.splits)),
            None => ("amlserve_paged_attention_bf16", attention(self.per_row, h, self.splits)),
        }
    }
}

/// The plan for `step` on a GPU of `sms` multiprocessors. The step's leading single tokens (decode rows: the
/// scheduler puts them first) are read one at a time, with split-K when they are few; the tokens after them take
/// the tiled kernel when they average `TILED_MIN_RUN` or more per sequence (prompt chunks) and its tiles hold
/// `TILED_MIN_KEYS` keys for these heads; otherwise every token is read one at a time. Tokens read one at a time
/// take the grouped kernel where it takes the heads and a kv head has several query heads, else the per-row one.
pub fn attention_plan(step: StepMeta, h: Heads, sms: usize) -> AttentionPlan {
    let kernels = kernels();
    let singles = step.singles.min(step.tokens);
    let (rest, rest_seqs) = (step.tokens - singles, step.seqs.saturating_sub(singles));
    let tiled = if kernels.tiled && rest > 0 && rest >= TILED_MIN_RUN * rest_seqs.max(1) {
        tiled_shape(singles, rest, h).filter(|t| t.kt >= TILED_MIN_KEYS)
    } else {
        None
    };
    let per_row = if tiled.is_some() { singles } else { step.tokens };
    // Without query heads to share a kv head (a group of 1) the grouped kernel saves no reads: the per-row kernel
    // until a GPU measures the two there.
    let grouped = kernels.grouped && h.n_head > h.n_kv_head && grouped_kernel(h).is_some();
    let (blocks, warps) = if grouped {
        (h.n_kv_head, GROUPED_WARPS as usize)
    } else {
        (h.n_head, (ATTN_THREADS / 32) as usize)
    };
    AttentionPlan {
        per_row,
        splits: if per_row > 0 {
            attention_splits(sms, per_row, blocks, warps)
        } else {
            1
        },
        grouped,
        tiled,
    }
}

/// The tiled kernel's shape for the `tokens` tokens from token `first`, whatever their runs, or `None` when the
/// heads do not fit its tiles.
pub fn tiled_shape(first: usize, tokens: usize, h: Heads) -> Option<Tiled> {
    if !attention_supports(h) || tokens == 0 {
        return None;
    }
    let (group, hd) = (h.n_head / h.n_kv_head, h.head_dim);
    let qt = (TILE_OUT_PER_THREAD * ATTN_THREADS as usize / (group * hd)).min(TILE_TOKENS);
    if qt == 0 {
        return None;
    }
    let rows = qt * group;
    // Queries and keys in rows of hd + 1 floats, values, scores, three floats per row, the slots.
    let floats = |kt: usize| rows * (hd + 1) + kt * (hd + 1) + kt * hd + rows * kt + 3 * rows + kt;
    let kt = [64, 32, 16, 8].into_iter().find(|&kt| 4 * floats(kt) <= SHARED_BYTES)?;
    Some(Tiled {
        dims: Dims::new(
            (tokens.div_ceil(qt), h.n_kv_head, 1),
            ATTN_THREADS,
            (4 * floats(kt)) as u32,
        ),
        first,
        qt,
        kt,
    })
}

/// Floats of split-K's partial results: per (token, head, split) its maximum, sum and head_dim outputs (one
/// unused float without splits, as a buffer cannot be empty).
pub fn attention_partial_len(tokens: usize, h: Heads, splits: usize) -> usize {
    if splits > 1 {
        tokens * h.n_head * splits * (2 + h.head_dim)
    } else {
        1
    }
}

/// `amlserve_attention_combine`: a block per (token, query head), whole warps over the head's dimensions.
pub fn attention_combine(tokens: usize, h: Heads) -> Dims {
    Dims::new(
        (tokens, h.n_head, 1),
        (h.head_dim as u32).next_multiple_of(32).min(ATTN_THREADS),
        0,
    )
}

/// A grid-stride launch over `n` elements (`amlserve_gated`, `amlserve_add_bias`).
pub fn grid_stride(n: usize) -> Dims {
    Dims::new((n.div_ceil(256).clamp(1, 65_535), 1, 1), 256, 0)
}

/// `amlserve_head_norms`: a block per (row, normed head); whole warps (the reduction's unit), a thread per
/// dimension up to 256.
pub fn head_norms(rows: usize, h: Heads) -> Dims {
    Dims::new(
        (rows.max(1), h.n_head + h.n_kv_head, 1),
        (h.head_dim as u32).next_multiple_of(32).clamp(32, 256),
        0,
    )
}

/// `amlserve_add_rms_norm`: a block of 256 threads per row.
pub fn add_rms_norm(rows: usize) -> Dims {
    Dims::new((rows.max(1), 1, 1), 256, 0)
}

/// Threads per row of `amlserve_row_argmax` (kernels.cu's `ARGMAX_THREADS`, a power of two).
pub const ARGMAX_THREADS: u32 = 256;

/// `amlserve_row_argmax`: a block per row.
pub fn row_argmax(rows: usize) -> Dims {
    Dims::new((rows.max(1), 1, 1), ARGMAX_THREADS, 0)
}

/// The most activation rows the `amlserve_q8_0_rows_*` kernels multiply; larger steps take candle's tiled kernels.
pub const Q8_MAX_ROWS: usize = 8;
/// The most rows for which the kernels also compute the MLP's gated activation of their input: every warp
/// computes it again, which costs little for a row or two (the single stream it saves a launch for).
pub const Q8_GATED_MAX_ROWS: usize = 2;
/// Warps per block of `amlserve_q8_0_rows_*` (kernels.cu's `Q8_WARPS`).
pub const Q8_WARPS: u32 = 4;

/// Whether the `amlserve_q8_0_rows_*` kernels take `rows` rows of `k` activations (of `2k` gate and up values
/// when `gated`), the first at element `offset` of its buffer: up to [`Q8_MAX_ROWS`] rows ([`Q8_GATED_MAX_ROWS`]
/// gated), `k` a multiple of Q8_0's 32-weight blocks, rows 16 bytes aligned (read as `float4`).
pub fn q8_rows_fit(rows: usize, k: usize, offset: usize, gated: bool) -> bool {
    let most = if gated { Q8_GATED_MAX_ROWS } else { Q8_MAX_ROWS };
    (1..=most).contains(&rows) && k > 0 && k.is_multiple_of(32) && offset.is_multiple_of(4)
}

/// The Q8_0 kernel for `rows` rows (up to [`Q8_MAX_ROWS`]) and the output columns a warp of it takes: the kernel
/// made for the fewest rows that holds them (a lane keeps each row's activations and sums in registers), whose
/// warps take as many columns as it has rows, up to 4 (more columns a warp read the activations fewer times;
/// fewer give small projections more blocks). kernels.cu's `Q8_0_ROWS` lines.
pub fn q8_rows_kernel(rows: usize) -> (&'static str, usize) {
    match rows {
        0..=1 => ("amlserve_q8_0_rows_1", 1),
        2 => ("amlserve_q8_0_rows_2", 2),
        3..=4 => ("amlserve_q8_0_rows_4", 4),
        _ => ("amlserve_q8_0_rows_8", 4),
    }
}

/// The `gate` argument of `amlserve_q8_0_rows_*`: 0 for plain rows, 1 for SiLU-gated, 2 for GELU-gated.
pub fn q8_gate(gate: Option<Activation>) -> i32 {
    match gate {
        None => 0,
        Some(Activation::Silu) => 1,
        Some(Activation::GeluTanh) => 2,
    }
}

/// `amlserve_q8_0_rows_*` for `rows` rows and `n` output columns.
pub fn q8_rows(rows: usize, n: usize) -> Dims {
    let cols = q8_rows_kernel(rows).1;
    Dims::new((n.div_ceil(Q8_WARPS as usize * cols).max(1), 1, 1), 32 * Q8_WARPS, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_give_each_multiprocessor_16_warps_and_stop_at_sixteen() {
        // H200: 132 multiprocessors, 16 warps each: 2,112. The per-row kernel (8 warps a block), one sequence of
        // 9 heads: 2,112 / 72 -> 30, capped at 16.
        assert_eq!(attention_splits(132, 1, 9, 8), 16);
        assert_eq!(attention_splits(132, 4, 9, 8), 8);
        // 64 decode rows already give 576 blocks.
        assert_eq!(attention_splits(132, 64, 9, 8), 1);
        // The grouped kernel: 64 rows x 3 kv heads x 4 warps = 768 warps -> 3 runs.
        assert_eq!(attention_splits(132, 64, 3, 4), 3);
        assert_eq!(attention_splits(0, 0, 0, 0), 16);
    }

    fn step(tokens: usize, seqs: usize, singles: usize) -> StepMeta {
        StepMeta { tokens, seqs, singles }
    }

    #[test]
    fn prompt_steps_take_tiles_and_decode_steps_do_not() {
        let smol = Heads {
            n_head: 9,
            n_kv_head: 3,
            head_dim: 64,
        };
        let p = attention_plan(step(2048, 16, 0), smol, 132);
        let t = p.tiled.expect("a burst of prompts");
        // 16 tokens x 3 query heads x 64 dimensions = 3,072 outputs, 12 per thread; keys 32 at a time.
        assert_eq!(
            (p.per_row, t.first, t.qt, t.kt, t.dims.grid),
            (0, 0, 16, 32, (128, 3, 1))
        );
        assert!(t.dims.shared as usize <= SHARED_BYTES);
        // Decode rows first, then a prompt chunk: the rows one at a time, grouped (3 rows x 3 kv heads: split-K
        // up to 16 runs), the chunk tiled.
        let p = attention_plan(step(2048, 4, 3), smol, 132);
        assert_eq!((p.per_row, p.grouped, p.splits), (3, true, 16));
        assert_eq!(p.tiled.map(|t| (t.first, t.dims.grid.0)), Some((3, 128)));
        // 64 decode rows: 192 grouped blocks of 4 warps, split in three for 16 warps on each of 132 multiprocessors.
        let decode = attention_plan(step(64, 64, 64), smol, 132);
        assert_eq!(
            (decode.per_row, decode.grouped, decode.splits, decode.tiled),
            (64, true, 3, None)
        );
        let mostly_decode = attention_plan(step(60, 16, 0), smol, 132);
        assert_eq!((mostly_decode.per_row, mostly_decode.tiled), (60, None));
        set_kernels(Kernels::GROUPED);
        assert_eq!(attention_plan(step(2048, 16, 0), smol, 132).tiled, None, "switched off");
        set_kernels(Kernels::PER_ROW);
        // The per-row kernel: a block per query head, so 64 rows need no split.
        let decode = attention_plan(step(64, 64, 64), smol, 132);
        assert_eq!((decode.grouped, decode.splits), (false, 1));
        set_kernels(Kernels::ALL);
        let gemma = Heads {
            n_head: 4,
            n_kv_head: 1,
            head_dim: 256,
        };
        let t = tiled_shape(0, 512, gemma).expect("a Gemma prompt");
        assert_eq!((t.qt, t.kt), (4, 8));
        assert_eq!(
            attention_plan(step(512, 1, 0), gemma, 132).tiled,
            None,
            "8-key tiles: per row"
        );
        let wide = Heads {
            n_head: 64,
            n_kv_head: 1,
            head_dim: 128,
        };
        assert_eq!(tiled_shape(0, 512, wide), None, "a group too wide for one tile");
        // Gemma 3's prompt: its tiles are too small, so it is read a token at a time, grouped.
        assert!(attention_plan(step(512, 1, 0), gemma, 132).grouped);
        assert!(
            !attention_plan(step(1, 1, 1), wide, 132).grouped,
            "64 query heads to a kv head"
        );
        let mha = Heads {
            n_head: 32,
            n_kv_head: 32,
            head_dim: 96,
        };
        assert!(!attention_plan(step(1, 1, 1), mha, 132).grouped, "no kv head shared");
    }

    #[test]
    fn q8_0_steps_take_the_kernel_for_the_fewest_rows_that_hold_them() {
        let kernels: Vec<&str> = (1..=Q8_MAX_ROWS).map(|r| q8_rows_kernel(r).0).collect();
        assert_eq!(
            kernels,
            [1, 2, 4, 4, 8, 8, 8, 8].map(|r| match r {
                1 => "amlserve_q8_0_rows_1",
                2 => "amlserve_q8_0_rows_2",
                4 => "amlserve_q8_0_rows_4",
                _ => "amlserve_q8_0_rows_8",
            })
        );
        // SmolLM2's output projection: 49,152 columns, 4 a block for one row, 16 for eight.
        assert_eq!(q8_rows(1, 49_152).grid, (12_288, 1, 1));
        assert_eq!(q8_rows(8, 49_152).grid, (3_072, 1, 1));
        // Its attention output projection for one row: 144 blocks, more than an H100's 132 multiprocessors.
        assert_eq!(q8_rows(1, 576).grid, (144, 1, 1));
        assert_eq!(q8_rows(8, 17).grid, (2, 1, 1));
        assert!(q8_rows_fit(8, 576, 576, false) && !q8_rows_fit(9, 576, 0, false) && !q8_rows_fit(1, 48, 0, false));
        assert!(!q8_rows_fit(1, 576, 2, false), "not 16 bytes aligned");
        assert!(
            q8_rows_fit(2, 1536, 0, true) && !q8_rows_fit(3, 1536, 0, true),
            "gated: up to 2 rows"
        );
    }

    #[test]
    fn the_grouped_kernel_takes_the_common_heads() {
        let heads = |n_head, n_kv_head, head_dim| Heads {
            n_head,
            n_kv_head,
            head_dim,
        };
        // SmolLM2, Qwen2.5-0.5B, Llama 3 8B, Phi-3 (no grouping), Gemma 3 270M, head 80.
        for (h, kernel) in [
            (heads(9, 3, 64), "amlserve_grouped_attention_bf16_64"),
            (heads(14, 2, 64), "amlserve_grouped_attention_bf16_64"),
            (heads(32, 8, 128), "amlserve_grouped_attention_bf16_128"),
            (heads(32, 32, 96), "amlserve_grouped_attention_bf16_128"),
            (heads(4, 1, 256), "amlserve_grouped_attention_bf16_256"),
            (heads(8, 8, 80), "amlserve_grouped_attention_bf16_128"),
        ] {
            assert_eq!(grouped_kernel(h), Some(kernel), "{h:?}");
            assert!(grouped_attention(64, h, 1).shared as usize <= SHARED_BYTES, "{h:?}");
        }
        // A head not a multiple of 8, too wide a group for its registers, a head wider than 256.
        for h in [heads(8, 8, 36), heads(16, 1, 64), heads(8, 1, 256), heads(2, 1, 512)] {
            assert_eq!(grouped_kernel(h), None, "{h:?}");
        }
    }
}

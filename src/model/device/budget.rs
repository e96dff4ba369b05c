//! How big a device's KV pool is: the margin a pool keeps beyond the engine's admission budget, and the budget
//! a GPU's free memory allows when `--kv-cache-mb` is not given.

use super::paged::BLOCK;

/// Blocks per sequence the pool keeps beyond the budget, for partly filled blocks.
const SPARE_BLOCKS_PER_SEQUENCE: usize = 4;

/// Bytes of pool behind an admission budget of `kv_bytes`: an eighth more (copies on write, partly filled
/// blocks), and a few blocks per sequence for up to `max_seqs` sequences.
pub fn pool_bytes(kv_bytes: usize, per_token: usize, max_seqs: usize) -> usize {
    kv_bytes + kv_bytes / 8 + SPARE_BLOCKS_PER_SEQUENCE * max_seqs * BLOCK * per_token
}

/// The admission budget for a GPU with `free` of its `total` bytes free once the weights are in: the pool
/// ([`pool_bytes`]) fills what is free less a tenth of the GPU (at least 1 GiB) kept for activations, matmul
/// scratch and graphs; capped at `max_seqs` sequences of `context` tokens (more could never be used), and at
/// least one such sequence (if even that does not fit, allocating the pool says so).
pub fn budget_from_memory(free: usize, total: usize, per_token: usize, context: usize, max_seqs: usize) -> usize {
    let headroom = (total / 10).max(1 << 30);
    let spare = SPARE_BLOCKS_PER_SEQUENCE * max_seqs * BLOCK * per_token;
    let room = free.saturating_sub(headroom).saturating_sub(spare);
    let fits = room / 9 * 8;
    let one = context.saturating_mul(per_token);
    fits.min(one.saturating_mul(max_seqs)).max(one)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;
    /// SmolLM2-135M's bf16 keys and values per token: 30 layers, 3 KV heads of 64.
    const SMOL: usize = 2 * 30 * 192 * 2;

    #[test]
    fn a_large_gpu_holds_every_sequence_at_full_context() {
        let kv = budget_from_memory(139 * GIB, 141 * GIB, SMOL, 8192, 64);
        assert_eq!(kv, 64 * 8192 * SMOL);
    }

    #[test]
    fn a_smaller_gpu_fills_what_is_free_less_the_headroom() {
        // A 7B model's KV (512 KiB a token) on a 24 GiB GPU with 10 GiB left after its weights.
        let per_token = 512 << 10;
        let (free, total) = (10 * GIB, 24 * GIB);
        let kv = budget_from_memory(free, total, per_token, 4096, 64);
        let usable = free - total / 10;
        assert!(pool_bytes(kv, per_token, 64) <= usable, "{kv}");
        assert!(
            pool_bytes(kv, per_token, 64) + usable / 50 > usable,
            "{kv} leaves much unused"
        );
    }

    #[test]
    fn a_full_gpu_still_gets_one_sequence() {
        assert_eq!(budget_from_memory(GIB / 2, 16 * GIB, SMOL, 8192, 64), 8192 * SMOL);
    }
}

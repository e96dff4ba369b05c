//! The one way the model's kernels write disjoint outputs from candle's barrier pool.
//!
//! Every parallel kernel here (attention, SwiGLU, activation quantization, the VNNI matmul) fills an output
//! that splits into pieces no two work items share. [`for_each_disjoint`] takes those pieces as an iterator
//! (`chunks_mut`, or several zipped), so the borrow checker proves they are disjoint, and shares them out on
//! candle's barrier pool: the pool its quantized matmuls use, since a second pool (rayon) spinning beside it
//! starved it on 2 cores (see [`super::attention`]). No `unsafe`, no lock per item: the iterator sits behind
//! one mutex and each thread takes a run of items at a time, about 8 runs per thread per call, as the pool's
//! own `execute_chunked` does, so fast threads still absorb a straggler's work.
//!
//! Must stay free of model knowledge; kernels choose their pieces.

use std::sync::Mutex;

/// How many runs of pieces one call aims to share out (about 8 per pool thread): kernels that choose their
/// own piece sizes make about this many pieces, or more.
pub fn target_pieces() -> usize {
    (candle_core::utils::barrier_pool().n_workers() + 1) * 8
}

/// Runs `f(index, piece)` for every item of `pieces` on candle's barrier pool, each item exactly once.
/// `index` is the item's position in `pieces`. A panic in `f` reaches the caller, but leaves candle's pool
/// unusable for the life of the process (its call lock is poisoned): validate before calling in.
pub fn for_each_disjoint<I, F>(pieces: I, f: F)
where
    I: ExactSizeIterator + Send,
    I::Item: Send,
    F: Fn(usize, I::Item) + Sync,
{
    let n = pieces.len();
    if n == 0 {
        return;
    }
    let run = n.div_ceil(target_pieces()).max(1);
    let runs = n.div_ceil(run);
    let source = Mutex::new(pieces.enumerate());
    // Each of the `runs` indices the pool hands out takes the next `run` items; `runs * run >= n`, so together
    // they take every item. The pool runs the closure inline when called from one of its own threads.
    candle_core::utils::barrier_pool().execute_chunked(runs, |indices| {
        let mut batch = Vec::with_capacity(run);
        for _ in indices {
            // The lock is never held while `f` runs, so only a panicking iterator could poison it; that panic
            // is the one the pool re-raises.
            batch.extend(source.lock().expect("piece iterator panicked").by_ref().take(run));
            for (i, piece) in batch.drain(..) {
                f(i, piece);
            }
        }
    });
    let left = source.into_inner().expect("piece iterator panicked").next();
    assert!(left.is_none(), "the pool skipped pieces");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_is_written_once_with_its_index() {
        for (len, width) in [(0, 3), (1, 1), (7, 3), (1000, 1), (4099, 16)] {
            let mut out = vec![0u32; len];
            let mut tags = vec![0u8; len.div_ceil(width)];
            for_each_disjoint(out.chunks_mut(width).zip(tags.iter_mut()), |i, (piece, tag)| {
                *tag += 1;
                for (j, x) in piece.iter_mut().enumerate() {
                    *x += (i * width + j) as u32 + 1;
                }
            });
            assert!(tags.iter().all(|&t| t == 1), "len {len} width {width}: {tags:?}");
            assert!(
                out.iter().enumerate().all(|(j, &x)| x == j as u32 + 1),
                "len {len} width {width}"
            );
        }
    }
}

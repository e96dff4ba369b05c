//! The SwiGLU feed-forward activation, `silu(gate) * up`, for a step's rows at once.
//!
//! Written here rather than as candle ops (`silu`, then a multiply) because those ran one element at a time on
//! the engine thread, with a scalar `exp`, while the pool thread spun waiting (about 3% of a serving step's
//! CPU, and the spin as much again). Here rows are shared out on candle's barrier pool ([`super::par`]) and
//! each row is done 8 lanes at a time.

use wide::f32x8;

use super::par;

/// `silu(gate) * up` for each row of `gate_up` (`[rows, 2 * width]`, the gate's `width` values then the up
/// projection's); returns `[rows, width]`.
pub fn swiglu(gate_up: &[f32], width: usize) -> Vec<f32> {
    let rows = gate_up.len() / (2 * width).max(1);
    let mut out = vec![0f32; rows * width];
    par::for_each_disjoint(out.chunks_mut(width.max(1)), |r, dst| {
        let (gate, up) = gate_up[r * 2 * width..(r + 1) * 2 * width].split_at(width);
        swiglu_row(gate, up, dst);
    });
    out
}

fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let (g8, g_tail) = gate.as_chunks::<8>();
    let (u8, u_tail) = up.as_chunks::<8>();
    let (o8, o_tail) = out.as_chunks_mut::<8>();
    for ((g, u), o) in g8.iter().zip(u8).zip(o8.iter_mut()) {
        let g = f32x8::new(*g);
        let silu = g / (f32x8::ONE + (-g).exp());
        *o = (silu * f32x8::new(*u)).to_array();
    }
    for ((g, u), o) in g_tail.iter().zip(u_tail).zip(o_tail.iter_mut()) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_silu_times_up() {
        let width = 21; // two full vectors and a tail
        let rows = 3;
        let gate_up: Vec<f32> = (0..rows * 2 * width).map(|i| (i as f32 * 0.61).sin() * 9.0).collect();
        let got = swiglu(&gate_up, width);
        for r in 0..rows {
            for i in 0..width {
                let g = f64::from(gate_up[r * 2 * width + i]);
                let u = f64::from(gate_up[r * 2 * width + width + i]);
                let want = g / (1.0 + (-g).exp()) * u;
                let diff = (f64::from(got[r * width + i]) - want).abs();
                assert!(
                    diff < 1e-4 * want.abs().max(1.0),
                    "row {r} col {i}: {} vs {want}",
                    got[r * width + i]
                );
            }
        }
    }
}

//! The gated feed-forward activations, `silu(gate) * up` (SwiGLU) and `gelu_tanh(gate) * up` (GeGLU, Gemma),
//! for a step's rows at once.
//!
//! Written here rather than as candle ops (`silu`, then a multiply) because those ran one element at a time on
//! the engine thread, with a scalar `exp`, while the pool thread spun waiting (about 3% of a serving step's
//! CPU, and the spin as much again). Here rows are shared out on candle's barrier pool ([`super::par`]) and
//! each row is done 8 lanes at a time.

use wide::f32x8;

use super::arch::Activation;
use super::par;

/// `act(gate) * up` for each row of `gate_up` (`[rows, 2 * width]`, the gate's `width` values then the up
/// projection's); returns `[rows, width]`.
pub fn gated(gate_up: &[f32], width: usize, act: Activation) -> Vec<f32> {
    let rows = gate_up.len() / (2 * width).max(1);
    let mut out = vec![0f32; rows * width];
    par::for_each_disjoint(out.chunks_mut(width.max(1)), |r, dst| {
        let (gate, up) = gate_up[r * 2 * width..(r + 1) * 2 * width].split_at(width);
        match act {
            Activation::Silu => gated_row(gate, up, dst, |g| g, |g| g),
            Activation::GeluTanh => gated_row(gate, up, dst, gelu_arg8, gelu_arg),
        }
    });
    out
}

/// `sqrt(2 / pi)`, for GELU's tanh approximation.
const GELU_K: f32 = 0.797_884_6;

/// GELU-tanh written as a sigmoid: `0.5 g (1 + tanh(u)) = g sigmoid(2u)` with
/// `u = sqrt(2/pi) (g + 0.044715 g^3)`; this returns `2u`.
fn gelu_arg(g: f32) -> f32 {
    2.0 * GELU_K * (g + 0.044_715 * g * g * g)
}

fn gelu_arg8(g: f32x8) -> f32x8 {
    f32x8::splat(2.0 * GELU_K) * (g + f32x8::splat(0.044_715) * g * g * g)
}

/// `g * sigmoid(z(g)) * up` per value: SiLU with `z(g) = g`, GELU-tanh with [`gelu_arg`].
fn gated_row(gate: &[f32], up: &[f32], out: &mut [f32], z8: impl Fn(f32x8) -> f32x8, z: impl Fn(f32) -> f32) {
    let (g8, g_tail) = gate.as_chunks::<8>();
    let (u8, u_tail) = up.as_chunks::<8>();
    let (o8, o_tail) = out.as_chunks_mut::<8>();
    for ((g, u), o) in g8.iter().zip(u8).zip(o8.iter_mut()) {
        let g = f32x8::new(*g);
        let act = g / (f32x8::ONE + (-z8(g)).exp());
        *o = (act * f32x8::new(*u)).to_array();
    }
    for ((g, u), o) in g_tail.iter().zip(u_tail).zip(o_tail.iter_mut()) {
        *o = g / (1.0 + (-z(*g)).exp()) * u;
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
        let got = gated(&gate_up, width, Activation::Silu);
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

    #[test]
    fn gelu_tanh_matches_its_definition() {
        let width = 19;
        let gate_up: Vec<f32> = (0..2 * 2 * width).map(|i| (i as f32 * 0.37).cos() * 6.0).collect();
        let got = gated(&gate_up, width, Activation::GeluTanh);
        for r in 0..2 {
            for i in 0..width {
                let g = f64::from(gate_up[r * 2 * width + i]);
                let u = f64::from(gate_up[r * 2 * width + width + i]);
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let want = 0.5 * g * (1.0 + (k * (g + 0.044715 * g.powi(3))).tanh()) * u;
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

//! Rotary position embeddings applied in place on plain rows, in the half-split layout (pairs `i, i + d/2`)
//! that the loader gives query and key heads (see `weights::unpermute_rope_rows`).

use super::arch::LlamaConfig;
use super::source::TensorSource;
use super::ModelError;

/// Precomputed `cos` / `sin` of every position up to the context length.
#[derive(Debug)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for `head_dim` and `positions` positions with frequency base `base`.
    pub fn new(head_dim: usize, positions: usize, base: f32) -> Self {
        Self::scaled(head_dim, positions, base, 1.0, None)
    }

    /// [`Self::new`] with linear scaling (positions divided by `scale`) and, per frequency, a factor it is
    /// divided by (Llama 3's `rope_freqs`, `head_dim / 2` of them), as llama.cpp applies them.
    pub fn scaled(head_dim: usize, positions: usize, base: f32, scale: f32, factors: Option<&[f32]>) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| {
                let factor = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
                1.0 / base.powf(2.0 * i as f32 / head_dim as f32) / factor / scale
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// One table per distinct (base, scale) among `cfg`'s layers, and which one each layer uses (Gemma 3's
    /// sliding and global layers differ), with the source's `rope_freqs` (Llama 3) if it has them.
    pub(crate) fn for_model(
        src: &mut dyn TensorSource,
        cfg: &LlamaConfig,
    ) -> Result<(Vec<Self>, Vec<usize>), ModelError> {
        let factors = match src.contains("rope_freqs.weight") {
            true => Some(src.vec("rope_freqs.weight")?),
            false => None,
        };
        let factors = factors.as_deref();
        let (mut kinds, mut tables, mut of_layer) = (Vec::new(), Vec::new(), Vec::new());
        for li in 0..cfg.n_layer {
            let kind = cfg.layer_rope(li);
            let at = kinds.iter().position(|&k| k == kind).unwrap_or_else(|| {
                let (base, scale) = kind;
                kinds.push(kind);
                tables.push(Self::scaled(cfg.head_dim, cfg.context_length, base, scale, factors));
                kinds.len() - 1
            });
            of_layer.push(at);
        }
        Ok((tables, of_layer))
    }

    /// The table as rows `[positions, head_dim]`: each position's cosines, then its sines (the device forward's
    /// layout).
    pub fn cos_sin_rows(&self) -> Vec<f32> {
        self.cos
            .chunks_exact(self.half)
            .zip(self.sin.chunks_exact(self.half))
            .flat_map(|(c, s)| c.iter().chain(s).copied())
            .collect()
    }

    /// Rotates every head (`head_dim` values each) of `row` to position `pos`.
    pub fn rotate(&self, row: &mut [f32], pos: usize) {
        let (cos, sin) = (
            &self.cos[pos * self.half..][..self.half],
            &self.sin[pos * self.half..][..self.half],
        );
        for head in row.chunks_exact_mut(2 * self.half) {
            let (a, b) = head.split_at_mut(self.half);
            for i in 0..self.half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x1 * sin[i] + x2 * cos[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_candles_rope_thd() {
        let (d, heads, pos) = (8, 2, 5);
        let table = RopeTable::new(d, 16, 10_000.0);
        let x: Vec<f32> = (0..heads * d).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut ours = x.clone();
        table.rotate(&mut ours, pos);
        let t = Tensor::from_vec(x, (1, 1, heads, d), &Device::Cpu).unwrap();
        let cos = Tensor::from_vec(
            table.cos[pos * d / 2..(pos + 1) * d / 2].to_vec(),
            (1, d / 2),
            &Device::Cpu,
        )
        .unwrap();
        let sin = Tensor::from_vec(
            table.sin[pos * d / 2..(pos + 1) * d / 2].to_vec(),
            (1, d / 2),
            &Device::Cpu,
        )
        .unwrap();
        let want: Vec<f32> = candle_nn::rotary_emb::rope_thd(&t, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in ours.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}

//! Log-probabilities of sampled tokens, from the model's raw distribution.
//!
//! As vLLM does by default, they are the log-softmax of the logits the model produced, before logit bias,
//! penalties, temperature, top-k/top-p/min-p and any grammar mask: what the model thought of each token, not
//! the filtered distribution the sampler drew from.

/// One sampled token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: f32,
    /// The `top` most likely ids and their log-probabilities, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `id` and the `top` most likely tokens under the softmax of `logits`.
pub fn sampled(logits: &[f32], id: u32, top: usize) -> Sampled {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let lp = |l: f32| l - log_z;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut all: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = top.min(all.len());
        if k < all.len() {
            all.select_nth_unstable_by(k - 1, desc);
            all.truncate(k);
        }
        all.sort_unstable_by(desc);
        best = all.into_iter().map(|(i, l)| (i, lp(l))).collect();
    }
    Sampled {
        id,
        logprob: logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_normalised_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let s = sampled(&logits, 2, 3);
        let total: f32 = logits
            .iter()
            .map(|&l| sampled(&logits, 0, 0).logprob - logits[0] + l)
            .map(f32::exp)
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((s.logprob - s.top[2].1).abs() < 1e-6);
        assert!(s.top[0].1 < 0.0 && s.top[0].1 > s.top[2].1);
        assert!(sampled(&logits, 1, 0).top.is_empty());
    }
}

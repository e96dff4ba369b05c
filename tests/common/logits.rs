//! Logit-by-logit comparison of our forward with a reference implementation: one row per step over a prompt
//! and [`STEPS`] tokens the reference picks greedily, each checked against a [`Tolerance`]; and the
//! deterministic [`noise`] the synthetic models of these comparisons are made of. Either forward can be compared:
//! the CPU one ([`Llama`]) or the device one ([`OnDevice`], here on candle's CPU backend).

use std::sync::Arc;

use amlserve::model::device::forward::DeviceChunk;
use amlserve::model::device::{DeviceLlama, KvPool, PagedKv};
use amlserve::model::{Llama, SeqChunk, SeqKv};

/// A forward these comparisons run, with its own kind of per-sequence cache.
pub trait Runner {
    type Kv;
    fn vocab(&self) -> usize;
    /// A cache for a sequence of up to `capacity` tokens.
    fn cache(&self, capacity: usize) -> Self::Kv;
    /// Tokens the cache holds.
    fn cached(kv: &Self::Kv) -> usize;
    /// One step over `(cache, tokens, want logits)` chunks; the wanted rows, in chunk order.
    fn step(&self, chunks: &mut [(&mut Self::Kv, &[u32], bool)]) -> Vec<Vec<f32>>;
}

impl Runner for Llama {
    type Kv = SeqKv;

    fn vocab(&self) -> usize {
        self.config.vocab_size
    }

    fn cache(&self, capacity: usize) -> SeqKv {
        SeqKv::new(self.config.kv_shape(), 8, capacity)
    }

    fn cached(kv: &SeqKv) -> usize {
        kv.len()
    }

    fn step(&self, chunks: &mut [(&mut SeqKv, &[u32], bool)]) -> Vec<Vec<f32>> {
        let mut chunks: Vec<SeqChunk<'_>> = chunks
            .iter_mut()
            .map(|(kv, tokens, want)| SeqChunk {
                kv,
                tokens,
                want_logits: *want,
            })
            .collect();
        self.forward(&mut chunks)
            .expect("forward")
            .to_vec2::<f32>()
            .expect("logits")
    }
}

/// The device forward with a KV pool of its own.
pub struct OnDevice<'a> {
    pub llama: &'a DeviceLlama,
    pub pool: Arc<KvPool>,
}

impl<'a> OnDevice<'a> {
    /// `llama` with a pool of 64 MiB.
    pub fn new(llama: &'a DeviceLlama) -> Self {
        let pool = llama.new_pool(64 << 20).expect("kv pool");
        Self { llama, pool }
    }
}

impl Runner for OnDevice<'_> {
    type Kv = PagedKv;

    fn vocab(&self) -> usize {
        self.llama.config.vocab_size
    }

    fn cache(&self, capacity: usize) -> PagedKv {
        PagedKv::new(self.pool.clone(), capacity)
    }

    fn cached(kv: &PagedKv) -> usize {
        kv.len()
    }

    fn step(&self, chunks: &mut [(&mut PagedKv, &[u32], bool)]) -> Vec<Vec<f32>> {
        let mut chunks: Vec<DeviceChunk<'_>> = chunks
            .iter_mut()
            .map(|(kv, tokens, want)| DeviceChunk {
                kv,
                tokens,
                want_logits: *want,
            })
            .collect();
        self.llama
            .forward(&mut chunks, &self.pool)
            .expect("device forward")
            .to_vec2::<f32>()
            .expect("logits")
    }
}

/// Tokens generated after the prompt.
pub const STEPS: usize = 32;

/// How close one of our logit rows must be to the reference's.
pub struct Tolerance {
    /// Largest allowed `|ours - reference|` over the vocabulary.
    pub max_abs: f32,
    /// Largest allowed RMS of the difference relative to the RMS of the reference's (centred) logits.
    pub max_rel_rms: f32,
}

/// Max |diff| and relative RMS of the difference.
pub struct Diff {
    max_abs: f32,
    rel_rms: f32,
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |best, (i, &x)| if x > best.1 { (i, x) } else { best },
        )
        .0
}

/// Largest `|ours - reference|`, and the RMS of the difference relative to the RMS of the reference's (centred)
/// values.
pub fn diff(ours: &[f32], reference: &[f32]) -> (f32, f32) {
    let n = reference.len() as f64;
    let mean = reference.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let spread = (reference.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n).sqrt();
    let err = (ours
        .iter()
        .zip(reference)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    let max_abs = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    (max_abs, (err / spread) as f32)
}

/// Compares one step's logits. Our greedy pick must be the reference's, or a token the reference scores
/// within `max_abs` of its best (a near tie that the allowed error may flip).
pub fn check(step: &str, ours: &[f32], reference: &[f32], tol: &Tolerance) -> Diff {
    assert_eq!(ours.len(), reference.len(), "{step}: vocabulary sizes");
    let (max_abs, rel_rms) = diff(ours, reference);
    let d = Diff { max_abs, rel_rms };
    assert!(
        d.max_abs.is_finite() && d.max_abs <= tol.max_abs && d.rel_rms <= tol.max_rel_rms,
        "{step}: max |diff| {} (allowed {}), relative RMS {} (allowed {})",
        d.max_abs,
        tol.max_abs,
        d.rel_rms,
        tol.max_rel_rms
    );
    let (mine, best) = (argmax(ours), argmax(reference));
    assert!(
        mine == best || reference[best] - reference[mine] <= tol.max_abs,
        "{step}: greedy token {mine} (reference logit {}) vs reference's {best} ({})",
        reference[mine],
        reference[best]
    );
    d
}

/// The reference's logits for the prompt's last token and after each of [`STEPS`] greedy tokens, and those
/// tokens. `forward(tokens, position)` runs the reference on `tokens` appended at `position` and returns the last
/// token's logits.
pub fn greedy_reference(
    prompt: &[u32],
    mut forward: impl FnMut(&[u32], usize) -> Vec<f32>,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut rows = vec![forward(prompt, 0)];
    let mut generated = Vec::new();
    for i in 0..STEPS {
        let next = argmax(rows.last().expect("a row")) as u32;
        generated.push(next);
        rows.push(forward(&[next], prompt.len() + i));
    }
    (rows, generated)
}

/// `model`'s logits for the prompt and `steps` tokens it picks greedily, and those tokens.
pub fn greedy<R: Runner>(model: &R, prompt: &[u32], steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut kv = model.cache(prompt.len() + steps + 1);
    let mut rows = vec![model.step(&mut [(&mut kv, prompt, true)]).remove(0)];
    let mut generated = Vec::new();
    for _ in 0..steps {
        let next = argmax(rows.last().expect("a row")) as u32;
        generated.push(next);
        rows.push(model.step(&mut [(&mut kv, &[next], true)]).remove(0));
    }
    (rows, generated)
}

/// Our logits for the same steps: the prompt in forward calls split at `split` (logits from the last), then
/// one call per generated token. With `neighbour`, another sequence's tokens share every call.
pub fn ours<R: Runner>(
    model: &R,
    prompt: &[u32],
    split: &[usize],
    generated: &[u32],
    neighbour: Option<&[u32]>,
) -> Vec<Vec<f32>> {
    let total = prompt.len() + generated.len();
    let mut kv = model.cache(total);
    let mut other = model.cache(4096);
    let mut step = |tokens: &[u32], want: bool| -> Option<Vec<f32>> {
        // The neighbour prefills its whole text in the first call, then adds one token per call.
        let theirs: Vec<u32> = match neighbour {
            Some(n) if R::cached(&other) == 0 => n.to_vec(),
            Some(n) => vec![n[R::cached(&other) % n.len()]],
            None => Vec::new(),
        };
        let mut chunks = Vec::new();
        if !theirs.is_empty() {
            // Packed before ours, with its own logits, so our row is not simply the first.
            chunks.push((&mut other, theirs.as_slice(), true));
        }
        chunks.push((&mut kv, tokens, want));
        let logits = model.step(&mut chunks);
        want.then(|| logits.last().expect("our row").clone())
    };
    let mut rows = Vec::new();
    let mut at = 0;
    for (i, &end) in split.iter().chain(std::iter::once(&prompt.len())).enumerate() {
        let last = i == split.len();
        if let Some(r) = step(&prompt[at..end], last) {
            rows.push(r);
        }
        at = end;
    }
    for &t in generated {
        rows.push(step(&[t], true).expect("decode logits"));
    }
    rows
}

/// Runs our forward the two ways a server runs it, the prompt whole and in two chunks packed with another
/// sequence, and compares both runs with the reference's rows (`want`, for the prompt and `generated`).
pub fn compare_whole_and_packed<R: Runner>(
    name: &str,
    model: &R,
    prompt: &[u32],
    want: &[Vec<f32>],
    generated: &[u32],
    tol: &Tolerance,
) {
    compare(
        &format!("{name}, whole prompt"),
        ours(model, prompt, &[], generated, None),
        want,
        tol,
    );
    let vocab = model.vocab() as u32;
    let neighbour: Vec<u32> = (0..9u32).map(|i| (i * 53 + 5) % vocab).collect();
    let got = ours(model, prompt, &[prompt.len() / 2], generated, Some(&neighbour));
    compare(
        &format!("{name}, prompt in two chunks packed with another sequence"),
        got,
        want,
        tol,
    );
}

/// Deterministic values uniform in `[-scale, scale)`.
pub fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Checks every step of a run against the reference and prints the run's worst differences.
pub fn compare(name: &str, got: Vec<Vec<f32>>, want: &[Vec<f32>], tol: &Tolerance) {
    assert_eq!(got.len(), want.len(), "{name}: one logit row per step");
    let diffs: Vec<Diff> = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| check(&format!("{name}, step {i}"), g, w, tol))
        .collect();
    let worst = |f: fn(&Diff) -> f32| diffs.iter().map(f).fold(0f32, f32::max);
    let agree = got.iter().zip(want).filter(|(g, w)| argmax(g) == argmax(w)).count();
    // Shown with --nocapture; the assertions above are the test.
    println!(
        "{name}: over {} steps max |logit diff| {:.5} (allowed {}), relative RMS {:.5} (allowed {}), \
         same greedy token {agree}/{}",
        want.len(),
        worst(|d| d.max_abs),
        tol.max_abs,
        worst(|d| d.rel_rms),
        tol.max_rel_rms,
        want.len()
    );
}

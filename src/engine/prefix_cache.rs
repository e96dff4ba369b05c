//! Reuse of computed KV across requests whose prompts start the same way.
//!
//! When a sequence leaves the batch, its KV cache (the tokens it has run through the model) is kept here, most
//! recently used last, up to a byte limit. A new request's prompt is compared with every kept token list; the
//! longest common prefix (always short of the whole prompt, so the last prompt token still runs and yields
//! logits) is copied into the new sequence's cache and skipped by prefill. Chat requests share their template's
//! system preamble, and a multi-turn conversation resends its whole history, so much of a prompt is often
//! cached. Exact: a token's keys and values depend only on the tokens before it, and every kernel computes a row
//! the same way whatever else is in the batch, so reused rows equal recomputed ones.

use std::collections::VecDeque;

use super::backend::KvCache;

struct Entry<K> {
    /// The tokens whose keys and values `kv` holds.
    tokens: Vec<u32>,
    kv: K,
}

/// Finished sequences' caches, least recently used first.
pub(super) struct PrefixCache<K> {
    entries: VecDeque<Entry<K>>,
    max_bytes: usize,
    bytes: usize,
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<K: KvCache> PrefixCache<K> {
    /// A cache holding at most `max_bytes` of KV (0 disables it).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            max_bytes,
            bytes: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keeps `kv`, which holds the keys and values of `tokens[..kv.len()]`, evicting the least recently used
    /// entries to stay within the limit. A cache covered by a kept one (its tokens a prefix of the kept tokens)
    /// is dropped, and kept ones covered by it are replaced.
    pub fn insert(&mut self, mut tokens: Vec<u32>, mut kv: K) {
        tokens.truncate(kv.len());
        if tokens.is_empty() || kv.stored_bytes() > self.max_bytes {
            return;
        }
        if self
            .entries
            .iter()
            .any(|e| common_prefix(&e.tokens, &tokens) == tokens.len())
        {
            return;
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let covered = common_prefix(&e.tokens, &tokens) == e.tokens.len();
            if covered {
                freed += e.kv.stored_bytes();
            }
            !covered
        });
        self.bytes -= freed;
        kv.shrink_to_len();
        self.bytes += kv.stored_bytes();
        self.entries.push_back(Entry { tokens, kv });
        while self.bytes > self.max_bytes {
            self.evict_oldest();
        }
    }

    /// Drops the least recently used entry; the bytes freed (0 when empty).
    pub fn evict_oldest(&mut self) -> usize {
        let freed = self.entries.pop_front().map_or(0, |e| e.kv.stored_bytes());
        self.bytes -= freed;
        freed
    }

    /// Copies the longest cached prefix of `prompt` (at most `prompt.len() - 1` tokens) into the empty `kv` and
    /// returns its length; 0 when nothing matches.
    pub fn reuse(&mut self, prompt: &[u32], kv: &mut K) -> usize {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, &prompt[..limit])))
            .max_by_key(|&(i, n)| (n, i));
        let Some((i, n)) = best.filter(|&(_, n)| n > 0) else {
            return 0;
        };
        let Some(entry) = self.entries.remove(i) else {
            return 0;
        };
        let copied = kv.copy_prefix(&entry.kv, n);
        self.entries.push_back(entry);
        if copied {
            n
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{KvShape, SeqKv};

    const SHAPE: KvShape = KvShape {
        n_layer: 2,
        n_kv_head: 1,
        head_dim: 4,
    };

    /// A cache whose token `i` has keys `tokens[i]` and values `-tokens[i]` in every slot.
    fn computed(tokens: &[u32]) -> SeqKv {
        let mut kv = SeqKv::new(SHAPE, tokens.len(), tokens.len() + 8);
        kv.reserve(tokens.len()).expect("room");
        let k: Vec<f32> = tokens.iter().flat_map(|&t| [t as f32; 4]).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        for layer in 0..SHAPE.n_layer {
            kv.append(layer, &k, &v);
        }
        kv.advance(tokens.len());
        kv
    }

    fn fresh() -> SeqKv {
        SeqKv::new(SHAPE, 16, 64)
    }

    #[test]
    fn reuses_the_longest_prefix_and_copies_its_rows() {
        let mut cache = PrefixCache::new(1 << 20);
        cache.insert(vec![1, 2, 3, 9], computed(&[1, 2, 3, 9]));
        cache.insert(vec![1, 2, 3, 4, 5, 6], computed(&[1, 2, 3, 4, 5, 6]));
        cache.insert(vec![7, 7], computed(&[7, 7]));
        let mut kv = fresh();
        assert_eq!(cache.reuse(&[1, 2, 3, 4, 5, 8, 8], &mut kv), 5);
        assert_eq!(kv.len(), 5);
        for layer in 0..SHAPE.n_layer {
            for (pos, t) in [1u32, 2, 3, 4, 5].into_iter().enumerate() {
                let (k, v) = kv.token(layer, pos);
                assert_eq!(k, [t as f32; 4], "layer {layer} token {pos}");
                assert_eq!(v, [-(t as f32); 4], "layer {layer} token {pos}");
            }
        }
    }

    #[test]
    fn leaves_the_last_prompt_token_to_compute() {
        let mut cache = PrefixCache::new(1 << 20);
        cache.insert(vec![1, 2, 3, 4], computed(&[1, 2, 3, 4]));
        let mut kv = fresh();
        assert_eq!(
            cache.reuse(&[1, 2, 3], &mut kv),
            2,
            "same prompt again: all but its last token"
        );
        assert_eq!(cache.reuse(&[5, 6], &mut fresh()), 0);
        assert_eq!(cache.reuse(&[1], &mut fresh()), 0);
    }

    #[test]
    fn stays_within_its_bytes_dropping_the_least_recently_used() {
        // A cache holds whole blocks: each 4-token entry takes one, and room is left for two and a half.
        let entry = SHAPE.bytes_for(4);
        let mut cache = PrefixCache::new(2 * entry + entry / 2);
        cache.insert(vec![1, 1, 1, 1], computed(&[1, 1, 1, 1]));
        cache.insert(vec![2, 2, 2, 2], computed(&[2, 2, 2, 2]));
        assert_eq!(
            cache.reuse(&[1, 1, 1, 1, 0], &mut fresh()),
            4,
            "touches 1s: now most recent"
        );
        cache.insert(vec![3, 3, 3, 3], computed(&[3, 3, 3, 3]));
        assert_eq!(cache.bytes(), 2 * entry);
        assert_eq!(
            cache.reuse(&[2, 2, 2, 2, 0], &mut fresh()),
            0,
            "2s were least recently used"
        );
        assert_eq!(cache.reuse(&[1, 1, 1, 1, 0], &mut fresh()), 4);
        cache.insert((0..40).collect(), computed(&(0..40).collect::<Vec<_>>()));
        assert_eq!(cache.bytes(), 2 * entry, "larger than the whole cache: not kept");
        assert_eq!(cache.evict_oldest(), entry);
        assert_eq!(PrefixCache::<SeqKv>::new(0).reuse(&[1, 2], &mut fresh()), 0);
    }

    #[test]
    fn keeps_one_entry_per_prefix_chain() {
        let mut cache = PrefixCache::new(1 << 20);
        cache.insert(vec![1, 2], computed(&[1, 2]));
        cache.insert(vec![1, 2, 3, 4], computed(&[1, 2, 3, 4]));
        cache.insert(vec![1, 2, 3], computed(&[1, 2, 3]));
        assert_eq!(cache.bytes(), SHAPE.bytes_for(4), "only [1, 2, 3, 4] is kept");
        // Tokens beyond what the cache holds (the last sampled token never ran) are ignored.
        let mut partial = computed(&[5, 6]);
        partial.shrink_to_len();
        cache.insert(vec![5, 6, 7], partial);
        assert_eq!(cache.reuse(&[5, 6, 7, 8], &mut fresh()), 2);
    }
}

//! A small least-recently-used map from a spec's key to its compiled grammar.

use std::collections::HashMap;
use std::sync::Arc;

/// At most `capacity` entries; the least recently used goes first. Linear eviction: capacities are small.
pub(crate) struct Lru<V> {
    capacity: usize,
    tick: u64,
    entries: HashMap<String, (Arc<V>, u64)>,
}

impl<V> Lru<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    pub(crate) fn get(&mut self, key: &str) -> Option<Arc<V>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(v, used)| {
            *used = tick;
            v.clone()
        })
    }

    pub(crate) fn insert(&mut self, key: String, value: Arc<V>) {
        if self.capacity == 0 {
            return;
        }
        self.tick += 1;
        self.entries.insert(key, (value, self.tick));
        while self.entries.len() > self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.entries.remove(&k),
                None => break,
            };
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut lru = Lru::new(2);
        lru.insert("a".into(), Arc::new(1));
        lru.insert("b".into(), Arc::new(2));
        assert!(lru.get("a").is_some());
        lru.insert("c".into(), Arc::new(3));
        assert_eq!(lru.len(), 2);
        assert!(lru.get("b").is_none() && lru.get("a").is_some() && lru.get("c").is_some());
        let mut none = Lru::new(0);
        none.insert("a".into(), Arc::new(1));
        assert_eq!(none.len(), 0);
    }
}

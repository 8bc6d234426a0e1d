//! The KV cache: a fixed number of blocks of `block_size` tokens, with
//! automatic prefix caching as vLLM does it.
//!
//! Each full block of a prompt is named by a hash chain: the hash of the
//! previous block's name and this block's token ids, so a block is shared
//! only by prompts whose whole prefix up to it is equal. A running request
//! holds references to its prompt's full blocks plus "anonymous" blocks for
//! the partial last prompt block and its output (reserved for `max_tokens`
//! at admission, so a running request never runs out). When a request ends,
//! its full blocks stay cached without references and become evictable, in
//! least-recently-used order, with a request's tail blocks before its head
//! (vLLM frees blocks in reverse so that common prefixes live longest).
//! A request that does not fit in free plus evictable blocks waits.

use std::collections::{BTreeSet, HashMap};

/// A running request's hold on the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Chain hashes of the prompt's full blocks, each referenced once.
    pub hashes: Vec<u64>,
    /// Blocks held outside the prefix cache.
    pub anonymous: usize,
    /// Prompt tokens found in the cache (a whole number of blocks, always
    /// less than the prompt: the last prompt token is always computed).
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    refs: u32,
    last_used: u64,
}

/// The blocks of one server.
#[derive(Debug)]
pub struct KvCache {
    block_size: usize,
    capacity: usize,
    blocks: HashMap<u64, Entry>,
    /// Unreferenced cached blocks, oldest first: `(last_used, hash)`.
    lru: BTreeSet<(u64, u64)>,
    anonymous: usize,
    tick: u64,
}

impl KvCache {
    pub fn new(capacity: usize, block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            capacity,
            blocks: HashMap::new(),
            lru: BTreeSet::new(),
            anonymous: 0,
            tick: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks needed for `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The hash chain over the full blocks of `tokens`.
    pub fn block_hashes(&self, tokens: &[u32]) -> Vec<u64> {
        let mut parent: u64 = 0xcbf2_9ce4_8422_2325;
        tokens
            .chunks_exact(self.block_size)
            .map(|block| {
                let mut h = parent;
                for t in block {
                    for b in t.to_le_bytes() {
                        h ^= u64::from(b);
                        h = h.wrapping_mul(0x0000_0100_0000_01b3);
                    }
                }
                // Mix so that a chain never collides with its parent.
                h ^= h >> 29;
                parent = h;
                h
            })
            .collect()
    }

    /// Prompt tokens of `tokens` that are cached now (whole blocks of the
    /// leading chain, less than the whole prompt).
    pub fn cached_tokens(&self, tokens: &[u32]) -> usize {
        let hashes = self.block_hashes(tokens);
        self.hit_blocks(&hashes, tokens.len()) * self.block_size
    }

    fn hit_blocks(&self, hashes: &[u64], prompt_len: usize) -> usize {
        let mut hit = hashes
            .iter()
            .take_while(|h| self.blocks.contains_key(h))
            .count();
        if hit > 0 && hit * self.block_size >= prompt_len {
            hit -= 1;
        }
        hit
    }

    /// Reserves blocks for a request of prompt `tokens` that may grow to
    /// `total_tokens`; `None` when free plus evictable blocks are too few.
    pub fn try_allocate(&mut self, tokens: &[u32], total_tokens: usize) -> Option<Allocation> {
        let hashes = self.block_hashes(tokens);
        let hit = self.hit_blocks(&hashes, tokens.len());
        let anonymous = self
            .blocks_for(total_tokens.max(tokens.len()))
            .saturating_sub(hashes.len());
        let mut missing = 0;
        let mut pinned_evictable = 0;
        for h in &hashes {
            match self.blocks.get(h) {
                Some(e) if e.refs == 0 => pinned_evictable += 1,
                Some(_) => {}
                None => missing += 1,
            }
        }
        let free = self.capacity - self.blocks.len() - self.anonymous;
        let evictable = self.lru.len() - pinned_evictable;
        if missing + anonymous > free + evictable {
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        for h in &hashes {
            if let Some(e) = self.blocks.get_mut(h) {
                if e.refs == 0 {
                    self.lru.remove(&(e.last_used, *h));
                }
                e.refs += 1;
                e.last_used = tick;
            }
        }
        while self.capacity - self.blocks.len() - self.anonymous < missing + anonymous {
            let oldest = self
                .lru
                .pop_first()
                .expect("checked above: enough evictable");
            self.blocks.remove(&oldest.1);
        }
        for h in &hashes {
            self.blocks.entry(*h).or_insert(Entry {
                refs: 1,
                last_used: tick,
            });
        }
        self.anonymous += anonymous;
        Some(Allocation {
            hashes,
            anonymous,
            cached_tokens: hit * self.block_size,
        })
    }

    /// Gives a finished (or aborted) request's blocks back: its full blocks
    /// stay cached and become evictable, tail first.
    pub fn release(&mut self, allocation: &Allocation) {
        for h in allocation.hashes.iter().rev() {
            self.tick += 1;
            if let Some(e) = self.blocks.get_mut(h) {
                e.refs = e.refs.saturating_sub(1);
                e.last_used = self.tick;
                if e.refs == 0 {
                    self.lru.insert((self.tick, *h));
                }
            }
        }
        self.anonymous -= allocation.anonymous.min(self.anonymous);
    }

    /// Blocks held by running requests, as a fraction of all blocks (vLLM's
    /// `kv_cache_usage_perc`: cached blocks nobody references count as free).
    pub fn usage(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        (self.blocks.len() - self.lru.len() + self.anonymous) as f64 / self.capacity as f64
    }

    /// Cached blocks, referenced or not.
    pub fn cached_blocks(&self) -> usize {
        self.blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|i| seed.wrapping_mul(1_000_003) ^ i)
            .collect()
    }

    #[test]
    fn a_repeated_prompt_finds_its_full_blocks_cached() {
        let mut cache = KvCache::new(100, 16);
        let p = prompt(1, 40);
        let a = cache.try_allocate(&p, 50).unwrap();
        assert_eq!(a.cached_tokens, 0);
        assert_eq!(a.hashes.len(), 2);
        assert_eq!(a.anonymous, 2); // 50 tokens = 4 blocks, 2 of them full prompt blocks
        cache.release(&a);
        assert_eq!(cache.usage(), 0.0);
        let b = cache.try_allocate(&p, 50).unwrap();
        assert_eq!(b.cached_tokens, 32);
    }

    #[test]
    fn only_the_common_leading_chain_hits() {
        let mut cache = KvCache::new(100, 16);
        let mut p = prompt(1, 64);
        let a = cache.try_allocate(&p, 64).unwrap();
        cache.release(&a);
        p[20] ^= 1; // second block differs, so the third and fourth do too
        assert_eq!(cache.cached_tokens(&p), 16);
    }

    #[test]
    fn the_last_prompt_token_is_never_cached() {
        let mut cache = KvCache::new(100, 16);
        let p = prompt(1, 32);
        let a = cache.try_allocate(&p, 32).unwrap();
        cache.release(&a);
        assert_eq!(cache.cached_tokens(&p), 16);
    }

    #[test]
    fn under_pressure_the_least_recently_used_unreferenced_blocks_go() {
        let mut cache = KvCache::new(8, 16);
        let (p1, p2, p3) = (prompt(1, 64), prompt(2, 64), prompt(3, 64));
        let a = cache.try_allocate(&p1, 64).unwrap();
        cache.release(&a);
        let b = cache.try_allocate(&p2, 64).unwrap();
        cache.release(&b);
        // p1 is older: allocating p3 (4 blocks, none free) evicts p1's blocks.
        let c = cache.try_allocate(&p3, 64).unwrap();
        assert_eq!(cache.cached_tokens(&p1), 0);
        assert_eq!(cache.cached_tokens(&p2), 48);
        assert_eq!(cache.usage(), 0.5);
        cache.release(&c);
    }

    #[test]
    fn blocks_of_running_requests_are_never_evicted_and_a_request_that_does_not_fit_waits() {
        let mut cache = KvCache::new(8, 16);
        let a = cache.try_allocate(&prompt(1, 64), 100).unwrap(); // 7 blocks
        assert!(cache.try_allocate(&prompt(2, 20), 100).is_none()); // needs 7, 1 free
        assert!((cache.usage() - 7.0 / 8.0).abs() < 1e-9);
        cache.release(&a);
        assert!(cache.try_allocate(&prompt(2, 20), 100).is_some()); // evicts 3
                                                                    // The evicted tail went first: the head block of prompt 1 is still cached.
        assert_eq!(cache.cached_tokens(&prompt(1, 64)), 16);
    }

    #[test]
    fn two_running_requests_share_a_prefix_block() {
        let mut cache = KvCache::new(4, 16);
        let mut p2 = prompt(1, 33);
        let p1 = prompt(1, 33);
        p2[32] ^= 7;
        let a = cache.try_allocate(&p1, 33).unwrap(); // 2 full + 1 partial
        let b = cache.try_allocate(&p2, 33).unwrap(); // shares both full blocks
        assert_eq!(b.cached_tokens, 32);
        assert_eq!(cache.usage(), 1.0);
        cache.release(&a);
        cache.release(&b);
        assert_eq!(cache.usage(), 0.0);
    }
}

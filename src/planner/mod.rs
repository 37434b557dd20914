//! Scheduler-side facade: what kvpark holds, what requests can load, what
//! finished requests park, and where each suspended session's KV lives. Pure
//! state (but for [`recovery`]'s scan at start): no threads, no I/O; time
//! is an argument.
//!
//! - [`core`]: sessions, capacity accounting and the policy calls; the pure
//!   planner that the connector and the replay simulator share.
//! - [`blocks`]: the block-level planner the vLLM connector's scheduler role
//!   drives; it maps vLLM's block hashes onto sessions and runs [`core`].
//! - [`recovery`]: at start, what every worker rank's files still hold (the
//!   one place the scheduler side reads files).

pub mod blocks;
mod chain_index;
pub mod core;
pub mod recovery;

pub use blocks::{BlockPlanner, Match, PlannerMetrics, RequestHint, RequestView};

#[cfg(test)]
mod kvpark_policy_tests;
#[cfg(test)]
mod policy_tests;

/// A hasher for maps keyed by block keys (and small integers): keys are
/// SHA-256 outputs or a digest XOR vLLM's own block hash, which a client
/// cannot choose, so they need no keyed hash (SipHash cost the planner a
/// third of its time on reports); a multiply-rotate per word and one
/// avalanche at the end spread them over the table.
#[derive(Clone, Copy, Default)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.write_u64(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    #[inline]
    fn write_u64(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    fn write_u8(&mut self, b: u8) {
        self.write_u64(u64::from(b));
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
}

/// splitmix64's finaliser: a bijection of `u64` that spreads every input
/// bit over the output (the block index's and [`KeyHasher`]'s last step).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A map hashed with [`KeyHasher`].
pub type KeyMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<KeyHasher>>;
/// A set hashed with [`KeyHasher`].
pub type KeySet<K> = std::collections::HashSet<K, std::hash::BuildHasherDefault<KeyHasher>>;

//! The block planner's index: where each parked block lives, stored per
//! session chain.
//!
//! A session's blocks (those it parked first) are kept in the order it
//! parked them: their 32-byte keys in one vector, and their location (which
//! ranks hold a host / NVMe copy, loads in flight, a failed load) as runs of
//! equal state — a chain parked and moved as a whole is one run. The lookup
//! table maps a key to its chain and position with an 8-byte entry: the
//! key itself is read from the chain, not stored again. So an indexed block
//! costs its key (32 B), one table entry (8 B + a control byte, in a table
//! at most 7/8 full) and its share of the runs, instead of a map entry of
//! key and location plus a second copy of the key in the session's chain.
//!
//! A removed block leaves its key in the chain (marked absent) until more
//! than half of the chain is absent; the chain is then compacted, and freed
//! when nothing in it is present.

use crate::block::BlockKey;
use crate::planner::core::SessionId;
use hashbrown::HashTable;
use std::collections::HashMap;

/// Where a block lives, as the index answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Ranks holding a host copy (bit r = rank r).
    pub host: u64,
    /// Ranks holding an NVMe copy.
    pub nvme: u64,
    /// The session that parked it first (its chain's).
    pub session: SessionId,
    /// Loads planned and not yet reported: never dropped meanwhile.
    pub loading: u32,
    /// A load of it failed on some rank: never offered again; dropped on
    /// every rank that holds it.
    pub doomed: bool,
}

/// A block's state in a run (what [`Loc`] holds but the session).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct State {
    host: u64,
    nvme: u64,
    loading: u32,
    doomed: bool,
    present: bool,
}

impl State {
    fn of(l: &Loc) -> State {
        State {
            host: l.host,
            nvme: l.nvme,
            loading: l.loading,
            doomed: l.doomed,
            present: true,
        }
    }

    fn loc(&self, session: SessionId) -> Loc {
        Loc {
            host: self.host,
            nvme: self.nvme,
            session,
            loading: self.loading,
            doomed: self.doomed,
        }
    }
}

/// Per-position states of a chain as runs of equal state.
#[derive(Clone, Debug, Default)]
struct Runs {
    /// End (exclusive) of each run, increasing.
    ends: Vec<u32>,
    vals: Vec<State>,
}

impl Runs {
    fn len(&self) -> u32 {
        self.ends.last().copied().unwrap_or(0)
    }

    fn run_of(&self, p: u32) -> usize {
        self.ends.partition_point(|&e| e <= p)
    }

    fn get(&self, p: u32) -> State {
        self.vals[self.run_of(p)]
    }

    fn push(&mut self, s: State) {
        match self.vals.last() {
            Some(v) if *v == s => *self.ends.last_mut().expect("a run") += 1,
            _ => {
                let end = self.len() + 1;
                self.ends.push(end);
                self.vals.push(s);
            }
        }
    }

    fn set(&mut self, p: u32, s: State) {
        let i = self.run_of(p);
        if self.vals[i] == s {
            return;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        let end = self.ends[i];
        let old = self.vals[i];
        // [start, p) old, [p, p + 1) s, [p + 1, end) old
        let mut ends = Vec::with_capacity(3);
        let mut vals = Vec::with_capacity(3);
        if p > start {
            ends.push(p);
            vals.push(old);
        }
        ends.push(p + 1);
        vals.push(s);
        if p + 1 < end {
            ends.push(end);
            vals.push(old);
        }
        let n = ends.len();
        self.ends.splice(i..=i, ends);
        self.vals.splice(i..=i, vals);
        // merge the new run with equal neighbours
        let lo = i.saturating_sub(1);
        let hi = (i + n).min(self.vals.len() - 1);
        let mut j = hi;
        while j > lo {
            if self.vals[j] == self.vals[j - 1] {
                self.ends.remove(j - 1);
                self.vals.remove(j);
            }
            j -= 1;
        }
    }

    /// Makes `p` (0 < p < len) the start of a run.
    fn split(&mut self, p: u32) {
        let i = self.run_of(p);
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        if start != p {
            self.ends.insert(i, p);
            self.vals.insert(i, self.vals[i]);
        }
    }

    /// Applies `f` to the states of `a..b`, once per run with its length.
    fn update_range(&mut self, a: u32, b: u32, mut f: impl FnMut(&mut State, u32)) {
        if a >= b {
            return;
        }
        if a > 0 {
            self.split(a);
        }
        if b < self.len() {
            self.split(b);
        }
        let (i0, i1) = (self.run_of(a), self.run_of(b - 1));
        for i in i0..=i1 {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            f(&mut self.vals[i], self.ends[i] - start);
        }
        // merge equal neighbours from the run after the range down to the
        // one before it
        let lo = i0.saturating_sub(1);
        let mut j = (i1 + 1).min(self.vals.len() - 1);
        while j > lo {
            if self.vals[j] == self.vals[j - 1] {
                self.ends.remove(j - 1);
                self.vals.remove(j);
            }
            j -= 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u32, u32, State)> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .zip(self.vals.iter().copied())
            .map(|((a, b), v)| (a, b, v))
    }
}

#[derive(Debug)]
struct Chain {
    session: SessionId,
    keys: Vec<BlockKey>,
    runs: Runs,
    present: u32,
}

/// A block's place: (chain, position in it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pos(pub u32, pub u32);

/// The block index (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct ChainIndex {
    /// (chain, position) of every present block, hashed by its key.
    table: HashTable<(u32, u32)>,
    chains: Vec<Option<Chain>>,
    free: Vec<u32>,
    /// The chain a session appends to.
    by_session: HashMap<SessionId, u32>,
    /// Changes whenever a present block may change its position (a block
    /// removed, a chain compacted or freed): positions found before stay
    /// valid while it is unchanged.
    layout: u64,
}

/// The table's hash of a key: all 32 bytes mixed (splitmix64's finalizer
/// per 8-byte word). A key is a vLLM hash XOR a namespace digest
/// ([`crate::block::KeyDeriver`]), so its bits are only as random as vLLM's
/// hash: structured hashes (short ones, tests) must spread over the table too.
#[inline]
fn hash_of(k: &BlockKey) -> u64 {
    use super::mix64 as mix;
    k.0.chunks_exact(8).fold(0x9e37_79b9_7f4a_7c15, |h, w| {
        mix(h ^ u64::from_le_bytes(w.try_into().expect("8 bytes")))
    })
}

impl ChainIndex {
    /// The layout generation (see the field): positions found under one
    /// value still hold the same blocks while it is unchanged.
    pub fn layout(&self) -> u64 {
        self.layout
    }

    /// Present blocks.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.chains
            .iter()
            .flatten()
            .map(|c| c.present as usize)
            .sum()
    }

    fn chain(&self, c: u32) -> &Chain {
        self.chains[c as usize].as_ref().expect("live chain")
    }

    fn find(&self, k: &BlockKey) -> Option<(u32, u32)> {
        let chains = &self.chains;
        self.table
            .find(hash_of(k), |&(c, p)| {
                chains[c as usize]
                    .as_ref()
                    .is_some_and(|ch| ch.keys[p as usize] == *k)
            })
            .copied()
    }

    /// [`Self::find`], trying first the position after `near` (where a
    /// caller walking a chain's keys in order finds the next one without
    /// the table).
    #[inline]
    fn find_near(&self, near: Option<Pos>, k: &BlockKey) -> Option<(u32, u32)> {
        if let Some(Pos(c, p)) = near {
            if let Some(Some(ch)) = self.chains.get(c as usize) {
                let q = p.wrapping_add(1);
                if ch.keys.get(q as usize) == Some(k) && ch.runs.get(q).present {
                    return Some((c, q));
                }
            }
        }
        self.find(k)
    }

    /// [`Self::get`] with a hint (see [`Self::update_near`]); also returns
    /// the block's position.
    pub fn get_near(&self, near: Option<Pos>, k: &BlockKey) -> Option<(Loc, Pos)> {
        let (c, p) = self.find_near(near, k)?;
        let ch = self.chain(c);
        Some((ch.runs.get(p).loc(ch.session), Pos(c, p)))
    }

    /// [`Self::update`], looking first right after `near` (the position of
    /// the key before `k` in the caller's walk); also returns `k`'s position.
    pub fn update_near<R>(
        &mut self,
        near: Option<Pos>,
        k: &BlockKey,
        f: impl FnOnce(&mut Loc) -> R,
    ) -> Option<(R, Pos)> {
        let (c, p) = self.find_near(near, k)?;
        let ch = self.chains[c as usize].as_mut().expect("live chain");
        let mut l = ch.runs.get(p).loc(ch.session);
        let r = f(&mut l);
        debug_assert_eq!(l.session, ch.session, "a block keeps its session");
        ch.runs.set(p, State::of(&l));
        Some((r, Pos(c, p)))
    }

    /// The position of `k`, if present.
    #[inline]
    pub fn locate(&self, k: &BlockKey) -> Option<Pos> {
        self.find(k).map(|(c, p)| Pos(c, p))
    }

    /// How many of `keys` sit at `at`, `at + 1`, … of one chain, present,
    /// each with a location `ok` accepts (called once per block, in
    /// order); and whether the count stopped at a block present there that
    /// `ok` refused (rather than at the chain's end, a different key or an
    /// absent block).
    pub fn extend(
        &self,
        at: Pos,
        keys: &[BlockKey],
        mut ok: impl FnMut(&Loc) -> bool,
    ) -> (usize, bool) {
        let Some(Some(ch)) = self.chains.get(at.0 as usize) else {
            return (0, false);
        };
        let start = at.1 as usize;
        let mut r = ch.runs.run_of(at.1);
        let mut n = 0;
        for (i, k) in keys.iter().enumerate() {
            let p = start + i;
            if ch.keys.get(p) != Some(k) {
                break;
            }
            while r < ch.runs.ends.len() && ch.runs.ends[r] as usize <= p {
                r += 1;
            }
            let Some(st) = ch.runs.vals.get(r) else {
                break;
            };
            if !st.present {
                break;
            }
            if !ok(&st.loc(ch.session)) {
                return (n, true);
            }
            n += 1;
        }
        (n, false)
    }

    /// Which of `keys` are present: one table lookup per run of them that
    /// a chain holds in order (a request's parked prefix is usually one),
    /// and one per key outside such runs.
    #[cfg(test)]
    pub fn present(&self, keys: &[BlockKey]) -> Vec<bool> {
        self.present_where(keys, |_| true)
    }

    /// Which of `keys` are present with a location `ok` accepts (called in
    /// order, once per present block).
    pub fn present_where(&self, keys: &[BlockKey], mut ok: impl FnMut(&Loc) -> bool) -> Vec<bool> {
        let mut out = vec![false; keys.len()];
        let mut i = 0;
        while i < keys.len() {
            match self.locate(&keys[i]) {
                Some(at) => {
                    let (m, refused) = self.extend(at, &keys[i..], &mut ok);
                    out[i..i + m].iter_mut().for_each(|b| *b = true);
                    // (a refused block stays false)
                    i += m + usize::from(refused || m == 0);
                }
                None => i += 1,
            }
        }
        out
    }

    /// Applies `f` to the locations of chain positions `a..b` of `c` (all
    /// present), once per run of equal location with its length.
    pub fn update_range(&mut self, c: u32, a: u32, b: u32, mut f: impl FnMut(&mut Loc, u32)) {
        let ch = self.chains[c as usize].as_mut().expect("live chain");
        let session = ch.session;
        ch.runs.update_range(a, b, |st, n| {
            debug_assert!(st.present);
            let mut l = st.loc(session);
            f(&mut l, n);
            *st = State::of(&l);
        });
    }

    /// Where `k` lives, if some rank holds it.
    pub fn get(&self, k: &BlockKey) -> Option<Loc> {
        self.get_near(None, k).map(|f| f.0)
    }

    pub fn contains(&self, k: &BlockKey) -> bool {
        self.find(k).is_some()
    }

    /// Changes `k`'s location (not its session) with `f`; `None` when `k`
    /// is absent.
    pub fn update<R>(&mut self, k: &BlockKey, f: impl FnOnce(&mut Loc) -> R) -> Option<R> {
        self.update_near(None, k, f).map(|u| u.0)
    }

    /// Adds `k` (not present) at the end of its session's chain.
    pub fn insert(&mut self, k: BlockKey, l: Loc) {
        debug_assert!(!self.contains(&k));
        let c = match self.by_session.get(&l.session) {
            Some(&c) => c,
            None => {
                let ch = Chain {
                    session: l.session,
                    keys: Vec::new(),
                    runs: Runs::default(),
                    present: 0,
                };
                let c = match self.free.pop() {
                    Some(c) => {
                        self.chains[c as usize] = Some(ch);
                        c
                    }
                    None => {
                        self.chains.push(Some(ch));
                        (self.chains.len() - 1) as u32
                    }
                };
                self.by_session.insert(l.session, c);
                c
            }
        };
        let ch = self.chains[c as usize].as_mut().expect("live chain");
        let p = ch.keys.len() as u32;
        // grow by what is added, not by doubling: the keys are most of
        // the index's memory
        if ch.keys.len() == ch.keys.capacity() {
            ch.keys.reserve_exact((ch.keys.len() / 8).max(4));
        }
        ch.keys.push(k);
        ch.runs.push(State::of(&l));
        ch.present += 1;
        let chains = &self.chains;
        self.table.insert_unique(hash_of(&k), (c, p), |&(c, p)| {
            hash_of(&chains[c as usize].as_ref().expect("live chain").keys[p as usize])
        });
    }

    /// Forgets `k`; its location before, if it was present.
    pub fn remove(&mut self, k: &BlockKey) -> Option<Loc> {
        let chains = &self.chains;
        let entry = self
            .table
            .find_entry(hash_of(k), |&(c, p)| {
                chains[c as usize]
                    .as_ref()
                    .is_some_and(|ch| ch.keys[p as usize] == *k)
            })
            .ok()?;
        let ((c, p), _) = entry.remove();
        self.layout += 1;
        let ch = self.chains[c as usize].as_mut().expect("live chain");
        let s = ch.runs.get(p);
        ch.runs.set(p, State::default());
        ch.present -= 1;
        let loc = s.loc(ch.session);
        if ch.present == 0 {
            self.free_chain(c);
        } else if ch.keys.len() >= 64 && (ch.present as usize) * 2 < ch.keys.len() {
            self.compact(c);
        }
        Some(loc)
    }

    fn free_chain(&mut self, c: u32) {
        let ch = self.chains[c as usize].take().expect("live chain");
        if self.by_session.get(&ch.session) == Some(&c) {
            self.by_session.remove(&ch.session);
        }
        self.free.push(c);
    }

    /// Drops the absent positions of chain `c`, re-pointing the table.
    fn compact(&mut self, c: u32) {
        let ch = self.chains[c as usize].as_mut().expect("live chain");
        let mut keys = Vec::with_capacity(ch.present as usize);
        let mut runs = Runs::default();
        let mut moved = Vec::new();
        for (a, b, s) in ch.runs.iter() {
            if !s.present {
                continue;
            }
            for p in a..b {
                let np = keys.len() as u32;
                keys.push(ch.keys[p as usize]);
                runs.push(s);
                if np != p {
                    moved.push((p, np));
                }
            }
        }
        let old_keys = std::mem::replace(&mut ch.keys, keys);
        ch.runs = runs;
        for (p, np) in moved {
            let k = old_keys[p as usize];
            if let Some(e) = self.table.find_mut(hash_of(&k), |&e| e == (c, p)) {
                *e = (c, np);
            }
        }
    }

    /// The present blocks a session parked first, in order, with where
    /// they live.
    pub fn chain_of(&self, s: SessionId) -> Vec<(BlockKey, Loc)> {
        let Some(&c) = self.by_session.get(&s) else {
            return Vec::new();
        };
        let ch = self.chain(c);
        let mut out = Vec::with_capacity(ch.present as usize);
        for (a, b, st) in ch.runs.iter() {
            if st.present {
                let l = st.loc(ch.session);
                out.extend(ch.keys[a as usize..b as usize].iter().map(|k| (*k, l)));
            }
        }
        out
    }

    /// Whether `s` has a chain.
    #[cfg(test)]
    pub fn has_chain(&self, s: SessionId) -> bool {
        self.by_session.contains_key(&s)
    }

    /// The sessions that have a chain.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.by_session.keys().copied().collect()
    }

    /// Unlinks session `s` from its chain (its blocks stay indexed until
    /// removed, still under `s`; a later block of `s` starts a new chain);
    /// returns the chain's present blocks.
    pub fn detach(&mut self, s: SessionId) -> Vec<(BlockKey, Loc)> {
        let blocks = self.chain_of(s);
        self.by_session.remove(&s);
        blocks
    }

    /// Every present block with where it lives.
    pub fn iter(&self) -> impl Iterator<Item = (BlockKey, Loc)> + '_ {
        self.chains.iter().flatten().flat_map(|ch| {
            ch.runs
                .iter()
                .filter(|r| r.2.present)
                .flat_map(move |(a, b, st)| {
                    let l = st.loc(ch.session);
                    ch.keys[a as usize..b as usize].iter().map(move |k| (*k, l))
                })
        })
    }

    /// Bytes the index holds on the heap (table, keys, runs, chains), by
    /// capacity.
    pub fn heap_bytes(&self) -> usize {
        let table = self.table.allocation_size();
        let chains: usize = self
            .chains
            .iter()
            .flatten()
            .map(|ch| {
                ch.keys.capacity() * std::mem::size_of::<BlockKey>()
                    + ch.runs.ends.capacity() * 4
                    + ch.runs.vals.capacity() * std::mem::size_of::<State>()
            })
            .sum();
        table
            + chains
            + self.chains.capacity() * std::mem::size_of::<Option<Chain>>()
            + self.by_session.capacity() * 24
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u32) -> BlockKey {
        BlockKey::derive(b"", &i.to_le_bytes())
    }

    fn loc(session: SessionId, host: u64) -> Loc {
        Loc {
            host,
            nvme: 0,
            session,
            loading: 0,
            doomed: false,
        }
    }

    proptest! {
        /// Runs answer like a plain vector of states, and stay merged.
        #[test]
        fn runs_are_a_vector(ops in proptest::collection::vec((0u32..40, 0u64..3), 1..200)) {
            let mut runs = Runs::default();
            let mut plain = Vec::new();
            for i in 0..40u32 {
                let s = State { host: (i / 10) as u64, present: true, ..State::default() };
                runs.push(s);
                plain.push(s);
            }
            for (p, h) in ops {
                let s = State { host: h, present: h != 2, ..State::default() };
                if h == 0 {
                    // a range update: loading + 1 over p..p + 5
                    let b = (p + 5).min(40);
                    let mut seen = 0;
                    runs.update_range(p, b, |st, n| { st.loading += 1; seen += n; });
                    prop_assert_eq!(seen, b - p);
                    for q in p..b {
                        plain[q as usize].loading += 1;
                    }
                } else {
                    runs.set(p, s);
                    plain[p as usize] = s;
                }
                for (q, want) in plain.iter().enumerate() {
                    prop_assert_eq!(runs.get(q as u32), *want);
                }
                prop_assert!(runs.vals.windows(2).all(|w| w[0] != w[1]), "unmerged runs");
                prop_assert!(runs.ends.windows(2).all(|w| w[0] < w[1]));
                prop_assert_eq!(runs.len(), 40);
            }
        }

        /// The index answers like a map of key to location, through
        /// inserts, updates, removals (and the compactions they cause).
        #[test]
        fn index_is_a_map(ops in proptest::collection::vec((0u8..4, 0u32..300, 1u64..4), 1..600)) {
            let mut ix = ChainIndex::default();
            let mut plain: HashMap<BlockKey, Loc> = HashMap::new();
            for (op, i, v) in ops {
                let k = key(i);
                match op {
                    0 | 1 => {
                        if let std::collections::hash_map::Entry::Vacant(e) = plain.entry(k) {
                            let l = loc(v, 1);
                            ix.insert(k, l);
                            e.insert(l);
                        }
                    }
                    2 => {
                        // (with a hint: the position of the key before it, if present)
                        let near = ix.get_near(None, &key(i.wrapping_sub(1))).map(|x| x.1);
                        let a = ix.update_near(near, &k, |l| { l.host = v; l.loading += 1; }).is_some();
                        let b = plain.get_mut(&k).map(|l| { l.host = v; l.loading += 1; }).is_some();
                        prop_assert_eq!(a, b);
                    }
                    _ => prop_assert_eq!(ix.remove(&k), plain.remove(&k)),
                }
                prop_assert_eq!(ix.len(), plain.len());
            }
            let mut near = None;
            for i in 0..300 {
                let k = key(i);
                prop_assert_eq!(ix.get(&k), plain.get(&k).copied());
                // a walk that hints each lookup with the last block found
                let found = ix.get_near(near, &k);
                prop_assert_eq!(found.map(|f| f.0), plain.get(&k).copied());
                prop_assert_eq!(found.map(|f| f.1), ix.locate(&k));
                near = found.map(|f| f.1).or(near);
            }
            let probe: Vec<BlockKey> = (0..300).map(key).collect();
            let want: Vec<bool> = probe.iter().map(|k| plain.contains_key(k)).collect();
            prop_assert_eq!(ix.present(&probe), want);
            let even: Vec<bool> = probe.iter().map(|k| plain.get(k).is_some_and(|l| l.host % 2 == 0)).collect();
            prop_assert_eq!(ix.present_where(&probe, |l| l.host % 2 == 0), even);
            let mut all: Vec<(BlockKey, Loc)> = ix.iter().collect();
            all.sort_by_key(|e| e.0 .0);
            let mut want: Vec<(BlockKey, Loc)> = plain.into_iter().collect();
            want.sort_by_key(|e| e.0 .0);
            prop_assert_eq!(all, want);
        }
    }

    #[test]
    fn chains_keep_parking_order_and_detach() {
        let mut ix = ChainIndex::default();
        for i in 0..100 {
            ix.insert(key(i), loc(1 + (i % 2) as u64, 1));
        }
        let c1: Vec<BlockKey> = ix.chain_of(1).into_iter().map(|e| e.0).collect();
        assert_eq!(c1, (0..100).step_by(2).map(key).collect::<Vec<_>>());
        // removing most of chain 1 compacts it; order stays
        for i in (0..80).step_by(2) {
            assert!(ix.remove(&key(i)).is_some());
        }
        let c1: Vec<BlockKey> = ix.chain_of(1).into_iter().map(|e| e.0).collect();
        assert_eq!(c1, (80..100).step_by(2).map(key).collect::<Vec<_>>());
        assert!(ix.get(&key(98)).is_some_and(|l| l.session == 1));
        // a detached session's blocks stay under it; new ones start a chain
        assert_eq!(ix.detach(2).len(), 50);
        assert!(!ix.has_chain(2));
        assert!(ix.get(&key(1)).is_some_and(|l| l.session == 2));
        ix.insert(key(1000), loc(2, 1));
        assert_eq!(ix.chain_of(2).len(), 1);
        // a chain emptied is freed and its slot reused
        for i in (80..100).step_by(2) {
            ix.remove(&key(i));
        }
        assert!(!ix.has_chain(1));
        ix.insert(key(2000), loc(3, 1));
        assert_eq!(ix.chains.len(), 3);
        assert_eq!(ix.len(), 52);
    }
}

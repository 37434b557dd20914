//! Model-based test of the block index and the host slot allocator.
//!
//! Random operation sequences run against the real `BlockIndex` +
//! `HostArena` and against a naive model written from the transition table
//! in `src/index/mod.rs`. After every operation the test checks that both
//! agree (states, slots, pins, access times, error kinds) and that the
//! allocator is sound: no slot is handed out twice (each held slot still
//! carries the tag written by its owner), pinned blocks keep their slot,
//! `used + free == capacity`, and freeing a free slot is an error.

use kvpark::block::BlockKey;
use kvpark::index::{BlockIndex, BlockState, SlotId};
use kvpark::tier::host::HostArena;
use kvpark::ErrorKind;
use proptest::prelude::*;
use std::collections::HashMap;

const KEYS: u8 = 6;
const SLOTS: usize = 4;

#[derive(Clone, Copy, Debug)]
enum Op {
    Save(u8),
    FinishSave(u8, bool),
    Demote(u8),
    FinishDemote(u8, bool),
    Release(u8),
    Promote(u8),
    FinishPromote(u8, bool),
    Pin(u8, u64),
    Unpin(u8),
    Remove(u8),
    InsertNvme(u8),
    ForgetNvme(u8),
    Touch(u8, u64),
    Victims(usize),
    FreeAFreeSlot(u32),
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..KEYS;
    prop_oneof![
        3 => k.clone().prop_map(Op::Save),
        3 => (k.clone(), prop::bool::weighted(0.8)).prop_map(|(k, b)| Op::FinishSave(k, b)),
        2 => k.clone().prop_map(Op::Demote),
        2 => (k.clone(), prop::bool::weighted(0.8)).prop_map(|(k, b)| Op::FinishDemote(k, b)),
        2 => k.clone().prop_map(Op::Release),
        2 => k.clone().prop_map(Op::Promote),
        2 => (k.clone(), prop::bool::weighted(0.7)).prop_map(|(k, b)| Op::FinishPromote(k, b)),
        2 => (k.clone(), 0..40u64).prop_map(|(k, t)| Op::Pin(k, t)),
        2 => k.clone().prop_map(Op::Unpin),
        2 => k.clone().prop_map(Op::Remove),
        1 => k.clone().prop_map(Op::InsertNvme),
        1 => k.clone().prop_map(Op::ForgetNvme),
        1 => (k.clone(), 0..40u64).prop_map(|(k, t)| Op::Touch(k, t)),
        1 => (0..8usize).prop_map(Op::Victims),
        1 => (0..SLOTS as u32).prop_map(Op::FreeAFreeSlot),
    ]
}

/// The model's states, named independently of the real enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum S {
    Saving,
    Host,
    Demoting,
    Both,
    Nvme,
    Promoting,
}

impl S {
    fn real(self) -> BlockState {
        match self {
            S::Saving => BlockState::Saving,
            S::Host => BlockState::Host,
            S::Demoting => BlockState::Demoting,
            S::Both => BlockState::HostAndNvme,
            S::Nvme => BlockState::Nvme,
            S::Promoting => BlockState::Promoting,
        }
    }
    fn busy(self) -> bool {
        matches!(self, S::Saving | S::Demoting | S::Promoting)
    }
}

#[derive(Clone, Debug)]
struct M {
    st: S,
    slot: Option<u32>,
    pins: u32,
    last: u64,
    seq: u32,
    /// Tag written into the slot by whoever filled it.
    tag: u64,
    /// Slot held when the first pin was taken.
    pinned_slot: Option<u32>,
}

fn key(i: u8) -> BlockKey {
    BlockKey::derive(b"model", &[i])
}

/// `Ok(())` or the error kind the model expects.
type Expect = std::result::Result<(), ErrorKind>;

struct Harness {
    ix: BlockIndex,
    arena: HostArena,
    model: Vec<Option<M>>,
    now: u64,
    next_tag: u64,
}

impl Harness {
    fn new() -> Self {
        Harness {
            ix: BlockIndex::new(),
            arena: HostArena::new(4096, SLOTS).unwrap(),
            model: vec![None; KEYS as usize],
            now: 100,
            next_tag: 1,
        }
    }

    fn held(&self) -> usize {
        self.model
            .iter()
            .flatten()
            .filter(|m| m.slot.is_some())
            .count()
    }

    fn write_tag(&mut self, slot: SlotId) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        let mut w = self.arena.slot_mut(slot).unwrap();
        w[..8].copy_from_slice(&tag.to_le_bytes());
        w[4088..].copy_from_slice(&tag.to_le_bytes());
        tag
    }

    fn give_back(&mut self, slot: Option<SlotId>) {
        if let Some(s) = slot {
            self.arena
                .free(s)
                .expect("a slot returned by the index is freed exactly once");
        }
    }

    fn apply(&mut self, op: Op) {
        self.now += 1;
        let now = self.now;
        let (expect, got): (Expect, std::result::Result<(), kvpark::Error>) = match op {
            Op::Save(k) => {
                let m = self.model[k as usize].clone();
                let expect = if self.held() == SLOTS {
                    Err(ErrorKind::NoSpace)
                } else if let Some(m) = &m {
                    Err(if m.st.busy() {
                        ErrorKind::Busy
                    } else {
                        ErrorKind::InvalidArgument
                    })
                } else {
                    Ok(())
                };
                let got = self.arena.alloc().and_then(|s| {
                    match self.ix.begin_save(key(k), 9, k as u32, s, now) {
                        Ok(()) => Ok(s),
                        Err(e) => {
                            self.arena.free(s).unwrap();
                            Err(e)
                        }
                    }
                });
                let got = got.map(|s| {
                    let tag = self.write_tag(s);
                    self.model[k as usize] = Some(M {
                        st: S::Saving,
                        slot: Some(s.0),
                        pins: 0,
                        last: now,
                        seq: k as u32,
                        tag,
                        pinned_slot: None,
                    });
                });
                (expect, got)
            }
            Op::FinishSave(k, ok) => {
                let expect = match &self.model[k as usize] {
                    None => Err(ErrorKind::NotFound),
                    Some(m) if m.st != S::Saving => Err(ErrorKind::InvalidArgument),
                    Some(_) => Ok(()),
                };
                let got = self.ix.finish_save(&key(k), ok).map(|slot| {
                    if ok {
                        assert_eq!(slot, None);
                        self.model[k as usize].as_mut().unwrap().st = S::Host;
                    } else {
                        let m = self.model[k as usize].take().unwrap();
                        assert_eq!(slot.map(|s| s.0), m.slot, "failed save returns its slot");
                        self.give_back(slot);
                    }
                });
                (expect, got)
            }
            Op::Demote(k) => {
                let expect = match self.model[k as usize].as_ref().map(|m| m.st) {
                    None => Err(ErrorKind::NotFound),
                    Some(S::Host) => Ok(()),
                    Some(S::Both | S::Nvme) => Err(ErrorKind::InvalidArgument),
                    Some(_) => Err(ErrorKind::Busy),
                };
                let got = self.ix.begin_demote(&key(k)).map(|()| {
                    self.model[k as usize].as_mut().unwrap().st = S::Demoting;
                });
                (expect, got)
            }
            Op::FinishDemote(k, ok) => {
                let expect = match self.model[k as usize].as_ref().map(|m| m.st) {
                    None => Err(ErrorKind::NotFound),
                    Some(S::Demoting) => Ok(()),
                    Some(_) => Err(ErrorKind::InvalidArgument),
                };
                let got = self.ix.finish_demote(&key(k), ok).map(|()| {
                    self.model[k as usize].as_mut().unwrap().st =
                        if ok { S::Both } else { S::Host };
                });
                (expect, got)
            }
            Op::Release(k) => {
                let expect = match &self.model[k as usize] {
                    None => Err(ErrorKind::NotFound),
                    Some(m) if m.st == S::Both && m.pins == 0 => Ok(()),
                    Some(m) if m.st == S::Both || m.st.busy() => Err(ErrorKind::Busy),
                    Some(_) => Err(ErrorKind::InvalidArgument),
                };
                let got = self.ix.release_host(&key(k)).map(|slot| {
                    let m = self.model[k as usize].as_mut().unwrap();
                    assert_eq!(Some(slot.0), m.slot);
                    m.st = S::Nvme;
                    m.slot = None;
                    self.give_back(Some(slot));
                });
                (expect, got)
            }
            Op::Promote(k) => {
                let expect = if self.held() == SLOTS {
                    Err(ErrorKind::NoSpace)
                } else {
                    match self.model[k as usize].as_ref().map(|m| m.st) {
                        None => Err(ErrorKind::NotFound),
                        Some(S::Nvme) => Ok(()),
                        Some(S::Host | S::Both) => Err(ErrorKind::InvalidArgument),
                        Some(_) => Err(ErrorKind::Busy),
                    }
                };
                let got =
                    self.arena
                        .alloc()
                        .and_then(|s| match self.ix.begin_promote(&key(k), s, now) {
                            Ok(()) => Ok(s),
                            Err(e) => {
                                self.arena.free(s).unwrap();
                                Err(e)
                            }
                        });
                let got = got.map(|s| {
                    let tag = self.write_tag(s);
                    let m = self.model[k as usize].as_mut().unwrap();
                    m.st = S::Promoting;
                    m.slot = Some(s.0);
                    m.tag = tag;
                    m.last = m.last.max(now);
                });
                (expect, got)
            }
            Op::FinishPromote(k, ok) => {
                let expect = match self.model[k as usize].as_ref().map(|m| m.st) {
                    None => Err(ErrorKind::NotFound),
                    Some(S::Promoting) => Ok(()),
                    Some(_) => Err(ErrorKind::InvalidArgument),
                };
                let got = self.ix.finish_promote(&key(k), ok).map(|slot| {
                    let m = self.model[k as usize].as_mut().unwrap();
                    if ok {
                        assert_eq!(slot, None);
                        m.st = S::Both;
                    } else {
                        assert_eq!(slot.map(|s| s.0), m.slot, "failed promote returns its slot");
                        m.st = S::Nvme;
                        m.slot = None;
                        self.give_back(slot);
                    }
                });
                (expect, got)
            }
            Op::Pin(k, back) => {
                let t = now.saturating_sub(back);
                let expect = match self.model[k as usize].as_ref().map(|m| m.st) {
                    None => Err(ErrorKind::NotFound),
                    Some(S::Host | S::Demoting | S::Both) => Ok(()),
                    Some(S::Saving | S::Promoting) => Err(ErrorKind::Busy),
                    Some(S::Nvme) => Err(ErrorKind::InvalidArgument),
                };
                let got = self.ix.pin(&key(k), t).map(|()| {
                    let m = self.model[k as usize].as_mut().unwrap();
                    if m.pins == 0 {
                        m.pinned_slot = m.slot;
                    }
                    m.pins += 1;
                    m.last = m.last.max(t);
                });
                (expect, got)
            }
            Op::Unpin(k) => {
                let expect = match &self.model[k as usize] {
                    None => Err(ErrorKind::NotFound),
                    Some(m) if m.pins == 0 => Err(ErrorKind::InvalidArgument),
                    Some(_) => Ok(()),
                };
                let got = self.ix.unpin(&key(k)).map(|()| {
                    let m = self.model[k as usize].as_mut().unwrap();
                    m.pins -= 1;
                    if m.pins == 0 {
                        m.pinned_slot = None;
                    }
                });
                (expect, got)
            }
            Op::Remove(k) => {
                let expect = match &self.model[k as usize] {
                    None => Err(ErrorKind::NotFound),
                    Some(m) if m.st.busy() || m.pins > 0 => Err(ErrorKind::Busy),
                    Some(_) => Ok(()),
                };
                let got = self.ix.remove(&key(k)).map(|slot| {
                    let m = self.model[k as usize].take().unwrap();
                    assert_eq!(slot.map(|s| s.0), m.slot);
                    self.give_back(slot);
                });
                (expect, got)
            }
            Op::InsertNvme(k) => {
                let expect = match &self.model[k as usize] {
                    Some(m) if m.st.busy() => Err(ErrorKind::Busy),
                    Some(_) => Err(ErrorKind::InvalidArgument),
                    None => Ok(()),
                };
                let got = self.ix.insert_nvme(key(k), 9, k as u32, now).map(|()| {
                    self.model[k as usize] = Some(M {
                        st: S::Nvme,
                        slot: None,
                        pins: 0,
                        last: now,
                        seq: k as u32,
                        tag: 0,
                        pinned_slot: None,
                    });
                });
                (expect, got)
            }
            Op::ForgetNvme(k) => {
                let expect = match self.model[k as usize].as_ref().map(|m| m.st) {
                    None => Err(ErrorKind::NotFound),
                    Some(S::Both) => Ok(()),
                    Some(s) if s.busy() => Err(ErrorKind::Busy),
                    Some(_) => Err(ErrorKind::InvalidArgument),
                };
                let got = self.ix.forget_nvme(&key(k)).map(|()| {
                    self.model[k as usize].as_mut().unwrap().st = S::Host;
                });
                (expect, got)
            }
            Op::Touch(k, back) => {
                let t = now.saturating_sub(back);
                let expect = if self.model[k as usize].is_some() {
                    Ok(())
                } else {
                    Err(ErrorKind::NotFound)
                };
                let got = self.ix.touch(&key(k), t).map(|()| {
                    let m = self.model[k as usize].as_mut().unwrap();
                    m.last = m.last.max(t);
                });
                (expect, got)
            }
            Op::Victims(n) => {
                // Naive: sort every candidate with the documented order.
                let mut c: Vec<(u64, bool, u32, BlockKey)> = self
                    .model
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| {
                        let m = m.as_ref()?;
                        let ok = m.pins == 0 && matches!(m.st, S::Host | S::Both);
                        ok.then(|| (now - m.last.min(now), m.st == S::Both, m.seq, key(i as u8)))
                    })
                    .collect();
                c.sort_by(|a, b| {
                    b.0.cmp(&a.0)
                        .then(b.1.cmp(&a.1))
                        .then(b.2.cmp(&a.2))
                        .then(a.3.cmp(&b.3))
                });
                let want: Vec<BlockKey> = c.into_iter().take(n).map(|c| c.3).collect();
                assert_eq!(self.ix.evictable_host_victims(n, now), want);
                (Ok(()), Ok(()))
            }
            Op::FreeAFreeSlot(s) => {
                let held = self.model.iter().flatten().any(|m| m.slot == Some(s));
                if held {
                    (Ok(()), Ok(()))
                } else {
                    (Err(ErrorKind::InvalidArgument), self.arena.free(SlotId(s)))
                }
            }
        };
        match (&expect, &got) {
            (Ok(()), Ok(())) => {}
            (Err(k), Err(e)) => assert_eq!(*k, e.kind(), "{op:?}: wrong error kind: {e}"),
            _ => panic!("{op:?}: model expected {expect:?}, index gave {got:?}"),
        }
        self.check();
    }

    fn check(&self) {
        let live: Vec<(u8, &M)> = self
            .model
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i as u8, m.as_ref()?)))
            .collect();
        assert_eq!(self.ix.len(), live.len());
        // the allocator agrees with the slots the model holds
        assert_eq!(self.arena.used(), self.held());
        assert_eq!(
            self.arena.used() + self.arena.free_slots(),
            self.arena.capacity()
        );
        let mut seen = HashMap::new();
        for &(k, m) in &live {
            let e = self.ix.get(&key(k)).expect("model entry is indexed");
            assert_eq!(e.state, m.st.real(), "key {k}");
            assert_eq!(e.host.map(|s| s.0), m.slot, "key {k}");
            assert_eq!(e.pins, m.pins, "key {k}");
            assert_eq!(e.last_access, m.last, "key {k}");
            assert_eq!((e.session, e.seq), (9, m.seq));
            assert_eq!(e.on_nvme, matches!(m.st, S::Both | S::Nvme | S::Promoting));
            if m.pins > 0 {
                assert_eq!(
                    m.slot, m.pinned_slot,
                    "key {k}: a pinned block lost its slot"
                );
            }
            if let Some(s) = m.slot {
                assert!(seen.insert(s, k).is_none(), "slot {s} held by two blocks");
                assert!(self.arena.is_allocated(SlotId(s)));
                assert_eq!(self.ix.slot_owner(SlotId(s)), Some(key(k)));
                let r = self.arena.slot(SlotId(s)).unwrap();
                assert_eq!(r[..8], m.tag.to_le_bytes(), "slot {s} overwritten");
                assert_eq!(r[4088..], m.tag.to_le_bytes(), "slot {s} overwritten");
            }
        }
        for st in BlockState::ALL {
            let n = live.iter().filter(|(_, m)| m.st.real() == st).count();
            assert_eq!(self.ix.count(st), n, "count of {st}");
        }
        assert_eq!(self.ix.counts().host_slots(), self.held());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn index_and_allocator_match_the_model(ops in prop::collection::vec(op(), 1..150)) {
        let mut h = Harness::new();
        for op in ops {
            h.apply(op);
        }
    }
}

/// A fixed sequence that walks every legal transition once, so a regression
/// shows up even if the random search is unlucky.
#[test]
fn every_transition_once() {
    let mut h = Harness::new();
    for op in [
        Op::Save(0),
        Op::FinishSave(0, true),
        Op::Pin(0, 0),
        Op::Demote(0),
        Op::FinishDemote(0, false),
        Op::Demote(0),
        Op::FinishDemote(0, true),
        Op::Release(0),
        Op::Unpin(0),
        Op::Release(0),
        Op::Promote(0),
        Op::FinishPromote(0, false),
        Op::Promote(0),
        Op::FinishPromote(0, true),
        Op::ForgetNvme(0),
        Op::Remove(0),
        Op::Save(1),
        Op::FinishSave(1, false),
        Op::InsertNvme(2),
        Op::Remove(2),
        Op::Save(1),
        Op::Save(2),
        Op::Save(3),
        Op::Save(4),
        Op::Save(5),
        Op::FreeAFreeSlot(0),
        Op::Victims(3),
    ] {
        h.apply(op);
    }
    assert!(h
        .model
        .iter()
        .all(|m| m.is_none() || m.as_ref().unwrap().st == S::Saving));
    assert_eq!(h.arena.used(), SLOTS);
}

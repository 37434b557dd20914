//! The slot table of a file-backed host arena: which block each slot holds,
//! kept beside the arena file so that a restarted worker (and the scheduler
//! of a restarted engine) finds what it parked in host memory.
//!
//! File `<arena file>.slots`, mode 0600, never a symlink:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVPSLOT1` |
//! | 8 | 8 | slot bytes (u64 LE) |
//! | 16 | 8 | slots (u64 LE) |
//! | 24 | 8 | block bytes (u64 LE): the KV geometry's record size |
//! | 32 | 32 | zero |
//! | 64 + 64·i | 64 | entry of slot i |
//!
//! Entry: `state` u32 (0 empty, 1 valid) · `seq` u32 · `session` u64 · key
//! 32 bytes · `data_crc` u32 (crc32c of the block's bytes in the slot) ·
//! `entry_crc` u32 (crc32c of bytes 4..56 of the entry) · 4 bytes zero.
//!
//! Ordering (a worker that dies at any instruction leaves no entry that
//! names wrong bytes): an entry is written, then made valid with a release
//! store of `state`, only after the slot's bytes are complete; it is made
//! empty (release store) before the slot is freed, so before its bytes can
//! change. Readers load `state` with acquire and check `entry_crc` (a torn
//! or half-written entry is skipped) and, when recovering the worker,
//! `data_crc` against the slot's bytes. The table describes the arena only
//! while the worker that owns the arena's lock runs; a reader that is not
//! that worker (the scheduler at start) takes what it reads as a hint the
//! worker confirms (a block the worker lacks is a failed load, recomputed).

use crate::block::BlockKey;
use crate::error::{Error, Result};
use memmap2::MmapMut;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

const MAGIC: &[u8; 8] = b"KVPSLOT1";
const HEADER: usize = 64;
const ENTRY: usize = 64;
const EMPTY: u32 = 0;
const VALID: u32 = 1;

/// The table file of the arena file `arena`.
pub fn table_path(arena: &Path) -> PathBuf {
    let mut s = arena.as_os_str().to_owned();
    s.push(".slots");
    PathBuf::from(s)
}

/// Bytes of a table of `slots` slots; `None` when that overflows.
fn table_len_u64(slots: u64) -> Option<u64> {
    slots.checked_mul(ENTRY as u64)?.checked_add(HEADER as u64)
}

/// One valid entry: the block a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotEntry {
    /// Slot index in the arena.
    pub slot: u32,
    /// Block key.
    pub key: BlockKey,
    /// Session the block belongs to.
    pub session: u64,
    /// Position of the block in its session's chain.
    pub seq: u32,
    /// crc32c of the block's bytes.
    pub data_crc: u32,
}

/// A mapped slot table (see the module docs).
pub struct SlotTable {
    map: MmapMut,
    slots: usize,
}

fn ctx(path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| e.context(format!("host slot table {}", path.display()))
}

fn entry_crc(e: &[u8]) -> u32 {
    crc32c::crc32c(&e[4..56])
}

impl SlotTable {
    /// Opens (or creates) the table for an arena of `slots` slots of
    /// `slot_bytes` holding blocks of `block_bytes`. A table written for
    /// other sizes (or not a table at all) is reset: every slot empty.
    /// Returns the table and whether it was kept (its entries still apply).
    pub fn open(
        path: &Path,
        slot_bytes: usize,
        slots: usize,
        block_bytes: usize,
    ) -> Result<(SlotTable, bool)> {
        let c = ctx(path);
        let file = crate::tier::host::open_private(path).map_err(&c)?;
        let meta = file.metadata().map_err(|e| c(e.into()))?;
        let len = table_len_u64(slots as u64)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| {
                c(Error::invalid(format!(
                    "{slots} slots: the table size overflows"
                )))
            })?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&(slot_bytes as u64).to_le_bytes());
        header[16..24].copy_from_slice(&(slots as u64).to_le_bytes());
        header[24..32].copy_from_slice(&(block_bytes as u64).to_le_bytes());
        let same_len = meta.len() == len as u64;
        if !same_len {
            file.set_len(0).map_err(|e| c(e.into()))?;
            file.set_len(len as u64).map_err(|e| c(e.into()))?;
        }
        // SAFETY: the file is ours (checked above) and sized to `len`; the
        // arena's lock keeps a second worker from mapping it for writing.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| c(e.into()))?;
        let kept = same_len && map[..HEADER] == header;
        if !kept {
            map[HEADER..].fill(0);
            map[..HEADER].copy_from_slice(&header);
        }
        Ok((SlotTable { map, slots }, kept))
    }

    fn state(&self, slot: usize) -> &AtomicU32 {
        let off = HEADER + slot * ENTRY;
        // SAFETY: the entry lies inside the mapping, is 4-aligned (page-aligned
        // base, 64-byte entries) and is only accessed atomically through here.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU32) }
    }

    /// Marks `slot` as holding `e` (its bytes must already be complete).
    pub fn set(&mut self, slot: u32, key: &BlockKey, session: u64, seq: u32, data_crc: u32) {
        let s = slot as usize;
        if s >= self.slots {
            return;
        }
        self.state(s).store(EMPTY, Ordering::Release);
        let off = HEADER + s * ENTRY;
        let e = &mut self.map[off..off + ENTRY];
        e[4..8].copy_from_slice(&seq.to_le_bytes());
        e[8..16].copy_from_slice(&session.to_le_bytes());
        e[16..48].copy_from_slice(&key.0);
        e[48..52].copy_from_slice(&data_crc.to_le_bytes());
        e[52..56].fill(0);
        let crc = entry_crc(e);
        e[52..56].copy_from_slice(&crc.to_le_bytes());
        self.state(s).store(VALID, Ordering::Release);
    }

    /// Marks `slot` empty (before its bytes may change).
    pub fn clear(&mut self, slot: u32) {
        if (slot as usize) < self.slots {
            self.state(slot as usize).store(EMPTY, Ordering::Release);
        }
    }

    /// The valid entries (torn ones skipped).
    pub fn entries(&self) -> Vec<SlotEntry> {
        (0..self.slots).filter_map(|s| self.entry(s)).collect()
    }

    fn entry(&self, s: usize) -> Option<SlotEntry> {
        if self.state(s).load(Ordering::Acquire) != VALID {
            return None;
        }
        let off = HEADER + s * ENTRY;
        let mut copy = [0u8; ENTRY];
        copy.copy_from_slice(&self.map[off..off + ENTRY]);
        parse_entry(s, copy)
    }
}

/// A valid, untorn entry of slot `s` (a copy of its 64 bytes).
fn parse_entry(s: usize, mut e: [u8; ENTRY]) -> Option<SlotEntry> {
    let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    if le32(&e[..4]) != VALID {
        return None;
    }
    let want = le32(&e[52..56]);
    e[52..56].fill(0);
    if entry_crc(&e) != want {
        return None;
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&e[16..48]);
    Some(SlotEntry {
        slot: s as u32,
        key: BlockKey(key),
        session: u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
        seq: le32(&e[4..8]),
        data_crc: le32(&e[48..52]),
    })
}

/// Reads the table of `arena` without changing it (the scheduler at start):
/// the block bytes it was written for and its valid entries; `None` when
/// there is no table (or the file is not one, or its length does not match
/// the slot count its header gives). A header whose slot count makes the
/// table size overflow is a [`Corrupt`](crate::ErrorKind::Corrupt) error; a
/// path that is not a regular file (a FIFO, a symlink) is refused at once.
pub fn read_entries(arena: &Path) -> Result<Option<(u64, Vec<SlotEntry>)>> {
    let path = table_path(arena);
    let c = ctx(&path);
    // Never blocks (a FIFO at the path is refused at once), never follows a symlink.
    let file = match crate::tier::open_regular(OpenOptions::new().read(true), 0, &path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(c(Error::invalid(
                "is a symbolic link; refusing to follow it",
            )))
        }
        Err(e) => return Err(c(e.into())),
    };
    let file_len = file.metadata().map_err(|e| c(e.into()))?.len();
    let mut header = [0u8; HEADER];
    if file_len < HEADER as u64 {
        return Ok(None);
    }
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut header, 0)
            .map_err(|e| c(e.into()))?;
    }
    if &header[..8] != MAGIC {
        return Ok(None);
    }
    let slots = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    let block_bytes = u64::from_le_bytes(header[24..32].try_into().expect("8 bytes"));
    let want = table_len_u64(slots).ok_or_else(|| {
        c(Error::corrupt(format!(
            "header claims {slots} slots: the table size overflows"
        )))
    })?;
    if file_len != want {
        // A table for another arena size, or one being rewritten.
        return Ok(None);
    }
    // The whole table is now known to be `want` bytes, and it is in memory
    // already (mapped by the worker), so reading it is bounded.
    let len = usize::try_from(want).map_err(|_| {
        c(Error::corrupt(format!(
            "header claims {slots} slots: too large"
        )))
    })?;
    let slots = (want as usize - HEADER) / ENTRY;
    let mut bytes = vec![0u8; len];
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut bytes, 0).map_err(|e| c(e.into()))?;
    }
    let entries = (0..slots)
        .filter_map(|s| {
            let off = HEADER + s * ENTRY;
            parse_entry(s, bytes[off..off + ENTRY].try_into().expect("64 bytes"))
        })
        .collect();
    Ok(Some((block_bytes, entries)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> BlockKey {
        BlockKey::derive(b"t", &i.to_le_bytes())
    }

    #[test]
    fn entries_survive_reopen_and_other_sizes_reset() {
        let d = tempfile::tempdir().unwrap();
        let arena = d.path().join("arena");
        let p = table_path(&arena);
        let (mut t, kept) = SlotTable::open(&p, 8192, 4, 8000).unwrap();
        assert!(!kept);
        t.set(1, &key(1), 7, 3, 0xdead);
        t.set(3, &key(3), 8, 0, 0xbeef);
        t.set(2, &key(2), 9, 1, 1);
        t.clear(2);
        drop(t);
        let want = vec![
            SlotEntry {
                slot: 1,
                key: key(1),
                session: 7,
                seq: 3,
                data_crc: 0xdead,
            },
            SlotEntry {
                slot: 3,
                key: key(3),
                session: 8,
                seq: 0,
                data_crc: 0xbeef,
            },
        ];
        assert_eq!(read_entries(&arena).unwrap(), Some((8000, want.clone())));
        assert_eq!(read_entries(&d.path().join("no-such-arena")).unwrap(), None);
        let (t, kept) = SlotTable::open(&p, 8192, 4, 8000).unwrap();
        assert!(kept);
        assert_eq!(t.entries(), want);
        drop(t);
        // Another geometry: reset, nothing survives.
        let (t, kept) = SlotTable::open(&p, 8192, 4, 4000).unwrap();
        assert!(!kept);
        assert!(t.entries().is_empty());
    }

    #[test]
    fn a_torn_entry_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        let arena = d.path().join("arena");
        let p = table_path(&arena);
        let (mut t, _) = SlotTable::open(&p, 4096, 2, 4096).unwrap();
        t.set(0, &key(0), 1, 0, 5);
        t.set(1, &key(1), 1, 1, 6);
        drop(t);
        // Flip one byte of entry 1's key: its entry crc no longer matches.
        let mut b = std::fs::read(&p).unwrap();
        b[HEADER + ENTRY + 20] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let (_, got) = read_entries(&arena).unwrap().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].key, key(0));
    }
}

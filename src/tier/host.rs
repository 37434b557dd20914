//! Host tier: one arena of fixed-size slots, mapped once.
//!
//! A [`HostArena`] is a single region of `slots * slot_bytes` bytes mapped at
//! construction — anonymous memory, or a file in shared memory
//! ([`HostArena::open_shared`]) that a restarted worker maps again and finds
//! byte for byte as it was. Nothing is allocated on the heap after
//! construction: [`HostArena::alloc`] and [`HostArena::free`] pop and push a
//! preallocated free stack, O(1), under a short lock.
//!
//! ## Invariants
//!
//! - Slot `i` covers `[base + i * slot_bytes, base + (i + 1) * slot_bytes)`;
//!   `slot_bytes` is a multiple of [`SLOT_ALIGN`] (4 KiB), so every slot is
//!   page-aligned and the slots of the arena are contiguous.
//! - A slot is either **free** (on the free stack) or **allocated** (held by
//!   exactly one owner, normally a block of the [`crate::index`]); `used() +
//!   free == capacity()` at every moment. Freeing a free slot is an error,
//!   never a second push.
//! - Bytes are reached through borrow guards: any number of [`SlotRef`]s or
//!   one [`SlotMut`] per allocated slot at a time, checked with one atomic
//!   per slot (like a `RefCell` per slot, but `Sync`). Different slots are
//!   independent: the mover may gather into one slot on one thread while
//!   other threads read other slots. A slot cannot be freed while borrowed.
//!   The unchecked accessors ([`HostArena::slot_unchecked`],
//!   [`HostArena::slot_mut_unchecked`], [`HostArena::slot_ptr`]) exist for
//!   DMA and for callers that hold exclusivity through the block index
//!   states; their contract is in their `# Safety` sections.
//! - The memory is ordinary write-back memory, never write-combined: the CPU
//!   reads it back to compress and checksum.
//!
//! ## Pinning
//!
//! Page-locking (`cudaHostRegister`) a large arena takes seconds, so it is
//! done in chunks through a [`PinHook`], typically from a background thread
//! while the arena is already in use. The arena records which chunks are
//! pinned ([`HostArena::pinned_bytes`]) and unpins them when dropped.
//! [`NoPin`] pins nothing (no device); [`MlockPin`] page-locks with `mlock`.

use crate::error::{Error, ErrorKind, Result};
use crate::units::fmt_bytes;
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

/// Slot alignment and size granularity: one 4 KiB page.
pub const SLOT_ALIGN: usize = 4096;

/// Index of a slot in a [`HostArena`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct SlotId(pub u32);

impl SlotId {
    /// The slot number as an index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Page-locks (and unlocks) ranges of the arena for fast device DMA.
///
/// Implementations are called with page-aligned ranges inside the arena and
/// must not call back into [`HostArena::pin_with`] or
/// [`HostArena::unpin_all`] (the arena holds its pinning lock meanwhile).
pub trait PinHook: Send + Sync {
    /// Pins `[addr, addr + len)`.
    fn pin(&self, addr: *mut u8, len: usize) -> Result<()>;
    /// Unpins a range earlier passed to [`PinHook::pin`].
    fn unpin(&self, addr: *mut u8, len: usize) -> Result<()>;
}

/// A hook that pins nothing: for hosts without a device. The arena still
/// records the chunks as registered, so `pinned_bytes()` reports them.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPin;

impl PinHook for NoPin {
    fn pin(&self, _addr: *mut u8, _len: usize) -> Result<()> {
        Ok(())
    }
    fn unpin(&self, _addr: *mut u8, _len: usize) -> Result<()> {
        Ok(())
    }
}

/// A hook that page-locks with `mlock(2)` (bounded by `RLIMIT_MEMLOCK`).
#[derive(Clone, Copy, Debug, Default)]
pub struct MlockPin;

impl PinHook for MlockPin {
    fn pin(&self, addr: *mut u8, len: usize) -> Result<()> {
        // SAFETY: mlock only changes page residency of a range we own.
        if unsafe { libc::mlock(addr as *const libc::c_void, len) } != 0 {
            return Err(
                Error::from(std::io::Error::last_os_error()).context(format!(
                    "mlock of {} (see ulimit -l)",
                    fmt_bytes(len as u64)
                )),
            );
        }
        Ok(())
    }
    fn unpin(&self, addr: *mut u8, len: usize) -> Result<()> {
        // SAFETY: as above.
        if unsafe { libc::munlock(addr as *const libc::c_void, len) } != 0 {
            return Err(Error::from(std::io::Error::last_os_error()).context("munlock"));
        }
        Ok(())
    }
}

/// How the arena's memory is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaOptions {
    /// Fault every page in at construction (`MAP_POPULATE`): slower start,
    /// no page faults on the first save.
    pub populate: bool,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`), best effort.
    pub huge_pages: bool,
}

impl Default for ArenaOptions {
    fn default() -> Self {
        ArenaOptions {
            populate: false,
            huge_pages: true,
        }
    }
}

/// Slot bit: the slot is allocated.
const ALLOCATED: u32 = 1 << 31;
/// Slot bit: a [`SlotMut`] exists.
const WRITER: u32 = 1 << 30;
/// Slot bits: number of live [`SlotRef`]s.
const READERS: u32 = WRITER - 1;
/// `FreeList::pos` of an allocated slot.
const NOT_FREE: u32 = u32::MAX;

/// Free stack plus each slot's position in it (for O(1) [`HostArena::claim`]).
struct FreeList {
    stack: Vec<u32>,
    pos: Vec<u32>,
}

impl FreeList {
    fn new(slots: u32) -> Self {
        // Reverse order so that a fresh arena hands out 0, 1, 2, ...
        let stack: Vec<u32> = (0..slots).rev().collect();
        let mut pos = vec![0u32; slots as usize];
        for (i, &s) in stack.iter().enumerate() {
            pos[s as usize] = i as u32;
        }
        FreeList { stack, pos }
    }

    fn pop(&mut self) -> Option<u32> {
        let s = self.stack.pop()?;
        self.pos[s as usize] = NOT_FREE;
        Some(s)
    }

    fn push(&mut self, s: u32) {
        debug_assert_eq!(self.pos[s as usize], NOT_FREE);
        // Never reallocates: the stack was created with room for every slot.
        self.pos[s as usize] = self.stack.len() as u32;
        self.stack.push(s);
    }

    fn take(&mut self, s: u32) -> bool {
        let p = self.pos[s as usize];
        if p == NOT_FREE {
            return false;
        }
        let last = *self.stack.last().expect("a free slot is on the stack");
        self.stack.swap_remove(p as usize);
        if last != s {
            self.pos[last as usize] = p;
        }
        self.pos[s as usize] = NOT_FREE;
        true
    }
}

/// An owned `mmap` region, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize, fd: Option<&File>, opts: ArenaOptions) -> Result<Self> {
        let mut flags = match fd {
            Some(_) => libc::MAP_SHARED,
            None => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        };
        if opts.populate {
            flags |= libc::MAP_POPULATE;
        }
        let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping at an address of the kernel's choosing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            let kind = match e.raw_os_error() {
                Some(libc::ENOMEM) => ErrorKind::NoSpace,
                _ => ErrorKind::Io,
            };
            return Err(Error::new(
                kind,
                format!("mmap of a {} host arena: {e}", fmt_bytes(len as u64)),
            ));
        }
        if opts.huge_pages {
            // SAFETY: advice on our own mapping; failure is harmless.
            unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        }
        Ok(Mapping {
            ptr: NonNull::new(p as *mut u8).expect("mmap never returns NULL on success"),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`; no borrow of it
        // outlives the arena (guards borrow the arena).
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

enum Backing {
    Anonymous,
    Shared {
        path: PathBuf,
        /// Held open (with its `flock`) for the arena's lifetime.
        _file: File,
        reopened: bool,
    },
}

struct PinState {
    chunk_bytes: usize,
    pinned: Vec<bool>,
    hook: Option<Arc<dyn PinHook>>,
}

/// One mapped region of fixed-size, page-aligned slots. See the module docs.
pub struct HostArena {
    map: Mapping,
    slot_bytes: usize,
    slots: u32,
    state: Box<[AtomicU32]>,
    free: Mutex<FreeList>,
    used: AtomicUsize,
    backing: Backing,
    pin: Mutex<PinState>,
    pinned_bytes: AtomicUsize,
}

// SAFETY: the mapping is owned by the arena; its bytes are only reached
// through the per-slot borrow flags (or unsafe accessors whose contract
// requires the same exclusivity), and all bookkeeping is atomics or locks.
unsafe impl Send for HostArena {}
// SAFETY: as above.
unsafe impl Sync for HostArena {}

fn round_slot(slot_bytes: usize) -> Result<usize> {
    if slot_bytes == 0 {
        return Err(Error::invalid("host arena: slot size must be > 0"));
    }
    slot_bytes
        .checked_next_multiple_of(SLOT_ALIGN)
        .ok_or_else(|| Error::invalid(format!("host arena: slot size {slot_bytes} is too large")))
}

fn geometry(slot_bytes: usize, slots: usize) -> Result<(usize, u32, usize)> {
    let sb = round_slot(slot_bytes)?;
    if slots == 0 {
        return Err(Error::invalid("host arena: slot count must be > 0"));
    }
    let n = u32::try_from(slots)
        .ok()
        .filter(|&n| n < NOT_FREE)
        .ok_or_else(|| Error::invalid(format!("host arena: {slots} slots is too many")))?;
    let len = sb.checked_mul(slots).ok_or_else(|| {
        Error::invalid(format!(
            "host arena: {slots} slots of {sb} bytes overflow the address space"
        ))
    })?;
    Ok((sb, n, len))
}

/// Opens (creating with mode 0600) a read-write file that must be a
/// regular file of this process's user, never through a symbolic link;
/// group/other permission bits are removed. The host arena file and its
/// slot table are opened this way.
pub(crate) fn open_private(path: &Path) -> Result<File> {
    let file = crate::tier::open_regular(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600),
        0,
        path,
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            Error::invalid("is a symbolic link; refusing to follow it")
        } else {
            Error::from(e)
        }
    })?;
    let meta = file.metadata()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(Error::invalid(format!(
            "owned by uid {}, not by this process (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// How many slots of `slot_bytes` (rounded up to 4 KiB) fit in
/// `total_bytes`: (rounded slot bytes, slots); none is a config error.
fn slots_in(total_bytes: u64, slot_bytes: usize) -> Result<(usize, usize)> {
    let sb = round_slot(slot_bytes)?;
    let slots = total_bytes / sb as u64;
    if slots == 0 {
        return Err(Error::config(format!(
            "host arena of {} cannot hold one slot of {} (a block rounded up to 4 KiB)",
            fmt_bytes(total_bytes),
            fmt_bytes(sb as u64)
        )));
    }
    let slots = usize::try_from(slots)
        .map_err(|_| Error::config(format!("host arena of {total_bytes} bytes is too large")))?;
    Ok((sb, slots))
}

impl HostArena {
    /// Maps an anonymous arena of `slots` slots of `slot_bytes` (rounded up to
    /// 4 KiB) with default options.
    pub fn new(slot_bytes: usize, slots: usize) -> Result<Self> {
        Self::with_options(slot_bytes, slots, ArenaOptions::default())
    }

    /// Maps an anonymous arena with explicit options.
    pub fn with_options(slot_bytes: usize, slots: usize, opts: ArenaOptions) -> Result<Self> {
        let (sb, n, len) = geometry(slot_bytes, slots)?;
        let map = Mapping::new(len, None, opts)?;
        Ok(Self::assemble(map, sb, n, Backing::Anonymous))
    }

    /// An anonymous arena holding as many slots of `slot_bytes` as fit in
    /// `total_bytes` (sizes as they come from config).
    pub fn from_bytes(total_bytes: u64, slot_bytes: usize) -> Result<Self> {
        let (sb, slots) = slots_in(total_bytes, slot_bytes)?;
        Self::new(sb, slots)
    }

    /// [`HostArena::open_shared`] with as many slots of `slot_bytes` as fit
    /// in `total_bytes` (sizes as they come from config).
    pub fn open_shared_bytes(
        path: impl AsRef<Path>,
        total_bytes: u64,
        slot_bytes: usize,
    ) -> Result<Self> {
        let (sb, slots) = slots_in(total_bytes, slot_bytes)?;
        Self::open_shared(path, sb, slots)
    }

    /// Creates, or reopens, an arena backed by the file at `path` (for example
    /// under `/dev/shm`), so that a restarted worker maps the same bytes again.
    ///
    /// The file is created with mode 0600; a symbolic link at `path` is
    /// refused (`O_NOFOLLOW`), as are non-regular files, files of another
    /// user and an existing file whose size differs from the requested
    /// arena. The file is `flock`ed: a second live arena on the same file is
    /// refused with [`ErrorKind::Busy`]. Space is reserved up front, so a
    /// full tmpfs is a [`ErrorKind::NoSpace`] error here instead of a
    /// `SIGBUS` later. All slots start free: which slot holds what is
    /// recovered by the caller, which then [`HostArena::claim`]s them.
    pub fn open_shared(path: impl AsRef<Path>, slot_bytes: usize, slots: usize) -> Result<Self> {
        Self::open_shared_with(path, slot_bytes, slots, ArenaOptions::default())
    }

    /// [`HostArena::open_shared`] with explicit options.
    pub fn open_shared_with(
        path: impl AsRef<Path>,
        slot_bytes: usize,
        slots: usize,
        opts: ArenaOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let (sb, n, len) = geometry(slot_bytes, slots)?;
        let ctx = |e: Error| e.context(format!("host arena file {}", path.display()));
        let file = open_private(path).map_err(ctx)?;
        let meta = file.metadata().map_err(|e| ctx(e.into()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(ctx(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::new(ErrorKind::Busy, "in use by another live arena")
            } else {
                e.into()
            }));
        }
        let reopened = match meta.len() {
            0 => {
                file.set_len(len as u64).map_err(|e| ctx(e.into()))?;
                // SAFETY: fallocate on a descriptor we own, inside its size.
                let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
                match rc {
                    0 | libc::EOPNOTSUPP | libc::EINVAL => {}
                    e => {
                        let _ = file.set_len(0);
                        return Err(ctx(Error::from(std::io::Error::from_raw_os_error(e))
                            .context(format!("reserving {}", fmt_bytes(len as u64)))));
                    }
                }
                false
            }
            l if l == len as u64 => true,
            l => {
                return Err(ctx(Error::invalid(format!(
                    "holds {l} bytes but this arena needs {len} ({n} slots of {sb}); \
                     refusing to reuse it: remove it or fix the configured sizes"
                ))))
            }
        };
        let map = Mapping::new(len, Some(&file), opts).map_err(ctx)?;
        Ok(Self::assemble(
            map,
            sb,
            n,
            Backing::Shared {
                path: path.to_path_buf(),
                _file: file,
                reopened,
            },
        ))
    }

    fn assemble(map: Mapping, slot_bytes: usize, slots: u32, backing: Backing) -> Self {
        HostArena {
            map,
            slot_bytes,
            slots,
            state: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            free: Mutex::new(FreeList::new(slots)),
            used: AtomicUsize::new(0),
            backing,
            pin: Mutex::new(PinState {
                chunk_bytes: 0,
                pinned: Vec::new(),
                hook: None,
            }),
            pinned_bytes: AtomicUsize::new(0),
        }
    }

    /// Bytes per slot (a multiple of 4 KiB).
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots as usize
    }
    /// Slots currently allocated.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
    /// Slots currently free.
    pub fn free_slots(&self) -> usize {
        self.capacity() - self.used()
    }
    /// First byte of the arena (for device registration).
    pub fn base_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }
    /// Total bytes mapped: `capacity() * slot_bytes()`.
    pub fn len(&self) -> usize {
        self.map.len
    }
    /// Always false: construction refuses an arena without slots.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }
    /// The backing file, for a shared arena.
    pub fn path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Anonymous => None,
            Backing::Shared { path, .. } => Some(path),
        }
    }
    /// Whether a shared arena found its file already there (a warm restart).
    pub fn reopened(&self) -> bool {
        matches!(self.backing, Backing::Shared { reopened: true, .. })
    }

    fn check_id(&self, id: SlotId) -> Result<()> {
        if id.0 >= self.slots {
            return Err(Error::invalid(format!(
                "slot {} out of range (arena has {} slots)",
                id.0, self.slots
            )));
        }
        Ok(())
    }

    /// Takes a free slot. [`ErrorKind::NoSpace`] when every slot is in use.
    pub fn alloc(&self) -> Result<SlotId> {
        let mut f = self.free.lock();
        let Some(s) = f.pop() else {
            return Err(Error::no_space(format!(
                "host arena full: all {} slots of {} ({} total) are in use",
                self.slots,
                fmt_bytes(self.slot_bytes as u64),
                fmt_bytes(self.map.len as u64)
            )));
        };
        self.state[s as usize].store(ALLOCATED, Ordering::Release);
        self.used.fetch_add(1, Ordering::AcqRel);
        Ok(SlotId(s))
    }

    /// Takes one specific free slot (rebuilding the allocation of a reopened
    /// shared arena). [`ErrorKind::Busy`] if it is already allocated.
    pub fn claim(&self, id: SlotId) -> Result<()> {
        self.check_id(id)?;
        let mut f = self.free.lock();
        if !f.take(id.0) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("slot {} is already allocated", id.0),
            ));
        }
        self.state[id.index()].store(ALLOCATED, Ordering::Release);
        self.used.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Returns a slot to the free stack. Freeing a free slot is an
    /// [`ErrorKind::InvalidArgument`] error (a double free), freeing a
    /// borrowed slot is [`ErrorKind::Busy`]; neither changes anything.
    pub fn free(&self, id: SlotId) -> Result<()> {
        self.check_id(id)?;
        let mut f = self.free.lock();
        match self.state[id.index()].compare_exchange(
            ALLOCATED,
            0,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {}
            Err(0) => {
                return Err(Error::invalid(format!(
                    "double free: slot {} is not allocated",
                    id.0
                )))
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("slot {} is borrowed and cannot be freed", id.0),
                ))
            }
        }
        f.push(id.0);
        self.used.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }

    /// Whether `id` is currently allocated.
    pub fn is_allocated(&self, id: SlotId) -> bool {
        id.0 < self.slots && self.state[id.index()].load(Ordering::Acquire) & ALLOCATED != 0
    }

    fn slot_addr(&self, id: SlotId) -> *mut u8 {
        // SAFETY (arithmetic): id < slots, so the offset is inside the mapping.
        unsafe { self.map.ptr.as_ptr().add(id.index() * self.slot_bytes) }
    }

    /// Borrows an allocated slot for reading. [`ErrorKind::Busy`] while a
    /// [`SlotMut`] of it exists; [`ErrorKind::InvalidArgument`] if it is free.
    pub fn slot(&self, id: SlotId) -> Result<SlotRef<'_>> {
        self.check_id(id)?;
        let st = &self.state[id.index()];
        let mut cur = st.load(Ordering::Acquire);
        loop {
            if cur & ALLOCATED == 0 {
                return Err(Error::invalid(format!("slot {} is not allocated", id.0)));
            }
            if cur & WRITER != 0 {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("slot {} is being written", id.0),
                ));
            }
            if cur & READERS == READERS {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("slot {} has too many readers", id.0),
                ));
            }
            match st.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(c) => cur = c,
            }
        }
        // SAFETY: the slot lies in the mapping; the reader count keeps
        // writers and `free` away until the guard drops.
        let bytes = unsafe { std::slice::from_raw_parts(self.slot_addr(id), self.slot_bytes) };
        Ok(SlotRef {
            state: st,
            id,
            bytes,
        })
    }

    /// Borrows an allocated slot for writing. [`ErrorKind::Busy`] while any
    /// other guard of it exists; [`ErrorKind::InvalidArgument`] if it is free.
    pub fn slot_mut(&self, id: SlotId) -> Result<SlotMut<'_>> {
        self.check_id(id)?;
        let st = &self.state[id.index()];
        match st.compare_exchange(
            ALLOCATED,
            ALLOCATED | WRITER,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {}
            Err(c) if c & ALLOCATED == 0 => {
                return Err(Error::invalid(format!("slot {} is not allocated", id.0)))
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("slot {} is already borrowed", id.0),
                ))
            }
        }
        // SAFETY: the slot lies in the mapping; the writer bit excludes every
        // other guard and `free` until this guard drops.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.slot_addr(id), self.slot_bytes) };
        Ok(SlotMut {
            state: st,
            id,
            bytes,
        })
    }

    /// Address of a slot, for device DMA. Checks the id, nothing else.
    ///
    /// Reading or writing through the pointer is subject to the contract of
    /// [`HostArena::slot_mut_unchecked`].
    pub fn slot_ptr(&self, id: SlotId) -> Result<*mut u8> {
        self.check_id(id)?;
        Ok(self.slot_addr(id))
    }

    /// A slot's bytes without the borrow check.
    ///
    /// # Safety
    /// `id < capacity()`, the slot is allocated to the caller, and for the
    /// returned lifetime nobody writes it (no [`SlotMut`], no
    /// `slot_mut_unchecked`, no DMA into it) and nobody frees it.
    pub unsafe fn slot_unchecked(&self, id: SlotId) -> &[u8] {
        std::slice::from_raw_parts(self.slot_addr(id), self.slot_bytes)
    }

    /// A slot's bytes, writable, without the borrow check.
    ///
    /// # Safety
    /// `id < capacity()`, the slot is allocated to the caller, and for the
    /// returned lifetime nobody else reads, writes or frees it (no guard, no
    /// other unchecked borrow, no DMA). The block index's in-flight states
    /// (`Saving`, `Promoting`) are the usual proof of that exclusivity.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut_unchecked(&self, id: SlotId) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.slot_addr(id), self.slot_bytes)
    }

    /// Registers the arena with `hook` in chunks of `chunk_bytes` (rounded up
    /// to 4 KiB), skipping chunks already pinned; returns the bytes pinned
    /// in total. Meant to run on a background thread while the arena is in
    /// use. On a hook error the chunks pinned so far stay recorded (and are
    /// unpinned on drop) and a later call resumes where this one stopped.
    /// Every call must use the same chunk size and, once a chunk is pinned,
    /// the same hook.
    pub fn pin_with(&self, hook: Arc<dyn PinHook>, chunk_bytes: usize) -> Result<usize> {
        if chunk_bytes == 0 {
            return Err(Error::invalid("pin chunk size must be > 0"));
        }
        let chunk = chunk_bytes
            .checked_next_multiple_of(SLOT_ALIGN)
            .ok_or_else(|| Error::invalid("pin chunk size too large"))?
            .min(self.map.len.next_multiple_of(SLOT_ALIGN));
        let mut p = self.pin.lock();
        if p.chunk_bytes == 0 {
            p.chunk_bytes = chunk;
            p.pinned = vec![false; self.map.len.div_ceil(chunk)];
        } else if p.chunk_bytes != chunk {
            return Err(Error::invalid(format!(
                "arena is pinned in chunks of {} bytes; {chunk} requested",
                p.chunk_bytes
            )));
        }
        let any = self.pinned_bytes.load(Ordering::Acquire) > 0;
        match &p.hook {
            Some(h) if any && !Arc::ptr_eq(h, &hook) => {
                return Err(Error::invalid(
                    "arena is partly pinned by another hook; unpin_all first",
                ))
            }
            _ => p.hook = Some(hook.clone()),
        }
        for i in 0..p.pinned.len() {
            if p.pinned[i] {
                continue;
            }
            let off = i * chunk;
            let len = chunk.min(self.map.len - off);
            // SAFETY (arithmetic): off < len of the mapping.
            let addr = unsafe { self.base_ptr().add(off) };
            hook.pin(addr, len).map_err(|e| {
                e.context(format!(
                    "pinning host arena chunk {i} ({} at offset {off})",
                    fmt_bytes(len as u64)
                ))
            })?;
            p.pinned[i] = true;
            self.pinned_bytes.fetch_add(len, Ordering::AcqRel);
        }
        Ok(self.pinned_bytes())
    }

    /// Unpins every pinned chunk. On a hook error the chunk stays recorded as
    /// pinned, the others are still unpinned, and the first error is returned.
    pub fn unpin_all(&self) -> Result<()> {
        let mut p = self.pin.lock();
        let Some(hook) = p.hook.clone() else {
            return Ok(());
        };
        let chunk = p.chunk_bytes;
        let mut first = None;
        for i in 0..p.pinned.len() {
            if !p.pinned[i] {
                continue;
            }
            let off = i * chunk;
            let len = chunk.min(self.map.len - off);
            // SAFETY (arithmetic): off < len of the mapping.
            let addr = unsafe { self.base_ptr().add(off) };
            match hook.unpin(addr, len) {
                Ok(()) => {
                    p.pinned[i] = false;
                    self.pinned_bytes.fetch_sub(len, Ordering::AcqRel);
                }
                Err(e) => {
                    first.get_or_insert(e.context(format!("unpinning chunk {i}")));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Bytes currently registered through [`HostArena::pin_with`].
    pub fn pinned_bytes(&self) -> usize {
        self.pinned_bytes.load(Ordering::Acquire)
    }
}

impl Drop for HostArena {
    fn drop(&mut self) {
        // Unpin before the mapping goes away; nothing to report an error to.
        let _ = self.unpin_all();
    }
}

impl std::fmt::Debug for HostArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostArena")
            .field("slot_bytes", &self.slot_bytes)
            .field("capacity", &self.slots)
            .field("used", &self.used())
            .field("pinned_bytes", &self.pinned_bytes())
            .field("path", &self.path())
            .finish()
    }
}

/// A shared borrow of one slot's bytes; see [`HostArena::slot`].
pub struct SlotRef<'a> {
    state: &'a AtomicU32,
    id: SlotId,
    bytes: &'a [u8],
}

impl SlotRef<'_> {
    /// The borrowed slot.
    pub fn id(&self) -> SlotId {
        self.id
    }
}

impl Deref for SlotRef<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for SlotRef<'_> {
    fn drop(&mut self) {
        self.state.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An exclusive borrow of one slot's bytes; see [`HostArena::slot_mut`].
pub struct SlotMut<'a> {
    state: &'a AtomicU32,
    id: SlotId,
    bytes: &'a mut [u8],
}

impl SlotMut<'_> {
    /// The borrowed slot.
    pub fn id(&self) -> SlotId {
        self.id
    }
}

impl Deref for SlotMut<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl DerefMut for SlotMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}

impl Drop for SlotMut<'_> {
    fn drop(&mut self) {
        self.state.fetch_and(!WRITER, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for SlotRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotRef({}, {} bytes)", self.id.0, self.bytes.len())
    }
}

impl std::fmt::Debug for SlotMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotMut({}, {} bytes)", self.id.0, self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(slot: u32, i: usize) -> u8 {
        (slot as usize * 31 + i * 7 + (i >> 12)) as u8
    }

    #[test]
    fn slot_size_rounds_up_to_pages_and_slots_are_contiguous() {
        let a = HostArena::new(5000, 3).unwrap();
        assert_eq!(a.slot_bytes(), 8192);
        assert_eq!(a.len(), 3 * 8192);
        assert_eq!(a.base_ptr() as usize % SLOT_ALIGN, 0);
        let s: Vec<SlotId> = (0..3).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(s, vec![SlotId(0), SlotId(1), SlotId(2)]);
        assert_eq!(
            a.slot_ptr(SlotId(2)).unwrap() as usize - a.base_ptr() as usize,
            16384
        );
    }

    #[test]
    fn every_slot_keeps_its_own_pattern() {
        let a = HostArena::new(4096 * 2, 16).unwrap();
        let ids: Vec<SlotId> = (0..16).map(|_| a.alloc().unwrap()).collect();
        for &id in &ids {
            let mut w = a.slot_mut(id).unwrap();
            for (i, b) in w.iter_mut().enumerate() {
                *b = pattern(id.0, i);
            }
        }
        for &id in &ids {
            let r = a.slot(id).unwrap();
            assert_eq!(r.len(), 8192);
            assert!(
                r.iter().enumerate().all(|(i, &b)| b == pattern(id.0, i)),
                "slot {id:?}"
            );
        }
    }

    #[test]
    fn full_arena_is_no_space_naming_capacity_and_free_makes_room() {
        let a = HostArena::new(4096, 4).unwrap();
        let ids: Vec<SlotId> = (0..4).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(a.used(), 4);
        let e = a.alloc().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert!(e.message().contains("all 4 slots"), "{e}");
        a.free(ids[2]).unwrap();
        assert_eq!((a.used(), a.free_slots()), (3, 1));
        assert_eq!(a.alloc().unwrap(), ids[2]);
    }

    #[test]
    fn double_free_and_foreign_ids_are_errors_that_change_nothing() {
        let a = HostArena::new(4096, 2).unwrap();
        let s = a.alloc().unwrap();
        a.free(s).unwrap();
        let e = a.free(s).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("double free"), "{e}");
        assert_eq!(a.used(), 0);
        assert_eq!(
            a.free(SlotId(9)).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        // both slots still come back exactly once
        let x = a.alloc().unwrap();
        let y = a.alloc().unwrap();
        assert_ne!(x, y);
        assert_eq!(a.alloc().unwrap_err().kind(), ErrorKind::NoSpace);
    }

    #[test]
    fn borrows_exclude_writers_and_free() {
        let a = HostArena::new(4096, 2).unwrap();
        let s = a.alloc().unwrap();
        let t = a.alloc().unwrap();
        {
            let r1 = a.slot(s).unwrap();
            let _r2 = a.slot(s).unwrap();
            assert_eq!(a.slot_mut(s).unwrap_err().kind(), ErrorKind::Busy);
            assert_eq!(a.free(s).unwrap_err().kind(), ErrorKind::Busy);
            // another slot is independent
            a.slot_mut(t).unwrap()[0] = 9;
            drop(r1);
        }
        {
            let mut w = a.slot_mut(s).unwrap();
            w[0] = 1;
            assert_eq!(a.slot(s).unwrap_err().kind(), ErrorKind::Busy);
        }
        assert_eq!(a.slot(s).unwrap()[0], 1);
        a.free(s).unwrap();
        assert_eq!(a.slot(s).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn claim_takes_a_specific_slot_once() {
        let a = HostArena::new(4096, 4).unwrap();
        a.claim(SlotId(2)).unwrap();
        assert_eq!(a.claim(SlotId(2)).unwrap_err().kind(), ErrorKind::Busy);
        let mut got: Vec<u32> = (0..3).map(|_| a.alloc().unwrap().0).collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 3]);
        assert_eq!(a.alloc().unwrap_err().kind(), ErrorKind::NoSpace);
    }

    #[test]
    fn from_bytes_fits_whole_slots() {
        let a = HostArena::from_bytes(10 * 4096 + 100, 4096).unwrap();
        assert_eq!(a.capacity(), 10);
        let e = HostArena::from_bytes(1000, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(HostArena::new(0, 4).is_err());
        assert!(HostArena::new(4096, 0).is_err());
        assert!(HostArena::new(usize::MAX / 2, 4).is_err());
    }

    #[test]
    fn shared_file_survives_reopen_byte_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arena");
        {
            let a = HostArena::open_shared(&path, 4096 * 3, 5).unwrap();
            assert!(!a.reopened());
            for i in 0..5 {
                let id = a.alloc().unwrap();
                let mut w = a.slot_mut(id).unwrap();
                for (j, b) in w.iter_mut().enumerate() {
                    *b = pattern(i, j);
                }
            }
            // a second live arena on the same file is refused
            let e = HostArena::open_shared(&path, 4096 * 3, 5).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
        }
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let a = HostArena::open_shared(&path, 4096 * 3, 5).unwrap();
        assert!(a.reopened());
        assert_eq!(a.used(), 0, "allocation state is rebuilt by the caller");
        for i in 0..5 {
            a.claim(SlotId(i)).unwrap();
            let r = a.slot(SlotId(i)).unwrap();
            assert!(
                r.iter().enumerate().all(|(j, &b)| b == pattern(i, j)),
                "slot {i}"
            );
        }
        drop(a);
        let e = HostArena::open_shared(&path, 4096, 5).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("refusing to reuse"), "{e}");
    }

    #[test]
    fn shared_file_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = HostArena::open_shared(&link, 4096, 2).unwrap_err();
        assert!(e.message().contains("symbolic link"), "{e}");
        assert_eq!(
            std::fs::metadata(&target).unwrap().len(),
            0,
            "target untouched"
        );
    }

    /// Records every call so the chunking can be checked; fails once at
    /// pin call number `fail_at`.
    struct Recorder {
        calls: Mutex<Vec<(bool, usize, usize)>>,
        fail_at: AtomicUsize,
    }

    impl Recorder {
        fn new(fail_at: usize) -> Arc<Self> {
            Arc::new(Recorder {
                calls: Mutex::new(Vec::new()),
                fail_at: AtomicUsize::new(fail_at),
            })
        }
    }

    impl PinHook for Recorder {
        fn pin(&self, addr: *mut u8, len: usize) -> Result<()> {
            let mut c = self.calls.lock();
            if self.fail_at.load(Ordering::Relaxed) == c.len() {
                self.fail_at.store(usize::MAX, Ordering::Relaxed);
                return Err(Error::cuda("injected pin failure"));
            }
            c.push((true, addr as usize, len));
            Ok(())
        }
        fn unpin(&self, addr: *mut u8, len: usize) -> Result<()> {
            self.calls.lock().push((false, addr as usize, len));
            Ok(())
        }
    }

    #[test]
    fn pinning_goes_in_chunks_resumes_after_failure_and_unpins_on_drop() {
        let a = HostArena::new(4096, 10).unwrap();
        let base = a.base_ptr() as usize;
        let rec = Recorder::new(1);
        let e = a.pin_with(rec.clone(), 16384).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cuda);
        assert_eq!(a.pinned_bytes(), 16384);
        let other = Recorder::new(usize::MAX);
        assert!(
            a.pin_with(other, 16384).is_err(),
            "another hook while partly pinned"
        );
        let e = a.pin_with(rec.clone(), 8192).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "chunk size changed");
        // resuming pins only what is missing; the last chunk is short
        assert_eq!(a.pin_with(rec.clone(), 16384).unwrap(), 40960);
        assert_eq!(a.pinned_bytes(), a.len());
        assert_eq!(
            *rec.calls.lock(),
            vec![
                (true, base, 16384),
                (true, base + 16384, 16384),
                (true, base + 32768, 8192)
            ]
        );
        drop(a);
        let calls = rec.calls.lock();
        let mut unpins: Vec<_> = calls[3..].to_vec();
        unpins.sort();
        assert_eq!(
            unpins,
            vec![
                (false, base, 16384),
                (false, base + 16384, 16384),
                (false, base + 32768, 8192)
            ],
            "every pinned chunk is unpinned on drop"
        );
    }

    #[test]
    fn no_pin_reports_registered_bytes() {
        let a = HostArena::new(4096, 3).unwrap();
        assert_eq!(a.pinned_bytes(), 0);
        assert_eq!(a.pin_with(Arc::new(NoPin), 1 << 20).unwrap(), 3 * 4096);
        assert_eq!(a.pinned_bytes(), a.len());
    }

    #[test]
    fn concurrent_alloc_free_hands_out_each_slot_once() {
        let a = Arc::new(HostArena::new(4096, 64).unwrap());
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for round in 0..500u32 {
                        let mut held = Vec::new();
                        for _ in 0..8 {
                            if let Ok(s) = a.alloc() {
                                let mut w = a.slot_mut(s).unwrap();
                                w[..4].copy_from_slice(&round.to_le_bytes());
                                w[4] = t;
                                drop(w);
                                held.push(s);
                            }
                        }
                        for s in held {
                            let r = a.slot(s).unwrap();
                            assert_eq!(r[..4], round.to_le_bytes());
                            assert_eq!(r[4], t, "slot {s:?} was handed out twice");
                            drop(r);
                            a.free(s).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(a.used(), 0);
    }
}

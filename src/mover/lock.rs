//! The mover's mutexes, each with its place in the lock order (see the
//! module docs of `src/mover/mod.rs`).
//!
//! In debug builds every thread keeps the levels of the [`Ordered`] locks
//! it holds, and taking one whose level is not above all of them panics
//! before it waits: a nesting against the documented order fails the first
//! test that runs it, rather than deadlocking a rare run. Release builds
//! keep no record; an [`Ordered`] is then a plain mutex.

use parking_lot::{Mutex, MutexGuard};
use std::ops::{Deref, DerefMut};

/// A lock's place in the order: a thread holding a lock may take only
/// locks of a higher level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Level {
    /// `Registered::index`.
    Index = 1,
    /// `Registered::slots` (the slot table of a file-backed arena).
    Slots,
    /// `Registered::report`.
    Report,
    /// `Registered::writes`.
    Writes,
    /// `Registered::deferred`.
    Deferred,
    /// `Registered::nvme_paused_until`.
    PausedUntil,
}

/// A mutex at a [`Level`] of the lock order.
pub(super) struct Ordered<T> {
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    level: Level,
    m: Mutex<T>,
}

/// The guard of an [`Ordered`] lock.
pub(super) struct OrderedGuard<'a, T> {
    g: MutexGuard<'a, T>,
    #[cfg(debug_assertions)]
    level: Level,
}

impl<T> Ordered<T> {
    pub(super) fn new(level: Level, value: T) -> Self {
        Ordered {
            level,
            m: Mutex::new(value),
        }
    }

    /// Locks; in debug builds, panics first when this thread holds a lock
    /// of this level or a higher one.
    pub(super) fn lock(&self) -> OrderedGuard<'_, T> {
        #[cfg(debug_assertions)]
        held::acquire(self.level);
        OrderedGuard {
            g: self.m.lock(),
            #[cfg(debug_assertions)]
            level: self.level,
        }
    }
}

impl<T> Deref for OrderedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.g
    }
}

impl<T> DerefMut for OrderedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.g
    }
}

#[cfg(debug_assertions)]
impl<T> Drop for OrderedGuard<'_, T> {
    fn drop(&mut self) {
        held::release(self.level);
    }
}

#[cfg(debug_assertions)]
mod held {
    use super::Level;
    use std::cell::RefCell;

    thread_local! {
        /// Levels of the locks this thread holds, in the order taken.
        static HELD: RefCell<Vec<Level>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn acquire(level: Level) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(top) = h.iter().max() {
                assert!(
                    *top < level,
                    "mover lock order: {level:?} taken while holding {:?} \
                     (see src/mover/mod.rs)",
                    *h
                );
            }
            h.push(level);
        });
    }

    /// Guards may drop in any order: forgets the last `level` taken.
    pub(super) fn release(level: Level) {
        // `try_with`: a guard dropped while the thread's locals are torn
        // down has nothing left to update.
        let _ = HELD.try_with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|l| *l == level) {
                h.remove(i);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_nest_in_level_order_and_drop_in_any_order() {
        let index = Ordered::new(Level::Index, 0u32);
        let report = Ordered::new(Level::Report, 0u32);
        let writes = Ordered::new(Level::Writes, 0u32);
        let i = index.lock();
        let mut r = report.lock();
        *r += 1;
        drop(i);
        let w = writes.lock();
        drop(r);
        drop(w);
        // nothing held: any lock may be taken again
        let _i = index.lock();
        let _r = report.lock();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "mover lock order")]
    fn a_lower_level_under_a_higher_one_panics() {
        let index = Ordered::new(Level::Index, ());
        let report = Ordered::new(Level::Report, ());
        let _r = report.lock();
        let _i = index.lock();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "mover lock order")]
    fn a_level_twice_panics() {
        let a = Ordered::new(Level::Writes, ());
        let b = Ordered::new(Level::Writes, ());
        let _a = a.lock();
        let _b = b.lock();
    }
}

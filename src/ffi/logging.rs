//! Library log messages across the C ABI.
//!
//! kvpark logs through the `log` facade. Inside the shared library the
//! facade's logger is this module's: until a host installs a callback with
//! [`kvpark_set_log_callback`], warnings and errors go to stderr (one line
//! each); with a callback, every message up to the chosen level goes to it
//! (the Python shim forwards them to `logging.getLogger("kvpark")`).
//!
//! Threads: the callback runs on the thread that logs, often one of kvpark's
//! background threads (NVMe writer, pinning job); it must be callable from
//! any thread and must not call `kvpark_set_log_callback` itself. Calls run
//! under a read lock that `kvpark_set_log_callback` takes for writing, so
//! once that call returns no call of the previous callback is in progress or
//! will start: a host uninstalls its callback (NULL) before the callback's
//! code goes away (the Python shim does at interpreter exit).

use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::Duration;

use parking_lot::RwLock;

use super::KvparkStatus;
use crate::error::{Error, ErrorKind};

/// Severity of a log message (`log::Level`'s order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KvparkLogLevel {
    /// An operation failed.
    Error = 1,
    /// Something degraded (a slower path, skipped data) but kvpark goes on.
    Warn = 2,
    /// Notable events.
    Info = 3,
    /// Diagnostics.
    Debug = 4,
    /// Detailed diagnostics.
    Trace = 5,
}

impl KvparkLogLevel {
    fn of(l: log::Level) -> Self {
        match l {
            log::Level::Error => KvparkLogLevel::Error,
            log::Level::Warn => KvparkLogLevel::Warn,
            log::Level::Info => KvparkLogLevel::Info,
            log::Level::Debug => KvparkLogLevel::Debug,
            log::Level::Trace => KvparkLogLevel::Trace,
        }
    }

    fn filter(n: u32) -> log::LevelFilter {
        match n {
            0 => log::LevelFilter::Off,
            1 => log::LevelFilter::Error,
            2 => log::LevelFilter::Warn,
            3 => log::LevelFilter::Info,
            4 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    }
}

/// Receives one library message: `user` as given to
/// [`kvpark_set_log_callback`], the level, the emitting module (`target`,
/// e.g. `kvpark::tier::nvme::store`) and the message, both NUL-terminated
/// UTF-8 valid only during the call.
pub type KvparkLogFn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        level: KvparkLogLevel,
        target: *const c_char,
        message: *const c_char,
    ),
>;

#[derive(Clone, Copy)]
struct Sink {
    cb: unsafe extern "C" fn(*mut c_void, KvparkLogLevel, *const c_char, *const c_char),
    user: usize,
}

static SINK: RwLock<Option<Sink>> = parking_lot::const_rwlock(None);
/// Most verbose level passed on (a `KvparkLogLevel` number; 0 = none).
static MAX: AtomicU32 = AtomicU32::new(KvparkLogLevel::Warn as u32);
static INSTALL: Once = Once::new();
/// How long replacing the callback waits for calls of the old one to return.
const REPLACE_WAIT: Duration = Duration::from_secs(5);

struct FfiLogger;
static LOGGER: FfiLogger = FfiLogger;

/// A C string of `s`; an interior NUL (not valid in the C string) becomes `\0`.
fn c_text(s: &str) -> CString {
    CString::new(s.replace('\0', "\\0")).unwrap_or_default()
}

impl log::Log for FfiLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        KvparkLogLevel::of(m.level()) as u32 <= MAX.load(Ordering::Relaxed)
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = r.args().to_string();
        // recursive: a message logged while the callback runs on this thread
        // (or with a writer queued) must not wait for the lock it holds
        let sink = SINK.read_recursive();
        match *sink {
            Some(s) => {
                let (t, m) = (c_text(r.target()), c_text(&msg));
                // SAFETY: the host promised a callable function until it
                // replaces it, which waits for this read lock.
                unsafe {
                    (s.cb)(
                        s.user as *mut c_void,
                        KvparkLogLevel::of(r.level()),
                        t.as_ptr(),
                        m.as_ptr(),
                    )
                }
            }
            None => eprintln!("{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Makes this module the `log` facade's logger of the library (once; a
/// no-op where the host process set another logger first, as the `kvpark`
/// binary and the tests do).
pub(crate) fn install() {
    INSTALL.call_once(|| {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(KvparkLogLevel::filter(MAX.load(Ordering::Relaxed)));
        }
    });
}

/// Sends kvpark's log messages up to `max_level` (1 = errors only … 5 =
/// everything; 0 = none) to `callback`, with `user` passed back on every
/// call. A NULL `callback` restores the default: warnings and errors to
/// stderr. When this returns `KVPARK_STATUS_OK`, no call of a previous
/// callback is running; when calls of it do not return within 5 s, it fails
/// with `KVPARK_STATUS_BUSY` and changes nothing. Must not be called from
/// inside the callback.
///
/// # Safety
/// `callback`, when not NULL, must be callable from any thread with `user`
/// until it is replaced by another call of this function.
#[no_mangle]
pub unsafe extern "C" fn kvpark_set_log_callback(
    callback: KvparkLogFn,
    user: *mut c_void,
    max_level: u32,
) -> KvparkStatus {
    super::guard("kvpark_set_log_callback", || {
        install();
        // bounded: a process forked while another thread was inside the
        // callback inherits a read lock nobody will release
        let mut sink = SINK.try_write_for(REPLACE_WAIT).ok_or_else(|| {
            Error::new(
                ErrorKind::Busy,
                format!(
                    "the log callback did not return within {} s; callback unchanged",
                    REPLACE_WAIT.as_secs()
                ),
            )
        })?;
        *sink = callback.map(|cb| Sink {
            cb,
            user: user as usize,
        });
        let max = if callback.is_some() {
            max_level.min(KvparkLogLevel::Trace as u32)
        } else {
            KvparkLogLevel::Warn as u32
        };
        MAX.store(max, Ordering::Relaxed);
        log::set_max_level(KvparkLogLevel::filter(max));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    const TARGET: &str = "kvpark::ffi::logging::test";
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    /// 1: a call is inside the callback; 2: let it return.
    static HELD: AtomicUsize = AtomicUsize::new(0);
    static TEXT: Mutex<Vec<(KvparkLogLevel, String)>> = Mutex::new(Vec::new());

    unsafe extern "C" fn count(
        user: *mut c_void,
        level: KvparkLogLevel,
        target: *const c_char,
        message: *const c_char,
    ) {
        let t = std::ffi::CStr::from_ptr(target).to_str().unwrap();
        if t != TARGET {
            return; // other tests of this binary log too
        }
        assert_eq!(user as usize, 0x5eed);
        let m = std::ffi::CStr::from_ptr(message).to_str().unwrap();
        if m == "hold" {
            HELD.store(1, Ordering::SeqCst);
            while HELD.load(Ordering::SeqCst) != 2 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            return;
        }
        SEEN.fetch_add(1, Ordering::SeqCst);
        if m.starts_with("one") {
            TEXT.lock().unwrap().push((level, m.to_string()));
        }
    }

    /// Messages from many threads at once all reach the callback, nothing
    /// above the chosen level does, a callback that does not return makes
    /// replacing it fail with Busy (not hang), and after the callback is
    /// removed no message reaches it. (Whether this logger or another is the facade's depends
    /// on the test binary; the callback is called directly when not.)
    #[test]
    fn messages_from_threads_reach_the_callback_until_it_is_removed() {
        let status = unsafe { kvpark_set_log_callback(Some(count), 0x5eed as *mut c_void, 3) };
        assert_eq!(status, KvparkStatus::Ok);
        let log = |level: log::Level, text: String| {
            log::Log::log(
                &LOGGER,
                &log::Record::builder()
                    .level(level)
                    .target(TARGET)
                    .args(format_args!("{text}"))
                    .build(),
            )
        };
        log(log::Level::Warn, "one\0warning".into());
        log(log::Level::Debug, "one debug message".into());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..100 {
                        log(log::Level::Info, format!("thread {t} message {i}"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(SEEN.load(Ordering::SeqCst), 401);
        assert_eq!(
            *TEXT.lock().unwrap(),
            [(KvparkLogLevel::Warn, "one\\0warning".to_string())]
        );
        // a call that does not return: replacing the callback gives up
        // after REPLACE_WAIT with Busy and leaves it installed
        let held = std::thread::spawn(move || log(log::Level::Warn, "hold".into()));
        while HELD.load(Ordering::SeqCst) != 1 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let t0 = std::time::Instant::now();
        let status = unsafe { kvpark_set_log_callback(None, std::ptr::null_mut(), 5) };
        assert_eq!(status, KvparkStatus::Busy);
        assert!(t0.elapsed() >= REPLACE_WAIT);
        log(log::Level::Warn, "still delivered".into());
        assert_eq!(SEEN.load(Ordering::SeqCst), 402);
        HELD.store(2, Ordering::SeqCst);
        held.join().unwrap();
        let status = unsafe { kvpark_set_log_callback(None, std::ptr::null_mut(), 5) };
        assert_eq!(status, KvparkStatus::Ok);
        log(log::Level::Error, "to stderr".into());
        assert_eq!(SEEN.load(Ordering::SeqCst), 402);
    }
}

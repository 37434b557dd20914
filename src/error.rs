//! The crate's one error type.
//!
//! Every fallible function in kvpark returns [`Result`]. An [`Error`] carries a
//! [`ErrorKind`] (which maps one-to-one onto a C status code in [`crate::ffi`]),
//! a message and an optional context chain ("nvme write: ENOSPC in seg 12").

use std::fmt;

/// What went wrong, coarse enough to act on.
///
/// Each kind maps onto one C ABI status (`KvparkStatus` in `src/ffi/mod.rs`,
/// the one place the status numbers are written; the header is generated
/// from it and the Python shim is checked against the header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A caller passed something malformed (NULL pointer, short buffer, bad geometry).
    InvalidArgument,
    /// An operating-system I/O error other than a full disk.
    Io,
    /// Stored data failed validation (checksum, magic, length): never served.
    Corrupt,
    /// A tier is full (disk full, arena exhausted, capacity cap reached).
    NoSpace,
    /// A configuration key or value is wrong.
    Config,
    /// A CUDA driver / NVRTC failure, or no CUDA device where one is required.
    Cuda,
    /// The operation is not supported in this build or on this platform.
    Unsupported,
    /// The requested block or record does not exist.
    NotFound,
    /// The object is in use (pinned, in flight) and cannot be changed now.
    Busy,
    /// The store or engine was shut down.
    Closed,
    /// A bug inside kvpark (a caught panic, a broken invariant).
    Internal,
}

impl ErrorKind {
    /// Short lowercase name used in messages and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Io => "i/o error",
            ErrorKind::Corrupt => "corrupt data",
            ErrorKind::NoSpace => "no space",
            ErrorKind::Config => "config error",
            ErrorKind::Cuda => "cuda error",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::NotFound => "not found",
            ErrorKind::Busy => "busy",
            ErrorKind::Closed => "closed",
            ErrorKind::Internal => "internal error",
        }
    }
}

/// A kvpark error: a kind, a message and the context it happened in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
}

impl Error {
    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
        }
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, including any context added with [`Error::context`].
    pub fn message(&self) -> &str {
        &self.msg
    }

    /// Prefixes the message with `ctx` ("nvme write: ..."), keeping the kind.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    /// Shorthand constructors.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, msg)
    }
    /// A configuration error naming the key.
    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, msg)
    }
    /// Stored data failed validation.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, msg)
    }
    /// A tier is full.
    pub fn no_space(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::NoSpace, msg)
    }
    /// Not supported here.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }
    /// Broken invariant.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, msg)
    }
    /// Missing block or record.
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, msg)
    }
    /// CUDA failure or no device.
    pub fn cuda(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Cuda, msg)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.msg)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ => match e.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
                _ => ErrorKind::Io,
            },
        };
        Error::new(kind, e.to_string())
    }
}

/// `Result` with kvpark's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Adds context to the error of a `Result`.
pub trait ResultExt<T> {
    /// Prefixes the error message with `ctx`.
    fn ctx(self, ctx: impl fmt::Display) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn ctx(self, ctx: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_maps_to_no_space() {
        let e: Error = std::io::Error::from_raw_os_error(libc::ENOSPC).into();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        let e = e.context("nvme write seg 12");
        assert!(e.message().starts_with("nvme write seg 12: "));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
    }
}

"""Python exceptions for libkvpark status codes.

Every non-zero `KvparkStatus` returned by the C ABI becomes an instance of the subclass
registered for that number, carrying the library's last-error message. The numbers are
fixed by the ABI and never reused. Their one definition is the `KvparkStatus` enum in
src/ffi/mod.rs, from which cbindgen generates include/kvpark.h; tests/vllm/test_abi.py
parses that header and fails when a number or name here differs from it.
"""

from __future__ import annotations


class KvparkError(Exception):
    """Base class of every kvpark error. `status` is the C status code (None if local)."""

    status: int | None = None
    status_name: str = "KVPARK_ERROR"

    def __init__(self, message: str, function: str | None = None):
        self.message = message
        self.function = function
        # The library's messages already start with the function that failed.
        where = f"{function}: " if function and not message.startswith(f"{function}: ") else ""
        super().__init__(f"{where}{message} [{self.status_name}]")


class LibraryNotFoundError(KvparkError, OSError):
    """libkvpark.so could not be found."""

    status_name = "LIBRARY_NOT_FOUND"


class AbiMismatchError(KvparkError, ImportError):
    """The loaded libkvpark speaks another C ABI version than this package."""

    status_name = "ABI_MISMATCH"


class NullPointerError(KvparkError):
    status, status_name = 1, "KVPARK_STATUS_NULL_POINTER"


class InvalidArgumentError(KvparkError, ValueError):
    status, status_name = 2, "KVPARK_STATUS_INVALID_ARGUMENT"


class KvparkIOError(KvparkError, OSError):
    status, status_name = 3, "KVPARK_STATUS_IO"


class CorruptError(KvparkError):
    status, status_name = 4, "KVPARK_STATUS_CORRUPT"


class NoSpaceError(KvparkError):
    status, status_name = 5, "KVPARK_STATUS_NO_SPACE"


class ConfigError(KvparkError, ValueError):
    status, status_name = 6, "KVPARK_STATUS_CONFIG"


class CudaError(KvparkError):
    status, status_name = 7, "KVPARK_STATUS_CUDA"


class UnsupportedError(KvparkError):
    status, status_name = 8, "KVPARK_STATUS_UNSUPPORTED"


class NotFoundError(KvparkError, LookupError):
    status, status_name = 9, "KVPARK_STATUS_NOT_FOUND"


class BusyError(KvparkError):
    status, status_name = 10, "KVPARK_STATUS_BUSY"


class ClosedError(KvparkError):
    status, status_name = 11, "KVPARK_STATUS_CLOSED"


class InternalError(KvparkError):
    status, status_name = 12, "KVPARK_STATUS_INTERNAL"


class BufferTooSmallError(KvparkError):
    status, status_name = 13, "KVPARK_STATUS_BUFFER_TOO_SMALL"


STATUS_ERRORS: dict[int, type[KvparkError]] = {
    cls.status: cls
    for cls in (
        NullPointerError,
        InvalidArgumentError,
        KvparkIOError,
        CorruptError,
        NoSpaceError,
        ConfigError,
        CudaError,
        UnsupportedError,
        NotFoundError,
        BusyError,
        ClosedError,
        InternalError,
        BufferTooSmallError,
    )
}


class UnknownStatusError(KvparkError):
    """A status number this package does not know (newer library?)."""

    status_name = "KVPARK_STATUS_UNKNOWN"


def error_for_status(status: int, message: str, function: str | None = None) -> KvparkError:
    """The exception instance for a non-zero status code."""
    cls = STATUS_ERRORS.get(status)
    if cls is None:
        err = UnknownStatusError(f"{message} (status {status})", function)
        err.status = status
        return err
    return cls(message, function)

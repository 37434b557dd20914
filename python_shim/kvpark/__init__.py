"""kvpark: parks the KV cache of suspended agent sessions for vLLM (Python side).

`kvpark.vllm.KVParkConnector` is the vLLM V1 connector; `kvpark._ffi` binds libkvpark's C
ABI with ctypes. Importing this package does not load the library; the connector loads it
when vLLM builds it (`$KVPARK_LIB`, else in a source checkout the crate's
target/release/libkvpark.so, else the library the wheel carries, `kvpark/lib/libkvpark.abi3.so`).
"""

from ._ffi import ABI_VERSION, LIB_ENV, library_path, load_library, preflight_config, validate_config
from .errors import (
    AbiMismatchError,
    BufferTooSmallError,
    BusyError,
    ClosedError,
    ConfigError,
    CorruptError,
    CudaError,
    InternalError,
    InvalidArgumentError,
    KvparkError,
    KvparkIOError,
    LibraryNotFoundError,
    NoSpaceError,
    NotFoundError,
    NullPointerError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "ABI_VERSION",
    "LIB_ENV",
    "AbiMismatchError",
    "BufferTooSmallError",
    "BusyError",
    "ClosedError",
    "ConfigError",
    "CorruptError",
    "CudaError",
    "InternalError",
    "InvalidArgumentError",
    "KvparkError",
    "KvparkIOError",
    "LibraryNotFoundError",
    "NoSpaceError",
    "NotFoundError",
    "NullPointerError",
    "UnsupportedError",
    "library_path",
    "load_library",
    "preflight_config",
    "validate_config",
]

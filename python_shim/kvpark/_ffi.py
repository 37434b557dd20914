"""ctypes binding of the libkvpark C ABI (include/kvpark.h, ABI version 1).

Invariants:
- Every call goes through `_call`, which turns a non-zero `KvparkStatus` into the matching
  `KvparkError` subclass carrying the library's thread-local last-error message. ctypes
  calls run on the calling thread, so the message read right after a failed call is the
  one that call set.
- Bytes returned by the library (`KvparkBuf`) are copied into Python `bytes` and freed with
  `kvpark_buf_free` in the same function; no library-owned pointer escapes this module.
- The library is loaded once per process and refused when its `kvpark_abi_version()`
  differs from `ABI_VERSION`.
- Python never interprets plans or worker metadata: they are opaque `bytes` here.
- The library's log messages (its `log` facade) reach Python's `logging`: loading the
  library installs `_forward_log` with `kvpark_set_log_callback`, and interpreter exit
  removes it again (messages after that go to stderr).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import sys
import threading
from ctypes import POINTER, Structure, c_char_p, c_int32, c_size_t, c_uint8, c_uint32, c_uint64, c_void_p
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import (
    AbiMismatchError,
    ClosedError,
    LibraryNotFoundError,
    KvparkError,
    error_for_status,
)

#: The C ABI version this package speaks (KVPARK_ABI_VERSION in include/kvpark.h).
ABI_VERSION = 1

#: Environment variable naming the shared library to load (overrides package data).
LIB_ENV = "KVPARK_LIB"

_u8p = POINTER(c_uint8)


class KvparkBuf(Structure):
    """`KvparkBuf`: bytes owned by the library, freed with kvpark_buf_free."""

    _fields_ = [("ptr", _u8p), ("len", c_size_t)]


class KvparkRequest(Structure):
    """`KvparkRequest`: one vLLM request as the planner sees it (borrowed pointers)."""

    _fields_ = [
        ("req_id", _u8p),
        ("req_id_len", c_size_t),
        ("salt", _u8p),
        ("salt_len", c_size_t),
        ("hashes", _u8p),
        ("hash_len", c_size_t),
        ("num_hashes", c_size_t),
        ("hint_json", _u8p),
        ("hint_len", c_size_t),
    ]


class KvparkMatch(Structure):
    """`KvparkMatch`: result of kvpark_planner_match."""

    _fields_ = [("external_tokens", c_uint32), ("load_async", c_uint8)]


class KvparkGeometry(Structure):
    """`KvparkGeometry`: the KV cache geometry shared by all registered layers."""

    _fields_ = [
        ("layers", c_uint32),
        ("kv_heads", c_uint32),
        ("block_tokens", c_uint32),
        ("head_size_k", c_uint32),
        ("head_size_v", c_uint32),
        ("dtype", c_uint8),
    ]


class KvparkLayerView(Structure):
    """`KvparkLayerView`: one layer's 4-D view; strides in elements."""

    _fields_ = [
        ("base", c_uint64),
        ("num_blocks", c_uint64),
        ("stride_block", c_uint64),
        ("stride_head", c_uint64),
        ("stride_token", c_uint64),
    ]


#: KvparkGeometry.dtype codes.
DTYPE_F16, DTYPE_BF16, DTYPE_F32, DTYPE_FP8 = 1, 2, 3, 4

_Status = c_int32
_PlannerP = c_void_p
_MoverP = c_void_p

#: KvparkLogLevel -> Python logging level (tests/vllm/test_abi.py checks the names
#: against include/kvpark.h).
LOG_LEVELS = {
    "KVPARK_LOG_LEVEL_ERROR": (1, logging.ERROR),
    "KVPARK_LOG_LEVEL_WARN": (2, logging.WARNING),
    "KVPARK_LOG_LEVEL_INFO": (3, logging.INFO),
    "KVPARK_LOG_LEVEL_DEBUG": (4, logging.DEBUG),
    "KVPARK_LOG_LEVEL_TRACE": (5, 5),
}
_PY_LEVEL = {n: py for n, py in LOG_LEVELS.values()}
#: Most verbose level the library passes on: Python's logging filters the rest, so a
#: level set later on the "kvpark" loggers takes effect.
_LOG_MAX = LOG_LEVELS["KVPARK_LOG_LEVEL_DEBUG"][0]

#: `KvparkLogFn`: void (*)(void *user, KvparkLogLevel, const char *target, const char *msg)
_LogFn = ctypes.CFUNCTYPE(None, c_void_p, c_int32, c_char_p, c_char_p)

log = logging.getLogger("kvpark")


def _forward_log(user: int | None, level: int, target: bytes | None, message: bytes | None) -> None:
    """The library's log callback: runs on the logging thread (often one of kvpark's
    background threads; ctypes takes the GIL, which the threads that call into kvpark
    release, so it cannot deadlock against them). Messages go to the logger named after
    the Rust module: `kvpark::tier::nvme::store` -> `kvpark.tier.nvme.store`, a child of
    `logging.getLogger("kvpark")`."""
    if sys.is_finalizing():
        return
    try:
        name = (target or b"kvpark").decode("utf-8", "replace").replace("::", ".")
        if name != "kvpark" and not name.startswith("kvpark."):
            name = "kvpark." + name
        text = (message or b"").decode("utf-8", "replace")
        logging.getLogger(name).log(_PY_LEVEL.get(level, logging.WARNING), "%s", text)
    except Exception:  # an exception must not unwind into the library's thread
        pass


#: The C function pointer of `_forward_log`; module-global, so it lives as long as the
#: library can call it.
_forward_log_c = _LogFn(_forward_log)


def _install_logging(l: ctypes.CDLL) -> None:
    _call(l, "kvpark_set_log_callback", _forward_log_c, None, c_uint32(_LOG_MAX))
    atexit.register(_remove_logging, l)


def _remove_logging(l: ctypes.CDLL) -> None:
    """At interpreter exit: back to stderr, before Python can no longer run the callback
    (the call waits for callbacks in progress, ctypes releasing the GIL meanwhile, at most
    5 s: in a process forked while another thread was inside the callback it gives up)."""
    try:
        l.kvpark_set_log_callback(_LogFn(), None, c_uint32(0))  # _LogFn(): NULL
    except Exception:
        pass


# name -> (restype, argtypes)
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "kvpark_abi_version": (c_uint32, []),
    "kvpark_last_error": (c_size_t, [c_char_p, c_size_t]),
    "kvpark_buf_free": (None, [KvparkBuf]),
    "kvpark_config_validate": (_Status, [_u8p, c_size_t, POINTER(KvparkBuf)]),
    "kvpark_config_preflight": (_Status, [_u8p, c_size_t, _u8p, c_size_t, POINTER(KvparkBuf)]),
    "kvpark_planner_new": (_Status, [_u8p, c_size_t, c_uint32, c_uint32, c_uint32, POINTER(_PlannerP)]),
    "kvpark_planner_free": (None, [_PlannerP]),
    "kvpark_planner_match": (
        _Status,
        [_PlannerP, POINTER(KvparkRequest), c_uint32, c_uint32, c_uint64, POINTER(KvparkMatch)],
    ),
    "kvpark_planner_on_alloc": (
        _Status,
        [_PlannerP, _u8p, c_size_t, POINTER(c_uint32), c_size_t, c_uint32],
    ),
    "kvpark_planner_request_finished": (
        _Status,
        [_PlannerP, POINTER(KvparkRequest), POINTER(c_uint32), c_size_t, c_uint32, c_uint64, POINTER(c_uint8)],
    ),
    "kvpark_planner_build_meta": (_Status, [_PlannerP, c_uint64, POINTER(KvparkBuf)]),
    "kvpark_planner_on_worker_meta": (_Status, [_PlannerP, _u8p, c_size_t, c_uint64]),
    "kvpark_planner_tick_moves": (_Status, [_PlannerP, c_uint64, POINTER(KvparkBuf)]),
    "kvpark_planner_expect_block_bytes": (_Status, [_PlannerP, c_uint64]),
    "kvpark_planner_next_wakeup": (_Status, [_PlannerP, POINTER(c_uint64)]),
    "kvpark_planner_hear_gpu_events": (_Status, [_PlannerP]),
    "kvpark_planner_gpu_removed": (_Status, [_PlannerP, POINTER(c_uint64), c_size_t, POINTER(c_uint64)]),
    "kvpark_planner_gpu_cleared": (_Status, [_PlannerP, POINTER(c_uint64)]),
    "kvpark_planner_metrics": (_Status, [_PlannerP, POINTER(KvparkBuf)]),
    "kvpark_mover_new": (_Status, [_u8p, c_size_t, c_uint32, POINTER(_MoverP)]),
    "kvpark_mover_free": (None, [_MoverP]),
    "kvpark_mover_register": (
        _Status,
        [_MoverP, POINTER(KvparkGeometry), POINTER(KvparkLayerView), c_size_t, c_uint8],
    ),
    "kvpark_mover_bind": (_Status, [_MoverP, _u8p, c_size_t]),
    "kvpark_mover_run_moves": (_Status, [_MoverP, _u8p, c_size_t]),
    "kvpark_mover_start_load": (_Status, [_MoverP]),
    "kvpark_mover_wait_layer": (_Status, [_MoverP, c_uint32]),
    "kvpark_mover_set_stream": (_Status, [_MoverP, c_uint64]),
    "kvpark_set_log_callback": (_Status, [_LogFn, c_void_p, c_uint32]),
    "kvpark_mover_wait_for_save": (_Status, [_MoverP]),
    "kvpark_mover_get_finished": (_Status, [_MoverP, POINTER(KvparkBuf)]),
    "kvpark_mover_take_worker_meta": (_Status, [_MoverP, POINTER(KvparkBuf)]),
    "kvpark_mover_metrics": (_Status, [_MoverP, POINTER(KvparkBuf)]),
}

_lib: ctypes.CDLL | None = None
_lib_path: str | None = None
_lock = threading.Lock()


def _candidates() -> list[Path]:
    """Where the library may be, in order: in a source checkout (an editable install) the
    crate's Cargo output, so a rebuilt library is used without reinstalling; then the
    library the wheel carries (kvpark/lib/libkvpark*.so)."""
    pkg = Path(__file__).resolve().parent
    out: list[Path] = []
    crate = pkg.parent.parent
    if (crate / "Cargo.toml").is_file() and (crate / "src" / "ffi").is_dir():
        target = os.environ.get("CARGO_TARGET_DIR")
        if target:
            out.append(Path(target) / "release" / "libkvpark.so")
        out.append(crate / "target" / "release" / "libkvpark.so")
    out.extend(sorted((pkg / "lib").glob("libkvpark*.so")))
    return out


def library_path() -> Path:
    """Where the library is looked for: $KVPARK_LIB, else the first of `_candidates` that
    exists (the package's lib/libkvpark.abi3.so in a wheel install)."""
    env = os.environ.get(LIB_ENV)
    if env:
        return Path(env)
    cands = _candidates()
    for c in cands:
        if c.is_file():
            return c
    return cands[0] if cands else Path(__file__).resolve().parent / "lib" / "libkvpark.abi3.so"


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Loads libkvpark (once per process) and checks its ABI version.

    Raises LibraryNotFoundError when the file is missing and AbiMismatchError when the
    library speaks another ABI version than this package.
    """
    global _lib, _lib_path
    with _lock:
        want = Path(path) if path is not None else library_path()
        if _lib is not None and path is None:
            return _lib
        if not want.is_file():
            raise LibraryNotFoundError(
                f"libkvpark not found at {want}: install the package with `pip install "
                f"./python_shim` (it builds libkvpark with Cargo and bundles it), run "
                f"`cargo build --release` for an editable install, or set "
                f"{LIB_ENV}=/path/to/libkvpark.so"
            )
        lib = ctypes.CDLL(str(want))
        try:
            lib.kvpark_abi_version.restype = c_uint32
            lib.kvpark_abi_version.argtypes = []
        except AttributeError as e:
            raise AbiMismatchError(f"{want} is not libkvpark (no kvpark_abi_version symbol)") from e
        got = int(lib.kvpark_abi_version())
        if got != ABI_VERSION:
            raise AbiMismatchError(
                f"libkvpark ABI version mismatch: {want} has ABI version {got}, "
                f"this kvpark Python package expects ABI version {ABI_VERSION}"
            )
        missing = []
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                missing.append(name)
                continue
            fn.restype = restype
            fn.argtypes = argtypes
        if missing:
            raise AbiMismatchError(
                f"{want} reports ABI version {got} but lacks symbols: {', '.join(missing)}"
            )
        if path is None:
            _install_logging(lib)
            _lib, _lib_path = lib, str(want)
        return lib


def lib() -> ctypes.CDLL:
    """The process-wide library handle (loaded on first use)."""
    return _lib if _lib is not None else load_library()


def last_error(l: ctypes.CDLL | None = None) -> str:
    """The calling thread's last error message from the library ('' if none)."""
    l = l or lib()
    n = int(l.kvpark_last_error(None, 0))
    if n == 0:
        return ""
    buf = ctypes.create_string_buffer(n + 1)
    l.kvpark_last_error(buf, n + 1)
    return buf.value.decode("utf-8", errors="replace")


def _call(l: ctypes.CDLL, name: str, *args: Any) -> None:
    status = int(getattr(l, name)(*args))
    if status != 0:
        raise error_for_status(status, last_error(l) or f"{name} failed", name)


def _take_buf(l: ctypes.CDLL, buf: KvparkBuf) -> bytes:
    try:
        if not buf.ptr or buf.len == 0:
            return b""
        return ctypes.string_at(buf.ptr, buf.len)
    finally:
        l.kvpark_buf_free(buf)


def _bytes_ptr(b: bytes | None) -> tuple[Any, int]:
    """A borrowed uint8_t* for b (kept alive by the caller holding b) and its length."""
    if not b:
        return None, 0
    return ctypes.cast(ctypes.c_char_p(b), _u8p), len(b)


def _u32_array(values: Sequence[int]) -> tuple[Any, int]:
    n = len(values)
    if n == 0:
        return None, 0
    return (c_uint32 * n)(*values), n


def validate_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """Validates kv_connector_extra_config; returns the normalized config (defaults filled).

    Raises ConfigError naming the offending key.
    """
    l = lib()
    raw = json.dumps(config or {}).encode()
    ptr, n = _bytes_ptr(raw)
    out = KvparkBuf()
    _call(l, "kvpark_config_validate", ptr, n, ctypes.byref(out))
    return json.loads(_take_buf(l, out) or b"{}")


def preflight_config(config: dict[str, Any] | None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validates kv_connector_extra_config and checks it against this machine
    (kvpark_config_preflight): directories, host memory, a reused host_file.

    `context`: {"rank": N | None, "ranks": N, "reserve_host_bytes": N, "block_bytes": N}.
    Returns the normalized config; raises ConfigError with one line per problem.
    """
    l = lib()
    raw = json.dumps(config or {}).encode()
    ctx = json.dumps(context or {}).encode()
    ptr, n = _bytes_ptr(raw)
    cptr, cn = _bytes_ptr(ctx)
    out = KvparkBuf()
    _call(l, "kvpark_config_preflight", ptr, n, cptr, cn, ctypes.byref(out))
    return json.loads(_take_buf(l, out) or b"{}")


class RequestView:
    """Keeps the bytes of one KvparkRequest alive while the struct is in use."""

    __slots__ = ("_keep", "struct")

    def __init__(
        self,
        req_id: str,
        block_hashes: Iterable[bytes],
        salt: str | None = None,
        hint: dict[str, Any] | None = None,
    ):
        rid = req_id.encode()
        hashes = [bytes(h) for h in block_hashes]
        hash_len = len(hashes[0]) if hashes else 0
        if any(len(h) != hash_len for h in hashes):
            raise ValueError(f"request {req_id}: block hashes of unequal length")
        joined = b"".join(hashes)
        salt_b = salt.encode() if salt else None
        hint_b = json.dumps(hint).encode() if hint is not None else None
        self._keep = (rid, joined, salt_b, hint_b)
        s = KvparkRequest()
        s.req_id, s.req_id_len = _bytes_ptr(rid)
        s.salt, s.salt_len = _bytes_ptr(salt_b)
        s.hashes, _ = _bytes_ptr(joined)
        s.hash_len = hash_len
        s.num_hashes = len(hashes)
        s.hint_json, s.hint_len = _bytes_ptr(hint_b)
        self.struct = s


class Planner:
    """Scheduler-side handle (`KvparkPlanner`) for the worker ranks
    `first_rank .. first_rank + world_size` (vLLM's tensor x pipeline parallel size;
    `first_rank` is 0 but with data parallelism): a block counts as parked only when
    every rank reported it, and a restart recovers what every rank's files hold."""

    def __init__(self, config: dict[str, Any], block_size: int, world_size: int = 1, first_rank: int = 0):
        self._lib = lib()
        raw = json.dumps(config or {}).encode()
        ptr, n = _bytes_ptr(raw)
        h = c_void_p()
        _call(
            self._lib,
            "kvpark_planner_new",
            ptr,
            n,
            c_uint32(block_size),
            c_uint32(first_rank),
            c_uint32(world_size),
            ctypes.byref(h),
        )
        self._h = h

    def close(self) -> None:
        if getattr(self, "_h", None) is not None and self._h.value:
            self._lib.kvpark_planner_free(self._h)
        self._h = None

    __del__ = close

    def _handle(self) -> c_void_p:
        if self._h is None:
            raise ClosedError("planner is closed", "planner")
        return self._h

    def match(self, req: RequestView, num_computed_tokens: int, num_tokens: int, now_ns: int) -> tuple[int, bool]:
        out = KvparkMatch()
        _call(
            self._lib,
            "kvpark_planner_match",
            self._handle(),
            ctypes.byref(req.struct),
            c_uint32(num_computed_tokens),
            c_uint32(num_tokens),
            c_uint64(now_ns),
            ctypes.byref(out),
        )
        return int(out.external_tokens), bool(out.load_async)

    def on_alloc(self, req_id: str, block_ids: Sequence[int], num_external_tokens: int) -> None:
        rid = req_id.encode()
        rp, rn = _bytes_ptr(rid)
        arr, n = _u32_array(block_ids)
        _call(self._lib, "kvpark_planner_on_alloc", self._handle(), rp, rn, arr, n, c_uint32(num_external_tokens))

    def request_finished(self, req: RequestView, block_ids: Sequence[int], num_computed_tokens: int, now_ns: int) -> bool:
        arr, n = _u32_array(block_ids)
        delay = c_uint8(0)
        _call(
            self._lib,
            "kvpark_planner_request_finished",
            self._handle(),
            ctypes.byref(req.struct),
            arr,
            n,
            c_uint32(num_computed_tokens),
            c_uint64(now_ns),
            ctypes.byref(delay),
        )
        return bool(delay.value)

    def build_meta(self, now_ns: int) -> bytes:
        out = KvparkBuf()
        _call(self._lib, "kvpark_planner_build_meta", self._handle(), c_uint64(now_ns), ctypes.byref(out))
        return _take_buf(self._lib, out)

    def expect_block_bytes(self, n: int) -> None:
        """One rank's bytes per KV block from vLLM's config, until a worker reports them."""
        _call(self._lib, "kvpark_planner_expect_block_bytes", self._handle(), c_uint64(n))

    def tick_moves(self, now_ns: int) -> bytes:
        """The policy's tier moves due by now_ns, as a moves-only plan (b"" when none)."""
        out = KvparkBuf()
        _call(self._lib, "kvpark_planner_tick_moves", self._handle(), c_uint64(now_ns), ctypes.byref(out))
        return _take_buf(self._lib, out)

    def next_wakeup(self) -> int | None:
        """When the policy next has time-driven work (ns, the clock of now_ns); None: nothing."""
        out = c_uint64(0)
        _call(self._lib, "kvpark_planner_next_wakeup", self._handle(), ctypes.byref(out))
        return None if out.value == 2**64 - 1 else int(out.value)

    def hear_gpu_events(self) -> None:
        """The caller will pass vLLM's KV-cache events (gpu_removed / gpu_cleared): the
        kvpark policies then keep host for the contexts vLLM's GPU cache gave up."""
        _call(self._lib, "kvpark_planner_hear_gpu_events", self._handle())

    def gpu_removed(self, ids: Sequence[int]) -> int:
        """vLLM's GPU prefix cache removed these blocks, given as vLLM's KV-cache events
        give block hashes (the hash's last 8 bytes as a big-endian integer; see
        event_id); returns how many parked contexts that gave up."""
        if not ids:
            return 0
        arr = (c_uint64 * len(ids))(*ids)
        out = c_uint64(0)
        _call(self._lib, "kvpark_planner_gpu_removed", self._handle(), arr, len(ids), ctypes.byref(out))
        return int(out.value)

    def gpu_cleared(self) -> int:
        """vLLM cleared its GPU prefix cache; returns how many parked contexts that gave up."""
        out = c_uint64(0)
        _call(self._lib, "kvpark_planner_gpu_cleared", self._handle(), ctypes.byref(out))
        return int(out.value)

    def on_worker_meta(self, blob: bytes, now_ns: int) -> None:
        ptr, n = _bytes_ptr(blob)
        _call(self._lib, "kvpark_planner_on_worker_meta", self._handle(), ptr, n, c_uint64(now_ns))

    def metrics_bytes(self) -> bytes:
        """The metrics snapshot as the library's JSON bytes."""
        out = KvparkBuf()
        _call(self._lib, "kvpark_planner_metrics", self._handle(), ctypes.byref(out))
        return _take_buf(self._lib, out)

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_bytes() or b"{}")


class Mover:
    """Worker-side handle (`KvparkMover`)."""

    def __init__(self, config: dict[str, Any], rank: int):
        self._lib = lib()
        raw = json.dumps(config or {}).encode()
        ptr, n = _bytes_ptr(raw)
        h = c_void_p()
        _call(self._lib, "kvpark_mover_new", ptr, n, c_uint32(rank), ctypes.byref(h))
        self._h = h

    def close(self) -> None:
        if getattr(self, "_h", None) is not None and self._h.value:
            self._lib.kvpark_mover_free(self._h)
        self._h = None

    __del__ = close

    def _handle(self) -> c_void_p:
        if self._h is None:
            raise ClosedError("mover is closed", "mover")
        return self._h

    def register(self, geometry: KvparkGeometry, layers: Sequence[KvparkLayerView], device: int | None) -> None:
        """device: the CUDA ordinal the caches live on, None for host memory."""
        n = len(layers)
        arr = (KvparkLayerView * n)(*layers)
        on_device = 0 if device is None else device + 1
        if not 0 <= on_device <= 255:
            raise ValueError(f"kvpark: CUDA device ordinal {device} out of range")
        _call(self._lib, "kvpark_mover_register", self._handle(), ctypes.byref(geometry), arr, n, c_uint8(on_device))

    def bind(self, plan: bytes) -> None:
        ptr, n = _bytes_ptr(plan)
        _call(self._lib, "kvpark_mover_bind", self._handle(), ptr, n)

    def run_moves(self, plan: bytes) -> None:
        """Runs a moves-only plan (Planner.tick_moves) outside the engine's step."""
        ptr, n = _bytes_ptr(plan)
        _call(self._lib, "kvpark_mover_run_moves", self._handle(), ptr, n)

    def start_load(self) -> None:
        _call(self._lib, "kvpark_mover_start_load", self._handle())

    def wait_layer(self, layer: int) -> None:
        _call(self._lib, "kvpark_mover_wait_layer", self._handle(), c_uint32(layer))

    def set_stream(self, stream: int) -> None:
        """The CUDA stream the model runs on (0: none); see kvpark_mover_set_stream."""
        _call(self._lib, "kvpark_mover_set_stream", self._handle(), c_uint64(stream))

    def wait_for_save(self) -> None:
        _call(self._lib, "kvpark_mover_wait_for_save", self._handle())

    def get_finished(self) -> dict[str, list]:
        out = KvparkBuf()
        _call(self._lib, "kvpark_mover_get_finished", self._handle(), ctypes.byref(out))
        return json.loads(_take_buf(self._lib, out) or b"{}")

    def take_worker_meta(self) -> bytes:
        out = KvparkBuf()
        _call(self._lib, "kvpark_mover_take_worker_meta", self._handle(), ctypes.byref(out))
        return _take_buf(self._lib, out)

    def metrics_bytes(self) -> bytes:
        """The metrics snapshot as the library's JSON bytes."""
        out = KvparkBuf()
        _call(self._lib, "kvpark_mover_metrics", self._handle(), ctypes.byref(out))
        return _take_buf(self._lib, out)

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_bytes() or b"{}")


__all__ = [
    "ABI_VERSION",
    "LIB_ENV",
    "KvparkError",
    "KvparkGeometry",
    "KvparkLayerView",
    "Mover",
    "Planner",
    "RequestView",
    "library_path",
    "load_library",
    "last_error",
    "preflight_config",
    "validate_config",
]

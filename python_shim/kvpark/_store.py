"""ctypes binding of the chunk-store part of the libkvpark C ABI (`kvpark_store_*`).

The chunk store keeps opaque chunks (caller metadata + data bytes) under caller keys in
kvpark's host arena and NVMe segment store; the LMCache storage plugin (`kvpark.lmcache`)
is built on it. Same rules as `_ffi`: every call goes through `_ffi._call` (a non-zero
status becomes the matching `KvparkError`), and library-owned bytes are copied and freed
in the function that received them.
"""

from __future__ import annotations

import ctypes
import json
import threading
from ctypes import POINTER, c_size_t, c_uint8, c_uint32, c_uint64, c_void_p
from typing import Any

from . import _ffi
from .errors import AbiMismatchError, NotFoundError

_u8p = _ffi._u8p
_Status = _ffi._Status
_StoreP = c_void_p

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "kvpark_store_open": (_Status, [_u8p, c_size_t, c_uint32, c_uint64, c_uint32, POINTER(_StoreP)]),
    "kvpark_store_free": (None, [_StoreP]),
    "kvpark_store_put": (
        _Status,
        [_StoreP, _u8p, c_size_t, _u8p, c_size_t, c_void_p, c_size_t, POINTER(c_uint8)],
    ),
    "kvpark_store_contains": (_Status, [_StoreP, _u8p, c_size_t, c_uint8, POINTER(c_uint8)]),
    "kvpark_store_lookup": (
        _Status,
        [_StoreP, _u8p, c_size_t, POINTER(_ffi.KvparkBuf), POINTER(c_uint64)],
    ),
    "kvpark_store_get": (_Status, [_StoreP, _u8p, c_size_t, c_void_p, c_size_t, POINTER(c_uint64)]),
    "kvpark_store_pin": (_Status, [_StoreP, _u8p, c_size_t]),
    "kvpark_store_unpin": (_Status, [_StoreP, _u8p, c_size_t]),
    "kvpark_store_remove": (_Status, [_StoreP, _u8p, c_size_t, POINTER(c_uint8)]),
    "kvpark_store_flush": (_Status, [_StoreP, c_uint64]),
    "kvpark_store_metrics": (_Status, [_StoreP, POINTER(_ffi.KvparkBuf)]),
}

_bound: set[int] = set()
_bind_lock = threading.Lock()


def _lib() -> ctypes.CDLL:
    """The library with the chunk-store signatures set (refused if it lacks them)."""
    l = _ffi.lib()
    with _bind_lock:
        if id(l) not in _bound:
            missing = [n for n in _SIGNATURES if not hasattr(l, n)]
            if missing:
                raise AbiMismatchError(
                    f"{_ffi._lib_path or 'libkvpark'} lacks the chunk-store symbols "
                    f"{', '.join(missing)}: rebuild it (`cargo build --release`)"
                )
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(l, name)
                fn.restype = restype
                fn.argtypes = argtypes
            _bound.add(id(l))
    return l


class ChunkStore:
    """One rank's chunk store (`KvparkStore`). Thread-safe: calls release the GIL."""

    def __init__(self, config: dict[str, Any], rank: int, chunk_bytes: int, elem_size: int):
        self._lib = _lib()
        raw = json.dumps(config or {}).encode()
        ptr, n = _ffi._bytes_ptr(raw)
        h = _StoreP()
        _ffi._call(
            self._lib,
            "kvpark_store_open",
            ptr,
            n,
            c_uint32(rank),
            c_uint64(chunk_bytes),
            c_uint32(elem_size),
            ctypes.byref(h),
        )
        self._h: _StoreP | None = h
        self._close_lock = threading.Lock()

    def _handle(self) -> _StoreP:
        if self._h is None:
            from .errors import ClosedError

            raise ClosedError("chunk store is closed", "ChunkStore")
        return self._h

    def close(self) -> None:
        """Finishes queued NVMe writes and frees the store (idempotent)."""
        with self._close_lock:
            h, self._h = self._h, None
        if h is not None:
            self._lib.kvpark_store_free(h)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def put(self, key: bytes, meta: bytes, data_ptr: int, data_len: int) -> bool:
        """Stores `data_len` bytes at address `data_ptr` (copied before return) with `meta`.

        Returns False when the key was already stored.
        """
        kp, kn = _ffi._bytes_ptr(key)
        mp, mn = _ffi._bytes_ptr(meta)
        stored = c_uint8(0)
        _ffi._call(
            self._lib,
            "kvpark_store_put",
            self._handle(),
            kp,
            kn,
            mp,
            mn,
            c_void_p(data_ptr),
            c_size_t(data_len),
            ctypes.byref(stored),
        )
        return bool(stored.value)

    def contains(self, key: bytes, pin: bool = False) -> bool:
        kp, kn = _ffi._bytes_ptr(key)
        found = c_uint8(0)
        _ffi._call(
            self._lib, "kvpark_store_contains", self._handle(), kp, kn, c_uint8(1 if pin else 0), ctypes.byref(found)
        )
        return bool(found.value)

    def lookup(self, key: bytes) -> tuple[bytes, int] | None:
        """(metadata, data length) of `key`; None on a miss. CorruptError when its record
        failed a check (the chunk is dropped: later calls miss)."""
        kp, kn = _ffi._bytes_ptr(key)
        out = _ffi.KvparkBuf()
        n = c_uint64(0)
        try:
            _ffi._call(self._lib, "kvpark_store_lookup", self._handle(), kp, kn, ctypes.byref(out), ctypes.byref(n))
        except NotFoundError:
            return None
        return _ffi._take_buf(self._lib, out), int(n.value)

    def get_into(self, key: bytes, dst_ptr: int, cap: int) -> int | None:
        """Copies the data of `key` to `dst_ptr` (`cap` bytes); its length, or None on a
        miss. CorruptError as in `lookup`; nothing is written unless it succeeds."""
        kp, kn = _ffi._bytes_ptr(key)
        n = c_uint64(0)
        try:
            _ffi._call(
                self._lib, "kvpark_store_get", self._handle(), kp, kn, c_void_p(dst_ptr), c_size_t(cap), ctypes.byref(n)
            )
        except NotFoundError:
            return None
        return int(n.value)

    def pin(self, key: bytes) -> None:
        kp, kn = _ffi._bytes_ptr(key)
        _ffi._call(self._lib, "kvpark_store_pin", self._handle(), kp, kn)

    def unpin(self, key: bytes) -> None:
        kp, kn = _ffi._bytes_ptr(key)
        _ffi._call(self._lib, "kvpark_store_unpin", self._handle(), kp, kn)

    def remove(self, key: bytes) -> bool:
        kp, kn = _ffi._bytes_ptr(key)
        removed = c_uint8(0)
        _ffi._call(self._lib, "kvpark_store_remove", self._handle(), kp, kn, ctypes.byref(removed))
        return bool(removed.value)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Waits for the NVMe writes in flight (BusyError after `timeout_s`)."""
        _ffi._call(self._lib, "kvpark_store_flush", self._handle(), c_uint64(int(timeout_s * 1000)))

    def metrics(self) -> dict[str, Any]:
        out = _ffi.KvparkBuf()
        _ffi._call(self._lib, "kvpark_store_metrics", self._handle(), ctypes.byref(out))
        return json.loads(_ffi._take_buf(self._lib, out) or b"{}")

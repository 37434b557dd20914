"""The ctypes binding: library lookup, ABI version check, status -> exception mapping.

A small C stub library (compiled here with the system C compiler) stands in for libkvpark
where the test needs a library that misbehaves on purpose; the last tests use the real one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import kvpark
from kvpark import _ffi, errors

STUB = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>
typedef struct { uint8_t *ptr; size_t len; } KvparkBuf;
static const char *last = "";
static char out_json[] = "{\"ok\":true}";
uint32_t kvpark_abi_version(void) { return ABI; }
size_t kvpark_last_error(char *buf, size_t cap) {
  size_t n = strlen(last);
  if (cap) { size_t k = n < cap - 1 ? n : cap - 1; memcpy(buf, last, k); buf[k] = 0; }
  return n;
}
void kvpark_buf_free(KvparkBuf b) { (void)b; }
int32_t kvpark_config_validate(const uint8_t *j, size_t n, KvparkBuf *out) {
  if (n >= 8 && memcmp(j, "{\"bogus\"", 8) == 0) { last = "unknown key `bogus` in kv_connector_extra_config"; return 6; }
  out->ptr = (uint8_t *)out_json; out->len = sizeof(out_json) - 1; return 0;
}
#define STUBFN(name) int32_t name(void) { last = #name " is a stub"; return 8; }
STUBFN(kvpark_planner_new) STUBFN(kvpark_planner_match) STUBFN(kvpark_planner_on_alloc)
STUBFN(kvpark_planner_request_finished) STUBFN(kvpark_planner_build_meta)
STUBFN(kvpark_planner_on_worker_meta) STUBFN(kvpark_planner_metrics) STUBFN(kvpark_mover_new)
STUBFN(kvpark_mover_register) STUBFN(kvpark_mover_bind) STUBFN(kvpark_mover_start_load)
STUBFN(kvpark_mover_wait_layer) STUBFN(kvpark_mover_wait_for_save) STUBFN(kvpark_mover_get_finished)
STUBFN(kvpark_mover_take_worker_meta) STUBFN(kvpark_mover_metrics) STUBFN(kvpark_mover_set_stream)
STUBFN(kvpark_config_preflight) STUBFN(kvpark_set_log_callback)
STUBFN(kvpark_planner_tick_moves) STUBFN(kvpark_planner_next_wakeup)
STUBFN(kvpark_planner_expect_block_bytes) STUBFN(kvpark_mover_run_moves)
STUBFN(kvpark_planner_hear_gpu_events) STUBFN(kvpark_planner_gpu_removed) STUBFN(kvpark_planner_gpu_cleared)
void kvpark_planner_free(void *p) { (void)p; }
void kvpark_mover_free(void *p) { (void)p; }
"""


def _stub(tmp_path: Path, abi: int) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("a C compiler (cc) is needed to build the ABI stub")
    src = tmp_path / f"stub{abi}.c"
    src.write_text(STUB)
    lib = tmp_path / f"libstub{abi}.so"
    subprocess.run([cc, "-shared", "-fPIC", f"-DABI={abi}", "-o", str(lib), str(src)], check=True)
    return lib


def test_abi_mismatch_names_both_versions(tmp_path):
    lib = _stub(tmp_path, 99)
    with pytest.raises(kvpark.AbiMismatchError) as ei:
        _ffi.load_library(lib)
    msg = str(ei.value)
    assert "ABI version 99" in msg and f"ABI version {_ffi.ABI_VERSION}" in msg


def test_missing_library_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPARK_LIB", str(tmp_path / "nope.so"))
    assert _ffi.library_path() == tmp_path / "nope.so"
    with pytest.raises(kvpark.LibraryNotFoundError) as ei:
        _ffi.load_library(_ffi.library_path())
    assert "KVPARK_LIB" in str(ei.value) and "nope.so" in str(ei.value)


def test_status_becomes_exception_with_last_error(tmp_path):
    lib = _stub(tmp_path, _ffi.ABI_VERSION)
    l = _ffi.load_library(lib)
    raw = b'{"bogus": 1}'
    out = _ffi.KvparkBuf()
    with pytest.raises(kvpark.ConfigError) as ei:
        _ffi._call(l, "kvpark_config_validate", *_ffi._bytes_ptr(raw), _ffi.ctypes.byref(out))
    assert ei.value.status == 6
    assert "unknown key `bogus`" in ei.value.message
    assert "kvpark_config_validate" in str(ei.value)
    with pytest.raises(kvpark.UnsupportedError) as ei:
        _ffi._call(l, "kvpark_mover_start_load", None)
    assert ei.value.message == "kvpark_mover_start_load is a stub"


HEADER = Path(__file__).resolve().parents[2] / "include" / "kvpark.h"


def header_statuses() -> dict[str, int]:
    """`KVPARK_STATUS_X = N` of the generated C header (the Rust enum is its one source)."""
    body = re.search(r"enum KvparkStatus\s*\{(.*?)\}", HEADER.read_text(), re.S)
    assert body, f"no enum KvparkStatus in {HEADER}"
    code = re.sub(r"//[^\n]*|/\*.*?\*/", "", body.group(1), flags=re.S)
    pairs = re.findall(r"(KVPARK_STATUS_[A-Z0-9_]+)\s*=\s*(\d+)", code)
    assert len(pairs) == code.count("="), f"unreadable enumerator in {code!r}"
    return {name: int(n) for name, n in pairs}


def test_python_statuses_are_the_headers():
    """errors.py names every status of include/kvpark.h with its number, and no other."""
    want = header_statuses()
    assert want.pop("KVPARK_STATUS_OK") == 0
    assert len(want) >= 13
    have = {cls.status_name: cls.status for cls in errors.STATUS_ERRORS.values()}
    assert have == want, (
        f"python_shim/kvpark/errors.py and include/kvpark.h disagree: "
        f"only in Python {sorted(set(have.items()) - set(want.items()))}, "
        f"only in the header {sorted(set(want.items()) - set(have.items()))}"
    )
    for status in want.values():
        e = errors.error_for_status(status, "m", "f")
        assert type(e) is errors.STATUS_ERRORS[status] and e.status == status
        assert isinstance(e, kvpark.KvparkError)


def test_python_abi_version_is_the_headers():
    m = re.search(r"#define KVPARK_ABI_VERSION (\d+)", HEADER.read_text())
    assert m and int(m.group(1)) == _ffi.ABI_VERSION


def test_an_unknown_status_keeps_its_number():
    e = errors.error_for_status(77, "m")
    assert isinstance(e, errors.UnknownStatusError) and e.status == 77 and "77" in str(e)


# ---- the real library -------------------------------------------------------------


def test_real_library_version(libkvpark):
    assert libkvpark.kvpark_abi_version() == _ffi.ABI_VERSION


def test_config_validate_fills_defaults(libkvpark):
    cfg = kvpark.validate_config({})
    assert cfg["host_bytes"] == 1 << 30
    cfg = kvpark.validate_config({"host_bytes": "8GiB", "codec": "lz4"})
    assert cfg["host_bytes"] == 8 << 30 and cfg["codec"] == "lz4"


@pytest.mark.parametrize(
    "bad,key",
    [({"no_such_knob": 1}, "no_such_knob"), ({"host_bytes": "lots"}, "host_bytes"), ({"codec": "zip"}, "codec")],
)
def test_config_validate_names_the_key(libkvpark, bad, key):
    with pytest.raises(kvpark.ConfigError) as ei:
        kvpark.validate_config(bad)
    assert key in ei.value.message
    text = str(ei.value)
    # each prefix once: the function, the kind, the key
    assert text.startswith("kvpark_config_validate: config error: "), text
    assert text.count("kvpark_config_validate") == 1 and text.count(f"{key}: ") <= 1, text


def test_preflight_names_key_value_and_what_fits(libkvpark, tmp_path):
    """Checks against the machine, all problems in one error, one line each: an nvme_dir
    that is a file, a host_file in a missing directory, a host tier larger than memory."""
    f = tmp_path / "file"
    f.write_text("x")
    cfg = {"nvme_dir": str(f), "host_file": str(tmp_path / "no" / "kv"), "host_bytes": "1024TiB"}
    with pytest.raises(kvpark.ConfigError) as ei:
        kvpark.preflight_config(cfg, {"rank": 0, "ranks": 1})
    lines = ei.value.message.split("\n")
    assert lines[0].startswith("kvpark_config_preflight: config error: nvme_dir: " + str(f)), lines
    assert lines[1].startswith("host_file: ") and "does not exist" in lines[1], lines
    assert lines[2].startswith("host_bytes: 1024.00TiB per rank") and "largest host_bytes" in lines[2], lines
    ok = kvpark.preflight_config({"host_bytes": "4MiB", "nvme_dir": str(tmp_path / "nvme")}, {"rank": 0})
    assert ok["host_bytes"] == 4 << 20 and (tmp_path / "nvme").is_dir()

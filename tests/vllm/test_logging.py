"""The library's log messages reach Python's `logging` (logger "kvpark" and its children):
a real warning of libkvpark, raised on the main thread and on another thread, and the
level mapping checked against include/kvpark.h. No vLLM engine is started.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from kvpark import _ffi
from kvpark._store import ChunkStore

HEADER = Path(__file__).resolve().parents[2] / "include" / "kvpark.h"


def _open_as(nvme: Path, identity: str) -> None:
    cfg = {"host_bytes": "4MiB", "nvme_dir": str(nvme), "nvme_bytes": "64MiB",
           "model_identity": identity}
    ChunkStore(cfg, 0, 4096, 2).close()


def _other_model_records(caplog, store: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name.startswith("kvpark") and "holds KV parked by another model" in r.getMessage()
            and store in r.getMessage()]


def test_a_library_warning_reaches_python_logging(tmp_path, caplog):
    nvme = tmp_path / "nvme"
    caplog.set_level(logging.WARNING, logger="kvpark")
    _open_as(nvme, "model-a")
    assert _other_model_records(caplog, "model-a") == []
    # reopening the store as another model: libkvpark warns that the parked KV is
    # unreachable for this model (src/store/mod.rs, log::warn!)
    _open_as(nvme, "model-b")
    recs = _other_model_records(caplog, "(model-a)")
    assert len(recs) == 1, [r.getMessage() for r in caplog.records]
    r = recs[0]
    assert r.levelno == logging.WARNING
    assert r.name == "kvpark.store", r.name
    assert "(model-b)" in r.getMessage()
    assert r.threadName == threading.current_thread().name


def test_a_warning_from_another_thread_arrives_while_the_main_thread_waits(tmp_path, caplog):
    nvme = tmp_path / "nvme"
    caplog.set_level(logging.WARNING, logger="kvpark")
    _open_as(nvme, "model-a")
    done = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(3):
                _open_as(nvme, "model-b")
                _open_as(nvme, "model-a")
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=worker, name="kvpark-log-test")
    t.start()
    # the main thread holds the GIL between waits; the worker's callbacks take it in turn
    assert done.wait(120), "a library log call from another thread did not return"
    t.join()
    assert errors == []
    recs = [r for r in caplog.records if "holds KV parked by another model" in r.getMessage()]
    assert len(recs) == 6
    assert {r.threadName for r in recs} == {"kvpark-log-test"}


def test_log_levels_are_the_headers():
    body = re.search(r"enum KvparkLogLevel\s*\{(.*?)\}", HEADER.read_text(), re.S)
    assert body, f"no enum KvparkLogLevel in {HEADER}"
    code = re.sub(r"//[^\n]*", "", body.group(1))
    have = {name: int(n) for name, n in re.findall(r"(KVPARK_LOG_LEVEL_[A-Z]+)\s*=\s*(\d+)", code)}
    assert have == {name: n for name, (n, _) in _ffi.LOG_LEVELS.items()}


EXIT_SCRIPT = r"""
import logging, sys, threading, time
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(name)s %(message)s")
from kvpark._store import ChunkStore

def churn(n):
    i = 0
    while True:
        cfg = {"host_bytes": "4MiB", "nvme_dir": sys.argv[1] + str(n), "nvme_bytes": "64MiB",
               "model_identity": f"model-{i % 2}"}
        ChunkStore(cfg, 0, 4096, 2).close()
        i += 1

for n in range(3):
    threading.Thread(target=churn, args=(n,), daemon=True).start()
time.sleep(1.0)
# under the log handler's lock, so the marker is never written into the middle of
# one of the threads' log lines
handler = logging.getLogger().handlers[0]
handler.acquire()
try:
    print("exiting", flush=True)
finally:
    handler.release()
"""


def test_interpreter_exit_while_threads_log(tmp_path):
    """Threads that keep making libkvpark warn while the interpreter exits: the process
    ends normally (the callback is removed at exit; later messages go to stderr)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path / "nvme")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Fatal Python error" not in p.stderr
    out = p.stdout.splitlines()
    assert "exiting" in out, out[-5:]
    # the threads may still log through Python until the callback is removed at exit;
    # nothing else follows (no traceback, no half-written line)
    tail = out[out.index("exiting") + 1 :]
    assert all(l.startswith("kvpark.") for l in tail), tail[-5:]
    # messages went through Python logging before the exit
    assert any(l.startswith("kvpark.store ") and "another model" in l for l in out), out[:5]

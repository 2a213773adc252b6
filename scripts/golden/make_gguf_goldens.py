#!/usr/bin/env python3
"""Record the GGUF goldens: dequantization references and SmolLM2-135M-Instruct's outputs.

Writes into tests/fixtures/gguf/:

  dequant.gguf        -- for every tensor type patchbay reads (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
                         Q5_0, Q5_1, Q4_K, Q5_K, Q6_K): a tensor `<type>` of seeded random bytes
                         (2 rows; the f16 scale fields set to finite values, every other bit
                         random) and `<type>.expected`, F32, what the `gguf` package's reference
                         dequantizer (gguf.quants.dequantize, a transcription of ggml's) gives.
                         Written by gguf.GGUFWriter, so it is also a file of the reference writer.
                         About 12 KB.
  smollm2_golden.json -- when the SmolLM2 GGUF is given (scripts/fetch-smollm2.sh puts it in
                         .cache/smollm2/): transformers' GGUF loader
                         (AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32),
                         AutoTokenizer likewise) on a plain, a chat and a non-ASCII prompt: the token
                         ids and, at the last position, the 20 largest logits (ids and values) and
                         the logits of the first 64 vocabulary ids.

Deterministic (fixed seed, one thread).

Usage:  python scripts/golden/make_gguf_goldens.py [--out tests/fixtures/gguf]
            [--smollm2 .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of the f16 scale fields in one block (kept finite so the reference is finite).
SCALES = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
PROMPTS = {
    "plain": ("The capital of France is", False),
    "chat": ("I finally got the job I wanted! How should I celebrate?", True),
    "non_ascii": ("Grüße aus Zürich — 東京は雨です 🌧️, naïve café", False),
}


def dequant_fixture(out_dir: str) -> None:
    rng = np.random.default_rng(13)
    w = gguf.GGUFWriter(os.path.join(out_dir, "dequant.gguf"), "dequant-test")
    for name in TYPES:
        qtype = T[name]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        cols = 256 if block == 256 else 64
        rows = 2
        n_blocks = rows * cols // block
        raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        if name == "F32":
            raw = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
        elif name == "F16":
            raw = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        elif name == "BF16":
            raw = (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
        for at in SCALES.get(name, []):
            scale = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
            raw[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
        raw = raw.reshape(rows, cols // block * type_size)
        expected = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(rows, cols)
        assert np.isfinite(expected).all(), name
        w.add_tensor(name, raw, raw_dtype=qtype)
        w.add_tensor(f"{name}.expected", expected)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def smollm2(out_dir: str, path: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    d, f = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    cases = {}
    for key, (text, chat) in PROMPTS.items():
        if chat:
            rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            ids = tok(rendered, add_special_tokens=False).input_ids
        else:
            ids = tok(text).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        top = torch.topk(logits, 20)
        cases[key] = {
            "text": text,
            "chat": chat,
            "token_ids": ids,
            "top_ids": top.indices.tolist(),
            "top_logits": top.values.tolist(),
            "first_logits": logits[:64].tolist(),
        }
    golden = {
        "model": os.path.basename(path),
        "made_by": f"transformers {transformers.__version__} GGUF loader, torch {torch.__version__}, gguf {importlib.metadata.version('gguf')}, float32",
        "cases": cases,
    }
    with open(os.path.join(out_dir, "smollm2_golden.json"), "w") as fh:
        json.dump(golden, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/gguf")
    ap.add_argument("--smollm2", default=".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dequant_fixture(a.out)
    if os.path.exists(a.smollm2):
        smollm2(a.out, a.smollm2)
    else:
        print(f"{a.smollm2} is absent (scripts/fetch-smollm2.sh fetches it): smollm2_golden.json not written")


if __name__ == "__main__":
    main()

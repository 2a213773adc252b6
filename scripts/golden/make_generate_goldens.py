#!/usr/bin/env python3
"""Record generation goldens from Hugging Face transformers for the fixture models.

Loads each existing fixture checkpoint <fixtures>/<family>/ (made by make_goldens.py; the steering
vectors by make_steer_goldens.py; nothing there is changed) and writes generate_golden.json beside
it: the greedy tokens `transformers.generate` (KV cache, do_sample=False, the checkpoint's eos ids)
produces for every fixture prompt, plain and steered. Steering is a forward hook on the middle
decoder layer's output adding beta * a (the `a` vector of steer_vectors.safetensors at that
layer's resid_post) at every position the forward computes: the whole prompt at prefill, then each
generated token as it is fed back (patchbay's `--positions all+generated`).

Greedy decoding is an argmax: where the top two logits of a step are closer than MIN_MARGIN, float
rounding could pick either, so every step's margin is recorded and the case is dropped (and
reported) when one is too close.

Deterministic (single thread); rerunning gives identical files.

Usage:  python scripts/golden/make_generate_goldens.py [--fixtures DIR] [--families llama ...]
"""

from __future__ import annotations

import os
import sys

import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_goldens import FAMILY_SPECS, hook_tensor, site_module  # noqa: E402
from make_patch_goldens import load_fixture, run_cli, to_json  # noqa: E402

GENERATOR = "scripts/golden/make_generate_goldens.py"
MAX_NEW_TOKENS = 8
BETAS = [0.0, 2.0, 6.0]
# The smallest top-1 minus top-2 logit gap of a recorded step.
MIN_MARGIN = 1e-3


def greedy(model, ids: list[int], hook=None) -> tuple[list[int], float]:
    """The generated tokens (an eos included) and the smallest top-2 margin over the steps."""
    handle = hook() if hook else None
    try:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0)
    finally:
        if handle:
            handle.remove()
    tokens = out.sequences[0, len(ids):].tolist()
    margin = min((s[0].topk(2).values[0] - s[0].topk(2).values[1]).item() for s in out.scores)
    return tokens, margin


def build_family(name: str, fixtures: str) -> None:
    fam = FAMILY_SPECS[name]
    out_dir = os.path.join(fixtures, name)
    model, _, prompts = load_fixture(out_dir)
    layer = model.config.num_hidden_layers // 2
    vector_name = f"blocks.{layer}.hook_resid_post/a"
    v = load_file(os.path.join(out_dir, "steer_vectors.safetensors"))[vector_name]
    mod, io = site_module(model, fam, layer, "hook_resid_post")
    cases, dropped = [], []
    for beta in BETAS:
        def hook(beta=beta):
            return hook_tensor(mod, io, lambda x: x + beta * v)

        for i, ids in enumerate(prompts):
            tokens, margin = greedy(model, ids, hook if beta != 0.0 else None)
            if margin < MIN_MARGIN:
                dropped.append({"beta": beta, "prompt": i, "margin": margin})
                continue
            cases.append({"beta": beta, "prompt": i, "tokens": tokens, "min_margin": margin})
    # beta 0 through the hook is the plain run.
    for c in cases:
        if c["beta"] == 0.0:
            tokens, _ = greedy(model, prompts[c["prompt"]], lambda: hook_tensor(mod, io, lambda x: x + 0.0 * v))
            assert tokens == c["tokens"], (name, c)
    steered = [c for c in cases if c["beta"] == BETAS[-1]]
    plain = {c["prompt"]: c["tokens"] for c in cases if c["beta"] == 0.0}
    assert any(plain.get(c["prompt"]) not in (None, c["tokens"]) for c in steered), f"{name}: steering changed no generation"
    golden = {
        "generator": GENERATOR,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "note": "greedy transformers.generate (KV cache, the checkpoint's eos ids), one prompt at a time; steered: "
        "x <- x + beta * a at the output of decoder layer `layer` (resid_post) for every position each forward "
        "computes (patchbay: --positions all+generated); tokens: the generated ids, an eos included; cases whose "
        "steps have a top-2 logit margin under min_margin are dropped",
        "prompts": prompts,
        "layer": layer,
        "vector": vector_name,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": model.generation_config.eos_token_id,
        "min_margin": MIN_MARGIN,
        "cases": cases,
        "dropped": dropped,
    }
    path = os.path.join(out_dir, "generate_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_json(golden) + "\n")
    print(f"{name:8s} layer={layer} cases={len(cases)} dropped={len(dropped)} {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    run_cli(__doc__, build_family)

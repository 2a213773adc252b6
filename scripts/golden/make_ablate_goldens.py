#!/usr/bin/env python3
"""Record component-ablation goldens from Hugging Face transformers for the fixture models.

Loads each existing fixture checkpoint <fixtures>/<family>/ (written by make_goldens.py; nothing
there is changed) and writes ablate_golden.json beside it: the label logits that an independent
forward-pre-hook implementation gives when one component is ablated or scaled, per case and
prompt.

A case is one component of one layer at positions `all` or [-1] (the last token):
  head:     head h's slice [h * d_head, (h + 1) * d_head) of the input of self_attn.o_proj
            (TransformerLens' attn.hook_z) set to 0 (`zero`) or multiplied by alpha (`scale`);
  neurons:  the listed entries of the input of mlp.down_proj (mlp.hook_post), likewise.
Heads and neuron groups are drawn with a fixed seed, two heads and one group of 5 neurons per
layer. Label logits are read at each prompt's last position, over the labels of
patch_golden.json (the same prompts: prompts.json ids then chat_ids).

The script checks that the clean logits equal golden.safetensors' (1e-4), that scaling by 1 gives
the clean logits exactly, and that every case moves some label logit by more than 1e-3 (so the
tests' f32 tolerance can tell an ablation from none).

Deterministic (single thread, fixed seed); rerunning gives identical files.

Usage:  python scripts/golden/make_ablate_goldens.py [--fixtures DIR] [--families llama ...]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_goldens import forward_logits  # noqa: E402
from make_patch_goldens import load_fixture, run_cli, to_json  # noqa: E402

GENERATOR = "scripts/golden/make_ablate_goldens.py"
SEED = 12
POSITIONS = ["all", [-1]]
OPS = [("zero", None), ("scale", 3.0)]


def ablated_labels(model, prompts, labels, layer, module, units, width, positions, op, alpha) -> torch.Tensor:
    """[n_prompts, n_labels]: label logits at each prompt's last position with the units' slices
    (each `width` wide) of `module`'s input of `layer` zeroed or scaled at `positions` (a forward
    pre-hook, one prompt at a time)."""
    block = model.model.layers[layer]
    mod = block.self_attn.o_proj if module == "o_proj" else block.mlp.down_proj
    cols = torch.tensor([u * width + i for u in units for i in range(width)])

    def pre(_mod, args):
        x = args[0].clone()  # [1, T, n_units * width]
        rows = range(x.shape[1]) if positions == "all" else [p % x.shape[1] for p in positions]
        for p in rows:
            x[0, p, cols] = 0.0 if op == "zero" else x[0, p, cols] * alpha
        return (x, *args[1:])

    out = []
    for ids in prompts:
        h = mod.register_forward_pre_hook(pre)
        try:
            out.append(forward_logits(model, ids)[-1, labels])
        finally:
            h.remove()
    return torch.stack(out)


def build_family(name: str, fixtures: str) -> None:
    out_dir = os.path.join(fixtures, name)
    model, recorded, prompts = load_fixture(out_dir)
    cfg = model.config
    n_layers, n_heads, d_mlp = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    with open(os.path.join(out_dir, "patch_golden.json"), encoding="utf-8") as f:
        labels = json.load(f)["labels"]
    clean_all = [forward_logits(model, p) for p in prompts]
    recorded_logits = load_file(os.path.join(out_dir, "golden.safetensors"))["logits"]
    torch.testing.assert_close(torch.cat(clean_all[: len(recorded["ids"])]), recorded_logits, rtol=0, atol=1e-4)
    clean = torch.stack([logits[-1, labels] for logits in clean_all])

    gen = torch.Generator().manual_seed(SEED)
    cases = []
    for layer in range(n_layers):
        heads = torch.randperm(n_heads, generator=gen)[:2].tolist()
        group = sorted(torch.randperm(d_mlp, generator=gen)[:5].tolist())
        components = [("head", {"head": h}, "o_proj", [h], d_head) for h in heads] + [("neurons", {"neurons": group}, "down_proj", group, 1)]
        for kind, which, module, units, width in components:
            for positions in POSITIONS:
                for op, alpha in OPS:
                    got = ablated_labels(model, prompts, labels, layer, module, units, width, positions, op, alpha)
                    change = (got - clean).abs().max().item()
                    assert change > 1e-3, (name, layer, kind, which, positions, op, change)
                    cases.append({"kind": kind, "layer": layer, **which, "positions": positions, "op": op, "alpha": alpha, "ablated": got.tolist()})
        one = ablated_labels(model, prompts, labels, layer, "o_proj", heads[:1], d_head, "all", "scale", 1.0)
        assert torch.equal(one, clean), (name, layer)  # x * 1 is x

    golden = {
        "generator": GENERATOR,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "note": "prompts: prompts.json ids then chat_ids; head: head h's d_head slice of self_attn.o_proj's input, "
        "neurons: entries of mlp.down_proj's input; op zero (x <- 0) or scale (x <- alpha x) at positions all or "
        "relative; clean/ablated: label logits at each prompt's last position, [prompt][label]",
        "prompts": prompts,
        "labels": labels,
        "clean": clean.tolist(),
        "cases": cases,
    }
    path = os.path.join(out_dir, "ablate_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_json(golden) + "\n")
    print(f"{name:8s} labels={labels} cases={len(cases)} {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    run_cli(__doc__, build_family)

#!/usr/bin/env python3
"""Record activation-patching goldens from Hugging Face transformers for the fixture models.

Loads each existing fixture checkpoint <fixtures>/<family>/ (written by make_goldens.py; nothing
there is changed) and writes <fixtures>/<family>/patch_golden.json: a few patching sweeps and the
label logits that an independent forward-hook implementation gives for every experiment.

An experiment (source prompt, target prompt, site kind, window of consecutive layers, positions)
replaces, at every layer of the window, the target's value of the site at the given positions
(relative: -1 = last token, resolved in each prompt) with the source's clean value at the same
relative positions, then reads the label logits at the target's last position. For z (per head,
the o_proj input) and mlp_post (per neuron, the down_proj input) only the selected units are
replaced. Hooks are the module boundaries of make_goldens.site_module: decoder-layer input/output
(resid_pre/resid_post), the attention / MLP output or, for gemma2 and olmo2, the post-norm's
output (attn_out/mlp_out), o_proj input (z), down_proj input (mlp_post).

Experiments are listed in patchbay's order (pair, then site, then centre); the window of W
layers centred on c covers layers c - (W-1)//2 .. c - (W-1)//2 + W - 1.

Deterministic (single thread, no randomness); rerunning gives identical files.

Usage:  python scripts/golden/make_patch_goldens.py [--fixtures DIR] [--families llama ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_goldens import FAMILIES, FAMILY_SPECS, forward_logits, hook_tensor, site_module  # noqa: E402

GENERATOR = "scripts/golden/make_patch_goldens.py"

# Site kinds (patchbay short names) -> make_goldens' TransformerLens site names.
SITES = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
    "mlp_post": "mlp.hook_post",
}
RESIDUAL_SITES = ["resid_pre", "resid_post", "attn_out", "mlp_out"]

# Prompt indices: the three fixture texts (prompts.json "ids"), then the chat prompt.
# Pairs (source, target): shorter source, longer source, and a 22-token source into a 5/6-token
# target. No pair shares its last token, so every experiment changes the target.
PAIRS = [(0, 1), (3, 2), (2, 0)]
N_LABELS = 4

# (sites, units, window, centres, positions): every site kind with windows of 1 and 2 layers
# (all layers of the 2-layer fixtures), one and several positions.
SWEEPS = [
    (RESIDUAL_SITES, None, 1, [0, 1], [-1]),
    (RESIDUAL_SITES, None, 2, [0], [-3, -1]),
    (["z"], [1, 3], 1, [0, 1], [-2, -1]),
    (["z"], [0, 2, 3], 2, [0], [-1]),
    (["mlp_post"], [0, 5, 40, 95], 1, [0, 1], [-3, -1]),
    (["mlp_post"], [7, 77], 2, [0], [-1]),
]


def window(center: int, width: int, n_layers: int) -> list[int]:
    start = center - (width - 1) // 2
    assert 0 <= start and start + width <= n_layers, (center, width)
    return list(range(start, start + width))


def clean_run(model, fam, ids: list[int]) -> tuple[dict, torch.Tensor]:
    """Clean forward of one prompt: {(layer, kind): [T, width]} for every patchable site, and logits."""
    store: dict = {}
    handles = []
    for l in range(model.config.num_hidden_layers):
        for kind, tl in SITES.items():
            mod, io = site_module(model, fam, l, tl)
            handles.append(hook_tensor(mod, io, lambda x, key=(l, kind): store.__setitem__(key, x.detach()[0].clone())))
    try:
        logits = forward_logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return store, logits


def patched_logits(model, fam, ids, kind, layers, tgt_pos, src_pos, units, source: dict) -> torch.Tensor:
    """Forward of the target with the site replaced by the source's clean values at every layer."""
    n_heads = model.config.num_attention_heads

    def replace(x, l):
        x = x.clone()
        src = source[(l, kind)]
        for pt, ps in zip(tgt_pos, src_pos):
            if units is None:
                x[0, pt] = src[ps]
            elif kind == "z":
                x[0, pt].view(n_heads, -1)[units] = src[ps].view(n_heads, -1)[units]
            else:
                assert kind == "mlp_post"
                x[0, pt, units] = src[ps, units]
        return x

    handles = []
    for l in layers:
        mod, io = site_module(model, fam, l, SITES[kind])
        handles.append(hook_tensor(mod, io, lambda x, l=l: replace(x, l)))
    try:
        return forward_logits(model, ids)
    finally:
        for h in handles:
            h.remove()


def choose_labels(last_logits: list[torch.Tensor]) -> list[int]:
    """The prompts' top tokens at the last position, round-robin by rank, N_LABELS distinct."""
    orders = [torch.argsort(v, descending=True, stable=True).tolist() for v in last_logits]
    labels: list[int] = []
    for rank in range(len(orders[0])):
        for order in orders:
            if order[rank] not in labels and len(labels) < N_LABELS:
                labels.append(order[rank])
    return labels


def to_json(obj, indent: int = 0) -> str:
    """JSON with lists of scalars, and objects of those (one experiment), on one line when they
    fit in 160 columns; floats as shortest float32 decimals. Keeps the file small and readable."""

    def depth(o) -> int:
        if isinstance(o, dict):
            return 1 + max(map(depth, o.values()), default=0)
        if isinstance(o, (list, tuple)):
            return 1 + max(map(depth, o), default=0)
        return 0

    def flat(o) -> str:
        if isinstance(o, float):
            return str(np.float32(o))
        if isinstance(o, dict):
            return "{" + ", ".join(f"{json.dumps(k)}: {flat(v)}" for k, v in o.items()) + "}"
        if isinstance(o, (list, tuple)):
            return "[" + ", ".join(flat(v) for v in o) + "]"
        return json.dumps(o, ensure_ascii=False)

    one = flat(obj)
    if depth(obj) <= 1 or (depth(obj) == 2 and indent + len(one) <= 160):
        return one
    pad = " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {to_json(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + to_json(v, indent + 2) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def load_fixture(out_dir: str) -> tuple:
    """A fixture's model (float32, eager attention), its recorded prompts.json and the prompts the
    goldens run (its ids, then chat_ids)."""
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with open(os.path.join(out_dir, "prompts.json"), encoding="utf-8") as f:
        recorded = json.load(f)
    return model, recorded, recorded["ids"] + [recorded["chat_ids"]]


def build_family(name: str, fixtures: str) -> None:
    fam = FAMILY_SPECS[name]
    out_dir = os.path.join(fixtures, name)
    model, recorded, prompts = load_fixture(out_dir)
    n_layers = model.config.num_hidden_layers

    clean = [clean_run(model, fam, p) for p in prompts]
    # Same model and prompts as the activation goldens.
    recorded_logits = load_file(os.path.join(out_dir, "golden.safetensors"))["logits"]
    assert torch.equal(torch.cat([logits for _, logits in clean[: len(recorded["ids"])]]), recorded_logits), name
    labels = choose_labels([logits[-1] for _, logits in clean])
    clean_labels = [logits[-1, labels] for _, logits in clean]

    sweeps = []
    for sites, units, width, centers, positions in SWEEPS:
        exps = []
        for s, t in PAIRS:
            tgt_pos = [p % len(prompts[t]) for p in positions]
            src_pos = [p % len(prompts[s]) for p in positions]
            for kind in sites:
                for c in centers:
                    layers = window(c, width, n_layers)
                    logits = patched_logits(model, fam, prompts[t], kind, layers, tgt_pos, src_pos, units, clean[s][0])
                    got = logits[-1, labels]
                    change = (got - clean_labels[t]).abs().max().item()
                    assert change > 1e-3, (name, s, t, kind, layers, change)  # every patch changes the target
                    if kind == "resid_post" and n_layers - 1 in layers and positions == [-1]:
                        # The last layer's residual at the last position is all the logits read.
                        torch.testing.assert_close(got, clean_labels[s], rtol=0, atol=1e-6)
                    exps.append(
                        {"source": s, "target": t, "site": kind, "layers": layers, "positions": tgt_pos,
                         "patched": got.tolist()}
                    )
        sweeps.append(
            {"sites": sites, "units": units, "window": width, "centers": centers, "positions": positions,
             "pairs": [list(p) for p in PAIRS], "experiments": exps}
        )
        # Patching a prompt with itself is the identity (checks the hook plumbing).
        kind = sites[0]
        same = patched_logits(model, fam, prompts[1], kind, window(centers[0], width, n_layers),
                              [p % len(prompts[1]) for p in positions], [p % len(prompts[1]) for p in positions],
                              units, clean[1][0])
        assert torch.equal(same, clean[1][1]), (name, kind)

    golden = {
        "generator": GENERATOR,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "note": "prompts: prompts.json ids then chat_ids; experiments in (pair, site, centre) order; positions: "
        "absolute target positions patched; clean/patched: label logits at the target's last position",
        "prompts": prompts,
        "labels": labels,
        "clean": [v.tolist() for v in clean_labels],
        "sweeps": sweeps,
    }
    path = os.path.join(out_dir, "patch_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_json(golden) + "\n")
    n_exps = sum(len(s["experiments"]) for s in sweeps)
    print(f"{name:8s} lengths={[len(p) for p in prompts]} labels={labels} experiments={n_exps} "
          f"{os.path.getsize(path)} bytes")


def run_cli(doc: str, build) -> None:
    """The command line of the fixture-reading generators: parses --fixtures and --families, then
    calls build(family, fixtures) for each family with torch deterministic on one thread."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--fixtures", default=os.path.join(repo_root, "tests", "fixtures"),
                        help="fixture directory made by make_goldens.py (default: <repo root>/tests/fixtures)")
    parser.add_argument("--families", nargs="*", default=FAMILIES, choices=FAMILIES)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in args.families:
        build(name, args.fixtures)


if __name__ == "__main__":
    run_cli(__doc__, build_family)

#!/usr/bin/env python3
"""Record logit-lens goldens from Hugging Face transformers for the fixture models.

Loads each existing fixture checkpoint <fixtures>/<family>/ (written by make_goldens.py; nothing
there is changed) and writes `lens_golden.json` beside it: for every prompt (prompts.json ids then
chat_ids), every layer L and every position, the logit lens of the residual stream after block L
(resid_post), computed from `output_hidden_states` as

    lens_L = lm_head(model.model.norm(hidden_states[L + 1]))     (Gemma 2: tanh(lens / cap) * cap)

(hidden_states[0] is the embeddings entering block 0 and hidden_states[L + 1] block L's output; by
default transformers replaces the last one by the final norm's output, so the script sets
`config.tie_last_hidden_states = False` and checks that the default's last entry is the norm of
the raw one), read at the labels of patch_golden.json
(`label_logits`, [prompt][position][layer][label]) and as the top K tokens of the whole vocabulary
(`top_ids`, `top_logits`, [prompt][position][layer][k], largest first).

The script checks that the last layer's lens equals the model's own logits (the final norm and
lm_head are exactly what the model applies to its last hidden state). Top-k lists may hold near
ties (random models); tests/lens.rs accepts a swap of two ranks whose logits agree within its
tolerance.

Deterministic (single thread); rerunning gives identical files.

Usage:  python scripts/golden/make_lens_goldens.py [--fixtures DIR] [--families llama ...]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_patch_goldens import load_fixture, run_cli, to_json  # noqa: E402

GENERATOR = "scripts/golden/make_lens_goldens.py"
TOP_K = 5


def lens_logits(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_layers, T, vocab] lens logits of every block's output, [T, vocab] the model's logits)."""
    with torch.no_grad():
        model.config.tie_last_hidden_states = True  # the default: the last entry is normed
        normed_last = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=True).hidden_states[-1]
        model.config.tie_last_hidden_states = False
        out = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=True)
        hidden = torch.stack([h[0] for h in out.hidden_states[1:]])  # [n_layers, T, d_model]
        assert torch.equal(model.model.norm(hidden[-1]), normed_last[0])
        lens = model.lm_head(model.model.norm(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # gemma2
            lens = torch.tanh(lens / cap) * cap
    return lens, out.logits[0]


def build_family(name: str, fixtures: str) -> None:
    out_dir = os.path.join(fixtures, name)
    model, _, prompts = load_fixture(out_dir)
    n_layers = model.config.num_hidden_layers
    with open(os.path.join(out_dir, "patch_golden.json"), encoding="utf-8") as f:
        labels = json.load(f)["labels"]

    label_logits, top_ids, top_logits = [], [], []
    for ids in prompts:
        lens, logits = lens_logits(model, ids)
        assert lens.shape[0] == n_layers, name
        # The last block's lens is the model's own output.
        torch.testing.assert_close(lens[-1], logits, rtol=0, atol=1e-5)
        top = torch.topk(lens, TOP_K, dim=-1)  # [n_layers, T, k]
        label_logits.append(lens[:, :, labels].permute(1, 0, 2).tolist())
        top_ids.append(top.indices.permute(1, 0, 2).tolist())
        top_logits.append(top.values.permute(1, 0, 2).tolist())

    golden = {
        "generator": GENERATOR,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "note": "prompts: prompts.json ids then chat_ids; lens of block L's output (resid_post) = "
        "lm_head(model.norm(hidden_states[L + 1])), soft-capped for gemma2; label_logits at the labels of "
        "patch_golden.json, [prompt][position][layer][label]; top_ids/top_logits: the top k of the whole "
        "vocabulary, [prompt][position][layer][k], largest first",
        "prompts": prompts,
        "labels": labels,
        "k": TOP_K,
        "label_logits": label_logits,
        "top_ids": top_ids,
        "top_logits": top_logits,
    }
    path = os.path.join(out_dir, "lens_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_json(golden) + "\n")
    print(f"{name:8s} layers={n_layers} lengths={[len(p) for p in prompts]} {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    run_cli(__doc__, build_family)

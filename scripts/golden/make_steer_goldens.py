#!/usr/bin/env python3
"""Record steering goldens from Hugging Face transformers for the fixture models.

Loads each existing fixture checkpoint <fixtures>/<family>/ (written by make_goldens.py; nothing
there is changed) and writes two files beside it:

  steer_vectors.safetensors  -- steering vectors in patchbay's directions naming: one f32 [d_model]
                                tensor `blocks.<L>.hook_<kind>/<name>` per residual site kind
                                (resid_pre, resid_post, attn_out, mlp_out), layer and name, and one
                                f32 [2, d_model] tensor `blocks.<L>.hook_<kind>/subspace` (orthonormal
                                rows U; P = U^T U) at the sites of the project-set cases.
  steer_golden.json          -- the steering cases and the label logits that an independent
                                forward-hook implementation gives for every case and prompt.

Vectors: `a` = a contrast direction (the clean site's mean over prompt 1's tokens minus the mean
over prompt 0's, as class-mean directions are made), `b` = a seeded Gaussian vector of the same
norm. A case steers one site (layer, kind) at positions `all` or [-1] (the last token):
  add:          x <- x + beta * v, v the sum of the named vectors, divided by its norm first when
                `normalise`;
  project_set:  x <- x + v - beta * P x, v the named vector, P = U^T U for the site's `subspace`.
Hooks are the module boundaries of make_goldens.site_module: decoder-layer input/output
(resid_pre/resid_post), the attention / MLP output or, for gemma2 and olmo2, the post-norm's
output (attn_out/mlp_out). Label logits are read at each prompt's last position, over the labels
make_patch_goldens.choose_labels picks (the same prompts and labels as patch_golden.json).

Deterministic (single thread, fixed seed); rerunning gives identical files.

Usage:  python scripts/golden/make_steer_goldens.py [--fixtures DIR] [--families llama ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_goldens import FAMILIES, FAMILY_SPECS, forward_logits, hook_tensor, save_file, site_module  # noqa: E402
from make_patch_goldens import RESIDUAL_SITES, SITES, choose_labels, clean_run, run_cli, to_json  # noqa: E402

GENERATOR = "scripts/golden/make_steer_goldens.py"
SEED = 11

POSITIONS = ["all", [-1]]
# Betas per `normalise`: the raw vectors have norms of a few units, like the residual stream.
BETAS = {False: [-2.0, 0.0, 1.0, 3.0], True: [-6.0, 0.0, 4.0, 12.0]}
# (site kind, layer index into the chosen layers, positions, beta, vector names) of the extra cases.
COMBINED = [("resid_pre", -1, "all", 2.0, ["a", "b"]), ("mlp_out", 0, [-1], -3.0, ["a", "b"])]
PROJECT_SET = [("resid_post", 0, "all", 1.0, "a"), ("attn_out", -1, [-1], 0.5, "b")]


def steer_layers(n_layers: int) -> list[int]:
    """First, middle and last layer (all of them in the 2-layer fixtures)."""
    return sorted({0, n_layers // 2, n_layers - 1})


def site_name(layer: int, kind: str) -> str:
    return f"blocks.{layer}.{SITES[kind]}"


def steered_labels(model, fam, prompts, labels, layer, kind, positions, edit) -> torch.Tensor:
    """[n_prompts, n_labels]: label logits at each prompt's last position with `edit(x_row) -> new row` applied to the
    site's value at the given positions (a hook on the HF module, one prompt at a time)."""

    def hook(x):
        x = x.clone()
        rows = range(x.shape[1]) if positions == "all" else [p % x.shape[1] for p in positions]
        for p in rows:
            x[0, p] = edit(x[0, p])
        return x

    mod, io = site_module(model, fam, layer, SITES[kind])
    out = []
    for ids in prompts:
        h = hook_tensor(mod, io, hook)
        try:
            out.append(forward_logits(model, ids)[-1, labels])
        finally:
            h.remove()
    return torch.stack(out)


def make_vectors(clean, layers, gen) -> dict[str, torch.Tensor]:
    """`a`, `b` at every (layer, residual kind); `subspace` where a project-set case needs it."""
    vecs = {}
    for layer in layers:
        for kind in RESIDUAL_SITES:
            a = clean[1][0][(layer, kind)].mean(0) - clean[0][0][(layer, kind)].mean(0)
            b = torch.randn(a.shape[0], generator=gen)
            vecs[f"{site_name(layer, kind)}/a"] = a.contiguous()
            vecs[f"{site_name(layer, kind)}/b"] = (b * (a.norm() / b.norm())).contiguous()
    for kind, li, _, _, _ in PROJECT_SET:
        d = clean[0][0][(layers[li], kind)].shape[1]
        q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen))
        vecs[f"{site_name(layers[li], kind)}/subspace"] = q.T.contiguous()  # [2, d_model], orthonormal rows
    return vecs


def build_family(name: str, fixtures: str) -> None:
    fam = FAMILY_SPECS[name]
    out_dir = os.path.join(fixtures, name)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    n_layers = model.config.num_hidden_layers
    layers = steer_layers(n_layers)
    with open(os.path.join(out_dir, "prompts.json"), encoding="utf-8") as f:
        recorded = json.load(f)
    prompts = recorded["ids"] + [recorded["chat_ids"]]

    clean = [clean_run(model, fam, p) for p in prompts]
    # Same model and prompts as the activation goldens: bit for bit on the machine that made them,
    # within float32 rounding (a few 1e-6) under another torch build or CPU.
    recorded_logits = load_file(os.path.join(out_dir, "golden.safetensors"))["logits"]
    got_logits = torch.cat([logits for _, logits in clean[: len(recorded["ids"])]])
    torch.testing.assert_close(got_logits, recorded_logits, rtol=0, atol=1e-4)
    labels = choose_labels([logits[-1] for _, logits in clean])
    with open(os.path.join(out_dir, "patch_golden.json"), encoding="utf-8") as f:
        assert labels == json.load(f)["labels"], name  # the patching goldens' labels
    clean_labels = torch.stack([logits[-1, labels] for _, logits in clean])
    vecs = make_vectors(clean, layers, torch.Generator().manual_seed(SEED))

    def add_vector(layer, kind, names, normalise):
        v = sum(vecs[f"{site_name(layer, kind)}/{n}"] for n in names)
        return v / torch.linalg.vector_norm(v) if normalise else v

    cases = []

    def record(case, got):
        if case["beta"] == 0.0 and case["op"] == "add":
            assert torch.equal(got, clean_labels), (name, case)  # x + 0 * v is x
        else:
            change = (got - clean_labels).abs().max().item()
            # Every case changes the labels by more than the tests' tolerances (the bf16 one is 5% of
            # the largest |logit|).
            assert change > 0.1 * clean_labels.abs().max().item(), (name, case, change)
        cases.append({**case, "steered": got.tolist()})

    for kind in RESIDUAL_SITES:
        for layer in layers:
            for positions in POSITIONS:
                for normalise in [False, True]:
                    for beta in BETAS[normalise]:
                        v = add_vector(layer, kind, ["a"], normalise)
                        got = steered_labels(model, fam, prompts, labels, layer, kind, positions, lambda x: x + beta * v)
                        record({"op": "add", "site": kind, "layer": layer, "positions": positions, "beta": beta,
                                "normalise": normalise, "vectors": ["a"]}, got)
    for kind, li, positions, beta, names in COMBINED:
        for normalise in [False, True]:
            v = add_vector(layers[li], kind, names, normalise)
            got = steered_labels(model, fam, prompts, labels, layers[li], kind, positions, lambda x: x + beta * v)
            record({"op": "add", "site": kind, "layer": layers[li], "positions": positions, "beta": beta,
                    "normalise": normalise, "vectors": names}, got)
    for kind, li, positions, beta, vname in PROJECT_SET:
        u = vecs[f"{site_name(layers[li], kind)}/subspace"]
        p = u.T @ u  # [d_model, d_model]
        v = vecs[f"{site_name(layers[li], kind)}/{vname}"]
        got = steered_labels(model, fam, prompts, labels, layers[li], kind, positions, lambda x: x + v - beta * (p @ x))
        record({"op": "project_set", "site": kind, "layer": layers[li], "positions": positions, "beta": beta,
                "normalise": False, "vectors": [vname, "subspace"]}, got)

    check_plumbing(model, fam, prompts, labels, layers, clean, vecs, cases)

    with open(os.path.join(out_dir, "config.json"), "rb") as f:
        config_sha256 = hashlib.sha256(f.read()).hexdigest()
    save_file(vecs, os.path.join(out_dir, "steer_vectors.safetensors"),
              {"format": "patchbay-directions-1", "generator": GENERATOR, "method": "golden",
               "model": f"tests/fixtures/{name}", "config_sha256": config_sha256,
               "sites": ",".join(site_name(l, k) for l in layers for k in RESIDUAL_SITES), "classes": "a,b",
               "note": "a: clean mean over prompt 1 minus prompt 0; b: seeded Gaussian of a's norm; "
                       "subspace: [2, d_model] orthonormal rows U, P = U^T U"})
    golden = {
        "generator": GENERATOR,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "note": "prompts: prompts.json ids then chat_ids; vectors: steer_vectors.safetensors "
        "blocks.<layer>.hook_<site>/<name>; add: x <- x + beta * v, v = sum of the vectors (over its norm when "
        "normalise); project_set: x <- x + v - beta * P x, vectors [v, subspace], P = U^T U; positions: all or "
        "relative; clean/steered: label logits at each prompt's last position, [prompt][label]",
        "prompts": prompts,
        "labels": labels,
        "layers": layers,
        "clean": clean_labels.tolist(),
        "cases": cases,
    }
    path = os.path.join(out_dir, "steer_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_json(golden) + "\n")
    print(f"{name:8s} labels={labels} cases={len(cases)} {os.path.getsize(path)} + "
          f"{os.path.getsize(os.path.join(out_dir, 'steer_vectors.safetensors'))} bytes")


def check_plumbing(model, fam, prompts, labels, layers, clean, vecs, cases) -> None:
    """Cross-checks of the hooks with the model's own modules: steering resid_post of layer L is
    steering resid_pre of layer L + 1; steering the last layer's resid_post at the last position is
    the final norm, unembedding (and soft-capping) of the clean value plus beta * v."""
    last = model.config.num_hidden_layers - 1
    for c in cases:
        if c["op"] != "add" or c["vectors"] != ["a"] or c["site"] != "resid_post":
            continue
        v = vecs[f"{site_name(c['layer'], 'resid_post')}/a"]
        v = v / torch.linalg.vector_norm(v) if c["normalise"] else v
        if c["layer"] < last:
            # Same addition at the next layer's input: the recorded case must match bit for bit.
            got = steered_labels(model, fam, prompts, labels, c["layer"] + 1, "resid_pre", c["positions"],
                                 lambda x: x + c["beta"] * v)
            assert got.tolist() == c["steered"], c
        if c["layer"] == last and c["positions"] == [-1]:
            x = torch.stack([clean[i][0][(last, "resid_post")][-1] for i in range(len(prompts))])
            with torch.no_grad():
                want = model.lm_head(model.model.norm(x + c["beta"] * v))[:, labels]
            cap = getattr(model.config, "final_logit_softcapping", None)
            if cap:  # gemma2
                want = torch.tanh(want / cap) * cap
            torch.testing.assert_close(torch.tensor(c["steered"]), want, rtol=0, atol=1e-5)


if __name__ == "__main__":
    run_cli(__doc__, build_family)

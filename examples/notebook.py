# %% [markdown]
# # patchbay from Python: one figure of each study on the demo model
#
# A plain script with `# %%` cells (VS Code, Jupyter's jupytext, or `python examples/notebook.py`
# from the repository root). Needs `pip install ./python` (README "Python"); matplotlib is
# optional: with it the figures are saved as PNGs, without it they are printed as tables.
#
# - Tak et al. 2025: activation patching in 5-layer windows between correctly predicted prompts
#   of different emotions: the flip rate to the source's emotion by site and window centre.
# - Wang et al. 2025: steering along each emotion's class-mean direction (resid_post, middle
#   layer, every position): the share of prompts of other emotions whose prediction becomes the
#   steered emotion, against a random direction of the same norm.

# %%
import csv
from pathlib import Path

import numpy as np

import patchbay

OUT = Path("demo-out/notebook")
OUT.mkdir(parents=True, exist_ok=True)
m = patchbay.Model("demo/model", device="cpu")  # "emu" runs the CUDA kernels on the CPU emulator; "cuda" a GPU
cfg = m.config
print(f"{cfg['family']}: {cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['parameters']:,} parameters")

rows = [r for r in csv.DictReader(open("demo/corpus.csv")) if r["split"] == "test"][:390]
emotions = sorted({r["emotion"] for r in rows})
gold = np.array([emotions.index(r["emotion"]) for r in rows])
ids = m.tokenize([r["text"] for r in rows], template="tak")  # the study's prompt, as `--template tak`

# %% [markdown]
# ## The model's own predictions (`patchbay score`)

# %%
scores = m.score(token_ids=ids, labels=emotions)
pred = scores["pred"]
print(f"accuracy {np.mean(pred == gold):.3f} on {len(ids)} held-out prompts (chance {1 / len(emotions):.3f})")

# %% [markdown]
# ## Tak et al.: activation patching (`patchbay patch`)
# 200 random pairs of correctly predicted prompts with different emotions; each (pair, site,
# centre) patches the source's clean activations at the last token into the target at the 5
# layers around the centre.

# %%
rng = np.random.default_rng(0)
correct = np.flatnonzero(pred == gold)
pairs = []
while len(pairs) < 200:
    s, t = rng.choice(correct, size=2, replace=False)
    if gold[s] != gold[t]:
        pairs.append((int(s), int(t)))
sites = ["attn_out", "mlp_out", "resid_post"]
results = m.patch(token_ids=ids, labels=emotions, pairs=pairs, sites=sites, window=5, positions=[-1])
centers = sorted({r["center"] for r in results})
flip = np.array([[np.mean([r["flipped_to_source"] for r in results if r["site"] == s and r["center"] == c]) for c in centers] for s in sites])
print("flip rate to the source's emotion (rows: site, columns: window centre layer)")
print("            " + " ".join(f"{c:>6}" for c in centers))
for s, row in zip(sites, flip):
    print(f"{s:>11} " + " ".join(f"{v:6.2f}" for v in row))

# %% [markdown]
# ## Wang et al.: steering along class-mean directions (`patchbay directions`, `steer`)
# Directions: the mean of resid_post at the last token over each emotion's prompts minus the mean
# over the rest (the first half of the prompts); steered: the other half's prompts of other
# emotions, with x <- x + beta v at every position of the middle layer.

# %%
layer = cfg["n_layers"] // 2
site = f"blocks.{layer}.hook_resid_post"
x = m.capture(token_ids=ids, sites=site, positions=[-1])[site][:, 0]  # [n_prompts, d_model]
half = len(ids) // 2
train, test = np.arange(half), np.arange(half, len(ids))
directions = {e: x[train][gold[train] == k].mean(0) - x[train][gold[train] != k].mean(0) for k, e in enumerate(emotions)}
betas = [0.0, 1.0, 2.0, 4.0]
share = np.zeros((len(emotions), len(betas)))
control = np.zeros_like(share)
for k, e in enumerate(emotions):
    others = [ids[i] for i in test if gold[i] != k]
    v = directions[e]
    r = rng.standard_normal(v.shape).astype(np.float32)
    r *= np.linalg.norm(v) / np.linalg.norm(r)
    for j, beta in enumerate(betas):
        for out, vec in [(share, v), (control, r)]:
            s = m.score(token_ids=others, labels=emotions, interventions=[patchbay.Add(site, vec, beta=beta, positions="all")])
            out[k, j] = np.mean(s["pred"] == k)
print(f"share of other emotions' prompts predicted as the steered emotion, by beta {betas} (mean over emotions)")
print("  class-mean direction:", " ".join(f"{v:.2f}" for v in share.mean(0)))
print("  random, same norm:   ", " ".join(f"{v:.2f}" for v in control.mean(0)))

# %% [markdown]
# ## Figures (with matplotlib)

# %%
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
    print("matplotlib is not installed: the tables above are the figures")
if plt is not None:
    fig, ax = plt.subplots(figsize=(6, 2.6))
    im = ax.imshow(flip, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set(xticks=range(len(centers)), xticklabels=centers, yticks=range(len(sites)), yticklabels=sites,
           xlabel="window centre layer (5-layer window)", title=f"Flip rate to the source's emotion ({len(pairs)} pairs)")
    fig.colorbar(im, ax=ax, label="flip rate")
    fig.tight_layout()
    fig.savefig(OUT / "tak_patching.png", dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(betas, share.mean(0), "o-", label="class-mean direction")
    ax.plot(betas, control.mean(0), "s--", label="random direction, same norm")
    ax.set(xlabel=f"beta (x <- x + beta v at {site}, all positions)", ylabel="share predicted as the steered emotion", ylim=(0, 1),
           title="Steering the demo model's emotion")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "wang_steering.png", dpi=120)
    print(f"figures in {OUT}")

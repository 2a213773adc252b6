#!/usr/bin/env python3
"""patchbay against Hugging Face PyTorch on one synthetic checkpoint, on this machine, in one run.

Times, with the same thread count on both sides:
- prefill tokens/s (batch x prompt length random ids, logits at the last position) with HF
  transformers in float32 and bfloat16, and `patchbay bench forward` at --precision f32 and bf16;
- activation patching on the Tak et al. protocol (sites attn_out, mlp_out and resid_post, windows
  of --window layers centred on every layer, the last token; random prompts and pairs): their
  method re-created with HF forward hooks, per experiment 2 cached forwards (source and target)
  and 1 patched forward at batch 1, in float32 and bfloat16; and `patchbay bench patch` (the
  resumed method) at both precisions,
then prints one table. Run it through scripts/side-by-side.sh (a throwaway venv with the pinned
torch and transformers); not part of the test run.

  scripts/side-by-side.sh --quick                  # 8-layer llama-3.2-1b-shaped checkpoint, minutes
  scripts/side-by-side.sh                          # the 16-layer llama-3.2-1b shape (2.5 GB, ~1 h)
  scripts/side-by-side.sh --model /tmp/l1b         # an existing `patchbay synth` checkpoint
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden"))
from make_goldens import hook_tensor  # noqa: E402

SITES = ["attn_out", "mlp_out", "resid_post"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def median_time(fn, reps: int) -> float:
    """Median seconds of `reps` calls after one untimed warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_ids(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def hf_prefill(model, batch: int, length: int, reps: int, seed: int) -> float:
    """Tokens/s of one forward over batch x length random ids, logits at the last position."""
    ids = torch.tensor(random_ids(random.Random(seed), batch, length, model.config.vocab_size))
    with torch.inference_mode():
        s = median_time(lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False), reps)
    return batch * length / s


def site_hook(model, layer: int, site: str, fn):
    """fn(hidden [1, T, d]) -> replacement or None on the module output that is `site`."""
    block = model.model.layers[layer]
    module = {"attn_out": block.self_attn, "mlp_out": block.mlp, "resid_post": block}[site]
    return hook_tensor(module, "out", fn)


def tak_experiment(model, src: torch.Tensor, tgt: torch.Tensor, site: str, layers: list[int]) -> torch.Tensor:
    """Tak et al.'s method for one experiment: the source forward caching the site at every
    window layer, the clean target forward (their second cached run), then the target forward
    with the site's last-token value replaced by the source's in every window layer."""
    cache = {}
    handles = [site_hook(model, l, site, lambda x, l=l: cache.__setitem__(l, x[:, -1].clone())) for l in layers]
    model(input_ids=src, logits_to_keep=1, use_cache=False)
    for h in handles:
        h.remove()
    model(input_ids=tgt, logits_to_keep=1, use_cache=False)

    def patch(x, l):
        x = x.clone()
        x[:, -1] = cache[l]
        return x

    handles = [site_hook(model, l, site, lambda x, l=l: patch(x, l)) for l in layers]
    out = model(input_ids=tgt, logits_to_keep=1, use_cache=False).logits
    for h in handles:
        h.remove()
    return out


def hf_tak(model, n_prompts: int, length: int, window: int, n_experiments: int, seed: int) -> float:
    """Experiments/s of Tak et al.'s method on the first n_experiments of a random sweep."""
    rng = random.Random(seed)
    n_layers = model.config.num_hidden_layers
    prompts = random_ids(rng, n_prompts, length, model.config.vocab_size)
    exps = []
    while len(exps) < n_experiments:
        s, t = rng.sample(range(n_prompts), 2)
        for site in SITES:
            for c in range(n_layers):
                lo = max(0, c - window // 2)
                exps.append((s, t, site, list(range(lo, min(n_layers, lo + window)))))
    exps = exps[:n_experiments]
    with torch.inference_mode():
        tak_experiment(model, torch.tensor([prompts[0]]), torch.tensor([prompts[1]]), SITES[0], [0])  # warm-up
        t = time.perf_counter()
        for s, tg, site, layers in exps:
            tak_experiment(model, torch.tensor([prompts[s]]), torch.tensor([prompts[tg]]), site, layers)
        return len(exps) / (time.perf_counter() - t)


def patchbay(binary: str, args: list[str], threads: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}
    out = subprocess.run([binary, *args, "--json", "--quiet"], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"patchbay {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an existing checkpoint (default: patchbay synth --like llama-3.2-1b into a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="8 layers, 40 pairs over 20 prompts, fewer repetitions")
    ap.add_argument("--patchbay", default="target/release/patchbay")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64, help="prefill prompt length")
    ap.add_argument("--patch-len", type=int, default=48, help="patching prompt length")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--tak-experiments", type=int, help="experiments timed with Tak et al.'s method (it is slow)")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    n_prompts, pairs = (20, 40) if a.quick else (100, 200)
    reps = 2 if a.quick else 3
    tak_n = a.tak_experiments or (6 if a.quick else 12)
    torch.set_num_threads(a.threads)

    tmp = None
    model_dir = a.model
    if model_dir is None:
        tmp = tempfile.mkdtemp(prefix="side-by-side-")
        model_dir = os.path.join(tmp, "model")
        layers = ["--layers", "8"] if a.quick else []
        subprocess.run([a.patchbay, "synth", "--like", "llama-3.2-1b", *layers, "--out", model_dir], check=True, capture_output=True)
    try:
        rows = {}
        # ---- patchbay ----
        for prec in ["f32", "bf16"]:
            fwd = patchbay(a.patchbay, ["bench", "forward", "--model", model_dir, "--precision", prec, "--batch", str(a.batch), "--prompt-len", str(a.prompt_len), "--decode-steps", "0", "--reps", str(reps)], a.threads)
            pat = patchbay(a.patchbay, ["bench", "patch", "--model", model_dir, "--precision", prec, "--n-prompts", str(n_prompts), "--prompt-len", str(a.patch_len), "--pairs", str(pairs), "--sites", ",".join(SITES), "--window", str(a.window), "--naive-limit", "3"], a.threads)
            u = fwd.get("prefill_utilization") or {}
            rows[f"patchbay {prec}"] = {
                "prefill_tokens_per_s": fwd["prefill_tokens_per_s"],
                "prefill_of_peak": u.get("of_peak"),
                "patch_experiments_per_s": pat["resumed_per_s"],
                "patch_method": "resumed",
                "forwards_per_experiment": pat["forwards"]["resumed"],
            }
        # ---- Hugging Face ----
        for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
            rows[f"HF torch {name}"] = {
                "prefill_tokens_per_s": hf_prefill(model, a.batch, a.prompt_len, reps, 0),
                "prefill_of_peak": None,
                "patch_experiments_per_s": hf_tak(model, n_prompts, a.patch_len, a.window, tak_n, 0),
                "patch_method": "Tak et al.",
                "forwards_per_experiment": 3.0,
            }
            del model
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    n_exp = pairs * len(SITES) * cfg["num_hidden_layers"]
    head = (
        f"side by side, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {a.threads} threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}\n"
        f"checkpoint: {a.model or 'patchbay synth --like llama-3.2-1b'}, {cfg['num_hidden_layers']} layers, d_model {cfg['hidden_size']}; prefill {a.batch} x {a.prompt_len} tokens; "
        f"patching: {pairs} pairs over {n_prompts} prompts of {a.patch_len} tokens x {len(SITES)} sites x {cfg['num_hidden_layers']} windows of {a.window} = {n_exp} experiments, last token "
        f"(Tak et al.'s method timed on {tak_n})\n"
    )
    lines = [head, f"{'engine':<18} {'prefill tok/s':>14} {'of GEMM peak':>13} {'patching exp/s':>15} {'method':>11} {'forwards/exp':>13}"]
    for name, r in rows.items():
        peak = "" if r["prefill_of_peak"] is None else f"{100 * r['prefill_of_peak']:.0f}%"
        lines.append(f"{name:<18} {r['prefill_tokens_per_s']:>14.1f} {peak:>13} {r['patch_experiments_per_s']:>15.3f} {r['patch_method']:>11} {r['forwards_per_experiment']:>13.3f}")
    for prec, hf in [("f32", "float32"), ("bf16", "bfloat16")]:
        p, h = rows[f"patchbay {prec}"], rows[f"HF torch {hf}"]
        lines.append(f"patchbay {prec} / HF {hf}: prefill {p['prefill_tokens_per_s'] / h['prefill_tokens_per_s']:.2f}x, patching {p['patch_experiments_per_s'] / h['patch_experiments_per_s']:.0f}x")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"header": head, "rows": rows}, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

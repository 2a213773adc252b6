"""OUT/report.md (and OUT/report.json, the numbers) from the outputs of scripts/studies.sh.

Standard library only. Reads each stage's files as the commands wrote them; a stage that is
missing is reported as missing, not skipped silently.

    python3 scripts/studies_report.py OUT
"""
import csv
import json
import math
import os
import struct
import sys

POSITIVE = {"joy", "pride", "relief", "trust"}
NEGATIVE = {"anger", "boredom", "disgust", "fear", "guilt", "sadness", "shame"}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_safetensors(path):
    """{name: list of floats} of the F32 tensors of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        a, b = meta["data_offsets"]
        out[name] = list(struct.unpack(f"<{(b - a) // 4}f", data[a:b]))
    return out


def cosine(u, v):
    nu = math.sqrt(sum(x * x for x in u))
    nv = math.sqrt(sum(x * x for x in v))
    return sum(x * y for x, y in zip(u, v)) / (nu * nv) if nu and nv else float("nan")


def f(x, digits=3):
    return f"{float(x):.{digits}f}"


class Report:
    def __init__(self, out):
        self.out = out
        self.lines = []
        self.numbers = {}

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def section(self, title, *stages):
        """Adds the heading; True when every stage it reads has finished."""
        self.add(f"### {title}", "")
        return all([self.has(s) for s in stages])

    def has(self, stage):
        done = os.path.exists(self.path(stage, ".done"))
        if not done:
            self.lines.append(f"*Stage `{stage}` has not run (no {stage}/.done): its results are missing.*\n")
        return done

    def seconds(self, stage):
        try:
            with open(self.path(stage, ".done")) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def add(self, *lines):
        self.lines.extend(lines)

    def figure(self, stage, name, caption):
        if os.path.exists(self.path(stage, name)):
            self.add(f"![{caption}]({stage}/{name})", "")


def shares(preds, labels):
    n = len(preds)
    return {label: sum(p == label for p in preds) / n for label in labels} if n else {}


def valence_share(share):
    return sum(v for k, v in share.items() if k in POSITIVE), sum(v for k, v in share.items() if k in NEGATIVE)


def tak(r):
    r.add("## Tak et al. 2025: probing, patching and appraisal steering", "")

    if r.section("The model's own answer (`score`, the study's prompt and few-shot examples)", "score"):
        s = json.load(open(r.path("score", "score.json")))
        labels = s["labels"]
        top = max(labels, key=lambda x: x["predicted"])
        n = s["n_with_gold"]
        r.numbers["score"] = {"accuracy": s["accuracy"], "n": n, "most_predicted": top["label"],
                              "most_predicted_share": top["predicted"] / n}
        r.add(f"Accuracy {f(s['accuracy'])} on {n} prompts (chance {f(1 / len(labels))}); the model answers "
              f"`{top['label']}` for {f(100 * top['predicted'] / n, 0)}% of them. Recall per emotion: "
              + ", ".join(f"{x['label']} {f(x['recall'], 2)}" for x in labels) + ".", "")
        r.figure("score", "confusion.png", "confusion matrix")

    if r.section("Probes by layer (`probe`: logistic for the emotion, ridge for the appraisals)", "probe"):
        rows = read_csv(r.path("probe", "probe_results.csv"))
        acc = [x for x in rows if x["metric"] == "accuracy"]
        r.add("| site | layer 0 | best layer | best accuracy (95% CI) | last layer | n test |", "|---|---|---|---|---|---|")
        probe_numbers = {}
        for site in sorted({x["site"] for x in acc}):
            by = sorted((x for x in acc if x["site"] == site), key=lambda x: int(x["layer"]))
            best = max(by, key=lambda x: float(x["value"]))
            probe_numbers[site] = {"layer0": float(by[0]["value"]), "best_layer": int(best["layer"]),
                                   "best": float(best["value"]), "last": float(by[-1]["value"])}
            r.add(f"| {site} | {f(by[0]['value'])} | {best['layer']} | {f(best['value'])} "
                  f"({f(best['ci_low'])}–{f(best['ci_high'])}) | {f(by[-1]['value'])} | {best['n']} |")
        r.add("")
        r2 = [x for x in rows if x["metric"].startswith("r2:") and x["site"] == "resid_post"]
        if r2:
            cols = sorted({x["metric"][3:] for x in r2})
            best_r2 = {c: max((x for x in r2 if x["metric"] == "r2:" + c), key=lambda x: float(x["value"])) for c in cols}
            ranked = sorted(cols, key=lambda c: -float(best_r2[c]["value"]))
            negative = sum(float(x["value"]) < 0 for x in r2)
            probe_numbers["appraisal_r2_best"] = {c: [int(best_r2[c]["layer"]), float(best_r2[c]["value"])] for c in cols}
            r.add(f"Appraisals (ridge, resid_post; penalty by inner cross-validation, `probe/regularisation.csv`): "
                  f"best R^2 per rating " + ", ".join(f"{c} {f(best_r2[c]['value'], 2)} (layer {best_r2[c]['layer']})" for c in ranked)
                  + f"; {negative} of {len(r2)} (rating, layer) cells below 0.", "")
        r.numbers["probe"] = probe_numbers
        r.figure("probe", "accuracy_by_layer.png", "probe accuracy by layer")
        r.figure("probe", "appraisal_r2.png", "appraisal R^2 by layer")

    if r.section("Activation patching between correctly predicted prompts of different emotions (`patch`)", "patch"):
        rows = read_csv(r.path("patch", "summary.csv"))
        n_pairs = int(rows[0]["n"]) if rows else 0
        r.add(f"{n_pairs} (source, target) pairs, each window of 5 layers at the last token; flip rate = share of "
              f"targets whose prediction becomes the source's emotion (Wilson 95% interval).", "",
              "| site | highest flip rate (centre layer, 95% CI) | flip rate at the last centre | mean logit difference there |",
              "|---|---|---|---|")
        patch_numbers = {}
        for site in ("attn_out", "mlp_out", "resid_post"):
            by = sorted((x for x in rows if x["site"] == site), key=lambda x: int(x["center"]))
            if not by:
                continue
            best = max(by, key=lambda x: float(x["flip_rate"]))
            patch_numbers[site] = {"best_center": int(best["center"]), "best_flip_rate": float(best["flip_rate"]),
                                   "last_flip_rate": float(by[-1]["flip_rate"])}
            r.add(f"| {site} | {f(best['flip_rate'], 2)} (centre {best['center']}, {f(best['flip_rate_lo95'], 2)}–"
                  f"{f(best['flip_rate_hi95'], 2)}) | {f(by[-1]['flip_rate'], 2)} | {f(by[-1]['mean_logit_diff'], 2)} |")
        r.add("")
        r.numbers["patch"] = {"pairs": n_pairs, **patch_numbers}
        r.figure("patch", "heatmap.png", "flip rate by site and window centre")

    if r.section("Steering along the appraisal probes (`directions --method probe`, `steer --mode labels`)", "steer"):
        clean = read_jsonl(r.path("steer", "clean.jsonl"))
        rows = read_jsonl(r.path("steer", "scores.jsonl"))
        labels = sorted({x["pred"] for x in clean} | {x["pred"] for x in rows})
        base = shares([x["pred"] for x in clean], labels)
        bpos, bneg = valence_share(base)
        r.add(f"{len(clean)} prompts; the unit direction added at every position of layer {rows[0]['layer'] if rows else '?'}'s "
              f"resid_post at strength beta, "
              f"each against a random direction of the same norm. Clean: positive-valence answers "
              f"(joy, pride, relief, trust) {f(bpos, 2)}, negative {f(bneg, 2)}.", "",
              "| direction | beta | positive share | negative share | most predicted (share) |", "|---|---|---|---|---|")
        steer_numbers = []
        conditions = sorted({(x["direction"], x["beta"]) for x in rows}, key=lambda c: (c[0].startswith("random"), c[0], c[1]))
        for direction, beta in conditions:
            sh = shares([x["pred"] for x in rows if x["direction"] == direction and x["beta"] == beta], labels)
            pos, neg = valence_share(sh)
            top = max(sh, key=sh.get)
            steer_numbers.append({"direction": direction, "beta": beta, "positive": pos, "negative": neg, "top": top, "top_share": sh[top]})
            r.add(f"| {direction} | {beta:g} | {f(pos, 2)} | {f(neg, 2)} | {top} ({f(sh[top], 2)}) |")
        r.add("")
        r.numbers["steer"] = {"clean_positive": bpos, "clean_negative": bneg, "conditions": steer_numbers}
        r.figure("steer", "shares.png", "predicted-label shares against beta")


def wang(r, layer, probe_layer):
    r.add("## Wang et al. 2025: directions, components, ablation and steered generation", "")

    if r.section("Emotion and valence directions (`directions`)", "sev-dirs", "emotion-dirs"):
        sev = read_safetensors(r.path("sev-dirs", "directions.safetensors"))
        emo = read_safetensors(r.path("emotion-dirs", "directions.safetensors"))
        sites = [f"blocks.{l}.hook_resid_post" for l in dict.fromkeys([layer, probe_layer]) if l is not None]
        emotions = sorted(k.split("/", 1)[1] for k in emo if k.startswith(sites[0] + "/"))
        variants = sorted(k.split("/", 1)[1] for k in sev if k.startswith(sites[0] + "/"))
        r.add("SEV's valence directions (context-averaged: x(scenario, variant) - x(scenario, neutral)) against the "
              "emotion directions (class means on the emotion dataset, each against the rest), cosine at the steering "
              "layer and at the layer of the best resid_post emotion probe:", "",
              "| site | SEV direction | " + " | ".join(emotions) + " |", "|---" * (len(emotions) + 2) + "|")
        cos = {}
        for site in sites:
            rows = {v: sev[f"{site}/{v}"] for v in variants}
            # The valence axis: what separates the two valences, without what both events share.
            if "positive" in rows and "negative" in rows:
                rows["positive - negative"] = [p - n for p, n in zip(rows["positive"], rows["negative"])]
            for v, vec in rows.items():
                row = {e: cosine(vec, emo[f"{site}/{e}"]) for e in emotions}
                cos.setdefault(site, {})[v] = row
                r.add(f"| {site} | {v} | " + " | ".join(f(row[e], 2) for e in emotions) + " |")
        r.add("")
        r.numbers["directions"] = {"cosine": cos}

    if r.section("Head and neuron contributions to the joy direction (`components contrib`)", "contrib"):
        numbers = {}
        for kind, unit in (("heads", "head"), ("neurons", "neuron")):
            rows = [x for x in read_csv(r.path("contrib", f"{kind}.csv")) if x["label"] == "joy"]
            rows.sort(key=lambda x: int(x["rank"]))
            total = sum(abs(float(x["mean"])) for x in rows)
            top10 = sum(abs(float(x["mean"])) for x in sorted(rows, key=lambda x: -abs(float(x["mean"])))[:10])
            numbers[kind] = {"top": [[int(x["layer"]), int(x[unit]), float(x["mean"])] for x in rows[:5]],
                             "top10_abs_share": top10 / total if total else float("nan")}
            r.add(f"- {kind} (prompts of joy): largest " + ", ".join(f"L{x['layer']}.{unit[0].upper()}{x[unit]} {f(x['mean'], 2)}" for x in rows[:5])
                  + f"; the 10 largest |mean| hold {f(100 * numbers[kind]['top10_abs_share'], 1)}% of the total over {len(rows)} {kind}.")
        r.add("")
        r.numbers["contrib"] = numbers
        r.figure("contrib", "heads.png", "head contributions per label")
        r.figure("contrib", "long_tail.png", "contributions against rank")

    if r.section("Top-k ablation curves (`ablate --ranking --top-k`, zero ablation)", "topk"):
        rows = read_csv(r.path("topk", "top_k.csv"))
        ks = sorted({int(x["k"]) for x in rows})
        r.add("Change of the joy projection (the emotion representation at the steering layer) and of the joy logit, "
              "top-k components against random sets of the same size (95% bootstrap intervals):", "",
              "| k | projection change, top | random | joy logit change, top | random |", "|---|---|---|---|---|")
        curve = []
        for k in ks:
            get = {(x["set"], x["metric"]): x for x in rows if int(x["k"]) == k}
            p_top, p_rnd = get.get(("top", "projection_change")), get.get(("random", "projection_change"))
            l_top, l_rnd = get.get(("top", "logit_change:joy")), get.get(("random", "logit_change:joy"))
            if not (p_top and p_rnd and l_top and l_rnd):
                continue
            curve.append({"k": k, "projection_top": float(p_top["mean"]), "projection_random": float(p_rnd["mean"]),
                          "logit_top": float(l_top["mean"]), "logit_random": float(l_rnd["mean"])})
            r.add(f"| {k} | {f(p_top['mean'], 2)} ({f(p_top['ci_low'], 2)}, {f(p_top['ci_high'], 2)}) | {f(p_rnd['mean'], 2)} "
                  f"| {f(l_top['mean'], 2)} | {f(l_rnd['mean'], 2)} |")
        r.add("")
        r.numbers["top_k"] = curve
        r.figure("topk", "top_k.png", "top-k curves")

    if r.section("Steered generation, judged by the emotion probe (`steer --mode generate`)", "generate"):
        rows = read_csv(r.path("generate", "summary.csv"))
        val = read_csv(r.path("generate", "valence.csv"))
        judge = json.load(open(r.path("generate", "judge.json")))
        r.add(f"SEV's neutral scenarios, `{{scenario}}. {{event}} I feel`, continued greedily; judged by "
              f"{judge.get('method', 'the probe')} (`generate/judge.json`). Expression accuracy = share of texts judged as the "
              f"target emotion; valence accuracy = share judged with the target's valence.", "",
              "| target | beta | steered | random | clean | valence: steered | random | clean |", "|---|---|---|---|---|---|---|---|")
        def pick(table, cond, direction, beta):
            for x in table:
                if x["condition"] == cond and x["direction"] == direction and (cond == "clean" or x["beta"] == beta):
                    return float(x["accuracy"])
            return float("nan")

        def valence(target):
            return "positive" if target in POSITIVE else "negative" if target in NEGATIVE else target
        gen = []
        for target in dict.fromkeys(x["direction"] for x in rows):
            for beta in sorted({x["beta"] for x in rows if x["direction"] == target and x["condition"] == "steered"}, key=float):
                g = {"target": target, "beta": float(beta)}
                for cond in ("steered", "random", "clean"):
                    g[cond] = pick(rows, cond, target, beta)
                    g["valence_" + cond] = pick(val, cond, valence(target), beta)
                gen.append(g)
                r.add(f"| {target} | {beta} | {f(g['steered'], 2)} | {f(g['random'], 2)} | {f(g['clean'], 2)} "
                      f"| {f(g['valence_steered'], 2)} | {f(g['valence_random'], 2)} | {f(g['valence_clean'], 2)} |")
        r.add("")
        r.numbers["generate"] = gen
        texts = read_jsonl(r.path("generate", "generations.jsonl"))
        first = [x for x in texts if x["index"] == 0]
        if first:
            r.add("The first scenario's texts (clean, then each steered pass and its random control):", "")
            for x in first:
                r.add(f"- {x.get('direction') or 'clean'} {'' if x.get('beta') is None else x['beta']}: {json.dumps(x['text'])}")
            r.add("")
        r.figure("generate", "accuracy.png", "expression accuracy against beta")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: studies_report.py OUT (the --out of scripts/studies.sh)")
    out = sys.argv[1]
    meta = json.load(open(os.path.join(out, "studies.json")))
    r = Report(out)
    r.add(f"# Both emotion studies on {os.path.basename(meta['model'])}", "",
          f"Model `{meta['model']}` ({meta['n_layers']} layers; directions, contributions and steering at layer {meta['layer']}); "
          f"engine {meta.get('engine', 'the default (cpu, f32)')}; "
          f"emotion data {meta['data']}; scenarios `{meta['sev']}`; {'small (smoke) sizes' if meta['small'] else 'full sizes'}. "
          "Every number below is read from the files each command wrote; `report.json` holds them.", "")
    tak(r)
    wang(r, meta["layer"], r.numbers.get("probe", {}).get("resid_post", {}).get("best_layer"))
    stages = ["score", "probe", "patch", "appraisal-dirs", "steer", "sev-dirs", "emotion-dirs", "contrib", "topk", "generate"]
    r.add("## Timings and commands", "", "| stage | seconds |", "|---|---|")
    for s in stages:
        t = r.seconds(s)
        r.add(f"| {s} | {'not run' if t is None else t} |")
    commands = []
    for s in stages:
        try:
            with open(r.path(s, "command.sh"), encoding="utf-8") as fh:
                commands.append(f"# {s}\n{fh.read().rstrip()}")
        except OSError:
            pass
    with open(os.path.join(out, "commands.sh"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(commands) + "\n")
    r.add("", "The commands, as run (`commands.sh`):", "", "```sh", *commands, "```", "")
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(r.lines) + "\n")
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, **r.numbers}, fh, indent=1, allow_nan=True)


if __name__ == "__main__":
    main()

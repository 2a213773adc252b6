#!/usr/bin/env python3
"""Redoes patchbay's probes with scikit-learn on the features patchbay captured and the splits
it used, and writes the accuracies / R^2 as JSON (the golden that tests/probe_pipeline.rs
compares patchbay's probe_results.csv against, within 1 point).

    python check_sklearn.py OUT_DIR GOLDEN.json

OUT_DIR is a `patchbay probe` output directory: it reads OUT_DIR/splits.json (probed examples,
classes, numeric targets, test_fold per example, C, alpha, standardisation) and the capture
shards OUT_DIR/acts/shard-*.safetensors. For every (site, position):
  - LogisticRegression(C) on StandardScaler features (fitted on the training rows), per fold;
    accuracy over the pooled out-of-fold predictions;
  - Ridge(alpha) on the same features, per numeric column; R^2 over the pooled predictions.
A grid C or alpha (`--C auto`, `--alpha 1,10`) is chosen for every fit by GridSearchCV on the
fit's training rows with the inner folds patchbay used (splits.json `inner_test_fold`, a
PredefinedSplit), scoring accuracy (C) or negative mean squared error (alpha, per column), and
the choices are written to the golden's `chosen` list (the same rows as regularisation.csv,
with the grid and GridSearchCV's mean inner-fold score of each value).
The solvers run to tight tolerances so the comparison is between optima, not between
iteration counts.
"""
import json
import sys
from pathlib import Path

import numpy as np
import sklearn
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def main(out_dir, golden):
    out = Path(out_dir)
    sp = json.loads((out / "splits.json").read_text())
    meta = json.loads((out / "acts" / "meta.json").read_text())
    t, split, params = sp["targets"], sp["split"], sp["params"]
    examples = np.array(t["examples"], dtype=np.int64)
    classes = np.array(t["classes"]) if t["classes"] is not None else None
    numeric = np.array(t["numeric"], dtype=np.float64).reshape(len(examples), -1)
    test_fold = np.array(split["test_fold"])
    folds = sorted(f for f in set(test_fold.tolist()) if f >= 0)
    standardize = params["standardize"]
    inner = {name: np.array(f) for name, f in sp.get("inner_test_fold", {}).items()}
    fits = [(f"fold {f}", test_fold != f, test_fold == f) for f in folds]
    if "all" in inner:
        fits.append(("all", np.ones(len(examples), bool), np.zeros(len(examples), bool)))
    chosen = []

    def fitted(estimator, name, grid, x, y, fit, scoring):
        """The pipeline fitted on x, y; a grid chooses its value by inner cross-validation."""
        steps = [StandardScaler()] if standardize else []
        if not isinstance(grid, list):
            return make_pipeline(*steps, estimator.set_params(**{name: grid})).fit(x, y), None
        pipe = make_pipeline(*steps, estimator)
        key = f"{pipe.steps[-1][0]}__{name}"
        search = GridSearchCV(pipe, {key: grid}, cv=PredefinedSplit(inner[fit]), scoring=scoring).fit(x, y)
        return search.best_estimator_, (search.best_params_[key], search.cv_results_["mean_test_score"].tolist())
    shards = [load_file(str(out / "acts" / f"shard-{k:05d}.safetensors")) for k in range(meta["n_shards"])]
    results = []
    for si, site in enumerate(meta["sites"]):
        acts = np.concatenate([s[site] for s in shards], axis=0)  # [n_prompts, n_pos, ...]
        acts = acts.reshape(acts.shape[0], acts.shape[1], -1)[examples].astype(np.float64)
        for pi, pos in enumerate(meta["positions"]):
            x = acts[:, pi, :]
            key = {"site": meta["site_kinds"][si], "layer": meta["site_layers"][si], "position": pos}
            if classes is not None:
                pred = np.full(len(examples), -1)
                for fit, tr, te in fits:
                    clf, c = fitted(LogisticRegression(max_iter=20000, tol=1e-10), "C", params["c"], x[tr], classes[tr], fit, "accuracy")
                    if c is not None:
                        chosen.append({**key, "penalty": "C", "fit": fit, "value": c[0], "grid": params["c"], "mean_scores": c[1]})
                    if te.any():
                        pred[te] = clf.predict(x[te])
                ev = pred >= 0
                results.append({**key, "metric": "accuracy", "value": float((pred[ev] == classes[ev]).mean()), "n": int(ev.sum())})
            if numeric.shape[1] > 0:
                yhat = np.full(numeric.shape, np.nan)
                for fit, tr, te in fits:
                    for c, name in enumerate(t["numeric_names"]):
                        reg, alpha = fitted(Ridge(), "alpha", params["alpha"], x[tr], numeric[tr, c], fit, "neg_mean_squared_error")
                        if alpha is not None:
                            chosen.append({**key, "penalty": f"alpha:{name}", "fit": fit, "value": alpha[0], "grid": params["alpha"], "mean_scores": alpha[1]})
                        if te.any():
                            yhat[te, c] = reg.predict(x[te])
                ev = ~np.isnan(yhat[:, 0])
                for c, name in enumerate(t["numeric_names"]):
                    results.append({**key, "metric": f"r2:{name}", "value": float(r2_score(numeric[ev, c], yhat[ev, c])), "n": int(ev.sum())})
    doc = {
        "sklearn_version": sklearn.__version__,
        "numpy_version": np.__version__,
        "made_from": str(out),
        "eval": split["eval"],
        "params": params,
        "n_examples": int(len(examples)),
        "results": results,
        "chosen": chosen,
    }
    Path(golden).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(results)} results to {golden}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

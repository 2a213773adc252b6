"""The Python API gives the CLI's results: Model.capture == `patchbay capture`'s file (every
value bit for bit, same keys, shapes and dtypes), Model.score == `patchbay score`, Model.patch ==
`patchbay patch` (experiments.jsonl), Model.config == `patchbay inspect --json`, on the fixture
models of every family."""

import json

import numpy as np
import pytest

import patchbay
from conftest import FAMILIES, FIXTURES, ROOT, fixture, fixture_ids, read_jsonl, read_safetensors


def assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, k
        assert g.shape == w.shape, k
        assert np.array_equal(g, w), f"{k}: max diff {np.abs(g.astype(np.float64) - w).max()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_config_is_inspect_json(cli, family):
    m = patchbay.Model(fixture(family))
    assert m.config == json.loads(cli("inspect", "--model", fixture(family), "--json").stdout)
    assert m.config["n_layers"] == len({s["layer"] for s in m.sites()}) - 1  # final_norm sits at n_layers
    assert m.device == "cpu"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["all", "-1,-3"])
def test_capture_equals_cli_file(cli, tmp_path, family, positions):
    ids = fixture_ids(family)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = tmp_path / "acts.safetensors"
    sites = "blocks.0.hook_resid_pre,attn_out,blocks.1.attn.hook_pattern,blocks.0.attn.hook_z,mlp_post,ln_final.hook_normalized"
    cli("capture", "--model", fixture(family), "--token-ids", tmp_path / "ids.json", "--sites", sites,
        "--positions", positions, "--logits", "--batch-size", 2, "--out", out, "--quiet")
    want, _ = read_safetensors(out)
    m = patchbay.Model(fixture(family))
    pos = "all" if positions == "all" else [int(p) for p in positions.split(",")]
    got = m.capture(token_ids=ids, sites=sites.split(","), positions=pos, logits=True, batch_size=2)
    assert_same_tensors(got, want)
    if positions == "all":
        assert got["prompt_offsets"].tolist() == np.cumsum([0] + [len(p) for p in ids]).tolist()
        assert got["logits"].shape == (sum(map(len, ids)), m.config["vocab"])
    else:
        assert got["blocks.0.attn.hook_z"].shape == (len(ids), 2, m.config["n_heads"], m.config["d_head"])


def test_capture_texts_chat_equals_cli(cli, tmp_path):
    out = tmp_path / "a.safetensors"
    texts = ["My dog died last week.", "I got the job!"]
    args = [a for t in texts for a in ("--text", t)]
    cli("capture", "--model", fixture("llama"), *args, "--chat", "--sites", "resid_post", "--positions", "-1", "--out", out, "--quiet")
    want, _ = read_safetensors(out)
    m = patchbay.Model(fixture("llama"))
    assert_same_tensors(m.capture(texts=texts, chat=True, sites="resid_post", positions=-1), want)
    chat_ids = m.tokenize(texts, chat=True)
    assert_same_tensors(m.capture(token_ids=chat_ids, sites="resid_post", positions=[-1]), want)


def test_capture_on_the_emulated_device_equals_cli(cli, tmp_path):
    ids = fixture_ids("llama")
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = tmp_path / "emu.safetensors"
    cli("capture", "--model", fixture("llama"), "--device", "emu", "--token-ids", tmp_path / "ids.json",
        "--sites", "resid_post,blocks.1.attn.hook_z", "--positions", "-1,-2", "--logits", "--out", out, "--quiet")
    want, meta = read_safetensors(out)
    m = patchbay.Model(fixture("llama"), device="emu")
    assert m.device == meta["device"] and m.device.startswith("emu")
    got = m.capture(token_ids=ids, sites=["resid_post", "blocks.1.attn.hook_z"], positions=[-1, -2], logits=True)
    assert_same_tensors(got, want)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_score_equals_cli(cli, tmp_path, family):
    ids = fixture_ids(family)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    cli("score", "--model", fixture(family), "--token-ids", tmp_path / "ids.json", "--label-token-ids", "a=11,b=42,c=97",
        "--out", tmp_path / "s", "--quiet")
    want = read_jsonl(tmp_path / "s" / "scores.jsonl")
    got = patchbay.Model(fixture(family)).score(token_ids=ids, label_token_ids={"a": 11, "b": 42, "c": 97})
    assert got["labels"] == ["a", "b", "c"] and got["label_token_ids"] == [11, 42, 97]
    assert got["label_logits"].dtype == np.float32 and got["label_logits"].shape == (len(ids), 3)
    assert got["label_logits"].tolist() == [w["label_logits"] for w in want]
    assert [got["labels"][p] for p in got["pred"]] == [w["pred"] for w in want]


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2"])
@pytest.mark.parametrize("method", ["resumed", "naive"])
def test_patch_equals_cli(cli, tmp_path, family, method):
    ids = fixture_ids(family)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    pairs = [(0, 1), (2, 0), (1, 2)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    cli("patch", "--model", fixture(family), "--token-ids", tmp_path / "ids.json", "--label-token-ids", "11,42,97",
        "--pairs", tmp_path / "pairs.jsonl", "--sites", "resid_post,attn_out,z", "--window", 1, "--positions", "-1,-2",
        "--method", method, "--batch-rows", 16, "--out", tmp_path / "cli", "--quiet")
    want = read_jsonl(tmp_path / "cli" / "experiments.jsonl")
    m = patchbay.Model(fixture(family))
    kw = dict(token_ids=ids, label_token_ids=[11, 42, 97], pairs=pairs, sites=["resid_post", "attn_out", "z"],
              window=1, positions=[-1, -2], method=method, batch_rows=16)
    assert m.patch(**kw) == want
    # No clean run held: spilled to a file (or recomputed) and read back, the same predictions.
    for overflow in ["spill", "recompute"]:
        spilled = m.patch(**kw, mem_budget=1, overflow=overflow)
        assert [(r["id"], r["pred"]) for r in spilled] == [(r["id"], r["pred"]) for r in want], overflow
    got = m.patch(**kw, out=tmp_path / "py")
    assert got == want
    for f in ["experiments.jsonl", "summary.csv"]:
        assert (tmp_path / "py" / f).read_bytes() == (tmp_path / "cli" / f).read_bytes(), f
    manifest = json.loads((tmp_path / "py" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["interface"] == "python"


def test_patch_heads_equals_cli(cli, tmp_path):
    ids = fixture_ids("llama")
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    (tmp_path / "pairs.jsonl").write_text('{"source": 1, "target": 2}\n')
    cli("patch", "--model", fixture("llama"), "--token-ids", tmp_path / "ids.json", "--label-token-ids", "11,42",
        "--pairs", tmp_path / "pairs.jsonl", "--sites", "z", "--heads", "1,3", "--window", 2, "--out", tmp_path / "cli", "--quiet")
    got = patchbay.Model(fixture("llama")).patch(token_ids=ids, label_token_ids=[11, 42], pairs=[(1, 2)], sites="z", heads=[1, 3], window=2)
    assert got == read_jsonl(tmp_path / "cli" / "experiments.jsonl")


def test_tokenize_template_and_score_equal_cli_dataset_run(cli, tmp_path):
    """tokenize(template=) renders as the CLI's --template: scoring those ids gives `patchbay
    score --dataset ... --template tak` on the demo model."""
    import csv
    root = str(ROOT)
    rows = list(csv.DictReader(open(f"{root}/demo/corpus.csv")))[:12]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([r["text"]] for r in rows)
    cli("score", "--model", f"{root}/demo/model", "--dataset", tmp_path / "d.csv", "--template", "tak",
        "--labels", "joy,anger,sadness,fear", "--out", tmp_path / "s", "--quiet")
    want = read_jsonl(tmp_path / "s" / "scores.jsonl")
    m = patchbay.Model(f"{root}/demo/model")
    ids = m.tokenize([r["text"] for r in rows], template="tak")
    assert ids[0] == m.tokenize(f"What are the inferred emotions in the following contexts? Context: {rows[0]['text']} Answer:")[0]
    got = m.score(token_ids=ids, labels=["joy", "anger", "sadness", "fear"])
    assert got["label_logits"].tolist() == [w["label_logits"] for w in want]


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_generate_equals_cli(cli, tmp_path, family):
    """Model.generate == `patchbay generate` (greedy, sampled, and steered along a vector file's
    direction at the prompt's last token and every generated one)."""
    ids = fixture_ids(family)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    m = patchbay.Model(fixture(family))
    vectors = FIXTURES / "llama" / "steer_vectors.safetensors"
    runs = [([], {}), (["--temperature", 0.8, "--top-p", 0.9, "--seed", 3], dict(temperature=0.8, top_p=0.9, seed=3))]
    if family == "llama":
        v = read_safetensors(vectors)[0]["blocks.1.hook_resid_post/a"]
        runs.append((["--vector", f"{vectors}:a", "--site", "resid_post", "--layers", 1, "--positions", "last+generated", "--betas=3"],
                     dict(interventions=[patchbay.Add("blocks.1.hook_resid_post", v, beta=3.0, positions="last+generated")])))
    for i, (flags, kw) in enumerate(runs):
        out = tmp_path / f"g{i}"
        cli("generate", "--model", fixture(family), "--token-ids", tmp_path / "ids.json", "--max-new-tokens", 6, *flags, "--out", out, "--quiet")
        want = read_jsonl(out / "generations.jsonl")
        got = m.generate(token_ids=ids, max_new_tokens=6, **kw)
        assert [{k: g[k] for k in ("index", "tokens", "text", "stop", "seed")} for g in want] == got, flags

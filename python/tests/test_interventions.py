"""Interventions from Python, on fresh random inputs (the seed is printed on failure): each op
against its definition computed with numpy from a clean capture, batching that changes nothing,
and identities that must give the clean run bit for bit."""

import numpy as np
import pytest

import patchbay
from conftest import fixture, fixture_ids

SEED = np.random.SeedSequence().entropy % 2**32


@pytest.fixture(scope="module")
def model():
    return patchbay.Model(fixture("llama"))


@pytest.fixture()
def rng():
    print(f"seed {SEED}")
    return np.random.default_rng(SEED)


def site(layer, name="hook_resid_post"):
    return f"blocks.{layer}.{name}"


def test_add_scale_zero_project_mean_at_their_site(model, rng):
    ids = fixture_ids("llama")
    d = model.config["d_model"]
    s = site(1)
    clean = model.capture(token_ids=ids, sites=s, positions=[-1, -2])[s]  # [n_prompts, 2, d]
    v = rng.standard_normal(d).astype(np.float32)
    basis = rng.standard_normal((2, d)).astype(np.float32)
    mean = rng.standard_normal(d).astype(np.float32)
    q, _ = np.linalg.qr(basis.T.astype(np.float64))
    p = q @ q.T
    beta = float(rng.uniform(0.5, 3.0))
    cases = [
        (patchbay.Add(s, v, beta=beta, positions=[-1, -2]), clean + beta * v),
        (patchbay.Add(s, v, beta=beta, positions=[-1, -2], normalise=True), clean + beta * v / np.linalg.norm(v)),
        (patchbay.Scale(s, alpha=beta, positions=[-1, -2]), clean * beta),
        (patchbay.Zero(s, positions=[-1, -2]), np.zeros_like(clean)),
        (patchbay.Mean(s, mean, positions=[-1, -2]), np.broadcast_to(mean, clean.shape)),
        (patchbay.ProjectSet(s, basis, beta=beta, vector=v, positions=[-1, -2]), clean - beta * clean @ p.T + v),
    ]
    for iv, want in cases:
        got = model.capture(token_ids=ids, sites=s, positions=[-1, -2], interventions=[iv])[s]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=type(iv).__name__)


def test_units_heads_and_neurons(model, rng):
    ids = fixture_ids("llama")
    z = site(1, "attn.hook_z")
    clean = model.capture(token_ids=ids, sites=z, positions="all")[z]  # [T, heads, d_head]
    got = model.capture(token_ids=ids, sites=z, positions="all", interventions=[patchbay.Zero(z, heads=[1, 3])])[z]
    assert not got[:, [1, 3]].any()
    assert np.array_equal(got[:, [0, 2]], clean[:, [0, 2]])
    mlp = site(0, "mlp.hook_post")
    clean = model.capture(token_ids=ids, sites=mlp, positions=-1)[mlp]
    k = rng.choice(model.config["d_mlp"], size=3, replace=False).tolist()
    got = model.capture(token_ids=ids, sites=mlp, positions=-1, interventions=[patchbay.Scale(mlp, 2.0, positions=-1, neurons=k)])[mlp]
    np.testing.assert_allclose(got[..., k], 2 * clean[..., k], rtol=1e-6)
    others = np.setdiff1d(np.arange(model.config["d_mlp"]), k)
    assert np.array_equal(got[..., others], clean[..., others])


def test_identities_give_the_clean_run(model, rng):
    ids = fixture_ids("llama")
    v = rng.standard_normal(model.config["d_model"]).astype(np.float32)
    clean = model.capture(token_ids=ids, logits=True, positions=-1)["logits"]
    for iv in [patchbay.Add(site(1), v, beta=0.0), patchbay.Scale(site(0, "attn.hook_z"), 1.0, heads=[0])]:
        assert np.array_equal(model.capture(token_ids=ids, logits=True, positions=-1, interventions=[iv])["logits"], clean)


def test_patch_values_from_a_capture_and_batching(model, rng):
    """Patching a prompt's own clean values is the clean run; patching prompt 0's values into
    random values, one row per prompt and position, land at the site and give the same later sites in
    batches of 1 and in one batch; restricted to some prompts, the others stay clean."""
    ids = fixture_ids("llama")
    s, later = site(0), site(1)
    clean = model.capture(token_ids=ids, sites=[s, later], positions=[-1])
    same = model.capture(token_ids=ids, sites=later, positions=[-1], interventions=[patchbay.Patch(s, clean[s], positions=[-1])])
    assert np.array_equal(same[later], clean[later])
    values = rng.standard_normal(clean[s].shape).astype(np.float32)  # [n_prompts, 1, d]
    iv = [patchbay.Patch(s, values, positions=[-1])]
    one = model.capture(token_ids=ids, sites=[s, later], positions=[-1], interventions=iv, batch_size=1)
    many = model.capture(token_ids=ids, sites=[s, later], positions=[-1], interventions=iv, batch_size=8)
    assert np.array_equal(one[s], values) and np.array_equal(many[s], values)
    for i, p in enumerate(ids):  # the simple path: each prompt alone with its own row
        alone = model.capture(token_ids=[p], sites=later, positions=[-1], interventions=[patchbay.Patch(s, values[i], positions=[-1])])[later]
        assert np.array_equal(one[later][i], alone[0])
    np.testing.assert_allclose(many[later], one[later], rtol=1e-5, atol=1e-5)  # other batch shapes round differently
    # Restricted to some prompts: the others are clean, bit for bit against a clean run batched
    # the same way (the CPU GEMM's kernel, hence its rounding, depends on the rows of a call).
    part = model.capture(token_ids=ids, sites=s, positions=[-1], interventions=[patchbay.Patch(s, values[[2]], positions=[-1], prompts=[2])], batch_size=2)[s]
    clean_by_2 = model.capture(token_ids=ids, sites=s, positions=[-1], batch_size=2)[s]
    assert np.array_equal(part[2], values[2]) and np.array_equal(part[:2], clean_by_2[:2])
    # One row for every prompt.
    row = model.capture(token_ids=ids, sites=s, positions=[-1], interventions=[patchbay.Patch(s, values[0, 0], positions=[-1])])[s]
    assert np.array_equal(row, np.broadcast_to(values[0, 0], row.shape))


def test_score_with_interventions_matches_capture_logits(model, rng):
    ids = fixture_ids("llama")
    labels = [11, 42, 97]
    v = rng.standard_normal(model.config["d_model"]).astype(np.float32)
    iv = [patchbay.Add(site(1), v, beta=2.0, positions=-1), patchbay.RandomEqualNorm(site(0, "hook_mlp_out"), seed=3, positions=-2)]
    full = model.capture(token_ids=ids, logits=True, positions=-1, interventions=iv)["logits"][:, 0, labels]
    got = model.score(token_ids=ids, label_token_ids=labels, interventions=iv, batch_size=2)
    np.testing.assert_allclose(got["label_logits"], full, rtol=1e-5, atol=1e-5)
    assert got["pred"].tolist() == full.argmax(axis=1).tolist()
    assert not np.allclose(got["label_logits"], model.score(token_ids=ids, label_token_ids=labels)["label_logits"])


def test_arrays_from_anything_numpy_reads(model, rng):
    class Tensorish:  # like a torch tensor: only __array__
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return self.a if dtype is None else self.a.astype(dtype)

    ids = fixture_ids("llama")
    v = rng.standard_normal(model.config["d_model"])  # float64: converted to float32
    s = site(1)
    want = model.capture(token_ids=ids, sites=s, positions=-1, interventions=[patchbay.Add(s, v.astype(np.float32), positions=-1)])[s]
    for vec in [v, v.tolist(), Tensorish(v)]:
        got = model.capture(token_ids=np.array(ids, dtype=object), sites=s, positions=-1, interventions=[patchbay.Add(s, vec, positions=-1)])[s]
        assert np.array_equal(got, want)
    square = [ids[0], ids[0]]
    assert np.array_equal(model.capture(token_ids=np.array(square), sites=s, positions=-1)[s], model.capture(token_ids=square, sites=s, positions=-1)[s])


def test_steer_and_ablate_sweeps_equal_one_scored_run_per_experiment(model, rng):
    """steer() / ablate() resume every experiment from the clean run; each row equals score()
    with the same interventions (a full forward), and the clean rows equal score() alone."""
    ids = fixture_ids("llama")
    d = model.config["d_model"]
    labels = [5, 40, 65, 262]
    v = rng.standard_normal(d).astype(np.float32)
    beta = float(rng.uniform(1.0, 4.0))
    experiments = [
        patchbay.Add(site(1), v, beta, positions="last"),
        [patchbay.Zero("blocks.0.attn.hook_z", heads=[1]), patchbay.Scale("blocks.1.mlp.hook_post", 0.5, neurons=[3, 7])],
        patchbay.Scale(site(0), 1.0),  # the identity: the clean run
    ]
    out = model.steer(experiments, token_ids=ids, label_token_ids=labels)
    n = len(ids)
    assert out["label_logits"].shape == (3, n, len(labels)) and out["clean_logits"].shape == (n, len(labels))
    clean = model.score(token_ids=ids, label_token_ids=labels)["label_logits"]
    np.testing.assert_allclose(out["clean_logits"], clean, rtol=1e-4, atol=1e-4)
    for e, ex in enumerate(experiments):
        want = model.score(token_ids=ids, label_token_ids=labels, interventions=ex)["label_logits"]
        np.testing.assert_allclose(out["label_logits"][e], want, rtol=1e-4, atol=1e-4, err_msg=f"experiment {e}")
    np.testing.assert_array_equal(out["label_logits"][2], out["clean_logits"])
    assert not np.allclose(out["label_logits"][0], out["clean_logits"]), "the add changes nothing: the test cannot fail"
    np.testing.assert_array_equal(out["pred"], out["label_logits"].argmax(-1))
    abl = model.ablate([patchbay.Zero("blocks.0.attn.hook_z", heads=[h]) for h in range(2)], token_ids=ids, label_token_ids=labels)
    for h in range(2):
        want = model.score(token_ids=ids, label_token_ids=labels, interventions=patchbay.Zero("blocks.0.attn.hook_z", heads=[h]))["label_logits"]
        np.testing.assert_allclose(abl["label_logits"][h], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(patchbay.InputError, match="Patch values are per prompt"):
        model.steer([patchbay.Patch(site(1), np.zeros(d, np.float32), positions=-1)], token_ids=ids, label_token_ids=labels)
    with pytest.raises(patchbay.InputError, match="prompts= is not supported"):
        model.steer([patchbay.Add(site(1), v, 1.0, prompts=[0])], token_ids=ids, label_token_ids=labels)

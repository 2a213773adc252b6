"""Bad input raises a patchbay.Error subclass with patchbay's one-line message (never a crash or
a silent result); the GIL is released while patchbay computes."""

import threading
import time

import numpy as np
import pytest

import patchbay
from conftest import ROOT, fixture, fixture_ids


@pytest.fixture(scope="module")
def model():
    return patchbay.Model(fixture("llama"))


def raises(exc, fn, *words):
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert isinstance(e.value, patchbay.Error)
    assert "\n" not in msg and msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def test_bad_input(model):
    ids = fixture_ids("llama")
    d = model.config["d_model"]
    I = patchbay.InputError
    raises(patchbay.FileError, lambda: patchbay.Model(str(ROOT / "no-such-model")), "no-such-model")
    raises(I, lambda: patchbay.Model(fixture("llama"), device="tpu"), "device `tpu`")
    raises(I, lambda: model.capture(token_ids=ids, sites="blocks.99.hook_resid_post"), "layer 99")
    raises(I, lambda: model.capture(token_ids=ids, sites="hook_nonsense"), "hook_nonsense")
    raises(I, lambda: model.capture(token_ids=ids, sites="resid_post", positions=[-40]), "-40")
    raises(I, lambda: model.capture(token_ids=ids, texts=["x"], sites="resid_post"), "one of them")
    raises(I, lambda: model.capture(token_ids=[[1, 2], []], sites="resid_post"), "prompt 1 has no tokens")
    raises(I, lambda: model.capture(token_ids=[[1, -2]], sites="resid_post"), "token_ids")
    raises(I, lambda: model.capture(token_ids=ids, sites="resid_post", interventions=[patchbay.Add("blocks.0.hook_resid_post", np.ones(d + 1))]), "interventions[0]", "vector", str(d))
    raises(I, lambda: model.capture(token_ids=ids, sites="resid_post", interventions=[patchbay.Add("blocks.0.hook_resid_post", np.full(d, np.nan))]), "finite")
    raises(I, lambda: model.capture(token_ids=ids, sites="resid_post", interventions=[patchbay.Zero("blocks.0.hook_resid_post", heads=[0])]), "heads")
    raises(I, lambda: model.capture(token_ids=ids, sites="resid_post", interventions=[patchbay.Zero("blocks.0.attn.hook_z", heads=[9])]), "head 9")
    raises(I, lambda: model.capture(token_ids=ids, sites="resid_post", interventions=[patchbay.Patch("blocks.0.hook_resid_post", np.ones((5, d)))]), "patch values")
    raises(I, lambda: model.capture(token_ids=ids, sites="resid_post", interventions=["zero"]), "not an intervention")
    raises(I, lambda: model.score(token_ids=ids, label_token_ids=[11, 11]), "11", "twice")
    raises(I, lambda: model.score(token_ids=ids, label_token_ids={"a": 11, "b": 11}), "both resolve to token 11")
    raises(I, lambda: model.score(token_ids=ids, label_token_ids=[10**6]), "out of range")
    raises(I, lambda: model.score(token_ids=ids), "labels")
    raises(I, lambda: model.patch(token_ids=ids, label_token_ids=[11, 42], pairs=[(0, 7)], window=1), "out of range")
    raises(I, lambda: model.patch(token_ids=ids, label_token_ids=[11, 42], pairs=[(0, 1)], window=1, method="fast"), "method `fast`")
    raises(I, lambda: model.patch(token_ids=ids, label_token_ids=[11, 42], pairs=[(0, 1)], window=9), "window 9")
    raises(I, lambda: model.patch(token_ids=ids, label_token_ids=[11, 42], pairs=[(0, 1)], window=1, overflow="disk"), "overflow `disk`")
    raises(I, lambda: model.patch(token_ids=ids, label_token_ids=[11, 42], pairs=[(0, 1)], sites="pattern", window=1), "pattern")


def test_patch_out_refuses_an_existing_run(model, tmp_path):
    kw = dict(token_ids=fixture_ids("llama"), label_token_ids=[11, 42], pairs=[(0, 1)], sites="resid_post", window=1, out=tmp_path)
    first = model.patch(**kw)
    raises(patchbay.InputError, lambda: model.patch(**kw), "exists", "resume")
    assert model.patch(**kw, resume=True) == first


def test_gil_is_released_during_compute():
    """A Python thread keeps counting while capture runs (with the GIL held it could not run at
    all between the call's start and end). The workload grows until the call is long enough to
    tell, whatever the machine's speed."""
    m = patchbay.Model(str(ROOT / "demo" / "model"))
    rng = np.random.default_rng(0)
    n = 16
    while True:
        ids = rng.integers(0, m.config["vocab"], size=(n, 96)).tolist()
        ticks = []
        stop = threading.Event()

        def count():
            while not stop.is_set():
                ticks.append(time.perf_counter())
                time.sleep(0.001)

        t = threading.Thread(target=count)
        t.start()
        time.sleep(0.05)
        t0 = time.perf_counter()
        m.capture(token_ids=ids, sites="all", positions="all", logits=True, batch_size=4)
        t1 = time.perf_counter()
        stop.set()
        t.join()
        if t1 - t0 > 0.2 or n >= 1024:
            break
        n *= 4
    inside = [x for x in ticks if t0 + 0.2 * (t1 - t0) < x < t1 - 0.2 * (t1 - t0)]
    assert len(inside) >= 5, f"{len(inside)} ticks in the middle of a {t1 - t0:.2f} s call ({n} prompts)"


def test_generate_inputs(model):
    ids = fixture_ids("llama")
    z = "blocks.0.hook_resid_post"
    raises(patchbay.InputError, lambda: model.capture(token_ids=ids, sites=z, interventions=[patchbay.Zero(z, positions="generated")]), "generated")
    raises(patchbay.InputError, lambda: model.generate(token_ids=ids, temperature=-1.0), "temperature")
    raises(patchbay.InputError, lambda: model.generate(token_ids=ids, interventions=[patchbay.Zero(z, prompts=[0])]), "prompts=")
    clean = model.generate(token_ids=ids, max_new_tokens=4)
    v = np.ones(model.config["d_model"], dtype=np.float32)
    assert model.generate(token_ids=ids, max_new_tokens=4, interventions=[patchbay.Add(z, v, beta=0.0, positions="all+generated")]) == clean


def test_nonfinite_outputs_raise(tmp_path):
    """A checkpoint with NaN in one q_proj weight: capture and score raise
    NonFiniteError naming a prompt and a site, as the CLI stops (nothing returned silently)."""
    import json
    import shutil
    import struct

    src = ROOT / "tests" / "fixtures" / "llama"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k.endswith("layers.0.self_attn.q_proj.weight"))
    start = 8 + n + header[name]["data_offsets"][0]
    nan = {"BF16": b"\xc0\x7f", "F16": b"\x00\x7e", "F32": struct.pack("<f", float("nan"))}[header[name]["dtype"]]
    raw[start : start + len(nan)] = nan
    path.write_bytes(bytes(raw))
    model = patchbay.Model(str(tmp_path))
    ids = fixture_ids("llama")
    raises(patchbay.NonFiniteError, lambda: model.capture(token_ids=ids, sites=["blocks.1.hook_resid_post"]), "prompt", "not finite")
    raises(patchbay.NonFiniteError, lambda: model.score(token_ids=ids, label_token_ids=[5, 6]), "prompt", "not finite")

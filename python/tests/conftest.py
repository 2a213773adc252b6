"""Shared helpers of the Python tests: the repository's fixtures, the patchbay CLI (built by
cargo in the tests' profile, or $PATCHBAY_BIN), and a reader of its safetensors files."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "phi3", "olmo2"]


def fixture(family):
    return str(FIXTURES / family)


def fixture_ids(family):
    return json.loads((FIXTURES / family / "prompts.json").read_text())["ids"]


@pytest.fixture(scope="session")
def cli():
    """A function running the patchbay binary with arguments; fails the test on a non-zero exit."""
    exe = os.environ.get("PATCHBAY_BIN")
    if not exe:
        out = subprocess.run(
            ["cargo", "build", "--quiet", "--locked", "--profile", "test", "--bin", "patchbay", "--message-format=json"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
        exe = [json.loads(l)["executable"] for l in out.splitlines() if '"executable":"' in l][-1]

    def run(*args, ok=True):
        r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True)
        if ok:
            assert r.returncode == 0, f"patchbay {' '.join(map(str, args))}: {r.stderr}"
        return r

    return run


def read_safetensors(path):
    """The tensors of a safetensors file as numpy arrays, and its metadata."""
    b = Path(path).read_bytes()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    data = b[8 + n:]
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        s, e = t["data_offsets"]
        out[name] = np.frombuffer(data[s:e], dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out, header.get("__metadata__", {})


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]

"""patchbay from Python: capture, score and patch a decoder-only LLM with numpy in and out.

    import patchbay
    m = patchbay.Model("demo/model", device="cpu")          # also "emu", "cuda", "cuda:1"
    ids = m.tokenize(["I finally got the job!"])
    acts = m.capture(token_ids=ids, sites=["blocks.3.hook_resid_post"], positions=[-1])
    acts["blocks.3.hook_resid_post"]                         # [n_prompts, n_positions, d_model]

Interventions are the small classes below; pass a list of them as ``interventions=`` to
``Model.capture`` and ``Model.score``. ``site`` is a TransformerLens name
(``blocks.3.hook_resid_post``, ``blocks.2.attn.hook_z``); ``positions`` is ``"all"``, an
integer or a list (``-1`` = the last token); ``heads`` select heads at head sites (q, k, v,
rot_q, rot_k, z, result), ``neurons`` select neurons at ``mlp.hook_post``; ``prompts`` limits an
intervention to some prompts (indices into the call's prompts). Vectors are anything numpy reads
as float32 (lists, numpy arrays, ``tensor.numpy()``).

Every error is a ``patchbay.Error`` (``InputError``, ``FileError``, ``UnsupportedError``,
``DeviceError``) with patchbay's one-line message.
"""

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from ._patchbay import (  # noqa: F401  (re-exported)
    DeviceError,
    Error,
    FileError,
    InputError,
    Model,
    UnsupportedError,
    __version__,
)

Positions = Union[str, int, Sequence[int]]

__all__ = [
    "Model", "Error", "InputError", "FileError", "UnsupportedError", "DeviceError",
    "Add", "Patch", "Zero", "Mean", "Scale", "ProjectSet", "RandomEqualNorm",
]


@dataclass
class _Intervention:
    site: str
    positions: Positions = "all"
    heads: Optional[Sequence[int]] = None
    neurons: Optional[Sequence[int]] = None
    prompts: Optional[Sequence[int]] = None

    def _common(self, op: str) -> dict:
        return {"op": op, "site": self.site, "positions": self.positions, "heads": self.heads,
                "neurons": self.neurons, "prompts": self.prompts}


@dataclass
class Add(_Intervention):
    """x <- x + beta * vector (vector scaled to unit norm first when ``normalise``): steering."""
    vector: Any = None
    beta: float = 1.0
    normalise: bool = False

    def __init__(self, site, vector, beta=1.0, positions="all", normalise=False, heads=None, neurons=None, prompts=None):
        super().__init__(site, positions, heads, neurons, prompts)
        self.vector, self.beta, self.normalise = vector, beta, normalise

    def _spec(self):
        return {**self._common("add"), "vector": self.vector, "beta": self.beta, "normalise": self.normalise}


@dataclass
class Patch(_Intervention):
    """x <- values: ``[width]`` at every row, ``[n_positions, width]`` for every prompt, or one
    row per (prompt, position) (``[n_prompts, n_positions, width]``, as ``capture`` returns it)."""
    values: Any = None

    def __init__(self, site, values, positions="all", heads=None, neurons=None, prompts=None):
        super().__init__(site, positions, heads, neurons, prompts)
        self.values = values

    def _spec(self):
        return {**self._common("patch"), "values": self.values}


@dataclass
class Zero(_Intervention):
    """x <- 0 (zero ablation)."""

    def __init__(self, site, positions="all", heads=None, neurons=None, prompts=None):
        super().__init__(site, positions, heads, neurons, prompts)

    def _spec(self):
        return self._common("zero")


@dataclass
class Mean(_Intervention):
    """x <- mean (mean ablation; ``mean`` has the selected width)."""
    mean: Any = None

    def __init__(self, site, mean, positions="all", heads=None, neurons=None, prompts=None):
        super().__init__(site, positions, heads, neurons, prompts)
        self.mean = mean

    def _spec(self):
        return {**self._common("mean"), "mean": self.mean}


@dataclass
class Scale(_Intervention):
    """x <- alpha * x (enhancement above 1, suppression below)."""
    alpha: float = 1.0

    def __init__(self, site, alpha, positions="all", heads=None, neurons=None, prompts=None):
        super().__init__(site, positions, heads, neurons, prompts)
        self.alpha = alpha

    def _spec(self):
        return {**self._common("scale"), "alpha": self.alpha}


@dataclass
class ProjectSet(_Intervention):
    """x <- x - beta * P x + vector, P the projector onto the span of ``subspace`` (``[k, width]``,
    k directions); without ``vector``, project-out."""
    subspace: Any = None
    beta: float = 1.0
    vector: Any = None

    def __init__(self, site, subspace, beta=1.0, vector=None, positions="all", heads=None, neurons=None, prompts=None):
        super().__init__(site, positions, heads, neurons, prompts)
        self.subspace, self.beta, self.vector = subspace, beta, vector

    def _spec(self):
        return {**self._common("project_set"), "subspace": self.subspace, "beta": self.beta, "vector": self.vector}


@dataclass
class RandomEqualNorm(_Intervention):
    """x <- Gaussian noise rescaled to |x| (seeded by position, so batching does not change it)."""
    seed: int = 0

    def __init__(self, site, seed=0, positions="all", heads=None, neurons=None, prompts=None):
        super().__init__(site, positions, heads, neurons, prompts)
        self.seed = seed

    def _spec(self):
        return {**self._common("random_equal_norm"), "seed": self.seed}

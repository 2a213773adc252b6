"""patchbay from Python: capture, score and patch a decoder-only LLM with numpy in and out.

    import patchbay
    m = patchbay.Model("demo/model", device="cpu")          # also "emu", "cuda", "cuda:1"
    ids = m.tokenize(["I finally got the job!"])
    acts = m.capture(token_ids=ids, sites=["blocks.3.hook_resid_post"], positions=[-1])
    acts["blocks.3.hook_resid_post"]                         # [n_prompts, n_positions, d_model]

Interventions are the small classes below; pass a list of them as ``interventions=`` to
``Model.capture``, ``Model.score`` and ``Model.generate``, and as experiments (one each, or a list
applied together) to the label sweeps ``Model.steer`` and ``Model.ablate``. ``site`` (the first argument) is a TransformerLens name
(``blocks.3.hook_resid_post``, ``blocks.2.attn.hook_z``); the keyword ``positions`` is ``"all"``,
``"last"``, ``"last:K"``, an integer or a list (``-1`` = the last token), and for ``generate``
also ``"generated"`` or ``"X+generated"``; ``heads`` select heads at head sites (q, k, v,
rot_q, rot_k, z, result), ``neurons`` select neurons at ``mlp.hook_post``; ``prompts`` limits an
intervention to some prompts (indices into the call's prompts). Vectors are anything numpy reads
as float32 (lists, numpy arrays, ``tensor.numpy()``).

Every error is a ``patchbay.Error`` (``InputError``, ``FileError``, ``UnsupportedError``,
``DeviceError``, ``NonFiniteError``: NaN or Inf in the model's outputs) with patchbay's one-line
message.
"""

from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Union

from ._patchbay import (  # noqa: F401  (re-exported)
    DeviceError,
    Error,
    FileError,
    InputError,
    Model,
    NonFiniteError,
    UnsupportedError,
    __version__,
)

Positions = Union[str, int, Sequence[int]]

__all__ = [
    "Model", "Error", "InputError", "FileError", "UnsupportedError", "DeviceError", "NonFiniteError",
    "Add", "Patch", "Zero", "Mean", "Scale", "ProjectSet", "RandomEqualNorm",
]


@dataclass(kw_only=True)
class _Intervention:
    """Where an intervention acts (keyword arguments of every class below)."""
    positions: Positions = "all"
    heads: Optional[Sequence[int]] = None
    neurons: Optional[Sequence[int]] = None
    prompts: Optional[Sequence[int]] = None
    _op = ""

    def _spec(self) -> dict:
        """The plain dict the extension reads (the op and every field)."""
        return {"op": self._op, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass
class Add(_Intervention):
    """x <- x + beta * vector (vector scaled to unit norm first when ``normalise``): steering."""
    site: str
    vector: Any
    beta: float = 1.0
    normalise: bool = False
    _op = "add"


@dataclass
class Patch(_Intervention):
    """x <- values: ``[width]`` at every row, ``[n_positions, width]`` for every prompt, or one
    row per (prompt, position) (``[n_prompts, n_positions, width]``, as ``capture`` returns it)."""
    site: str
    values: Any
    _op = "patch"


@dataclass
class Zero(_Intervention):
    """x <- 0 (zero ablation)."""
    site: str
    _op = "zero"


@dataclass
class Mean(_Intervention):
    """x <- mean (mean ablation; ``mean`` has the selected width)."""
    site: str
    mean: Any
    _op = "mean"


@dataclass
class Scale(_Intervention):
    """x <- alpha * x (enhancement above 1, suppression below)."""
    site: str
    alpha: float
    _op = "scale"


@dataclass
class ProjectSet(_Intervention):
    """x <- x - beta * P x + vector, P the projector onto the span of ``subspace`` (``[k, width]``,
    k directions); without ``vector``, project-out."""
    site: str
    subspace: Any
    beta: float = 1.0
    vector: Any = None
    _op = "project_set"


@dataclass
class RandomEqualNorm(_Intervention):
    """x <- Gaussian noise rescaled to |x| (seeded by position, so batching does not change it)."""
    site: str
    seed: int = 0
    _op = "random_equal_norm"

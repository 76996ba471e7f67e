"""lossglass: loss landscapes of neural networks measured with the tools of spin-glass physics.

One object, the :class:`Problem`, is an energy E(theta) (the mean training loss of a model on a data set, or any
function) evaluated for a batch of K replicas ``(K, P)`` in one vectorised pass. Everything else asks it questions:

- ``train``: K replicas from K seeds in one loop (SGD, Adam, SAM, Langevin/SGHMC, replicated SGD, stop criteria);
- walks: ``random_walk`` (every step, or Metropolis at T), ``langevin``, ``basin_radius`` (Kaplan-Meier), ``msd``,
  ``aging``; ``parallel_tempering`` (replica exchange; Ising spins or continuous parameters);
- connectivity: ``interpolate``, ``bezier_path``, ``plane``, ``permutation_barriers``, ``pair_barriers``; symmetry:
  ``permute``, ``align`` (weight / activation matching), ``PermutationSpec``;
- replicas: ``overlaps``, ``overlap_distribution`` (P(q)), ``distances_from_overlaps`` (d = sqrt(2(1 - q))),
  ``hierarchy``, ``ultrametricity`` (calibrated verdict), ``describe_ultrametricity``;
- curvature: ``lossglass.curvature`` (top eigenvalues, trace, spectral density, sharpness, local entropy);
- reference landscapes in ``lossglass.models``: ``quadratic``, ``double_well``, ``spherical_pspin``, ``sk``;
- studies: ``run_study`` (a TOML config or a preset -> a run folder with tables, figures and ``report.html``),
  ``RunStore`` to read one.

Example::

    import lossglass as lg
    ds = lg.datasets.load("digits")
    prob = lg.Problem(lg.models.mlp(64, 32, 10), ds)
    reps = lg.train(prob, 8, epochs=5, batch_size=64, lr=0.05)
    q = lg.overlaps(prob, reps)                      # (8, 8) aligned overlaps
    print(lg.ultrametricity(lg.distances_from_overlaps(q)).summary["verdict"])
"""

# importing changes no thread setting: runs, the CLI and entries such as train pin them as they start (issue 13)
from ._determinism import numerics as numerics  # noqa: I001
from . import datasets, models
from .errors import LossglassError
from .problem import FunctionProblem, Problem
from .batchnorm import BatchNormPolicy
from .energy import Energy
from .layout import ParamLayout
from . import curvature
from .protocols.connect import (
    PathResult,
    PlaneResult,
    bezier_path,
    interpolate,
    pair_barriers,
    permutation_barriers,
    plane,
    plane_through,
)
from .protocols.curvature import local_entropy, sharpness
from .problem import Sphere
from .proxies import FlatnessProbe
from .protocols.replicas import (
    describe_ultrametricity,
    distances_from_overlaps,
    hierarchy,
    overlap_distribution,
    overlaps,
    ultrametricity,
)
from .protocols.walk import WalkResult, aging, basin_radius, kaplan_meier, km_quantile, langevin, msd, random_walk
from .sampling import PTResult, overlap_matrix, overlap_samples, parallel_tempering
from .store import RunStore
from .symmetry import PermutationSpec, align, permute, random_permutation, swap_permutation
from .train import Replicas, descend, train
from .analyze import Analysis, analyze  # noqa: E402 - after the protocols it calls

from ._version import __version__ as __version__


def run_study(config, out=None, **kwargs):
    """Run a study (a :class:`~lossglass.config.StudyConfig`, a TOML path or a preset name) into a run folder."""
    from .study import run_study as _run

    return _run(config, out, **kwargs)


__all__ = [
    "LossglassError", "Problem", "FunctionProblem", "Replicas", "RunStore", "train", "descend", "datasets", "models",
    "random_walk", "langevin", "WalkResult", "basin_radius", "msd", "aging",
    "interpolate", "bezier_path", "plane", "plane_through", "permutation_barriers", "pair_barriers",
    "PathResult", "PlaneResult", "permute", "random_permutation", "swap_permutation", "align", "PermutationSpec",
    "overlaps", "overlap_distribution", "hierarchy", "ultrametricity", "curvature", "sharpness", "local_entropy",
    "run_study", "numerics", "analyze", "Analysis",
    "Sphere", "FlatnessProbe", "describe_ultrametricity", "distances_from_overlaps",
    "kaplan_meier", "km_quantile", "parallel_tempering", "PTResult", "overlap_samples", "overlap_matrix",
    "Energy", "ParamLayout", "BatchNormPolicy",
]

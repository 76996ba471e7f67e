"""lossglass: loss landscapes of neural networks measured with the tools of spin-glass physics."""

from . import datasets, models
from .errors import LossglassError
from .problem import FunctionProblem, Problem
from .protocols import curvature
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
from .protocols.replicas import hierarchy, overlap_distribution, overlaps, ultrametricity
from .protocols.walk import WalkResult, aging, basin_radius, langevin, msd, random_walk
from .store import RunStore
from .symmetry import PermutationSpec, align, permute, random_permutation, swap_permutation
from .train import Replicas, descend, train

__version__ = "0.1.0"


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
    "run_study",
]

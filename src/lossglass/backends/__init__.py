"""The forward paths of :class:`~lossglass.problem.Problem`, one interface (:class:`Backend`), chosen once when the
problem is built:

- ``"fused"`` (:class:`FusedMLPBackend`): a float32 Linear-ReLU-Linear network on the CPU; its loss sums run
  through the compiled kernel of :mod:`lossglass._native` (the MLP backend where the kernel is unavailable);
- ``"mlp"`` (:class:`MLPBackend`): any ``nn.Sequential`` of Linear layers and element-wise activations,
  hand-batched, with the reverse pass and the R-operator Hessian-vector product written out;
- ``"stack"`` / ``"graph"`` (:class:`StackBackend`): Conv/Linear/norm stacks and torch.fx-traced residual
  networks, replica-batched by grouped convolutions, with BatchNorm statistics supplied per point;
- ``"vmap"`` (:class:`VmapBackend`): any other module through ``torch.func.vmap`` (the reference).
"""

from .base import Backend
from .fused import FusedMLPBackend, fused_applies
from .mlp import MLPBackend, mlp_plan
from .stack import StackBackend
from .vmap import VmapBackend

__all__ = ["Backend", "FusedMLPBackend", "MLPBackend", "StackBackend", "VmapBackend", "fused_applies", "mlp_plan"]

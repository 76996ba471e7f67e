"""The fused CPU backend: a float32 single-hidden-layer ReLU MLP on the CPU, whose loss sums (energies, accuracies,
and every point of paths and planes) run through the compiled kernel :func:`lossglass._native.mlp1_tail`.

For replica (or grid point) k, with first-layer maps Z_{k,j} = X W_{1,j}^T + b_{1,j} of J basis vectors and
coefficients c_{k,j}, the kernel computes per sample n

    z = sum_j c_{k,j} Z_{k,j}[n],   o = W_2 relu(z) + b_2,   loss(o, y_n),   [argmax o == y_n],

and sums over the samples in float64; the first-layer maps are one GEMM per data chunk (torch). Everything else
(gradients, Hessian-vector products, mini-batch training) is the hand-batched MLP backend it extends. The kernel is
asked for at each call: where it is not available (no compiler, ``LOSSGLASS_NATIVE=0``, an unsupported class
count) or declines, the torch path of :class:`~lossglass.backends.mlp.MLPBackend` runs instead, with the same
result to float32 roundoff (tests/test_backends.py, tests/test_native.py).
"""

from __future__ import annotations

import torch

from ..layout import ParamLayout
from .mlp import MLPBackend


def fused_applies(plan: list | None, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused kernel's structure applies: Linear, ReLU, Linear in float32 on the CPU."""
    return (plan is not None and len(plan) == 3 and plan[0][0] == "linear" and plan[2][0] == "linear"
            and plan[1][0] == "act" and plan[1][1] is torch.relu and dtype == torch.float32 and device.type == "cpu")


class FusedMLPBackend(MLPBackend):
    """See the module docstring."""

    name = "fused"

    def __init__(self, plan: list, layout: ParamLayout, loss_name: str, hand_written: bool = True):
        super().__init__(plan, layout, loss_name, hand_written)
        self.first, self.last = plan[0][1], plan[2][1]

    def kernel_ready(self) -> bool:
        """Whether the compiled kernel serves this network now (built, enabled, its class count supported)."""
        from .. import _native

        return self.hand_written and _native.kernel(self.last.w.shape[0]) is not None

    def _sums(self, wb: torch.Tensor, bb: torch.Tensor | None, coef: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor, per_basis: int, x: torch.Tensor, y: torch.Tensor, memory_mb: float):
        """Sums over the samples of ``x`` of the loss and of the correct flags per point (float64), by the fused
        kernel: the first layer of B bases of J maps ``wb`` ``(B*J*H, D)`` (+ ``bb`` ``(B*J*H, 1)``) is one GEMM per
        data chunk, the rest one pass per point (:func:`lossglass._native.mlp1_tail`). None if the kernel declines."""
        from .. import _native

        h = self.first.w.shape[0]
        rows = wb.shape[0]
        j = coef.shape[1]
        # a chunk's first-layer maps stay within a few MB (L3) where possible, whole super-blocks of samples
        step = max(_native.SUPER, int(min(memory_mb, 8.0) * 2**20 // max(rows * 4, 1)) // _native.SUPER * _native.SUPER)
        loss = torch.zeros(coef.shape[0], dtype=torch.float64)
        corr = torch.zeros_like(loss)
        for i in range(0, len(y), step):
            xb, yb = x[i:i + step], y[i:i + step]
            zt = torch.addmm(bb, wb, xb.T) if bb is not None else wb @ xb.T  # (B*J*H, n)
            out = _native.mlp1_tail(zt.view(rows // (j * h), j, h, len(yb)), coef, w2, b2, yb, per_basis, "relu",
                                    self.loss_name)
            if out is None:
                return None
            loss += out[0]
            corr += out[1]
        return loss, corr

    def evaluate_sums(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      memory_mb: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Summed loss and correct predictions of each replica over ``x``: the first layer one GEMM, the rest
        fused, in groups of replicas whose first-layer maps of a chunk fit in ``memory_mb``."""
        if not self.kernel_ready():
            return None
        from .._native import SUPER

        first, last = self.first, self.last
        k = theta.shape[0]
        h, c = first.w.shape[0], last.w.shape[0]
        group = max(1, int(memory_mb * 2**20 // (h * SUPER * 4)))  # replicas whose maps of a chunk fit
        parts = []
        with torch.no_grad():
            for a in range(0, k, group):
                th = theta[a:a + group]
                kk = th.shape[0]
                wb = th[:, first.w.slice].reshape(kk * h, -1)
                bb = th[:, first.b.slice].reshape(kk * h, 1) if first.b is not None else None
                b2 = (th[:, last.b.slice] if last.b is not None
                      else torch.zeros(kk, c, device=theta.device, dtype=theta.dtype))
                parts.append(self._sums(wb, bb, torch.ones(kk, 1, dtype=theta.dtype), th[:, last.w.slice].view(kk, c, h),
                                        b2, 1, x, y, memory_mb))
                if parts[-1] is None:
                    break
        return None if parts[-1] is None else (torch.cat([p_[0] for p_ in parts]), torch.cat([p_[1] for p_ in parts]))

    def affine_sums(self, basis: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    memory_mb: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Summed loss and correct predictions at theta_{m,g} = sum_j coeffs[m, g, j] basis[m, j] (``basis``
        ``(M, J, P)``, ``coeffs`` ``(M, G, J)``; results ``(M*G,)``): one GEMM per basis vector and data chunk,
        then one fused pass per point."""
        if not self.kernel_ready():
            return None
        first, last = self.first, self.last
        m, j1 = basis.shape[0], basis.shape[1]
        g_total = coeffs.shape[1]
        h, c = first.w.shape[0], last.w.shape[0]
        with torch.no_grad():
            wb = basis[:, :, first.w.slice].reshape(m * j1 * h, -1)
            bb = basis[:, :, first.b.slice].reshape(m * j1 * h, 1) if first.b is not None else None
            w2 = torch.bmm(coeffs, basis[:, :, last.w.slice]).reshape(m * g_total, c, h)
            b2 = (torch.bmm(coeffs, basis[:, :, last.b.slice]).reshape(m * g_total, c) if last.b is not None
                  else torch.zeros(m * g_total, c, device=basis.device, dtype=basis.dtype))
            return self._sums(wb, bb, coeffs.reshape(m * g_total, j1), w2, b2, g_total, x, y, memory_mb)

"""The hand-batched MLP backend: an ``nn.Sequential`` of Linear layers and element-wise activations as replica-
batched matrix products, with its reverse pass and Hessian-vector product written out.

Forward: the first layer of all K replicas is one GEMM ``X (N, D) @ [W_1 ... W_K]^T`` on shared data
(:func:`lossglass.layers.linear`), the later layers one ``bmm`` each, the narrow output layer as W h^T
(:func:`lossglass.layers.output_layer`). For per-replica mini-batches the gradient is the reverse pass written out
(the products autograd would run, each weight gradient a GEMM straight into its slice of one ``(K, P)`` tensor);
for a ReLU network the Hessian-vector product is Pearlmutter's R-operator (Pearlmutter 1994) written out.

Example (two replicas of a 3-4-2 tanh network agree with the module):

    >>> import torch
    >>> from torch import nn
    >>> from lossglass.layout import ParamLayout
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> layout = ParamLayout.from_module(net)
    >>> backend = MLPBackend(mlp_plan(net, layout), layout, "cross_entropy")
    >>> theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).repeat(2, 1)
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(backend.forward(theta, x)[1], net(x), atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Linear, linear, output_layer
from ..layout import ParamLayout
from .base import Backend

ACTIVATIONS: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: torch.relu, nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid, nn.GELU: F.gelu,
    nn.Identity: lambda z: z, nn.Flatten: lambda z: z,
}
#: d(loss)/d(input) of an activation from d(loss)/d(output) and its output (ReLU: the output's sign)
ACT_BACKWARD = {torch.relu: lambda g, a: torch.ops.aten.threshold_backward(g, a, 0.0),
                torch.tanh: torch.ops.aten.tanh_backward, torch.sigmoid: torch.ops.aten.sigmoid_backward}


def mlp_plan(model: nn.Module, layout: ParamLayout) -> list | None:
    """The layer plan of a plain MLP, ``[("linear", Linear) | ("act", fn), ...]`` starting with a Linear, or None
    when the model is anything else."""
    if not isinstance(model, nn.Sequential):
        return None
    plan = []
    for idx, m in model.named_children():
        if isinstance(m, nn.Linear):
            plan.append(("linear", Linear(layout[f"{idx}.weight"],
                                          layout[f"{idx}.bias"] if m.bias is not None else None)))
        elif type(m) in ACTIVATIONS:
            plan.append(("act", ACTIVATIONS[type(m)]))
        else:
            return None
    return plan if plan and plan[0][0] == "linear" else None


class MLPBackend(Backend):
    """See the module docstring. ``hand_written=False`` keeps the autograd routes (a problem whose loss or forward
    pass is overridden by a subclass: the hand-written ones reproduce the built-in ones only)."""

    name = "mlp"
    first_layer_affine = True

    def __init__(self, plan: list, layout: ParamLayout, loss_name: str, hand_written: bool = True):
        super().__init__(layout)
        self.plan = plan
        self.loss_name = loss_name
        self.hand_written = hand_written
        self._scratch: dict = {}

    @property
    def linears(self) -> list[Linear]:
        return [op for kind, op in self.plan if kind == "linear"]

    def _relu_like(self, allowed) -> bool:
        """Linear, act, Linear, ..., Linear with every activation in ``allowed``, and the hand-written routes on."""
        acts = [op for kind, op in self.plan if kind == "act"]
        return ([kind for kind, _ in self.plan] == ["linear", "act"] * len(acts) + ["linear"]
                and all(a in allowed for a in acts) and self.hand_written)

    def forward(self, theta, x: torch.Tensor, stats: dict | None = None, *, group: int | None = None) -> torch.Tensor:
        return self.forward_from(theta, x)

    def forward_from(self, theta, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The layers from ``start`` on applied to ``x`` (the output of layer ``start - 1``)."""
        h = x
        plan = self.plan
        for i in range(start, len(plan)):
            kind, op = plan[i]
            if kind == "linear" and i == len(plan) - 1 and h.ndim == 3:
                return output_layer(self.layout, theta, op, h)
            h = linear(self.layout, theta, op, h) if kind == "linear" else op(h)
        return h

    def _bmm_into(self, g: torch.Tensor, block, a: torch.Tensor, b: torch.Tensor) -> None:
        """g[:, block] <- a @ b (batched over replicas). The product goes to a contiguous scratch buffer (kept between
        calls) and is then copied into its slice of g: a batched GEMM whose output rows are P apart runs about twice as
        slow on oneDNN/MKL as one into contiguous memory plus the copy (8.1 vs 3.7 ms for 32 x (64 x 128 @ 128 x 784))."""
        k = g.shape[0]
        shape = (k, *block.shape)
        key = (shape, g.dtype, g.device)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(shape, dtype=g.dtype, device=g.device)
        torch.bmm(a, b, out=buf)
        g[:, block.slice].view(shape).copy_(buf)

    def batch_loss_and_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                            mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mini-batch loss and gradient on per-replica batches ``x`` ``(K, B, D)``, by hand: the forward pass of
        :meth:`forward_from`, then its reverse pass written out (the same products autograd would run), each
        gradient GEMM writing straight into its slice of one ``(K, P)`` tensor. No autograd graph, no per-parameter
        leaves to join: this is the training step's whole cost besides the optimiser. None for shared data or
        activations without a known derivative."""
        if x is None or x.ndim != 3 or not self._relu_like(ACT_BACKWARD):
            return None
        plan = self.plan
        view = self.layout.view
        k, b = x.shape[0], x.shape[1]
        theta = theta.detach()
        with torch.no_grad():
            hs, pre = [x], []  # inputs of each linear layer; activation outputs
            h = x
            for i in range(len(plan) - 1):
                kind, op = plan[i]
                if kind == "linear":
                    h = linear(self.layout, theta, op, h)
                else:
                    h = op(h)
                    pre.append((op, h))
                if i + 1 < len(plan) and plan[i + 1][0] == "linear":
                    hs.append(h)
            last: Linear = plan[-1][1]
            w_last = view(theta, last.w)  # (K, C, H)
            c = w_last.shape[1]
            if last.b is None:
                o = torch.bmm(w_last, h.transpose(1, 2))
            else:
                o = torch.baddbmm(view(theta, last.b).unsqueeze(-1), w_last, h.transpose(1, 2))  # (K, C, B)
            yk = y.expand(k, b).unsqueeze(1)  # (K, 1, B)
            if self.loss_name == "cross_entropy":
                lse = torch.logsumexp(o, 1, keepdim=True)
                per = (lse - o.gather(1, yk)).squeeze(1)  # (K, B)
            else:
                diff = o - F.one_hot(y.expand(k, b), c).to(o.dtype).transpose(1, 2)
                per = 0.5 * diff.pow(2).sum(1)
            loss = per.mean(1)
            keep = torch.isfinite(loss) if mask is None else (mask & torch.isfinite(loss))
            s = torch.where(keep, torch.full_like(loss, 1.0 / b), torch.zeros_like(loss)).view(k, 1, 1)
            if self.loss_name == "cross_entropy":
                do = torch.exp(o - lse).mul_(s)
                do.scatter_add_(1, yk, (-s).expand(k, 1, b))
            else:
                do = diff.mul_(s)
            do = torch.where(keep.view(k, 1, 1), do, 0.0)  # nothing from a masked or non-finite replica
            g = torch.empty_like(theta)
            self._bmm_into(g, last.w, do, h)
            if last.b is not None:
                torch.sum(do, 2, out=g[:, last.b.slice])
            dh = torch.bmm(do.transpose(1, 2), w_last)  # (K, B, H)
            hidden = [op for kind, op in plan[:-1] if kind == "linear"]
            for li in range(len(hidden) - 1, -1, -1):
                layer = hidden[li]
                op, a = pre[li]
                dz = ACT_BACKWARD[op](dh, a)
                self._bmm_into(g, layer.w, dz.transpose(1, 2), hs[li])
                if layer.b is not None:
                    torch.sum(dz, 1, out=g[:, layer.b.slice])
                if li > 0:
                    dh = torch.bmm(dz, view(theta, layer.w))
        return loss, g

    def hvp_operator(self, theta: torch.Tensor, chunks: Callable[[], list], n_total: int, memory_mb: float,
                     cache: bool = True) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """v -> H(theta) v for a ReLU MLP by Pearlmutter's R-operator written out: the forward quantities at theta
        (layer inputs, ReLU masks, softmax, output gradient, hidden-layer deltas) are computed once, kept per data
        chunk when they fit in ``memory_mb`` (``cache``), and each product is one R-forward and one R-backward pass:
        for one hidden layer two GEMMs with the data (X V1^T and R(dZ)^T X) and a few narrow ones. The exact Hessian
        (ReLU'' = 0 almost everywhere, as autograd has it), without an autograd graph. None for other activations."""
        if not self._relu_like((torch.relu,)):
            return None
        layout = self.layout
        view = layout.view
        theta = theta.detach()
        k = theta.shape[0]
        lin = self.linears
        ws = [view(theta, l_.w) for l_ in lin]
        c = lin[-1].w.shape[0]
        chunks = chunks()
        per_sample = k * (3 * sum(l_.w.shape[0] for l_ in lin[:-1]) + 3 * c) * 4
        keep = cache and per_sample * n_total <= memory_mb * 2**20
        ce = self.loss_name == "cross_entropy"

        def wgrad(dz: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # sum_n dz_n h_n^T per replica: (K, out, in)
            if h.ndim == 2:  # the shared data: one GEMM for all replicas
                n, out = dz.shape[1], dz.shape[2]
                return (dz.transpose(1, 2).reshape(k * out, n) @ h).view(k, out, -1)
            return torch.bmm(dz.transpose(1, 2), h)

        def forward(xb, yb):
            with torch.no_grad():
                hs, masks = [xb], []
                h = xb
                for l_ in lin[:-1]:
                    z = linear(layout, theta, l_, h)
                    masks.append(z > 0)
                    h = torch.relu(z)
                    hs.append(h)
                o = output_layer(layout, theta, lin[-1], h)  # (K, n, C)
                onehot = F.one_hot(yb, c).to(o.dtype)
                p = torch.softmax(o, -1) if ce else None
                do = ((p if ce else o) - onehot) / n_total
                dzs = []
                dh = torch.bmm(do, ws[-1])
                for i in range(len(lin) - 2, -1, -1):
                    dz = dh * masks[i]
                    dzs.insert(0, dz)
                    if i > 0:
                        dh = torch.bmm(dz, ws[i])
                return hs, masks, p, do, dzs

        saved = [forward(xb, yb) for xb, yb in chunks] if keep else None

        def mv(v: torch.Tensor) -> torch.Tensor:
            v = v.to(theta.device, theta.dtype).reshape(theta.shape)
            vs = [view(v, l_.w) for l_ in lin]
            out = torch.zeros_like(theta)
            with torch.no_grad():
                for ci, (xb, yb) in enumerate(chunks):
                    hs, masks, p, do, dzs = saved[ci] if saved is not None else forward(xb, yb)
                    rhs = [None]  # R of each linear layer's input (the data: 0)
                    for i, l_ in enumerate(lin[:-1]):
                        rz = linear(layout, v, l_, hs[i])
                        if rhs[i] is not None:
                            rz = rz + torch.bmm(rhs[i], ws[i].transpose(1, 2))
                        rhs.append(rz * masks[i])
                    ro = output_layer(layout, v, lin[-1], hs[-1])
                    if rhs[-1] is not None:
                        ro = ro + torch.bmm(rhs[-1], ws[-1].transpose(1, 2))
                    rdo = (p * (ro - (p * ro).sum(-1, keepdim=True)) if ce else ro) / n_total  # R of dE/do
                    last = lin[-1]
                    hw = torch.bmm(rdo.transpose(1, 2), hs[-1])
                    if rhs[-1] is not None:
                        hw += torch.bmm(do.transpose(1, 2), rhs[-1])
                    out[:, last.w.slice] += hw.reshape(k, -1)
                    if last.b is not None:
                        out[:, last.b.slice] += rdo.sum(1)
                    rdh = torch.bmm(rdo, ws[-1]) + torch.bmm(do, vs[-1])
                    for i in range(len(lin) - 2, -1, -1):
                        rdz = rdh * masks[i]
                        hw = wgrad(rdz, hs[i])
                        if rhs[i] is not None:
                            hw += torch.bmm(dzs[i].transpose(1, 2), rhs[i])
                        out[:, lin[i].w.slice] += hw.reshape(k, -1)
                        if lin[i].b is not None:
                            out[:, lin[i].b.slice] += rdz.sum(1)
                        if i > 0:
                            rdh = torch.bmm(rdz, ws[i]) + torch.bmm(dzs[i], vs[i])
            return out

        return mv

    def affine_into(self, theta: torch.Tensor, basis: torch.Tensor, cc: torch.Tensor, x: torch.Tensor,
                    y: torch.Tensor, step: int, loss: Callable, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        """Points theta_{m,g} = sum_j cc[m, g, j] basis[m, j] of M affine families: the first layer's
        pre-activations are affine in theta, z_{m,g} = sum_j cc[m, g, j] Z_{m,j} with Z_{m,j} = X W_{m,j}^T + b_{m,j}
        (exact), so J+1 products per family and data chunk of ``step`` samples serve all G points. Adds the summed
        losses (``loss(out, y)`` per sample) and correct predictions into ``loss_sum``, ``correct`` ``(M, G)``."""
        first = self.linears[0]
        m, j1, p = basis.shape
        gb = cc.shape[1]
        for i in range(0, len(x), step):
            xb, yb = x[i:i + step], y[i:i + step]
            n, h = len(xb), first.w.shape[0]
            zb = linear(self.layout, basis.reshape(-1, p), first, xb)  # (M*(J+1), n, h)
            z = torch.bmm(cc, zb.reshape(m, j1, n * h)).reshape(m * gb, n, h)
            out = self.forward_from(theta, z, start=1)
            loss_sum += loss(out, yb).sum(1, dtype=torch.float64).view(m, gb)
            correct += (out.contiguous().argmax(-1) == yb).sum(1, dtype=torch.float64).view(m, gb)

    @property
    def has_hidden_activations(self) -> bool:
        return True

    def hidden_activations(self, theta: torch.Tensor, x: torch.Tensor,
                           stats: dict | None = None) -> list[torch.Tensor]:
        """The output of every activation that feeds a Linear layer, ``[(K, N, width_l)]``."""
        outs, h = [], x
        plan = self.plan
        for i, (kind, op) in enumerate(plan):
            h = linear(self.layout, theta, op, h) if kind == "linear" else op(h)
            if kind == "act" and (i + 1 == len(plan) or plan[i + 1][0] == "linear"):
                outs.append(h)
        return outs

    def permutation_spec(self) -> dict[str, tuple]:
        """Hidden layer l's permutation acts on the rows of W_l and b_l and the columns of W_{l+1}."""
        lin = self.linears
        perms = {}
        for i, (a, b) in enumerate(zip(lin[:-1], lin[1:])):
            axes = [(a.w.name, 0)] + ([(a.b.name, 0)] if a.b is not None else []) + [(b.w.name, 1)]
            perms[f"P{i}"] = tuple(axes)
        return perms

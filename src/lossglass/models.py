"""Networks and reference landscapes.

``mlp`` builds the paper's single-hidden-layer ReLU network (any depth with a list); ``cnn`` a small Conv/BatchNorm
stack; ``resnet`` a CIFAR-style residual network (He et al. 2016); ``transformer`` a small decoder for token tasks
such as modular arithmetic (Power et al. 2022). The reference
landscapes are energies with known answers, run through the same protocols as the networks:
a quadratic bowl (convex, equipartition exact), a double well, the spherical p-spin glass and the
Sherrington-Kirkpatrick Ising spin glass (``sk``, sampled by parallel tempering).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._util import resolve_device
from .energy import FunctionProblem
from .errors import check, choice
from .manifold import Sphere

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def mlp(in_dim: int, hidden: int | list[int] | tuple[int, ...], out_dim: int, activation: str = "relu",
        bias: bool = True) -> nn.Sequential:
    """x -> W_L s(... s(W_1 x + b_1) ...) + b_L with s the activation; ``hidden`` an int (one hidden layer,
    the paper's case) or a list of widths."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    check(isinstance(in_dim, int) and in_dim > 0, f"in_dim must be a positive int, got {in_dim!r}")
    check(isinstance(out_dim, int) and out_dim > 0, f"out_dim must be a positive int, got {out_dim!r}")
    check(len(widths) > 0 and all(isinstance(w, int) and w > 0 for w in widths),
          f"hidden widths must be positive ints, got {hidden!r}")
    act = ACTIVATIONS[choice("activation", activation, tuple(ACTIVATIONS))]
    layers: list[nn.Module] = []
    for a, b in zip([in_dim] + widths[:-1], widths):
        layers += [nn.Linear(a, b, bias=bias), act()]
    layers.append(nn.Linear(widths[-1], out_dim, bias=bias))
    return nn.Sequential(*layers)


def cnn(in_shape: tuple[int, int, int] = (1, 28, 28), channels=(16, 32), n_classes: int = 10, *,
        batchnorm: bool = True, kernel: int = 3) -> nn.Sequential:
    """A small CNN on flat inputs: Unflatten -> [Conv(k x k, same padding) -> BatchNorm2d -> ReLU -> MaxPool 2]
    per entry of ``channels`` -> Flatten -> Linear to ``n_classes``."""
    check(len(in_shape) == 3 and all(int(v) > 0 for v in in_shape), f"in_shape must be (C, H, W), got {in_shape}")
    check(len(channels) > 0 and all(int(c) > 0 for c in channels), f"channels must be positive ints, got {channels}")
    c, h, w = in_shape
    layers: list[nn.Module] = [nn.Unflatten(1, tuple(in_shape))]
    for ch in channels:
        layers += [nn.Conv2d(c, ch, kernel, padding=kernel // 2)]
        layers += [nn.BatchNorm2d(ch)] if batchnorm else []
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = ch, h // 2, w // 2
    check(h > 0 and w > 0, f"input {in_shape} is too small for {len(channels)} pooling layers")
    layers += [nn.Flatten(), nn.Linear(c * h * w, n_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x)) (He et al. 2016, Fig. 2); the shortcut is the identity,
    or a strided 1x1 convolution with BatchNorm when the shape changes (their option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                                    if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, sec. 4.2) on flat inputs: Unflatten -> conv3x3(w) -> BN -> ReLU -> three
    stages of n BasicBlocks with w, 2w, 4w channels (stride 2 at the start of stages 2 and 3) -> global average
    pooling -> Linear. depth = 6n + 2 (ResNet-20: n = 3, the setting of Li et al. 2018's loss-surface figures).

    ``lossglass_batchnorm = "recompute"``: a :class:`~lossglass.problem.Problem` normalises it with the statistics of
    the whole training set at the evaluated point (as the CNN path), batched over replicas by grouped convolutions."""

    lossglass_batchnorm = "recompute"

    def __init__(self, depth: int = 20, width: int = 16, in_shape: tuple[int, int, int] = (3, 32, 32),
                 n_classes: int = 10):
        super().__init__()
        check(isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0,
              f"resnet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth!r}")
        check(isinstance(width, int) and width > 0, f"resnet width must be a positive int, got {width!r}")
        check(len(in_shape) == 3 and all(isinstance(v, int) and v > 0 for v in in_shape),
              f"in_shape must be (C, H, W) positive ints, got {in_shape}")
        check(min(in_shape[1:]) >= 4, f"in_shape {in_shape} is too small for two stride-2 stages")
        n = (depth - 2) // 6
        self.unflatten = nn.Unflatten(1, tuple(in_shape))
        self.conv = nn.Conv2d(in_shape[0], width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if stage > 0 and j == 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(self.unflatten(x))))
        h = self.pool(self.layers(h))
        return self.fc(torch.flatten(h, 1))


def resnet(depth: int = 20, width: int = 16, in_shape: tuple[int, int, int] = (3, 32, 32),
           n_classes: int = 10) -> ResNet:
    """A CIFAR-style ResNet of ``depth`` = 6n + 2 layers and base ``width`` (see :class:`ResNet`); ResNet-20 with
    width 16 on CIFAR-10 has 0.27 M parameters (He et al. 2016, Table 6).

    Example::

        >>> net = resnet(8, 4, (1, 28, 28), 10)
        >>> net(torch.zeros(2, 784)).shape
        torch.Size([2, 10])
    """
    return ResNet(depth, width, tuple(int(v) for v in in_shape), n_classes)


class Attention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017) with separate query, key, value and output projections:
    head h attends with softmax(q_h k_h^T / sqrt(d_head) + causal mask) v_h, the heads are concatenated and mapped
    by the output projection. Inputs and outputs are ``(N, T, d_model)``.

    Its permutation symmetry is declared (:meth:`permutation_rule`), as tracing cannot see through the head
    reshapes: whole heads (q, k, v rows and o columns in blocks of d_head), within every head the query/key
    dimensions together (q_h . k_h is unchanged) and the value/output dimensions together (the same permutation in
    every head), and the residual stream it reads (q, k, v columns) and writes (o rows)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool = True):
        super().__init__()
        check(d_model % n_heads == 0, f"d_model = {d_model} is not a multiple of n_heads = {n_heads}")
        self.n_heads, self.d_head, self.causal = n_heads, d_model // n_heads, causal
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q = self.q(x).view(n, t, self.n_heads, self.d_head).transpose(1, 2)  # (N, H, T, dh)
        k = self.k(x).view(n, t, self.n_heads, self.d_head).transpose(1, 2)
        v = self.v(x).view(n, t, self.n_heads, self.d_head).transpose(1, 2)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        if self.causal:
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        out = (s.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
        return self.o(out)

    def permutation_rule(self) -> dict:
        """The declared symmetry, names relative to this module (see :func:`lossglass.symmetry.derive_spec`):
        ``in``: axes that read the input's features; ``out``: axes that write the output's features;
        ``internal``: permutations of its own units. Entries (parameter, axis, block, outer): the axis holds
        outer x n x block entries and the permutation acts on the n."""
        dh, h = self.d_head, self.n_heads
        proj = ("q", "k", "v")
        return {
            "in": [(f"{p}.weight", 1) for p in proj],
            "out": [("o.weight", 0), ("o.bias", 0)],
            "internal": {
                "heads": [(f"{p}.{t}", 0, dh) for p in proj for t in ("weight", "bias")] + [("o.weight", 1, dh)],
                "qk": [(f"{p}.{t}", 0, 1, h) for p in ("q", "k") for t in ("weight", "bias")],
                "vo": [("v.weight", 0, 1, h), ("v.bias", 0, 1, h), ("o.weight", 1, 1, h)],
            },
        }


class TransformerBlock(nn.Module):
    """Pre-LayerNorm decoder block: x + attn(LN(x)), then x + W_2 act(W_1 LN(x))."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, activation: str = "relu", layernorm: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.act = ACTIVATIONS[choice("activation", activation, tuple(ACTIVATIONS))]()
        self.fc2 = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Embedding(nn.Embedding):
    """``nn.Embedding`` initialised N(0, std^2) (``reset_parameters``, so every replica draws its own)."""

    def __init__(self, num: int, dim: int, std: float):
        self.std = float(std)
        super().__init__(num, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.std)


class Transformer(nn.Module):
    """A small decoder on token sequences (GPT-style, pre-LN): token + position embeddings, ``n_layers``
    :class:`TransformerBlock`, a final LayerNorm and an unembedding read at the last position.

    Inputs are ``(N, T)`` token ids stored as floats (a lossglass :class:`~lossglass.datasets.Dataset` holds float
    inputs; ids below 2^24 are exact in float32): the forward pass casts them to integers (``x.long()``) before the
    embedding lookup, so the model also accepts integer tensors."""

    def __init__(self, vocab: int, seq_len: int, n_classes: int, d_model: int = 128, n_heads: int = 4,
                 n_layers: int = 1, d_mlp: int | None = None, activation: str = "relu", layernorm: bool = True):
        super().__init__()
        for k, v in dict(vocab=vocab, seq_len=seq_len, n_classes=n_classes, d_model=d_model, n_heads=n_heads,
                         n_layers=n_layers).items():
            check(isinstance(v, int) and v > 0, f"transformer: {k} must be a positive int, got {v!r}")
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        check(isinstance(d_mlp, int) and d_mlp > 0, f"transformer: d_mlp must be a positive int, got {d_mlp!r}")
        self.vocab, self.seq_len = vocab, seq_len
        self.tok = Embedding(vocab, d_model, d_model**-0.5)
        self.pos = Embedding(seq_len, d_model, d_model**-0.5)
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        self.blocks = nn.Sequential(*[TransformerBlock(d_model, n_heads, d_mlp, activation, layernorm)
                                      for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.unembed = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x.long()) + self.pos(self.positions)
        h = self.ln(self.blocks(h))
        return self.unembed(h[:, -1])


def transformer(vocab: int, seq_len: int, n_classes: int, *, d_model: int = 128, n_heads: int = 4, n_layers: int = 1,
                d_mlp: int | None = None, activation: str = "relu", layernorm: bool = True) -> Transformer:
    """A small decoder-only transformer reading the last position (see :class:`Transformer`): for the modular
    arithmetic task of Power et al. (2022), ``vocab = p + 1`` (the residues and "="), ``seq_len = 3``, ``n_classes = p``.

    Example::

        >>> net = transformer(8, 3, 7, d_model=16, n_heads=2)
        >>> net(torch.tensor([[1.0, 2.0, 7.0]])).shape
        torch.Size([1, 7])
    """
    return Transformer(vocab, seq_len, n_classes, d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_mlp=d_mlp,
                       activation=activation, layernorm=layernorm)


def quadratic(hessian: torch.Tensor, *, device: str = "cpu", dtype: torch.dtype = torch.float64) -> FunctionProblem:
    """E(theta) = 1/2 theta^T H theta, H symmetric. With H positive definite the Boltzmann law exp(-E/T)
    has <E> = P T / 2 (equipartition) and Var(theta . u_i) = T / lambda_i."""
    h = torch.as_tensor(hessian, dtype=dtype)
    check(h.ndim == 2 and h.shape[0] == h.shape[1], f"hessian must be square, got shape {tuple(h.shape)}")
    check(bool(torch.isfinite(h).all()), "hessian holds NaN or inf")
    check(torch.allclose(h, h.T, atol=1e-8 * (1 + h.abs().max().item())), "hessian must be symmetric")
    dev = resolve_device(device)
    h = h.to(dev)

    def energy(theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((theta @ h) * theta).sum(-1)

    p = FunctionProblem(energy, h.shape[0], name="quadratic", device=str(dev), dtype=dtype)
    p.hessian = h
    return p


def double_well(n_params: int, *, height: float = 1.0, device: str = "cpu",
                dtype: torch.dtype = torch.float64) -> FunctionProblem:
    """E(theta) = height * sum_i (theta_i^2 - 1)^2: 2^P minima at theta_i = +-1 separated by barriers of
    ``height`` per coordinate (a minimal rugged landscape with exactly known barriers)."""
    check(height > 0, f"height must be positive, got {height}")

    def energy(theta: torch.Tensor) -> torch.Tensor:
        return height * (theta.pow(2) - 1).pow(2).sum(-1)

    return FunctionProblem(energy, n_params, name="double-well", device=device, dtype=dtype)


def spherical_pspin(n_spins: int, p: int = 3, seed: int = 0, *, device: str = "cpu",
                    dtype: torch.dtype = torch.float64) -> FunctionProblem:
    """The spherical p-spin glass (Crisanti & Sommers 1992), energy per spin:

        E(s) = H(s) / N,  H(s) = - sum_{i1<...<ip} J_{i1..ip} s_i1 ... s_ip,  J ~ N(0, p! / (2 N^(p-1))),

    spins on the sphere sum_i s_i^2 = N: ``problem.manifold`` is ``Sphere(sqrt(N))``, so ``project`` renormalises,
    curvature is the Riemannian Hessian P_T (grad^2 E - (s . grad E / N) I) P_T and paths follow great circles.
    For p = 2, H = -1/2 s^T M s with M the symmetric coupling matrix (zero diagonal) and min E = -lambda_max(M) / 2;
    at the ground state the Riemannian Hessian of E has eigenvalues (lambda_max - lambda_i) / N. Supported: p = 2, 3.

    ``energy_scale = N``: H = energy_scale * E. The Boltzmann weight is exp(-H / T_phys), so a walk or Metropolis
    temperature T given in units of E (the energy per spin) is the physical temperature T_phys = N T;
    :func:`lossglass.sampling.parallel_tempering` takes physical temperatures (units of H).
    """
    check(p in (2, 3), f"spherical_pspin supports p = 2 or 3, got {p}")
    check(isinstance(n_spins, int) and n_spins >= p, f"n_spins must be an int >= {p}, got {n_spins!r}")
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(int(seed))
    n = n_spins
    std = math.sqrt(math.factorial(p) / (2 * n ** (p - 1)))
    if p == 2:
        j = torch.randn(n, n, generator=g, dtype=dtype) * std
        m = torch.triu(j, 1)
        m = (m + m.T).to(dev)

        def energy(s: torch.Tensor) -> torch.Tensor:
            return -0.5 * ((s @ m) * s).sum(-1) / n

        couplings = m
    else:
        j = torch.randn(n, n, n, generator=g, dtype=dtype) * std
        i, k, l_ = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(n), indexing="ij")
        j = (j * ((i < k) & (k < l_))).to(dev)  # keep i<j<k only

        flat = j.reshape(n * n, n)

        def energy(s: torch.Tensor) -> torch.Tensor:
            js = (flat @ s.T).T.reshape(-1, n, n)  # sum_k J_ijk s_k, one GEMM for all replicas
            return -(torch.bmm(js, s.unsqueeze(-1)).squeeze(-1) * s).sum(-1) / n

        couplings = j
    prob = FunctionProblem(energy, n, name=f"spherical-{p}-spin", device=str(dev), dtype=dtype,
                           init_scale=1.0, manifold=Sphere(math.sqrt(n)))
    prob.couplings, prob.p = couplings, p
    prob.energy_scale = float(n)
    return prob


class IsingProblem(FunctionProblem):
    """A :class:`FunctionProblem` over Ising spins s_i = +-1 (``spins = "ising"``), stored as floats.

    ``init`` draws random +-1 configurations. Continuous protocols (random walks, Langevin, curvature, paths)
    make no sense on a discrete configuration space: callers check ``problem.spins == "ising"`` and refuse;
    sample it with :func:`lossglass.sampling.parallel_tempering` (single-spin-flip Metropolis)."""

    spins = "ising"

    def __init__(self, fn, n_params: int, couplings: torch.Tensor, **kwargs):
        super().__init__(fn, n_params, **kwargs)
        self.couplings = couplings

    def __repr__(self) -> str:
        return f"IsingProblem({self.name!r}, N={self.n_params})"

    def init(self, n_replicas: int, seed: int = 0, *, ids=None) -> torch.Tensor:
        """Replica k: s_i = sign(g_i), g ~ N(0, I) from the seed mixed from (seed, ids[k]): uniform over {-1, +1}^N."""
        return torch.where(super().init(n_replicas, seed, ids=ids) >= 0, 1.0, -1.0).to(self.dtype)

    def local_fields(self, s: torch.Tensor) -> torch.Tensor:
        """h_i = sum_j J_ij s_j, ``(K, N)``; flipping spin i changes H by Delta H_i = 2 s_i h_i."""
        s, _ = self._prepare(s)
        return s @ self.couplings

    def flip_energies(self, s: torch.Tensor) -> torch.Tensor:
        """Delta H_i = 2 s_i h_i for every single-spin flip of every configuration, ``(K, N)`` (units of H)."""
        s, _ = self._prepare(s)
        return 2 * s * (s @ self.couplings)


def sk(n_spins: int, seed: int = 0, *, device: str = "cpu", dtype: torch.dtype = torch.float64) -> IsingProblem:
    """The Sherrington-Kirkpatrick spin glass (Sherrington & Kirkpatrick 1975), energy per spin:

        E(s) = H(s) / N,  H(s) = - sum_{i<j} J_ij s_i s_j = -1/2 s^T J s,  J_ij = J_ji ~ N(0, 1/N),  s_i = +-1,

    ``couplings`` the symmetric J with zero diagonal. ``energy_scale = N`` (H = N E); temperatures are in units
    of H, where T_c = 1. Known values: the annealed (high-temperature) energy E[<H>]/N = -(beta/2)(N-1)/N,
    the exact Gaussian-coupling identity E[<H>]/N = -(beta/2)(1 - E<q^2>) (q the overlap of two copies), and
    the Parisi ground-state energy per spin -0.7633 as N -> infinity. Below T_c the overlap distribution of two
    equilibrium copies is broad (full replica symmetry breaking). ``spins = "ising"``: only spin-flip
    samplers apply (:func:`lossglass.sampling.parallel_tempering`); ``local_fields`` gives h = J s.
    """
    check(isinstance(n_spins, int) and n_spins >= 2, f"n_spins must be an int >= 2, got {n_spins!r}")
    check(dtype in (torch.float32, torch.float64), f"dtype must be torch.float32 or torch.float64, got {dtype}")
    dev = resolve_device(device)
    n = n_spins
    g = torch.Generator().manual_seed(int(seed))
    j = torch.triu(torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n), 1)
    j = (j + j.T).to(dev, dtype)

    def energy(s: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((s @ j) * s).sum(-1) / n

    prob = IsingProblem(energy, n, j, name="sk", device=str(dev), dtype=dtype)
    prob.energy_scale = float(n)
    prob.seed = int(seed)
    return prob

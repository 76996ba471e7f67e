"""Architectures whose permutation spec ``derive_spec`` derives by tracing, with an example input each: every model the
symmetry tests (test_symmetry_fx, test_architectures, test_cnn_bn, test_connect, test_byo, test_analyze) trace, plus
one model per op rule of the tracer (so every branch of the rules is pinned). ``tests/golden/symmetry_specs.json``
holds what the hand-written interpreter (before the torch.fx.Interpreter rewrite) derived for each: the groups as
data, or the one-line error for the models it refuses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lossglass as lg
from lossglass.analyze import _Reshaped


def _mlp_builder(forward):
    """A two-Linear module (8 -> 6 -> 3) whose forward is ``forward(self, x)``."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 3)

    M.forward = forward
    return M


class ResidualBN(nn.Module):
    """The residual CNN with BatchNorm of test_symmetry_fx (issue 17: a stream shared by two blocks)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x.view(-1, 1, 8, 8))))
        h = torch.relu(h + self.b1(self.c1(h)))
        h = torch.relu(h + self.b2(self.c2(h)))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(torch.cumsum(torch.relu(self.a(x)), -1))


class Branchy(Cumsum):
    def forward(self, x):
        h = self.a(x)
        return self.b(h if h.sum() > 0 else -h)


class Gru(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.rnn, self.b = nn.Linear(4, 5), nn.GRU(5, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(self.rnn(self.a(x).unsqueeze(1))[0][:, -1])


class _BadRule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))

    def permutation_rule(self):  # forgets the columns of b
        return {"internal": {"hidden": [("a.weight", 0), ("a.bias", 0)]}}


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _BadRule()

    def forward(self, x):
        return self.net(x)


class Conv1dNet(nn.Module):
    """Conv1d, GroupNorm with 1 and with C groups, a depthwise convolution, a transpose to (N, L, C), a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.c1, self.g1 = nn.Conv1d(2, 4, 3, padding=1), nn.GroupNorm(1, 4)
        self.dw, self.g2 = nn.Conv1d(4, 4, 3, padding=1, groups=4), nn.GroupNorm(4, 4)
        self.ln, self.fc = nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        h = F.gelu(self.g1(self.c1(x.reshape(-1, 2, 4))))
        h = self.g2(self.dw(h)).transpose(1, 2)
        return self.fc(self.ln(h).mean(1))


class Tokens(nn.Module):
    """An embedding starting a stream, a permute and back, slicing, a residual Linear, a sum over positions."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.out = nn.Embedding(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.emb(x.long())
        h = h.permute(0, 2, 1).permute(0, 2, 1)
        h = h + torch.tanh(self.lin(h))
        return self.out(h[:, 1:, :].sum(dim=1))


class Gated(nn.Module):
    """Two Linear branches multiplied entry by entry (one group), a scalar scale, softmax over classes."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x) * torch.sigmoid(self.g(x))
        h = h / 2.0
        return F.log_softmax(self.b(h.contiguous()), dim=-1)


class CatBatch(nn.Module):
    """Concatenation along the batch axis (allowed) and a max over hidden units (invariant)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.cat([h, h * 2], 0)
        return self.b(h)[: x.shape[0]] + h.amax(-1, keepdim=True)[: x.shape[0]]


class CatFeatures(CatBatch):
    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(torch.cat([h, h], -1)[:, :6])


class AddInput(nn.Module):
    """The hidden units added to the input: their group touches the input and is fixed (no permutation)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.fc(self.c(x.view(-1, 2, 4, 4)).flatten(1))


def _pool_net(pool):
    """Conv -> ReLU -> ``pool(h)`` -> Flatten -> Linear on 1x8x8 images."""

    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 16, 3)
            self.pool = pool if isinstance(pool, nn.Module) else None

        def forward(self, x):
            h = torch.relu(self.conv(x.view(-1, 1, 8, 8)))
            return self.fc((self.pool(h) if self.pool is not None else pool(h)).flatten(1))

    return P()


def cases() -> dict:
    """name -> (model, example input): fresh models, the same seeds every call."""
    torch.manual_seed(0)
    x8, x64, x4 = torch.randn(2, 8), torch.randn(2, 64), torch.randn(2, 4)
    out = {
        "mlp_two_hidden": (lg.models.mlp(8, [7, 6], 3), x8),
        "mlp_tanh": (lg.models.mlp(8, 5, 3, activation="tanh"), x8),
        "cnn_bn": (lg.models.cnn((1, 8, 8), (3, 4), 3), x64),
        "cnn_no_bn": (lg.models.cnn((1, 8, 8), (3,), 3, batchnorm=False), x64),
        "residual_bn": (ResidualBN(), x64),
        "layernorm_mlp": (nn.Sequential(nn.Linear(64, 10), nn.LayerNorm(10), nn.ReLU(), nn.Linear(10, 3)), x64),
        "custom": (Custom(), x8),
        "reshaped_cnn": (_Reshaped(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                                 nn.Flatten(), nn.Linear(256, 3)), (1, 8, 8)), x64),
        "resnet": (lg.models.resnet(8, 4, (1, 8, 8), 3), x64),
        "transformer": (lg.models.transformer(8, 3, 7, d_model=8, n_heads=2, d_mlp=12),
                        torch.tensor([[1.0, 2.0, 7.0], [3.0, 4.0, 7.0]])),
        "transformer_no_ln": (lg.models.transformer(8, 3, 7, d_model=8, n_heads=2, layernorm=False),
                              torch.tensor([[1.0, 2.0, 7.0], [3.0, 4.0, 7.0]])),
        "conv1d_groupnorm": (Conv1dNet(), x8),
        "tokens": (Tokens(), torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 2.0]])),
        "gated": (Gated(), x8),
        "cat_batch": (CatBatch(), x8),
        "add_input": (AddInput(), x8),
        "pool_module": (_pool_net(nn.MaxPool2d(2)), x64),
        "pool_functional": (_pool_net(lambda h: F.max_pool2d(h, 2)), x64),
        "pool_avg_functional": (_pool_net(lambda h: F.avg_pool2d(h, 2)), x64),
        "pool_adaptive": (_pool_net(nn.AdaptiveAvgPool2d(4)), x64),
        "view_squeeze": (_mlp_builder(lambda self, x: self.b(torch.relu(self.a(x)).unsqueeze(1).squeeze(1)
                                                                 .reshape(x.shape[0], -1)))(), x8),
        "method_ops": (_mlp_builder(lambda self, x: self.b(self.a(x).relu().add(1.0).mul(self.a(x).sigmoid())))(), x8),
        # refused
        "cumsum": (Cumsum(), torch.zeros(2, 4)),
        "branchy": (Branchy(), torch.zeros(2, 4)),
        "gru": (Gru(), torch.zeros(2, 4)),
        "wrong_rule": (Outer(), x4),
        "cat_features": (CatFeatures(), x8),
        "grouped_conv": (Grouped(), torch.randn(2, 32)),
        "pool_over_units": (_mlp_builder(lambda self, x: self.b(F.max_pool2d(self.a(x)[:, None, None], 1)[:, 0, 0]))(), x8),
        "indexing_units": (_mlp_builder(lambda self, x: self.b(F.pad(self.a(x)[:, :5], (0, 1))))(), x8),
        "does_not_run": (Custom(), torch.zeros(2, 5)),
    }
    return out

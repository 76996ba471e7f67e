"""User-side factories for the bring-your-own tests (imported by 'package.module:factory' strings)."""

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def model():
    return Net()


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x[:180], y[:180], x[180:], y[180:]


def loaders():
    x_tr, y_tr, x_te, y_te = data()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_tr, y_tr), batch_size=50)
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_te, y_te), batch_size=50)
    return train, test


def spec():
    import lossglass as lg

    return lg.PermutationSpec({"hidden": (("inp.weight", 0), ("inp.bias", 0), ("out.weight", 1))})


class Opaque(Net):
    """A cumulative sum over the hidden units: no permutation of them is a symmetry, and derive_spec says so."""

    def forward(self, x):
        return self.out(torch.cumsum(torch.tanh(self.inp(x)), -1))


def opaque_model():
    return Opaque()

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


# ---------------------------------------------------------------- a user's BatchNorm model trained on x/255 (issue 28)
class BNNet(nn.Module):
    """A small user model with BatchNorm on 1x8x8 'pixel' images, trained by the user on x/255."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 16, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x.reshape(-1, 1, 8, 8))))
        return self.head(torch.nn.functional.avg_pool2d(h, 2).flatten(1))


def bn_model():
    return BNNet()


def pixels():
    """uint8-valued 'pixels' 0..255 (as float): a 3-class task (how many of two quadrants are bright)."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(600, 1, 8, 8, generator=g) * 120 + 40
    y = torch.randint(0, 3, (600,), generator=g)
    base[:, :, :4, :4] += 22 * (y >= 1).float().view(-1, 1, 1, 1)
    base[:, :, 4:, 4:] += 22 * (y >= 2).float().view(-1, 1, 1, 1)
    return base.clamp(0, 255).round(), y


def pixels_over_255():
    """The user's own preprocessing: x / 255."""
    x, y = pixels()
    x = x / 255
    return x[:450], y[:450], x[450:], y[450:]


def pixels_standardised():
    """lossglass's preprocessing of its named image data sets: (x/255 - mean) / std (scalars of the training split)."""
    x, y = pixels()
    x = x / 255
    mu, sd = x[:450].mean(), x[:450].std()
    x = (x - mu) / sd
    return x[:450], y[:450], x[450:], y[450:]

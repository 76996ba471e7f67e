"""derive_spec as a torch.fx.Interpreter (issue 23): the specs it derives are frozen as data, and functional pooling and
activations (issue 28, item 9) give the spec of their module forms."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossglass as lg
from lossglass.symmetry import derive_spec, spec_of

from .conftest import image_task
from .symmetry_catalogue import cases

pytestmark = pytest.mark.usefixtures("one_thread")

FROZEN = json.loads((Path(__file__).parent / "golden" / "symmetry_specs.json").read_text())["specs"]


def _derived(model, x) -> dict:
    try:
        return {"perms": {k: [list(e) for e in v] for k, v in derive_spec(model, x).perms.items()}}
    except lg.LossglassError as e:
        msg = str(e)
        return {"error": msg.split(" (RuntimeError")[0] if "does not run" in msg else msg}


def test_every_catalogued_architecture_gets_the_frozen_spec():
    """The interpreter's spec (groups, their order and names, entries with block and outer) or its one-line error is
    the one the hand-written interpreter gave, on every architecture the symmetry tests trace and one model per rule."""
    got = {name: _derived(model, x) for name, (model, x) in cases().items()}
    assert set(got) == set(FROZEN)
    diff = {name: (got[name], FROZEN[name]) for name in FROZEN if got[name] != FROZEN[name]}
    assert not diff, diff
    # the catalogue is not vacuous: specs with several groups, declared groups, blocks and outer counts, and errors
    assert len(FROZEN["resnet"]["perms"]) == 6 and "blocks.0.attn.qk" in FROZEN["transformer"]["perms"]
    assert ["fc.weight", 1, 16] in FROZEN["pool_functional"]["perms"]["P0"]
    assert sum("error" in v for v in FROZEN.values()) == 9


class _Pooled(nn.Module):
    """Conv (1 or 2 spatial dims) -> ReLU -> ``op`` (a module or a function of the activations) -> Linear: the same
    parameters (names and shapes) whichever form ``op`` takes."""

    def __init__(self, op, dims: int = 2, flat: int = 16):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.dims, self.conv, self.fc = dims, conv(1, 4, 3, padding=1), nn.Linear(4 * flat, 3)
        self.op = op if isinstance(op, nn.Module) else None
        self._fn = None if isinstance(op, nn.Module) else op

    def forward(self, x):
        h = torch.relu(self.conv(x.view(-1, 1, 8, 8) if self.dims == 2 else x.view(-1, 1, 64)))
        return self.fc((self.op(h) if self.op is not None else self._fn(h)).flatten(1))


POOLS_2D = {
    "module": nn.MaxPool2d(2),
    "F.max_pool2d": lambda h: F.max_pool2d(h, 2),
    "torch.max_pool2d": lambda h: torch.max_pool2d(h, 2),
    "return_indices": lambda h: F.max_pool2d(h, 2, return_indices=True)[0],
    "module_return_indices": None,  # nn.MaxPool2d(return_indices=True) then [0], below
    "F.avg_pool2d": lambda h: F.avg_pool2d(h, 2),
    "F.adaptive_max_pool2d": lambda h: F.adaptive_max_pool2d(h, 4),
    "adaptive_with_indices": lambda h: F.adaptive_max_pool2d(h, 4, return_indices=True)[0],
}
POOLS_1D = {
    "module": nn.MaxPool1d(4),
    "F.max_pool1d": lambda h: F.max_pool1d(h, 4),
    "torch.max_pool1d": lambda h: torch.max_pool1d(h, 4),
    "F.avg_pool1d": lambda h: F.avg_pool1d(h, 4),
    "torch.avg_pool1d": lambda h: torch.avg_pool1d(h, 4),
    "F.adaptive_avg_pool1d": lambda h: F.adaptive_avg_pool1d(h, 16),
    "torch.adaptive_max_pool1d": lambda h: torch.adaptive_max_pool1d(h, 16)[0],
}


class _IndicesModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def forward(self, h):
        return self.pool(h)[0]


def test_functional_pooling_gets_the_spec_of_the_pooling_module():
    x = torch.randn(2, 64)
    want = {"P0": (("conv.weight", 0), ("conv.bias", 0), ("fc.weight", 1, 16))}
    for pools in (POOLS_2D, POOLS_1D):
        for name, op in pools.items():
            model = _Pooled(_IndicesModule() if op is None else op, dims=2 if pools is POOLS_2D else 1)
            assert derive_spec(model, x).perms == want, name  # derive_spec verifies it by a random permutation too


def test_pooling_over_the_hidden_units_is_refused_in_every_form():
    class OverUnits(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.a, self.b, self.fn = nn.Linear(8, 6), nn.Linear(6, 3), fn

        def forward(self, x):
            return self.b(self.fn(self.a(x)[:, None]).squeeze(1))

    for fn in (lambda h: F.max_pool1d(h, 1), lambda h: torch.max_pool1d(h, 1), lambda h: F.avg_pool1d(h, 1)):
        with pytest.raises(lg.LossglassError, match="pools over the permutable axis"):
            derive_spec(OverUnits(fn), torch.randn(2, 8))


@pytest.mark.parametrize("module, fn", [
    (nn.ReLU6(), F.relu6), (nn.Hardtanh(), F.hardtanh), (nn.Hardswish(), F.hardswish), (nn.SELU(), F.selu),
    (nn.CELU(), F.celu), (nn.Softsign(), F.softsign), (nn.Hardsigmoid(), F.hardsigmoid),
    (nn.Dropout2d(0.5), lambda h: F.dropout2d(h, 0.5, training=False)),
])
def test_functional_activations_get_the_spec_of_their_modules(module, fn):
    x = torch.randn(2, 64)
    by_module, by_function = derive_spec(_Pooled(module, flat=64), x), derive_spec(_Pooled(fn, flat=64), x)
    assert by_function.perms == by_module.perms == {"P0": (("conv.weight", 0), ("conv.bias", 0), ("fc.weight", 1, 64))}


def test_a_problem_with_functional_pooling_gets_the_module_spec():
    """Through a Problem (what connect, align and the overlaps use): the same spec, and a random permutation of it
    leaves the energy unchanged."""
    images = image_task(40, 10)
    probs = {name: lg.Problem(_Pooled(op), images, dtype=torch.float64)
             for name, op in (("module", nn.MaxPool2d(2)), ("torch.max_pool2d", lambda h: torch.max_pool2d(h, 2)))}
    specs = {name: spec_of(p).perms for name, p in probs.items()}
    assert specs["torch.max_pool2d"] == specs["module"]
    prob = probs["torch.max_pool2d"]
    theta = prob.init(2, 0)
    moved = lg.permute(prob, theta, lg.random_permutation(prob, 3))
    assert not torch.equal(moved, theta)
    assert torch.allclose(prob.energy(moved), prob.energy(theta), rtol=1e-12, atol=0)


def test_frozen_errors_name_the_op():
    """The refusals are one line each and name what was refused."""
    for name in ("cumsum", "gru", "grouped_conv", "cat_features", "indexing_units", "pool_over_units"):
        msg = FROZEN[name]["error"]
        assert "\n" not in msg and re.search(r"(node '|module ')", msg), (name, msg)

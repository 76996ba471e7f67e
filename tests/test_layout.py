"""The public parameter layout (lossglass.layout.ParamLayout): where each parameter tensor lives in theta."""

import pytest
import torch
from torch import nn

import lossglass as lg
from lossglass.layout import ParamEntry, ParamLayout

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layout_is_the_order_of_named_parameters_and_round_trips():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4, bias=False))
    layout = ParamLayout.from_module(net)
    assert layout.names == [n for n, _ in net.named_parameters()]
    assert layout.n_params == sum(p.numel() for p in net.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert torch.equal(flat, torch.nn.utils.parameters_to_vector(net.parameters()))
    for name, t in layout.unflatten(flat).items():  # one point: views shaped as the module's tensors
        assert torch.equal(t, net.get_parameter(name))
    assert torch.equal(layout.flatten(dict(net.named_parameters())), flat)
    theta = torch.randn(4, layout.n_params)
    parts = layout.split(theta)
    assert [tuple(p.shape) for p in parts] == [(4, *e.shape) for e in layout]
    assert torch.equal(layout.join(parts, 4), theta)
    assert parts[0].data_ptr() == theta.data_ptr()  # views, no copies
    leaves = layout.split(theta, leaf=True)
    assert all(t.is_leaf and t.requires_grad for t in leaves)
    for e, p in zip(layout, parts):  # view() serves a flat tensor and the per-tensor list alike
        assert torch.equal(layout.view(theta, e), p) and layout.view(parts, e.name) is p
        assert torch.equal(theta[:, layout[e.name].slice].reshape(4, *e.shape), p)
    m = layout.mask("0.bias", "3.weight")
    assert int(m.sum()) == 3 + 48 and float(m[layout["0.bias"].slice].min()) == 1.0


def test_layout_refuses_what_is_not_a_layout():
    with pytest.raises(lg.LossglassError, match="starts at 5, expected 4"):
        ParamLayout([ParamEntry("a", (2, 2), 0), ParamEntry("b", (3,), 5)])
    with pytest.raises(lg.LossglassError, match="unique"):
        ParamLayout([ParamEntry("a", (2,), 0), ParamEntry("a", (3,), 2)])
    layout = ParamLayout.from_shapes({"w": (2, 3), "b": (2,)})
    with pytest.raises(lg.LossglassError, match="unknown parameter 'c'; parameters: w, b"):
        layout["c"]
    with pytest.raises(lg.LossglassError, match="missing"):
        layout.flatten({"w": torch.zeros(2, 3)})
    with pytest.raises(lg.LossglassError, match="has shape"):
        layout.flatten({"w": torch.zeros(3, 2), "b": torch.zeros(2)})
    assert layout == ParamLayout.from_shapes({"w": [2, 3], "b": [2]}) and layout != ParamLayout.from_shapes({"w": (6,)})
    assert layout.get("c") is None and "b" in layout and "c" not in layout and layout.index("b") == 1


def test_a_problem_exposes_its_layout(tiny):
    assert tiny.layout.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    theta = tiny.init(2, 0)
    assert torch.equal(tiny.layout.join(tiny.split(theta), 2), theta)
    assert tiny.unflatten(theta)["2.weight"].shape == (2, 3, 5)

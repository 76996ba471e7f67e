"""The fused CPU kernel (lossglass._native) against the torch path it replaces: equal to float32 roundoff, the same
bits whatever the thread count, NaN/inf handled as torch does, and a clean fallback when no compiler works."""

import os
import subprocess
import sys

import pytest
import torch

import lossglass as lg
from lossglass import _native


@pytest.fixture(scope="module")
def ds():
    return lg.datasets.load("teacher", n_train=3000, n_test=500, in_dim=40, width=8, n_classes=7, seed=0)


@pytest.fixture
def torch_path(monkeypatch):
    def run(fn):
        monkeypatch.setenv("LOSSGLASS_NATIVE", "0")
        try:
            return fn()
        finally:
            monkeypatch.setenv("LOSSGLASS_NATIVE", "1")
    return run


def _rel(a, b):
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-30)).max())


needs_kernel = pytest.mark.skipif(_native.kernel(7) is None, reason=f"no fused kernel here: {_native.status()}")


@needs_kernel
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_evaluate_and_affine_equal_the_torch_path(ds, torch_path, loss):
    prob = lg.Problem(lg.models.mlp(40, 37, 7), ds, device="cpu", loss=loss)  # 37: no multiple of anything
    assert prob._fused_mlp1() is not None
    theta = prob.init(5, 0)
    for split in ("train", "test"):
        a = prob.evaluate(theta, split)
        b = torch_path(lambda split=split: prob.evaluate(theta, split))
        assert _rel(a["loss"], b["loss"]) < 1e-6
        assert torch.equal(a["accuracy"], b["accuracy"])
    d = torch.randn(2, prob.n_params, generator=torch.Generator().manual_seed(0))
    c = torch.randn(2, 13, 2, generator=torch.Generator().manual_seed(1))
    centres = theta[:2]
    a = prob.evaluate_affine(centres, d.expand(2, -1, -1), c)
    b = torch_path(lambda: prob.evaluate_affine(centres, d.expand(2, -1, -1), c))
    assert _rel(a["loss"], b["loss"]) < 1e-6
    assert torch.equal(a["accuracy"], b["accuracy"])


@needs_kernel
def test_same_bits_for_any_thread_count_and_nan_inf_as_torch(ds, torch_path):
    prob = lg.Problem(lg.models.mlp(40, 20, 7), ds, device="cpu")
    theta = prob.init(6, 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prob.evaluate(theta)
        torch.set_num_threads(2)
        two = prob.evaluate(theta)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one["loss"], two["loss"]) and torch.equal(one["accuracy"], two["accuracy"])
    bad = theta.clone()
    bad[1, 5] = float("nan")  # a first-layer weight: NaN reaches every logit through the ReLU
    w2 = prob._info["2.bias"].slice
    bad[2, w2.start] = float("inf")  # a logit +inf: loss +inf or NaN as torch has it
    bad[3, w2.start:w2.stop] = -float("inf")  # every logit -inf: NaN
    a = prob.evaluate(bad)["loss"]
    b = torch_path(lambda: prob.evaluate(bad)["loss"])
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
    ok = torch.isfinite(b)
    assert _rel(a[ok], b[ok]) < 1e-6


def test_no_compiler_falls_back_to_torch(tmp_path, ds):
    code = ("import lossglass as lg, torch\n"
            "from lossglass import _native\n"
            "ds = lg.datasets.load('teacher', n_train=300, n_test=50, in_dim=8, width=4, n_classes=3, seed=0)\n"
            "p = lg.Problem(lg.models.mlp(8, 5, 3), ds, device='cpu')\n"
            "assert p._fused_mlp1() is None and _native.kernel(3) is None, _native.status()\n"
            "e = p.evaluate(p.init(2, 0))['loss']\n"
            "assert torch.isfinite(e).all()\n"
            "print('failed' in str(_native.status()['failed']) or _native.status()['failed'])\n")
    env = {**os.environ, "CXX": "/bin/false", "PATH": str(tmp_path), "LOSSGLASS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]

"""Device-sensitive paths, run on the device named by ``LOSSGLASS_TEST_DEVICE`` (default ``cpu``; the GPU check,
``benchmarks/gpu_check.sh``, sets ``cuda``). On a device other than the CPU each result is compared with the same
computation on the CPU: float32 on both, so agreement is to float32 roundoff (GEMM summation orders differ), and
training, which amplifies roundoff, is compared over a few steps. Nothing here needs a GPU when the variable is unset.
"""

import os

import pytest
import torch

import lossglass as lg
from lossglass.protocols import curvature as K

DEVICE = os.environ.get("LOSSGLASS_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module", autouse=True)
def _device_available():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"LOSSGLASS_TEST_DEVICE={DEVICE} but torch {torch.__version__} sees no CUDA device")


@pytest.fixture(scope="module")
def ds():
    return lg.datasets.load("teacher", n_train=2000, n_test=500, in_dim=32, width=8, n_classes=5, seed=0)


def _pair(ds, hidden=24, **kw):
    model = lg.models.mlp(32, hidden, 5)
    return lg.Problem(model, ds, device="cpu", **kw), lg.Problem(model, ds, device=DEVICE, **kw)


def _rel(a, b) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_evaluate_and_affine_family_agree_with_cpu(ds):
    cpu, dev = _pair(ds)
    theta = cpu.init(6, 0)
    a, b = dev.evaluate(theta.to(dev.device)), cpu.evaluate(theta)
    assert _rel(a["loss"], b["loss"]) < 1e-5
    assert (a["accuracy"].cpu() - b["accuracy"]).abs().max() <= 2 / len(ds.y_train)  # a tie may flip an argmax
    d = torch.randn(2, cpu.n_params, generator=torch.Generator().manual_seed(0))
    coeffs = torch.rand(9, 2, generator=torch.Generator().manual_seed(1))
    fa = dev.evaluate_affine(theta[0].to(dev.device), d.to(dev.device), coeffs.to(dev.device))
    fb = cpu.evaluate_affine(theta[0], d, coeffs)
    assert _rel(fa["loss"], fb["loss"]) < 1e-5
    direct = dev.evaluate(theta[0].to(dev.device) + coeffs.to(dev.device) @ d.to(dev.device))
    assert _rel(fa["loss"], direct["loss"]) < 1e-5


def test_batch_gradient_and_hvp_agree_with_cpu(ds):
    cpu, dev = _pair(ds)
    theta = cpu.init(4, 1)
    idx = torch.randint(0, 2000, (4, 64), generator=torch.Generator().manual_seed(2))
    x, y = cpu.data["train"][0][idx], cpu.data["train"][1][idx]
    la, ga = dev.batch_loss_and_grad(theta.to(dev.device), x.to(dev.device), y.to(dev.device))
    lb, gb = cpu.batch_loss_and_grad(theta, x, y)
    assert _rel(la, lb) < 1e-5 and _rel(ga, gb) < 1e-4
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(3))
    assert _rel(dev.hvp_operator(theta.to(dev.device))(v.to(dev.device)), cpu.hvp_operator(theta)(v)) < 1e-4
    assert _rel(dev.hvp(theta.to(dev.device), v.to(dev.device)), cpu.hvp(theta, v)) < 1e-4


def test_training_agrees_with_cpu(ds):
    cpu, dev = _pair(ds)
    kw = dict(epochs=1, batch_size=100, lr=0.05, seed=0, progress=False)
    a, b = lg.train(dev, 4, **kw), lg.train(cpu, 4, **kw)  # 20 steps of SGD with momentum
    assert _rel(torch.tensor(a.table["train_loss"].tolist()), torch.tensor(b.table["train_loss"].tolist())) < 1e-4
    assert _rel(a.theta, b.theta) < 1e-3


def test_top_eigenvalue_agrees_with_cpu(ds):
    cpu, dev = _pair(ds)
    theta = lg.train(cpu, 1, epochs=1, batch_size=100, lr=0.05, progress=False).theta[0]
    a = K.top_eigenvalues(dev, theta.to(dev.device), k=1, tol=1e-6).values
    b = K.top_eigenvalues(cpu, theta, k=1, tol=1e-6).values
    assert _rel(a, b) < 1e-4


def test_walks_run_and_resume_on_device(ds, tmp_path):
    _, dev = _pair(ds)
    start = dev.init(2, 0)
    ck = tmp_path / "walk.safetensors"
    ref = lg.random_walk(dev, start, n_walkers=2, steps=12, step_size=0.01, temperature=1e-3, seed=0, progress=False)
    lg.random_walk(dev, start, n_walkers=2, steps=12, step_size=0.01, temperature=1e-3, seed=0, progress=False,
                   checkpoint=ck, checkpoint_every=5)
    res = lg.random_walk(dev, start, n_walkers=2, steps=12, step_size=0.01, temperature=1e-3, seed=0, progress=False,
                         checkpoint=ck)
    assert torch.equal(res.theta, ref.theta)
    lv = lg.langevin(dev, start, temperature=1e-3, lr=0.01, steps=5, n_walkers=2, progress=False)
    assert bool(torch.isfinite(lv.energy).all())


def test_plane_agrees_with_cpu(ds):
    cpu, dev = _pair(ds)
    theta = cpu.init(1, 0)[0]
    a = lg.plane(dev, theta.to(dev.device), steps=7)
    b = lg.plane(cpu, theta, steps=7)
    assert float(abs(a.train_loss - b.train_loss).max() / abs(b.train_loss).max()) < 1e-5

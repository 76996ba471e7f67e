import math

import numpy as np
import pytest
import torch

import lossglass as lg

from .conftest import needs_fmnist


def test_same_seed_same_replicas_and_independent_of_k(tiny):
    a = lg.train(tiny, 4, epochs=2, batch_size=32, lr=0.1, seed=5, progress=False)
    b = lg.train(tiny, 4, epochs=2, batch_size=32, lr=0.1, seed=5, progress=False)
    assert torch.equal(a.theta, b.theta)
    assert a.table.equals(b.table)
    c = lg.train(tiny, 2, epochs=2, batch_size=32, lr=0.1, seed=5, replica_ids=[2, 3], progress=False)
    assert torch.allclose(c.theta, a.theta[2:], atol=1e-12)
    assert a.table["train_loss"].lt(1.1).all()  # below chance (ln 3)


@pytest.mark.parametrize("opt,method", [("adam", "sgd"), ("sgd", "sam"), ("sgd", "langevin"), ("sgd", "replicated")])
def test_optimizers_and_methods_learn(tiny, opt, method):
    lr = 0.01 if opt == "adam" else 0.1
    init = tiny.energy(tiny.init(3, 0)).mean()
    r = lg.train(tiny, 3, epochs=5, batch_size=32, lr=lr, optimizer=opt, method=method, seed=0, progress=False)
    assert float(r.table["train_loss"].mean()) < float(init) - 0.1
    assert not r.table["diverged"].any()


def test_replicated_sgd_pulls_replicas_together(tiny):
    free = lg.train(tiny, 4, epochs=6, batch_size=32, lr=0.1, seed=0, progress=False)
    coupled = lg.train(tiny, 4, epochs=6, batch_size=32, lr=0.1, method="replicated", gamma=(0.1, 5.0), seed=0,
                       progress=False)
    spread = lambda t: (t - t.mean(0)).norm(dim=1).mean()  # noqa: E731
    assert spread(coupled.theta) < 0.5 * spread(free.theta)


def test_diverging_replica_is_flagged_and_frozen(tiny):
    r = lg.train(tiny, 3, epochs=3, batch_size=32, lr=[0.1, 1e200, 0.1], momentum=0.0, seed=0, progress=False)
    assert r.table["diverged"].tolist() == [False, True, False]
    assert torch.isfinite(r.theta).all()
    assert r.table.loc[1, "diverged_at_step"] >= 0
    assert r.alive.tolist() == [True, False, True]
    ok = lg.train(tiny, 3, epochs=3, batch_size=32, lr=0.1, momentum=0.0, seed=0, progress=False)
    assert torch.allclose(ok.theta[[0, 2]], r.theta[[0, 2]])  # the others went on unchanged


def test_checkpoint_resume_equals_uninterrupted(tiny, tmp_path):
    full = lg.train(tiny, 3, epochs=4, batch_size=32, lr=0.1, seed=1, progress=False)
    ck = tmp_path / "ck.safetensors"
    lg.train(tiny, 3, epochs=2, batch_size=32, lr=0.1, seed=1, checkpoint=ck, progress=False)
    resumed = lg.train(tiny, 3, epochs=4, batch_size=32, lr=0.1, seed=1, checkpoint=ck, progress=False)
    assert torch.equal(full.theta, resumed.theta)


def test_bad_training_inputs(tiny):
    for kw, msg in ((dict(epochs=0), "epochs must be a positive int"), (dict(lr=-1.0), "lr must be finite and >= 0"),
                    (dict(optimizer="lbfgs"), "unknown optimizer 'lbfgs'"), (dict(method="magic"), "unknown method"),
                    (dict(lr=[0.1, 0.2]), "list of 3 values"), (dict(batch_size=0), "batch_size must be")):
        args = dict(epochs=1, batch_size=16, lr=0.1) | kw
        with pytest.raises(lg.LossglassError, match=msg):
            lg.train(tiny, 3, progress=False, **args)
    with pytest.raises(lg.LossglassError, match="NaN"):
        lg.train(tiny, 1, theta0=torch.full((1, tiny.n_params), float("nan"), dtype=torch.float64), progress=False)


@pytest.mark.slow
@needs_fmnist
def test_fashion_mnist_ensemble_over_80_percent(fmnist):
    prob = lg.Problem(lg.models.mlp(784, 64, 10), fmnist, device="cpu")
    r = lg.train(prob, 8, epochs=4, batch_size=128, lr=0.05, seed=0, progress=False)
    assert r.table["test_accuracy"].min() > 0.80, r.table["test_accuracy"].tolist()


def _quadratic(p=10):
    evals = torch.linspace(0.5, 2.0, p, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    return lg.models.quadratic(q @ torch.diag(evals) @ q.T), evals, q


def _exact_langevin_energy(evals, temp, lr, momentum):
    """Stationary <E> of the trainer's discrete SGHMC on 1/2 theta^T H theta, mode by mode: with p = -lr v,
    p' = beta p - lr lambda theta + sqrt(2 (1 - beta) lr T) xi, theta' = theta + p'; Sigma = A Sigma A^T + Q."""
    from scipy.linalg import solve_discrete_lyapunov

    tot = 0.0
    for lam in evals.tolist():
        a = np.array([[1 - lr * lam, momentum], [-lr * lam, momentum]])
        sig = solve_discrete_lyapunov(a, 2 * (1 - momentum) * lr * temp * np.ones((2, 2)))
        tot += lam * sig[0, 0] / 2
    return tot


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_langevin_equipartition_with_and_without_momentum(momentum):
    # Before the SGHMC fix (noise added to theta, drift through the momentum buffer) momentum 0.9 gave
    # <E> = 0.22 instead of P T / 2 = 1.0 here.
    p, temp, lr, k = 10, 0.2, 0.01, 1000
    quad, evals, q = _quadratic(p)
    z = torch.randn(k, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta0 = (z * (temp / evals).sqrt()) @ q.T  # start in the Boltzmann law: no burn-in for theta
    r = lg.train(quad, k, epochs=150, lr=lr, momentum=momentum, method="langevin", temperature=temp, theta0=theta0,
                 seed=2, progress=False)
    e = r.table["train_loss"].to_numpy()  # k independent replicas at the end
    mean, se = e.mean(), e.std() / math.sqrt(k)
    exact = _exact_langevin_energy(evals, temp, lr, momentum)  # 1.0063 (beta 0), 1.0033 (beta 0.9)
    assert abs(exact - p * temp / 2) < 0.01
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert abs(mean - p * temp / 2) < 0.05 * p * temp / 2, mean


def test_langevin_refuses_adam_and_bad_stop_criteria(tiny):
    quad, _, _ = _quadratic(4)
    with pytest.raises(lg.LossglassError, match="langevin' needs optimizer='sgd'"):
        lg.train(quad, 2, epochs=1, optimizer="adam", method="langevin", temperature=0.1, progress=False)
    with pytest.raises(lg.LossglassError, match="stop_at_accuracy needs labelled data"):
        lg.train(quad, 2, epochs=1, stop_at_accuracy=0.9, progress=False)
    with pytest.raises(lg.LossglassError, match="stop_at_accuracy must be None or a number in"):
        lg.train(tiny, 2, epochs=1, stop_at_accuracy=1.5, progress=False)
    with pytest.raises(lg.LossglassError, match="stop_at_loss must be None or a finite number"):
        lg.train(tiny, 2, epochs=1, stop_at_loss=float("nan"), progress=False)


def test_stop_criterion_freezes_each_replica_when_it_reaches_the_target(tiny, tmp_path):
    kw = dict(batch_size=32, seed=0, stop_at_loss=0.35, progress=False)
    lrs = [0.08, 0.1, 0.2]
    a = lg.train(tiny, 3, epochs=20, lr=lrs, **kw)
    tab = a.table
    assert tab["reached_stop"].all() and not tab["diverged"].any()
    assert (tab["train_loss"] <= 0.35).all()
    eps = tab["epochs_trained"].tolist()
    assert eps == [18, 10, 11], eps  # each stopped at its own epoch (fixed by the seed)
    # replica independence: replica 1 trained alone is the same network, stopped at the same epoch
    alone = lg.train(tiny, 1, epochs=20, lr=0.1, replica_ids=[1], **kw)
    assert torch.allclose(alone.theta[0], a.theta[1], atol=1e-12)
    assert alone.table["epochs_trained"].item() == eps[1]
    # a stopped replica is frozen: it equals a run of exactly epochs_trained epochs without a criterion
    plain = lg.train(tiny, 1, epochs=eps[2], lr=0.2, replica_ids=[2], batch_size=32, seed=0, progress=False)
    assert torch.allclose(plain.theta[0], a.theta[2], atol=1e-12)
    assert plain.table["epochs_trained"].item() == eps[2] and not plain.table["reached_stop"].any()
    assert not torch.allclose(plain.theta[0], lg.train(tiny, 1, epochs=eps[2] + 1, lr=0.2, replica_ids=[2], batch_size=32,
                                                      seed=0, progress=False).theta[0])  # one more epoch does move it
    # checkpoint/resume across the stops is bit-identical
    ck = tmp_path / "stop.safetensors"
    lg.train(tiny, 3, epochs=11, lr=lrs, checkpoint=ck, evaluate=False, **kw)  # 1 and 2 stopped (2 at 11), 0 not
    resumed = lg.train(tiny, 3, epochs=20, lr=lrs, checkpoint=ck, **kw)
    assert torch.equal(resumed.theta, a.theta)
    assert resumed.table["epochs_trained"].tolist() == eps and resumed.table["reached_stop"].all()


def test_stopped_replicas_do_not_move_under_weight_decay_or_coupling(tiny, tmp_path):
    # replica 0 (lr 0.1) reaches the target after one epoch, replica 1 (lr 1e-4) never does and keeps training;
    # weight decay and the replicated coupling act on theta, not on the data gradient, and must not move replica 0
    for method in ("sgd", "replicated"):
        kw = dict(batch_size=32, lr=[0.1, 1e-4], weight_decay=0.1, method=method, seed=3, stop_at_loss=1.0,
                  checkpoint=tmp_path / f"{method}.safetensors", progress=False)
        first = lg.train(tiny, 2, epochs=1, **kw)
        assert first.table["reached_stop"].tolist() == [True, False], first.table["train_loss"].tolist()
        later = lg.train(tiny, 2, epochs=4, **kw)  # resumes from epoch 1
        assert torch.equal(later.theta[0], first.theta[0])
        assert not torch.equal(later.theta[1], first.theta[1])
        assert later.table["epochs_trained"].tolist() == [1, 4]


def test_damaged_checkpoint_is_discarded_and_training_resumes(tiny, tmp_path):
    ck = tmp_path / "ck.safetensors"
    ref = lg.train(tiny, 3, epochs=3, batch_size=32, lr=0.1, seed=4, progress=False)
    lg.train(tiny, 3, epochs=2, batch_size=32, lr=0.1, seed=4, checkpoint=ck, progress=False)
    assert ck.exists() and (tmp_path / "ck.safetensors.prev").exists()
    ck.write_bytes(b"")  # what a power cut can leave behind
    with pytest.warns(RuntimeWarning, match="discarding checkpoint"):
        resumed = lg.train(tiny, 3, epochs=3, batch_size=32, lr=0.1, seed=4, checkpoint=ck, progress=False)
    assert torch.equal(resumed.theta, ref.theta)  # resumed from the epoch-1 checkpoint, bit-identical
    for p in tmp_path.iterdir():
        p.write_bytes(b"\x00garbage")
    with pytest.warns(RuntimeWarning, match="discarding checkpoint"):
        fresh = lg.train(tiny, 3, epochs=3, batch_size=32, lr=0.1, seed=4, checkpoint=ck, progress=False)
    assert torch.equal(fresh.theta, ref.theta)  # nothing readable: started over, same result

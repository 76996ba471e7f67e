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

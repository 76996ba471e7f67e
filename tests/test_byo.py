import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lossglass as lg
from lossglass.byo import dataset_from_factory, import_checkpoints, model_from_factory
from lossglass.cli import main
from lossglass.proxies import FlatnessProbe, batch_proxies

from .byo_factories import Net


def test_factories_resolve_and_fail_clearly():
    assert isinstance(model_from_factory("tests.byo_factories:model"), Net)
    ds = dataset_from_factory("tests.byo_factories:data")
    assert ds.x_train.shape == (180, 8) and ds.n_classes == 3
    ds2 = dataset_from_factory("tests.byo_factories:loaders")
    assert torch.equal(ds.x_train, ds2.x_train)
    with pytest.raises(lg.LossglassError, match="cannot import module"):
        model_from_factory("no_such_pkg.mod:f")
    with pytest.raises(lg.LossglassError, match="has no attribute 'nope'"):
        model_from_factory("tests.byo_factories:nope")
    with pytest.raises(lg.LossglassError, match="must look like"):
        model_from_factory("tests.byo_factories")


def test_user_model_and_data_run_through_every_protocol(tmp_path, capsys):
    cfg = tmp_path / "byo.toml"
    cfg.write_text("""
name = "byo"
[data]
factory = "tests.byo_factories:data"
[model]
factory = "tests.byo_factories:opaque_model"
[train]
replicas = 4
epochs = 3
batch_size = 30
lr = 0.1
[walk]
n_walkers = 2
steps = 5
[connect]
swaps = [0, 2]
pairs = 1
bezier_steps = 5
plane_steps = 3
[curvature]
trace_probes = 6
n_samples = 4
slq_steps = 6
""")
    out = tmp_path / "run"
    # a model whose permutation spec cannot be derived (an op of unknown symmetry on its hidden units): the connect
    # stage is skipped naming the op and the config key to set, and every stage that needs no spec runs
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    store = lg.RunStore(out, create=False)
    assert "model.spec" in store.stages()["connect"]["skipped"]
    assert "torch.cumsum" in store.stages()["connect"]["skipped"]
    assert store.has_table("walk") and store.has_table("flatness") and not store.has_table("perm_barriers")
    assert set(store.read_table("replica_summary")["system"]) == {"network-raw", "network-functions"}
    assert "data.n_val" in store.stages()["select"]["skipped"]  # no validation split: nothing may choose
    # the per-protocol command that needed the symmetry exits non-zero with the reason, and says no 'results in'
    capsys.readouterr()
    assert main(["connect", str(out), "--quiet", "--redo", "--no-report"]) == 1
    said = capsys.readouterr()
    assert "connect: skipped, no results" in said.err and "model.spec" in said.err and "results in" not in said.out
    assert main(["connect", str(out), "--quiet"]) == 1  # asked again: still no results, still non-zero
    # with the spec declared, the permutation protocols run too
    cfg.write_text(cfg.read_text().replace('factory = "tests.byo_factories:opaque_model"',
                                           'factory = "tests.byo_factories:model"\nspec = "tests.byo_factories:spec"'))
    out2 = tmp_path / "run2"
    assert main(["run", str(cfg), "--out", str(out2), "--quiet", "--stages", "train,connect,replicas"]) == 0
    store = lg.RunStore(out2, create=False)
    assert store.has_table("perm_barriers") and store.has_table("replica_summary")
    assert store.read_table("perm_barriers")["barrier"].iloc[0] == 0.0


def test_checkpoint_folder_import_and_refusals(tmp_path):
    ds = dataset_from_factory("tests.byo_factories:data")
    prob = lg.Problem(Net(), ds)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    nets = []
    for i in range(3):
        torch.manual_seed(i)
        n = Net()
        nets.append(n)
        if i == 2:
            save_file({k: v.detach().contiguous() for k, v in n.state_dict().items()}, str(folder / f"m{i}.safetensors"))
        else:
            torch.save(n.state_dict(), folder / f"m{i}.pt")
    theta, files = import_checkpoints(prob, folder)
    assert files == ["m0.pt", "m1.pt", "m2.safetensors"]
    x = ds.x_test
    for i, n in enumerate(nets):
        assert torch.allclose(prob.forward(theta[i:i + 1], x)[0], n(x), atol=1e-6)
    bad = Net().state_dict()
    bad["inp.weight"] = torch.zeros(5, 8)
    torch.save(bad, folder / "m3.pt")
    with pytest.raises(lg.LossglassError, match=r"m3.pt: tensor 'inp.weight' has shape \(5, 8\), the model expects \(6, 8\)"):
        import_checkpoints(prob, folder)
    bad = Net().state_dict()
    del bad["out.bias"]
    torch.save(bad, folder / "m3.pt")
    with pytest.raises(lg.LossglassError, match=r"m3.pt: missing tensor\(s\) \['out.bias'\]"):
        import_checkpoints(prob, folder)
    bad = {k: v.long() for k, v in Net().state_dict().items()}
    torch.save(bad, folder / "m3.pt")
    with pytest.raises(lg.LossglassError, match="dtype torch.int64"):
        import_checkpoints(prob, folder)
    (folder / "m3.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(lg.LossglassError, match="weights-only state_dict"):
        import_checkpoints(prob, folder)


def test_import_cli_then_select_exports_a_loadable_state_dict(tmp_path, capsys):
    from tests.test_study_cli import _cfg

    cfg_path = _cfg(tmp_path)
    cfg_path.write_text(cfg_path.read_text().replace("n_test = 200", "n_test = 200\nn_val = 100"))  # select needs it
    src = tmp_path / "src"
    assert main(["run", str(cfg_path), "--out", str(src), "--quiet", "--stages", "train"]) == 0
    theta = lg.RunStore(src).read_tensors("replicas")["theta"]
    cfg = lg.study.load_config(cfg_path)
    prob = lg.study.build_problem(cfg)
    folder = tmp_path / "ck"
    folder.mkdir()
    for i in range(theta.shape[0]):
        torch.save(prob.to_module(theta[i]).state_dict(), folder / f"r{i:02d}.pt")
    out = tmp_path / "imported"
    assert main(["import", str(folder), "--config", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    assert torch.equal(lg.RunStore(out).read_tensors("replicas")["theta"], theta)
    assert main(["curvature", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["select", str(out)]) == 0
    said = capsys.readouterr().out
    assert "Ship replica" in said and "(from r0" in said  # the checkpoint file is named
    d = lg.RunStore(out).read_json("selection.json")
    from safetensors.torch import load_file

    m = prob.to_module(theta[0])
    m.load_state_dict(load_file(str(out / d["exported"])))
    assert torch.allclose(torch.cat([p.flatten() for p in m.parameters()]), theta[d["replica"]])
    assert "Which model to ship" in (out / "report.html").read_text()


def test_cheap_proxies_agree_with_full_measures(teacher_ds):
    prob = lg.Problem(lg.models.mlp(8, 16, 3), teacher_ds, dtype=torch.float64)
    reps = lg.train(prob, 6, epochs=6, batch_size=32, lr=[0.02, 0.05, 0.1, 0.2, 0.4, 0.8], seed=0, progress=False)
    full = lg.curvature.top_eigenvalues(prob, reps.theta, tol=1e-6).values[:, 0]
    prox = batch_proxies(prob, reps.theta, batch_size=300, n_iter=30)
    # on the whole training set as the "batch", power iteration converges to the same top eigenvalue
    assert torch.allclose(prox["lambda_batch"], full, rtol=1e-2)
    probe = FlatnessProbe(n_iter=30)
    x, y = prob.data["train"]
    stats = probe(prob.to_module(reps.theta[2]), x, y)
    assert stats["lambda_batch"] == pytest.approx(float(full[2]), rel=1e-2)
    assert np.isfinite(stats["perturbation_rise"]) and stats["loss"] > 0

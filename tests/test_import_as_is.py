"""Issue 28, item 1: imported checkpoints are analysed as they are (the user's preprocessing, their own BatchNorm
statistics), a preprocessing mismatch is refused with a message naming it, and the exported model scores in the
user's class what lossglass measured."""

import pytest
import torch
from safetensors.torch import load_file

import lossglass as lg
from lossglass.byo import export_state, module_accuracy
from lossglass.cli import main

from .byo_factories import BNNet, pixels_over_255

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three checkpoints of BNNet trained by 'the user' on x/255 (train mode, SGD), as state_dict files."""
    folder = tmp_path_factory.mktemp("ck")
    x, y, _, _ = pixels_over_255()
    for k in range(3):
        torch.manual_seed(k)
        m = BNNet()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(k)
        for _ in range(120):
            i = torch.randint(0, len(x), (32,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[i]), y[i]).backward()
            opt.step()
        torch.save(m.state_dict(), folder / f"ck{k}.pt")
    return folder


def _own(folder, name, x, y):
    m = BNNet()
    m.load_state_dict(torch.load(folder / name, weights_only=True))
    return module_accuracy(m, x, y)


def test_imported_bn_checkpoints_are_analysed_as_they_are_and_export_checks(checkpoints, tmp_path, capsys):
    x, y, xt, yt = pixels_over_255()
    out = tmp_path / "byo"
    assert main(["import", str(checkpoints), "--model", "tests.byo_factories:bn_model",
                 "--data", "tests.byo_factories:pixels_over_255", "--out", str(out), "--set", "data.n_val=0"]) == 0
    err = capsys.readouterr().err
    assert "checked 3 checkpoints as they are (batchnorm='module')" in err
    store = lg.RunStore(out)
    assert "bn_stats = \"module\"" in (out / "config.toml").read_text()  # the default for imported BatchNorm models
    table = store.read_table("replicas")
    for _, row in table.iterrows():  # lossglass's accuracies are the checkpoints' own eval-mode accuracies
        assert row["train_accuracy"] == pytest.approx(_own(checkpoints, row["source"], x, y), abs=1e-6)
        assert row["test_accuracy"] == pytest.approx(_own(checkpoints, row["source"], xt, yt), abs=1e-6)
    assert table["test_accuracy"].min() > 0.6  # trained: the check is not one of chance levels
    # the exported model, loaded into the user's class, scores what lossglass measured
    cfg = lg.study.load_config(out / "config.toml")
    prob = lg.study.build_problem(cfg)
    theta = store.read_tensors("replicas")["theta"]
    path = export_state(prob, theta[1], tmp_path / "ship.safetensors")
    m = BNNet()
    m.load_state_dict(load_file(str(path)), strict=True)
    assert module_accuracy(m, xt, yt) == pytest.approx(table["test_accuracy"][1], abs=1e-6)
    assert module_accuracy(m, xt, yt) == pytest.approx(_own(checkpoints, "ck1.pt", xt, yt), abs=1e-6)


def test_preprocessing_mismatch_is_refused_with_a_message_naming_it(checkpoints, tmp_path, capsys):
    out = tmp_path / "std"
    rc = main(["import", str(checkpoints), "--model", "tests.byo_factories:bn_model",
               "--data", "tests.byo_factories:pixels_standardised", "--out", str(out), "--set", "data.n_val=0"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "BatchNorm layer 'bn'" in err and "not preprocessed as the data the checkpoint was trained on" in err
    assert not (out / "tables").exists()  # refused before anything was analysed or written
    # asked to go on anyway, it warns and imports
    assert main(["import", str(checkpoints), "--model", "tests.byo_factories:bn_model", "--data",
                 "tests.byo_factories:pixels_standardised", "--out", str(out), "--accept-mismatch", "--set", "data.n_val=0"]) == 0
    assert "warning: ck0.pt: BatchNorm layer 'bn'" in capsys.readouterr().err


def test_recomputed_statistics_differ_from_the_checkpoints_and_are_named(checkpoints, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["import", str(checkpoints), "--model", "tests.byo_factories:bn_model", "--data",
                 "tests.byo_factories:pixels_over_255", "--out", str(out), "--set", "model.bn_stats=recompute",
                 "--set", "data.n_val=0"]) == 0
    err = capsys.readouterr().err
    # the user's explicit choice is kept, and its effect is named: recomputed statistics change the accuracies
    assert "(batchnorm='recompute')" in err
    assert "its own eval-mode training accuracy is" in err and "with batchnorm='recompute'" in err


def test_statistics_check_allows_an_early_checkpoint_and_catches_each_rescaling():
    """A checkpoint after 30 steps still carries much of BatchNorm's initial (0, 1) in its running averages: judged
    against what its num_batches_tracked updates would hold, its own preprocessing passes (the check without that
    correction refused it), and every other preprocessing is named."""
    from lossglass.byo import statistics_mismatch

    x, y, _, _ = pixels_over_255()
    torch.manual_seed(8)
    m = BNNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(8)
    for _ in range(30):
        i = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[i]), y[i]).backward()
        opt.step()
    assert int(m.bn.num_batches_tracked) == 30
    assert statistics_mismatch(m, x) is None
    mu, sd = x.mean(), x.std()
    for other in ((x - mu) / sd, 2 * x - 1, x * 255):
        assert "BatchNorm layer 'bn'" in statistics_mismatch(m, other)

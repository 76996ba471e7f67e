"""Flatness probes where people train (issue 14, item 4): the Lightning and Hugging Face callbacks, with the real
packages on tiny models and random data, offline. Each callback must log the proxies through the trainer's own
logging and leave the training run bit-identical."""

import doctest
import math
import subprocess
import sys

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import lossglass.proxies
from lossglass.errors import LossglassError
from lossglass.integrations import MissingExtraError
from lossglass.integrations.hf import FlatnessCallback as HFFlatness
from lossglass.integrations.lightning import FlatnessCallback as PLFlatness
from lossglass.proxies import FlatnessProbe

KEYS = ("flatness/loss", "flatness/lambda_batch", "flatness/perturbation_rise")


def snapshot(model: nn.Module) -> dict:
    """Everything a probe could disturb: parameters and buffers, .grad, every training flag, the global RNG."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grad": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
            "training": [m.training for m in model.modules()], "rng": torch.get_rng_state()}


def assert_same(a: dict, b: dict) -> None:
    assert a["training"] == b["training"] and torch.equal(a["rng"], b["rng"])
    assert a["state"].keys() == b["state"].keys() and a["grad"].keys() == b["grad"].keys()
    for k in a["state"]:
        assert a["state"][k].dtype == b["state"][k].dtype and torch.equal(a["state"][k], b["state"][k]), k
    for k in a["grad"]:
        assert (a["grad"][k] is None) == (b["grad"][k] is None), k
        assert a["grad"][k] is None or torch.equal(a["grad"][k], b["grad"][k]), k


# ---- Lightning -----------------------------------------------------------------------------------------------

class LitMLP(pl.LightningModule):
    """forward returns logits; batch-norm and dropout, so a probe that left train mode or drew from the global
    generator would change the run."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def lit_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)


def fit_lightning(root, callbacks=(), logger=False):
    """3 epochs of 4 shuffled batches (the shuffle draws from the global generator every epoch)."""
    pl.seed_everything(0, verbose=False)
    model = LitMLP()
    loader = DataLoader(TensorDataset(*lit_data()), batch_size=16, shuffle=True)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True, default_root_dir=root, log_every_n_steps=4)
    trainer.fit(model, loader)
    return model, trainer


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    cb = PLFlatness(every_n_steps=3, n_iter=4)
    with_cb, trainer = fit_lightning(root, [cb], CSVLogger(root, name="csv"))
    without, _ = fit_lightning(root)
    return {"cb": cb, "trainer": trainer, "with": with_cb, "without": without}


def test_lightning_callback_logs_to_the_trainers_logger(lightning_runs):
    cb, trainer = lightning_runs["cb"], lightning_runs["trainer"]
    assert [h["global_step"] for h in cb.history] == [3, 6, 9, 12]
    # through the configured logger, whatever log_every_n_steps says (4 here): the CSV has all four rows
    df = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")
    for key in KEYS:
        vals = df[key].dropna()
        assert len(vals) == 4 and all(math.isfinite(v) for v in vals), key
    assert sorted(df.loc[df["flatness/loss"].notna(), "step"]) == [2, 5, 8, 11]  # Lightning's step for those batches
    assert df["train_loss"].notna().any()  # the module's own logging is untouched
    assert all(math.isfinite(float(trainer.callback_metrics[k])) for k in KEYS)


def test_lightning_callback_leaves_training_bit_identical(lightning_runs):
    a, b = lightning_runs["with"].state_dict(), lightning_runs["without"].state_dict()
    assert a.keys() == b.keys()
    for k in a:  # weights, batch-norm running statistics and counter
        assert torch.equal(a[k], b[k]), k


def test_lightning_fixed_batch_and_custom_loss(tmp_path):
    x, y = lit_data()
    fixed = (x[:8], y[:8])
    cb = PLFlatness(every_n_steps=4, n_iter=3, batch=fixed, loss_fn=lambda logits, t: F.cross_entropy(logits, t) * 2.0,
                    prefix="probe/")
    model, _ = fit_lightning(tmp_path, [cb])
    assert [h["global_step"] for h in cb.history] == [4, 8, 12]
    with torch.no_grad():  # the last probe saw the final weights, in eval mode, on the fixed batch
        was = model.training
        model.eval()
        want = 2.0 * F.cross_entropy(model(fixed[0]), fixed[1])
        model.train(was)
    assert cb.history[-1]["probe/loss"] == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(LossglassError, match="unpack"):
        PLFlatness(batch=(x, y, y))
    with pytest.raises(LossglassError, match="every_n_steps"):
        PLFlatness(every_n_steps=0)


# ---- Hugging Face ----------------------------------------------------------------------------------------------

class TokenDS(Dataset):
    """Random token sequences; the label is the first token mod 3."""

    def __init__(self, n: int = 24, length: int = 8):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(1, 40, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i, 0] % 3}


def tiny_bert() -> BertForSequenceClassification:
    """A 1-layer BERT classifier built from a config (nothing downloaded); dropout on, SDPA attention."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(cfg)


class Recorder(TrainerCallback):
    """Stands for a reporter (TensorBoard, W&B): sees what on_log sees."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def fit_hf(root, callback=None):
    model = tiny_bert()
    args = TrainingArguments(output_dir=str(root), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=2, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    rec = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=TokenDS(), callbacks=[rec])
    if callback is not None:
        callback.attach(trainer)
    trainer.train()
    return model, trainer, rec


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    cb = HFFlatness(every_n_steps=3, n_iter=3)
    with_cb, trainer, rec = fit_hf(tmp_path_factory.mktemp("hf_with"), cb)
    without, _, _ = fit_hf(tmp_path_factory.mktemp("hf_without"))
    return {"cb": cb, "trainer": trainer, "rec": rec, "with": with_cb, "without": without}


def test_hf_callback_logs_to_log_history_and_reporters(hf_runs):
    cb, hist, rec = hf_runs["cb"], hf_runs["trainer"].state.log_history, hf_runs["rec"]
    assert len(cb.batch["input_ids"]) == 4  # the first per-device batch of the training set
    probed = [h for h in hist if "flatness/lambda_batch" in h]
    assert [h["step"] for h in probed] == [3, 6]
    assert all(math.isfinite(h[k]) for h in probed for k in KEYS)
    # the Trainer's own loss log at steps 2, 4 and 6 is still there (6 coincides with a probe)
    assert [h["step"] for h in hist if "loss" in h and "flatness/loss" not in h] == [2, 4, 6]
    assert sum("flatness/lambda_batch" in logs for logs in rec.logs) == 2  # what reporters receive


def test_hf_callback_leaves_training_bit_identical(hf_runs):
    a, b = hf_runs["with"].state_dict(), hf_runs["without"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hf_callback_needs_the_trainer(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TokenDS(), callbacks=[HFFlatness()])
    with pytest.raises(LossglassError, match="attach"):
        trainer.train()
    with pytest.raises(LossglassError, match="dict of model inputs"):
        HFFlatness(batch=[1, 2])


# ---- the probe itself --------------------------------------------------------------------------------------------

def _with_grads(model: nn.Module, loss: torch.Tensor) -> nn.Module:
    """Leave .grad set on all but the first parameter (which keeps None), as in the middle of a training step."""
    loss.backward()
    next(model.parameters()).grad = None
    return model


def test_probe_leaves_the_module_unchanged():
    x, y = lit_data()
    mlp = LitMLP().train()
    mlp.net[3].eval()  # a mixed-mode module: each flag must come back as it was
    _with_grads(mlp, F.cross_entropy(mlp(x), y))
    bert = tiny_bert().train()
    batch = TokenDS()[0:4]
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    _with_grads(bert, bert(**batch).loss)
    for model, args in ((mlp, (x, y)), (bert, (batch,))):
        before = snapshot(model)
        stats = FlatnessProbe(n_iter=3)(model, *args)
        assert all(math.isfinite(v) for v in stats.values())
        assert_same(before, snapshot(model))


def test_probe_docstring_example_runs():
    result = doctest.testmod(lossglass.proxies, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


def test_probe_needs_a_loss():
    with pytest.raises(LossglassError, match="no .loss"):
        FlatnessProbe()(nn.Linear(3, 2), torch.randn(4, 3))


def test_importing_lossglass_imports_no_framework():
    code = ("import sys, lossglass, lossglass.proxies, lossglass.integrations; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_framework_names_the_extra(monkeypatch):
    import importlib

    for name in ("lossglass.integrations.lightning", "lossglass.integrations.hf"):
        monkeypatch.delitem(sys.modules, name)  # put back after the test
    for name in ("lightning.pytorch", "pytorch_lightning", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'lossglass\[lightning\]'"):
        importlib.import_module("lossglass.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'lossglass\[hf\]'"):
        importlib.import_module("lossglass.integrations.hf")


class LitNoForward(pl.LightningModule):
    """Only a training_step: no forward() for the probe to evaluate."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(6, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_callback_refuses_a_module_without_forward_in_one_line(tmp_path):
    from lossglass.integrations.lightning import has_forward

    assert has_forward(LitMLP()) and not has_forward(LitNoForward())
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[PLFlatness(every_n_steps=1)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.raises(LossglassError, match=r"LitNoForward defines no forward\(\)"):
        trainer.fit(LitNoForward(), DataLoader(TensorDataset(*lit_data()), batch_size=16))

"""The checkpoint module (atomic write, NAME.prev, damaged files discarded) and the training state it carries: a
TrainState round-trips bit for bit, checkpoints of the inline trainer still resume, and training killed mid-write
resumes to the bytes of an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lossglass as lg
from lossglass import checkpoint
from lossglass.train import TrainState, update_rule

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(batch_size=32, lr=0.1, seed=4, progress=False)


def test_save_keeps_the_previous_file_and_restores_generators(tmp_path):
    path = tmp_path / "c.safetensors"
    g = torch.Generator().manual_seed(7)
    checkpoint.save(path, {"x": torch.arange(3)}, [g])
    torch.randn(5, generator=g)
    checkpoint.save(path, {"x": torch.arange(3) + 10}, [g])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "c.safetensors.prev"]  # no temporary left
    st = checkpoint.load(path, keys=("x",))
    assert st["x"].tolist() == [10, 11, 12]
    fresh = checkpoint.restore_generators(st, [torch.Generator()])[0]
    assert torch.equal(torch.randn(4, generator=fresh), torch.randn(4, generator=g))
    assert checkpoint.load(tmp_path / "none.safetensors") is None


def test_damaged_refused_or_incomplete_files_are_discarded_newest_first(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"x": torch.zeros(2)})
    checkpoint.save(path, {"x": torch.ones(2)})
    path.write_bytes(path.read_bytes()[:20])  # truncated by a power cut
    with pytest.warns(RuntimeWarning, match=r"discarding checkpoint .*c\.safetensors: it is unreadable"):
        st = checkpoint.load(path)
    assert st["x"].tolist() == [0, 0] and not path.exists()  # the one before, and the damaged file is gone
    checkpoint.save(path, {"x": torch.ones(2)})
    with pytest.warns(RuntimeWarning, match="discarding thing .*: it is unreadable \\(KeyError\\)"):
        assert checkpoint.load(path, keys=("y",), what="thing") is None
    assert list(tmp_path.iterdir()) == []
    checkpoint.save(path, {"x": torch.ones(2)})
    with pytest.warns(RuntimeWarning, match="discarding checkpoint .*: it is too small; resuming from an earlier"):
        assert checkpoint.load(path, accept=lambda st, f: "it is too small") is None


def test_a_refusal_that_raises_keeps_the_file(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"x": torch.zeros(2)})

    def accept(st, file):
        raise lg.LossglassError(f"{file.name} belongs to someone else")

    with pytest.raises(lg.LossglassError, match="c.safetensors belongs to someone else"):
        checkpoint.load(path, accept=accept)
    assert path.exists()


def _state_equal(a: TrainState, b: TrainState) -> None:
    assert torch.equal(a.theta, b.theta) and a.theta.dtype == b.theta.dtype
    assert a.rules.keys() == b.rules.keys() and all(torch.equal(a.rules[k], b.rules[k]) for k in a.rules)
    for f in ("alive", "done", "diverged_at", "epochs_trained"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert (a.epoch, a.step) == (b.epoch, b.step)
    assert a.kept.keys() == b.kept.keys() and all(torch.equal(a.kept[s], b.kept[s]) for s in a.kept)
    for ga, gb in zip(a.batch_gens + a.noise_gens, b.batch_gens + b.noise_gens, strict=True):
        assert torch.equal(ga.get_state(), gb.get_state())


@pytest.mark.parametrize("kw", [dict(optimizer="adam", lr=0.01, keep_at=[0, 5]),
                                dict(method="langevin", temperature=1e-3, stop_at_loss=0.7, lr=[0.1, 0.3, 1e200])])
def test_train_state_round_trips_bit_for_bit(tiny, tmp_path, kw):
    ck = tmp_path / "ck.safetensors"
    args = KW | dict(epochs=2, checkpoint=ck) | kw
    lg.train(tiny, 3, **args)
    rule = update_rule(args.get("optimizer", "sgd"), args.get("method", "sgd"), noise_gens=[torch.Generator()])
    blank = lambda: TrainState.start(torch.zeros(3, tiny.n_params, dtype=tiny.dtype), rule,  # noqa: E731
                                     [torch.Generator() for _ in range(3)], [torch.Generator() for _ in range(3)])
    a = blank()
    assert a.load(ck)
    assert a.epoch == 2 and a.step == 2 * (300 // 32) and a.rules
    copy = tmp_path / "copy.safetensors"
    a.save(copy)
    assert copy.read_bytes() == ck.read_bytes()  # save(load(file)) is the file, byte for byte
    b = blank()
    assert b.load(copy)
    _state_equal(a, b)
    if "stop_at_loss" in kw:
        assert not a.alive[2] and a.diverged_at[2] >= 0  # the diverged replica's bookkeeping came back too


def test_a_checkpoint_of_another_shape_or_other_rules_is_discarded(tiny, tmp_path):
    for i, (kw, msg) in enumerate(((dict(n_replicas=2), r"holds replicas of shape \(3, "),
                                   (dict(optimizer="adam"), "written by other update rules"))):
        ck = tmp_path / f"ck{i}.safetensors"
        lg.train(tiny, 3, epochs=1, checkpoint=ck, **KW)
        with pytest.warns(RuntimeWarning, match=msg):
            r = lg.train(tiny, kw.pop("n_replicas", 3), epochs=1, checkpoint=ck, **KW | kw)
        assert torch.equal(r.theta, lg.train(tiny, len(r), epochs=1, **KW | kw).theta)  # started over


def test_a_checkpoint_of_the_inline_trainer_resumes(tiny, tmp_path):
    # the trainer before issue 23 saved its optimiser buffers as buf1 (velocity, or Adam's mu) and buf2 (Adam's nu)
    for kw in (dict(), dict(optimizer="adam", lr=0.01)):
        full = lg.train(tiny, 3, epochs=3, **KW | kw)
        ck = tmp_path / f"old-{len(kw)}.safetensors"
        lg.train(tiny, 3, epochs=1, checkpoint=ck, **KW | kw)
        st = load_file(ck)
        bufs = [st.pop(k) for k in sorted(k for k in st if k.startswith("rules."))]
        st["buf1"], st["buf2"] = bufs[0], bufs[1] if len(bufs) > 1 else torch.zeros_like(bufs[0])
        save_file(st, ck)
        resumed = lg.train(tiny, 3, epochs=3, checkpoint=ck, **KW | kw)
        assert torch.equal(resumed.theta, full.theta), kw


CHILD = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import lossglass as lg
import lossglass.store

args = json.loads(sys.argv[1])
calls = 0
real = lossglass.store.atomic_write_bytes

def write_then_die(path, data):  # the kill lands inside the third save: after NAME -> NAME.prev, before the write
    global calls
    calls += 1
    if calls == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)

lossglass.store.atomic_write_bytes = write_then_die
ds = lg.datasets.load("teacher", n_train=300, n_test=100, in_dim=8, width=6, n_classes=3, seed=0)
prob = lg.Problem(lg.models.mlp(8, 5, 3), ds, device="cpu", dtype=torch.float64)
lg.train(prob, 3, **args)
"""


def test_training_killed_while_writing_a_checkpoint_resumes_to_the_same_bytes(tiny, tmp_path):
    ck = tmp_path / "ck.safetensors"
    args = dict(epochs=5, batch_size=32, lr=0.1, seed=2, method="langevin", temperature=1e-4, keep_at=[0, 20, 40],
                progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(lg.__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args | dict(checkpoint=str(ck)))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == -9, out.stderr[-2000:]
    assert not ck.exists() and (tmp_path / "ck.safetensors.prev").exists()  # killed between the rename and the write
    state = TrainState.start(torch.zeros(3, tiny.n_params, dtype=torch.float64),
                             update_rule("sgd", "langevin", noise_gens=[torch.Generator()]), [], [])
    assert state.load(ck) and state.epoch == 2  # what the resumed run starts from
    resumed = lg.train(tiny, 3, checkpoint=ck, **args)
    full = lg.train(tiny, 3, **args)
    assert torch.equal(resumed.theta, full.theta) and torch.equal(resumed.snapshots, full.snapshots)
    assert resumed.table.equals(full.table)

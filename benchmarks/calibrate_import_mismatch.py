"""Calibration of ``lossglass.byo.statistics_mismatch`` (issue 28): how often ``lossglass import`` refuses checkpoints
given their own preprocessing (false refusals) and given another one (mismatches caught), over independently trained
BatchNorm models (a conv net and a two-BatchNorm MLP; 30-250 SGD steps, batch 8-64, with and without input noise).

    OMP_NUM_THREADS=1 python benchmarks/calibrate_import_mismatch.py --trials 300 --offset 5000

Trial t trains from seed offset + t; intervals are Wilson 95 %. The thresholds were set on seeds 1000-1099 and this
was then run on seeds 5000-5299: 0/300 own-preprocessing checkpoints refused, 290-300/300 of each mismatch caught."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root (tests/byo_factories)

from tests.byo_factories import BNNet, pixels  # noqa: E402

from lossglass.byo import statistics_mismatch  # noqa: E402


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Share k/n and its Wilson score interval."""
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, c - h), min(1.0, c + h)


class MLPBN(nn.Module):
    """A two-BatchNorm MLP on 8x8 images, 3 classes."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Linear(64, 32), nn.BatchNorm1d(32)
        self.b, self.bn2 = nn.Linear(32, 16), nn.BatchNorm1d(16)
        self.c = nn.Linear(16, 3)

    def forward(self, x):
        x = x.reshape(len(x), -1)
        return self.c(torch.relu(self.bn2(self.b(torch.relu(self.bn(self.a(x)))))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--offset", type=int, default=5000, help="first seed")
    ap.add_argument("--out", help="write the counts (JSON) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = pixels()
    xtr, ytr = x[:450] / 255, y[:450]
    mu, sd = xtr.mean(), xtr.std()
    variants = {"own (x/255)": lambda t: t, "standardised (x/255-mu)/sd": lambda t: (t - mu) / sd,
                "[-1, 1] (2x/255 - 1)": lambda t: 2 * t - 1, "raw 0..255": lambda t: t * 255,
                "per-pixel mean removed": lambda t: t - xtr.mean(0, keepdim=True)}
    counts = {name: [0, 0] for name in variants}
    t0 = time.time()
    for trial in range(args.trials):
        seed = args.offset + trial
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        m = BNNet() if trial % 2 == 0 else MLPBN()
        steps, bs = [30, 60, 120, 250][trial % 4], [8, 16, 32, 64][(trial // 4) % 4]
        noise = [0.0, 0.05][(trial // 16) % 2]  # input noise during training (an augmentation): statistics drift
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for _ in range(steps):
            i = torch.randint(0, 450, (bs,), generator=g)
            xb = xtr[i] + noise * torch.randn(xtr[i].shape, generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(m(xb), ytr[i]).backward()
            opt.step()
        for name, f in variants.items():
            counts[name][0] += statistics_mismatch(m, f(xtr)) is not None
            counts[name][1] += 1
    print(f"{args.trials} trained checkpoints in {time.time() - t0:.0f} s")
    out = {}
    for name, (k, n) in counts.items():
        p, lo, hi = wilson(k, n)
        out[name] = {"refused": k, "n": n, "share": p, "ci95": [lo, hi]}
        print(f"{name:32s} refused {k}/{n} = {100 * p:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

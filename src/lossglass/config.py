"""Study configs: TOML files validated by pydantic. An unknown key, a wrong type or an out-of-range value is
reported as one line naming the key (as the user typed it: ``walk.steps``) and what is expected; every option
is checked when the config is loaded, before anything runs.

The models below are the one source of truth for the config keys: ``lossglass config`` prints the reference
(meaning, unit, default, allowed values) generated from them, and ``docs/config.md`` is that same text.
"""

from __future__ import annotations

import copy
import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from .errors import LossglassError, check


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _f(default, description: str, **kw):
    return Field(default, description=description, **kw)


class DataConfig(_Section):
    """The data set the replicas are trained on."""

    name: Literal["fashion-mnist", "mnist", "digits", "teacher", "cifar10", "modular"] = _f(
        "fashion-mnist", "Data set: IDX files (fashion-mnist, mnist), CIFAR-10 python batches (cifar10), scikit-learn's "
        "digits, a synthetic teacher-student task (teacher), or modular arithmetic token sequences (modular, generated: "
        "the grokking task of Power et al. 2022; see p, op, train_fraction).")
    n_train: PositiveInt | None = _f(10000, "Training samples (a seeded random subset; omit for all). The energy E is "
                                     "the mean loss over these. Not used by modular (its split is train_fraction).")
    n_test: PositiveInt | None = _f(2000, "Test samples (a seeded random subset; omit for all). Used only to grade. Not "
                                    "used by modular.")
    p: int = _f(97, "modular: the modulus p (a prime for op = 'div'); inputs are the tokens (a, b, '='), vocabulary "
                "p + 1, labels (a op b) mod p.", ge=2)
    op: Literal["add", "sub", "mul", "div"] = _f("add", "modular: the operation, (a + b), (a - b), (a b) or (a / b) "
                                                 "mod p.")
    train_fraction: float = _f(0.3, "modular: fraction of all equations (p^2; p (p - 1) for div) in the training set "
                               "(seeded); the rest is the test set.", gt=0, lt=1)
    n_val: int = _f(0, "Validation samples carved out of the training set (seeded, recorded) for model selection; "
                    "0 = none. The test split never chooses anything.", ge=0)
    data_dir: str | None = _f(None, "Folder with the data files (default: $LOSSGLASS_DATA, then the Debian folder).")
    factory: str | None = _f(None, "'package.module:function' returning a Dataset, (x_train, y_train, x_test, y_test) "
                             "or (train_loader, test_loader); replaces name.")


class ModelConfig(_Section):
    """The network (or the user's own module)."""

    arch: Literal["mlp", "cnn", "resnet", "transformer"] = _f(
        "mlp", "Architecture: the paper's MLP, a small CNN (conv, BatchNorm, pool), a CIFAR-style ResNet (BasicBlocks, "
        "BatchNorm, identity and 1x1 shortcuts; depth, width; image data), or a small decoder transformer (d_model, "
        "n_heads, n_layers, d_mlp; token data such as modular).")
    hidden: PositiveInt | list[PositiveInt] = _f(64, "MLP hidden width (one hidden layer, the paper's case) or a list "
                                                 "of widths.")
    channels: list[PositiveInt] = _f([16, 32], "CNN channels per convolution block.")
    batchnorm: bool = _f(True, "CNN: BatchNorm after each convolution.")
    depth: int = _f(20, "ResNet depth 6n + 2 (8, 14, 20, 32, ...): n BasicBlocks per stage (He et al. 2016).", ge=8)
    width: PositiveInt = _f(16, "ResNet channels of the first stage (the three stages have width, 2 width, 4 width).")
    d_model: PositiveInt = _f(128, "Transformer width of the residual stream.")
    n_heads: PositiveInt = _f(4, "Transformer attention heads (d_model must be a multiple).")
    n_layers: PositiveInt = _f(1, "Transformer blocks.")
    d_mlp: PositiveInt | None = _f(None, "Transformer MLP hidden width (default 4 d_model).")
    bn_stats: Literal["recompute", "batch", "fixed", "module"] = _f(
        "recompute", "BatchNorm statistics at every evaluated point: recomputed on the training set (Garipov et al.; "
        "REPAIR), those of fixed-size data batches (batch), frozen at the protocol's reference point (fixed, "
        "eval-mode style), or the module's own stored running statistics (module: eval mode, e.g. imported "
        "checkpoints; each replica's are folded into its BatchNorm affine parameters).")
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = _f("relu", "Hidden activation.")
    loss: Literal["cross_entropy", "mse"] = _f("cross_entropy", "Loss (nats for cross-entropy); the energy E is its "
                                               "mean over the training set.")
    memory_mb: float = _f(256.0, "Memory budget (MiB) for the activations of the replicas evaluated together: the data "
                          "are processed in chunks that fit (and, with BatchNorm, the replicas in groups that see the "
                          "whole training set at once). Raise it on a GPU.", gt=0)
    factory: str | None = _f(None, "'package.module:function' returning your nn.Module (replaces arch).")
    spec: str | None = _f(None, "'package.module:function' returning the model's PermutationSpec (your own models).")


class TrainGroup(_Section):
    """Overrides for one group of replicas (e.g. one batch size or one method in the flatness study)."""

    replicas: PositiveInt | None = _f(None, "Replicas in this group (default train.replicas).")
    batch_size: PositiveInt | None = _f(None, "Mini-batch size.")
    lr: float | None = _f(None, "Learning rate.", gt=0)
    method: Literal["sgd", "sam", "langevin", "replicated"] | None = _f(None, "Training method.")
    optimizer: Literal["sgd", "adam", "adamw"] | None = _f(None, "Optimizer.")
    epochs: PositiveInt | None = _f(None, "Epochs (the maximum when a stop criterion is set).")


class TrainConfig(_Section):
    """Ensemble training: K replicas that differ only in their seed (initialisation and batch order)."""

    replicas: PositiveInt = _f(16, "Number of replicas K.")
    epochs: PositiveInt = _f(3, "Epochs (the maximum when stop_at_loss or stop_at_accuracy is set).")
    batch_size: PositiveInt = _f(128, "Mini-batch size.")
    lr: float = _f(0.05, "Learning rate.", gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = _f("sgd", "Optimizer (sgd with momentum, adam, or adamw: adam with "
                                                     "decoupled weight decay, Loshchilov & Hutter 2019).")
    method: Literal["sgd", "sam", "langevin", "replicated"] = _f(
        "sgd", "sgd; sam (Foret et al. 2021); langevin (samples exp(-E/T), SGHMC noise with momentum; sgd only); "
        "replicated (Baldassi et al.: replicas coupled to their centre).")
    momentum: float = _f(0.9, "Heavy-ball momentum.", ge=0, lt=1)
    weight_decay: float = _f(0.0, "L2 weight decay (part of the energy for langevin).", ge=0)
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "Learning-rate schedule.")
    rho: float = _f(0.05, "SAM radius (absolute).", gt=0)
    temperature: float = _f(1e-5, "Langevin temperature T (units of the loss).", ge=0)
    stop_at_loss: float | None = _f(None, "Stop each replica once its training loss (whole training set, checked "
                                    "every epoch) is at or below this (Jiang et al. 2020 use 0.01).", gt=0)
    stop_at_accuracy: float | None = _f(None, "Stop each replica once its training accuracy reaches this fraction.",
                                        gt=0, le=1)
    chunk: PositiveInt = _f(64, "Replicas per training task (the unit of work for the executor).")
    groups: list[TrainGroup] = _f([], "Groups of replicas with their own settings ([[train.groups]] tables).")
    keep_at: list[int] | Literal["log"] = _f([], "Optimiser steps after which the replicas are kept (0 = the "
                                             "initialisation), for the timeline stage; 'log' = keep_points "
                                             "log-spaced steps from 0 to the last step.")
    keep_points: int = _f(12, "Number of log-spaced snapshots when keep_at = 'log'.", ge=2)

    @field_validator("keep_at")
    @classmethod
    def _keep(cls, v):
        if isinstance(v, list) and any(s < 0 for s in v):
            raise ValueError(f"keep_at steps must be >= 0, got {v}")
        return v


class TimelineConfig(_Section):
    """The landscape over training time: light protocols at every kept snapshot (train.keep_at)."""

    enabled: bool = _f(True, "Run this stage (only when train.keep_at keeps snapshots).")
    n_data: PositiveInt | None = _f(2000, "Training samples the curvature and the walks use (the first n; all when "
                                    "omitted).")
    tol: float = _f(1e-3, "Relative accuracy of lambda_max (Lanczos).", gt=0, lt=1)
    walkers: PositiveInt = _f(4, "Straight walks per replica and kind of direction (filter-normalised and isotropic).")
    walk_steps: int = _f(30, "Points of the geometric grid of radii along each straight walk, from step_size to 1 "
                         "(units of |theta|); each crossing refined by bisection.", ge=2)
    step_size: float = _f(0.002, "Smallest radius of that grid, in units of |theta|.", gt=0, lt=1)
    normalize: Literal["filter", "layer"] = _f("filter", "Direction of the first kind of walk: per filter/row or per "
                                               "layer (the second kind is always isotropic).")
    delta: float = _f(0.1, "Loss rise that defines the basin radius, as a fraction of the snapshot's training loss E0 "
                      "(threshold E0 (1 + delta)).", gt=0)
    pairs: int = _f(2, "Replica pairs (0, 1), (2, 3), ... for the naive and aligned barriers (0 = none).", ge=0)
    n_points: int = _f(11, "Points along each barrier path.", ge=2)


class WalkConfig(_Section):
    """Protocol 1: random walks, Metropolis and Langevin from trained solutions."""

    enabled: bool = _f(True, "Run this stage.")
    n_walkers: PositiveInt = _f(8, "Walkers per starting solution.")
    steps: PositiveInt = _f(200, "Steps per walk.")
    step_size: float = _f(0.01, "Step size sigma (per coordinate; relative to the row norm with normalize=filter).", gt=0)
    temperatures: list[float | Literal["none"]] = _f(["none"], "One walk per entry: 'none' = every step taken (the "
                                                     "paper's walk), a number T = Metropolis at T (units of the loss).")
    normalize: Literal["none", "filter", "layer"] = _f("none", "Step scale: isotropic, per filter/row, or per layer.")
    record_every: PositiveInt = _f(10, "Steps between test-set evaluations.")
    starts: PositiveInt = _f(1, "How many trained replicas to start walkers from.")
    deltas: list[float] = _f([0.01, 0.1, 0.5], "Loss rises delta (nats) at which the basin radius is measured.")
    n_data: PositiveInt | None = _f(None, "Training samples the walk's energy uses (the first n; default all). "
                                    "Recorded in the run folder.")
    langevin_temperature: float = _f(0.0, "Langevin walk temperature (units of the loss).", ge=0)
    langevin_lr: float = _f(0.01, "Langevin step (learning rate).", gt=0)
    langevin_steps: int = _f(0, "Langevin steps (0 = no Langevin walk).", ge=0)

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, v):
        for t in v:
            if t != "none" and t <= 0:
                raise ValueError(f"temperatures must be > 0 or 'none', got {t}")
        return v

    @field_validator("deltas")
    @classmethod
    def _deltas(cls, v):
        if not v or any(d <= 0 for d in v):
            raise ValueError(f"deltas must be a non-empty list of numbers > 0, got {v}")
        return v


class ConnectConfig(_Section):
    """Protocol 2: permutation-interpolation, barriers, curves and planes."""

    enabled: bool = _f(True, "Run this stage.")
    n_points: int = _f(25, "Points along every path.", ge=2)
    swaps: list[int] = _f([0, 1, 2, 4, 8, 16, 32, 64], "Numbers k of hidden units permuted (0, or >= 2; 1 is skipped).")
    pairs: PositiveInt = _f(4, "Pairs of independent replicas for naive/aligned barriers.")
    align: Literal["weight", "activation"] = _f("weight", "Alignment: weight matching or activation matching.")
    bezier_steps: int = _f(200, "Training steps of the Bezier curve's middle point (0 = no curve).", ge=0)
    plane_steps: int = _f(21, "Grid points per side of each loss plane (0 = no planes).", ge=0)
    plane_span: float = _f(1.0, "Half-width of the random plane (filter-normalised units).", gt=0)
    widths: list[PositiveInt] = _f([], "Hidden widths for the barrier-vs-width experiment (trains new replicas).")
    width_replicas: int = _f(4, "Replicas per width.", ge=2)

    @field_validator("swaps")
    @classmethod
    def _swaps(cls, v):
        if any(k < 0 for k in v):
            raise ValueError(f"swaps must be >= 0, got {v}")
        return v

    @field_validator("plane_steps")
    @classmethod
    def _plane(cls, v):
        if v == 1:
            raise ValueError("plane_steps must be 0 (no plane) or >= 2")
        return v


class ReplicasConfig(_Section):
    """Protocol 3: overlaps, P(q), the tree and ultrametricity."""

    enabled: bool = _f(True, "Run this stage.")
    kind: Literal["weights", "activations", "functions"] = _f("weights", "What the overlap q compares.")
    method: Literal["average", "complete", "single", "ward"] = _f("average", "Linkage of the hierarchical clustering.")
    max_triangles: PositiveInt = _f(200000, "Triangles tested for ultrametricity (a seeded sample beyond this).")
    alpha: float = _f(0.01, "Significance level of the ultrametricity verdict.", gt=0, lt=1)
    basin_temperature: float = _f(0.0, "Temperature (units of the loss) of the within-basin samples drawn around one "
                                  "trained solution by parallel tempering; 0 = none.", ge=0)
    basin_samples: int = _f(16, "Independent within-basin samples (chains).", ge=4)
    basin_sweeps: PositiveInt = _f(200, "Metropolis sweeps per within-basin chain.")
    basin_step_size: float = _f(0.002, "Proposal step of the within-basin chains (per coordinate).", gt=0)
    basin_n_data: PositiveInt | None = _f(2000, "Training samples the within-basin chains' energy uses (the first n).")


class CurvatureConfig(_Section):
    """Protocol 4: curvature, flatness and generalisation."""

    enabled: bool = _f(True, "Run this stage.")
    top_k: PositiveInt = _f(1, "Hessian eigenvalues per replica (Lanczos).")
    tol: float = _f(1e-3, "Relative accuracy of the eigenvalues.", gt=0, lt=1)
    trace_probes: int = _f(20, "Hessian-vector products for the trace (Hutch++).", ge=3)
    density: bool = _f(True, "Spectral density (SLQ) of the flattest and the sharpest replica.")
    slq_steps: int = _f(40, "Lanczos steps of the spectral density.", ge=2)
    rho: float = _f(0.05, "Sharpness radius, relative: perturbations of norm rho * |theta|.", gt=0)
    n_samples: PositiveInt = _f(8, "Random directions for average sharpness.")
    entropy_chains: int = _f(64, "Chains of the local-entropy estimator (subset simulation); about 60 batched "
                             "evaluations of replicas x chains points resolve log-fractions down to about -30.", ge=4)
    n_hvp_data: PositiveInt | None = _f(None, "Training samples used for curvature (the first n; default all).")
    entropy_radius: float = _f(0.5, "Local-entropy ball radius, relative to |theta|. The log-fraction scales with the "
                               "number of parameters: choose it so values fall between about -1 and -30 (784-64-10 on "
                               "Fashion-MNIST with epsilon 0.05: 0.5 to 0.7); beyond the estimator's reach it is NaN.",
                               gt=0)
    entropy_epsilon: float = _f(0.05, "Local-entropy loss tolerance epsilon (nats).", gt=0)


class SelectConfig(_Section):
    """Which model to ship: strategies graded on the untouched test split."""

    enabled: bool = _f(True, "Run this stage (after curvature).")
    strategy: Literal["best-val", "flattest", "flattest-within-1se", "random", "merged"] = _f(
        "flattest-within-1se", "The rule whose choice is exported: best validation accuracy, flattest, flattest within "
        "one standard error of the best validation accuracy, random (the floor), or the aligned average (merged).")
    measure: str = _f("sharpness_average", "The one flatness measure declared in advance for the 'flattest' "
                      "strategies: a column of the flatness table or of the measures table (complexity columns: "
                      "lower = flatter; local_entropy, margin, the PAC-Bayes sigmas, basin_radius_relative: higher = "
                      "flatter). Average sharpness is the closest of the curvature stage's to the best generalisation "
                      "predictors of Jiang et al. 2020; on the measures preset (Fashion-MNIST, issue 26) its overall "
                      "Kendall tau with the gap was +0.35 [+0.19, +0.49], behind the basin radius (+0.42) and the "
                      "magnitude-aware PAC-Bayes flatness (+0.39), and no measure had a granulated Psi above 0 beyond "
                      "its interval (see tables/measures_rank).")
    n_resamples: PositiveInt = _f(2000, "Sub-pools drawn to estimate each strategy's expected test accuracy.")
    pool: PositiveInt | None = _f(None, "Size of each random sub-pool a strategy picks its model from (default: half "
                                        "the replicas, at least 3); the pick's test accuracy is averaged over sub-pools.")


class ExamplesConfig(_Section):
    """Where the replicas disagree: per-example errors, churn, clusters' mistakes, robustness under input shifts."""

    enabled: bool = _f(False, "Run this stage (after select; forward passes of the replicas over the test split: "
                       "15-40 s on the quickstart and flatness presets on 2 CPU cores). 'lossglass examples RUN' "
                       "runs it on an existing run.")
    top: PositiveInt = _f(16, "Hardest test examples (and examples the clusters disagree on most) shown in the report.")
    corruptions: list[Literal["noise", "blur", "contrast", "shift", "rotate", "tokens"]] | None = _f(
        None, "Input shifts to grade robustness on (default: every one that applies to the data: images noise, blur, "
        "contrast, shift, rotate; token sequences tokens; other inputs noise), each at three seeded severities.")
    n_boot: int = _f(1000, "Bootstrap draws (and Mantel permutations) of the rank correlations.", ge=100)
    barrier_pairs: int = _f(0, "Replica pairs (seeded, at random) whose aligned loss barrier this stage measures itself, "
                            "on barrier_n_data training samples, so that churn is ranked against the barrier on enough "
                            "pairs; 0: the connect stage's pairs only (a few).", ge=0)
    barrier_n_data: PositiveInt | None = _f(2000, "Training samples of those barriers (None: all).")


class ReferenceConfig(_Section):
    """Reference landscapes through the same replica pipeline: a true spin glass and a convex control."""

    enabled: bool = _f(False, "Run this stage.")
    n_spins: int = _f(200, "Spherical p-spin size N.", ge=3)
    p: Literal[2, 3] = _f(3, "p of the spherical p-spin.")
    replicas: int = _f(32, "Descent minima (threshold states) of the p-spin, and convex-control samples.", ge=4)
    steps: PositiveInt = _f(2000, "Gradient-descent steps of the p-spin.")
    lr: float = _f(0.2, "Descent step of the p-spin (times N).", gt=0)
    sk_spins: int = _f(64, "Sherrington-Kirkpatrick size N (0 = no SK control).", ge=0)
    sk_temperatures: list[float] = _f([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6],
                                      "Parallel-tempering ladder for SK (physical units, T_c = 1).")
    sk_replicas: int = _f(32, "Independent SK replicas (whole ladders).", ge=4)
    sk_sweeps: PositiveInt = _f(2000, "Monte Carlo sweeps per SK replica.")
    sk_temperature: float = _f(0.4, "The low temperature whose samples are analysed (nearest ladder rung).", gt=0)
    sk_samples: int = _f(4, "SK disorder samples (P(q) is their average; tree p-values combined by Fisher's method).",
                         ge=1)

    @field_validator("sk_temperatures")
    @classmethod
    def _ladder(cls, v):
        if len(v) < 2 or any(t <= 0 for t in v) or sorted(v) != v or len(set(v)) != len(v):
            raise ValueError(f"sk_temperatures must be >= 2 increasing positive values, got {v}")
        return v


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class MeasuresConfig(_Section):
    """Which measure predicts generalisation (Jiang et al. 2020): networks trained on a designed grid of
    hyperparameters (every combination of the lists below, ``seeds`` networks per cell), every measure of each, and
    their rank correlations with the generalisation gap (overall, granulated per axis, Psi, conditional mutual
    information); the study's own replicas get the same measures (so select.measure can name one)."""

    enabled: bool = _f(False, "Run this stage (off by default: it trains its own grid of networks).")
    widths: list[PositiveInt] = _f([], "Hidden widths of a one-hidden-layer MLP (an axis of the grid); empty = the "
                                   "study's own model.")
    batch_sizes: list[PositiveInt] = _f([32, 128], "Mini-batch sizes (an axis of the grid).")
    lrs: list[float] = _f([0.02, 0.05], "Learning rates (an axis of the grid).")
    weight_decays: list[float] = _f([0.0, 0.002], "L2 weight decays (an axis of the grid).")
    sam_rhos: list[float] = _f([0.0, 0.05], "SAM radii (an axis of the grid; 0 = plain SGD).")
    seeds: PositiveInt = _f(2, "Networks per cell of the grid (independent seeds).")
    epochs: PositiveInt = _f(300, "Maximum epochs of each grid network (stop_at_loss ends it earlier).")
    stop_at_loss: float | None = _f(0.01, "Stop each network at this training cross-entropy (Jiang et al. 2020: "
                                    "0.01); networks that do not reach it are left out of the ranking.", gt=0)
    grid: bool = _f(True, "Train and rank the grid (false: only measure the study's replicas).")
    n_data: PositiveInt | None = _f(1000, "Training samples the perturbation and curvature measures use (the first n).")
    n_draws: PositiveInt = _f(8, "Gaussian draws per step of the PAC-Bayes sigma search.")
    target: float = _f(0.1, "Allowed rise of the training error that defines the PAC-Bayes sigma (Jiang: 0.1).",
                       gt=0, lt=1)
    eps: float = _f(1e-3, "Additive noise floor of the magnitude-aware PAC-Bayes perturbation (Jiang: 1e-3).", ge=0)
    margin_quantile: float = _f(0.1, "Quantile of the training margins that is the output margin (Jiang: 0.1).",
                                gt=0, lt=1)
    curvature: bool = _f(True, "Also the curvature stage's measures on the grid (lambda_max, Hessian trace, average "
                         "and worst sharpness at curvature.rho, basin radius along straight walks).")
    local_entropy: bool = _f(False, "Also the local entropy on the grid (curvature.entropy_* settings; costly).")
    n_boot: PositiveInt = _f(1000, "Bootstrap resamples over seeds for the intervals of tau and Psi.")

    @field_validator("batch_sizes", "lrs", "weight_decays", "sam_rhos")
    @classmethod
    def _levels(cls, v):
        if not v or len(set(v)) != len(v) or any(x < 0 for x in v):
            raise ValueError(f"each axis is a non-empty list of distinct values >= 0, got {v}")
        return v


class StudyConfig(_Section):
    """A study: the data, the model, training, and the protocols run on the replicas."""

    name: str = _f("study", "Name of the study (letters, digits, . _ -; up to 100); the default run folder is runs/NAME.")
    seed: int = _f(0, "Seed of everything random (replica k's streams are mixed from (seed, k)).")
    device: str = _f("cpu", "cpu, cuda or auto.")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    timeline: TimelineConfig = TimelineConfig()
    walk: WalkConfig = WalkConfig()
    connect: ConnectConfig = ConnectConfig()
    replicas: ReplicasConfig = ReplicasConfig()
    curvature: CurvatureConfig = CurvatureConfig()
    measures: MeasuresConfig = MeasuresConfig()
    select: SelectConfig = SelectConfig()
    examples: ExamplesConfig = ExamplesConfig()
    reference: ReferenceConfig = ReferenceConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not _NAME.match(v):
            raise ValueError("a name is letters, digits, '.', '_' or '-' (1 to 100, not starting with '.' or '-'), "
                             f"not a path; got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if v not in ("cpu", "auto") and not re.match(r"^cuda(:\d+)?$", v):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {v!r}")
        return v

    @model_validator(mode="after")
    def _cross(self):
        if self.walk.enabled and self.walk.starts > self.train.replicas and not self.train.groups:
            raise ValueError(f"walk.starts = {self.walk.starts} but train.replicas = {self.train.replicas}")
        if self.train.method == "langevin" and self.train.optimizer in ("adam", "adamw"):
            raise ValueError("train.method = 'langevin' samples exp(-E/T) only with train.optimizer = 'sgd'")
        m = self.model
        if m.arch == "resnet" and (m.depth - 2) % 6:
            raise ValueError(f"model.depth = {m.depth}: a ResNet has depth 6n + 2 (8, 14, 20, 32, 44, 56, 110)")
        if m.arch == "transformer" and m.d_model % m.n_heads:
            raise ValueError(f"model.d_model = {m.d_model} is not a multiple of model.n_heads = {m.n_heads}")
        return self


# ---------------------------------------------------------------------------- loading
def _fields_of(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        sub = _section_type(f.annotation)
        out.append(prefix + name)
        if sub is not None:
            out += _fields_of(sub, prefix + name + ".")
    return out


def _section_type(ann) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def all_keys() -> list[str]:
    """Every config key, dotted (``walk.steps``)."""
    return _fields_of(StudyConfig)


def _did_you_mean(key: str) -> str:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else " (see 'lossglass config' for every key)"


def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'{_did_you_mean(key)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            where = f"{key}: " if key else ""
            lines.append(f"{source}: {where}{msg} (got {err.get('input')!r})" if key else f"{source}: {msg}")
    return "; ".join(lines)


def validate(raw: dict[str, Any], source: str = "config") -> StudyConfig:
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise LossglassError(_format_errors(e, source)) from None


def presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("lossglass.presets").iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    check(name in presets(), f"unknown preset {name!r}; available: {', '.join(presets())}")
    return resources.files("lossglass.presets").joinpath(f"{name}.toml").read_text()


#: the most bytes of a config file that are read (a config is a few kB)
CONFIG_LIMIT = 1 << 20
_KEY_DELIMITERS = re.compile(r"[\n{,]")


def _longest_key(text: str) -> int:
    """The most dots in a key of ``text`` (linear in its length): the text before the '=' of each key/value pair (a
    pair starts a line, follows '{' or ','), and each table header ``[a.b]`` / ``[[a.b]]``."""
    most = 0
    for seg in _KEY_DELIMITERS.split(text):
        key, eq, _ = seg.partition("=")
        if eq or key.lstrip().startswith("["):
            most = max(most, key.count("."))
    return most

#: the config keys that name code lossglass imports and runs
CODE_KEYS = ("model.factory", "data.factory", "model.spec")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """A TOML document as a dict. Any failure is one line naming ``source``: bad syntax, a number too long to
    convert, more than :data:`CONFIG_LIMIT` characters, or nesting deeper than :data:`lossglass.store.MAX_DEPTH`
    (tomllib recurses: a deeply nested document would otherwise end in a RecursionError)."""
    from .store import MAX_DEPTH, nesting_depth

    check(len(text) <= CONFIG_LIMIT, f"{source}: too large for a config ({len(text):,} characters; at most "
          f"{CONFIG_LIMIT:,})")
    # tomllib's time and memory grow with the square of a dotted key's length (a.a.a... = 1: 10,000 parts take 400
    # MB): a key or table header of more than MAX_DEPTH parts is refused before it is parsed
    check(_longest_key(text) <= MAX_DEPTH, f"{source}: not a config (a dotted key of more than {MAX_DEPTH} parts)")
    try:
        raw = tomllib.loads(text)
    except RecursionError:
        raise LossglassError(f"{source}: not valid TOML (nested too deeply)") from None
    except ValueError as e:  # TOMLDecodeError, and integers too long to convert
        raise LossglassError(f"{source}: not valid TOML ({' '.join(str(e).split())[:300]})") from None
    check(nesting_depth(raw) <= MAX_DEPTH, f"{source}: not a config (nested more than {MAX_DEPTH} levels deep)")
    return raw


def decode_config(data: bytes, source: str) -> dict[str, Any]:
    """A config file's bytes (read once) parsed as UTF-8 TOML; one line naming ``source`` when they are not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LossglassError(f"{source}: not valid TOML (not UTF-8 text: {e.reason} at byte {e.start})") from None
    return parse_toml(text, source)


def config_code(cfg: StudyConfig) -> dict[str, str]:
    """The code a config names (``{key: 'module:function'}`` for :data:`CODE_KEYS` that are set): building its
    problem imports and runs it."""
    values = (cfg.model.factory, cfg.data.factory, cfg.model.spec)
    return {k: v for k, v in zip(CODE_KEYS, values) if v}


def check_trusted(cfg: StudyConfig, data: bytes, path: str | Path, *, trust: bool = False,
                  folder: str | Path | None = None) -> None:
    """Refuse a config read from a run folder that this user's lossglass did not write (no valid signature of these
    very bytes there) when it names code to import, unless ``trust`` (the user read it and says so:
    ``--trust-config``). ``folder``: the run folder (default: the config's own folder, checked only when lossglass
    has written there, see :func:`lossglass.store.written_by_lossglass`); a config anywhere else is the user's own."""
    from .store import RunStore, written_by_lossglass

    code = config_code(cfg)
    if trust or not code:
        return
    where = Path(folder) if folder is not None else Path(path).parent
    if folder is None and not written_by_lossglass(where):
        return
    if where.is_dir() and RunStore(where, create=False).is_trusted(data):
        return
    names = ", ".join(f"{k} = {v!r}" for k, v in code.items())
    raise LossglassError(f"{path} names code that this command would import and run ({names}), and it was not "
                         f"written by your lossglass in {where}; read it, then add --trust-config if you trust it")


def _coerce(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except (ValueError, RecursionError):
        return value


def check_override_key(key: str) -> None:
    """Refuse a ``--set`` key that is not a config key, with the closest one."""
    keys = set(all_keys())
    check(key in keys, f"--set {key}: unknown key '{key}'{_did_you_mean(key)}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["walk.steps=5000", "train.lr=0.1"]`` -> nested updates (values parsed as TOML, else strings)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        check("=" in item, f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        check_override_key(key)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            check(isinstance(node, dict), f"--set {key}: {p} is not a section")
        node[parts[-1]] = _coerce(value.strip())
    return raw


def load_config(path: str | Path | None = None, *, preset: str | None = None,
                overrides: list[str] | None = None, trust: bool = False) -> StudyConfig:
    """A validated config from a TOML file or a preset name, with ``--set`` overrides applied. Errors caused by an
    override name the ``--set`` key, not the file or preset. The file is read once (at most :data:`CONFIG_LIMIT`
    bytes) and those bytes are checked and parsed.

    A file from a run folder that this user's lossglass did not write (see :func:`check_trusted`) is refused when it
    names code to import, unless ``trust``: nothing is imported here, but whoever builds the study's problem would
    run that code."""
    from .store import read_file

    check((path is None) != (preset is None), "give either a config file or --preset NAME (not both)")
    data = b""
    if preset is not None:
        raw, source = parse_toml(preset_text(preset), f"preset {preset}"), f"preset {preset}"
    else:
        p = Path(path)
        check(p.is_file(), f"config file {p} not found")
        try:
            data = read_file(p, CONFIG_LIMIT, follow=True)
        except OSError as e:
            raise LossglassError(f"config file {p} cannot be read ({e.strerror or e})") from None
        except LossglassError as e:
            raise LossglassError(f"config file {p} cannot be read ({e})") from None
        raw, source = decode_config(data, str(p)), str(p)
    overrides = overrides or []
    cfg = validate(raw, source)  # the file itself must be valid before overrides are blamed
    if path is not None:
        check_trusted(cfg, data, Path(path), trust=trust)
    if overrides:
        cfg = validate(apply_overrides(raw, overrides), "--set " + " --set ".join(overrides))
    return cfg


def to_toml(cfg: StudyConfig) -> str:
    import tomli_w

    return tomli_w.dumps(_drop_none(cfg.model_dump()))


def same_config(a: StudyConfig, b: StudyConfig) -> bool:
    """Configs compared by value (parsed), not by text: comments and formatting do not count."""
    return a.model_dump() == b.model_dump()


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    return d


# ---------------------------------------------------------------------------- the reference
_BOUNDS = (("exclusiveMinimum", ">"), ("minimum", ">="), ("exclusiveMaximum", "<"), ("maximum", "<="))
_TYPES = {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}


def _type_text(prop: dict, defs: dict) -> str:
    """A key's type in words from its JSON schema (pydantic's ``model_json_schema``): allowed values, bounds, lists,
    optional."""
    if "$ref" in prop:
        return defs[prop["$ref"].rsplit("/", 1)[1]].get("title", "table")
    if "anyOf" in prop:
        opts = [o for o in prop["anyOf"] if o.get("type") != "null"]
        text = " or ".join(_type_text(o, defs) for o in opts)
        return text + (" (optional)" if len(opts) < len(prop["anyOf"]) else "")
    if "const" in prop:
        return f'"{prop["const"]}"' if isinstance(prop["const"], str) else str(prop["const"])
    if "enum" in prop:
        return "one of " + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in prop["enum"])
    if prop.get("type") == "array":
        return "list of " + _type_text(prop["items"], defs) if "items" in prop else "list"
    text = _TYPES.get(prop.get("type", ""), prop.get("type", "any"))
    bounds = ", ".join(f"{sym} {prop[k]}" for k, sym in _BOUNDS if k in prop)
    return f"{text} ({bounds})" if bounds else text


def _toml_value(v) -> str:
    import json

    return json.dumps(v)


def _rows() -> list[tuple[str, str, str, str, str]]:
    """(section doc, key, type, default, meaning) for every leaf key, sections in order, from the config's JSON schema
    (``StudyConfig.model_json_schema()``: the validation rules the configs are checked with, so the reference cannot
    drift from them)."""
    schema = StudyConfig.model_json_schema()
    defs = schema.get("$defs", {})
    out, subs = [], []

    def leaves(sch: dict, prefix: str, doc: str) -> None:
        for name, prop in sch["properties"].items():
            ref = prop.get("$ref")
            if ref and defs[ref.rsplit("/", 1)[1]].get("type") == "object" and prefix == "":
                subs.append((defs[ref.rsplit("/", 1)[1]], name + "."))
                continue
            default = "none" if prop.get("default") is None else _toml_value(prop["default"])
            out.append((doc, prefix + name, _type_text(prop, defs), default, prop.get("description", "")))

    leaves(schema, "", (StudyConfig.__doc__ or "").strip())
    for sub, prefix in subs:
        leaves(sub, prefix, sub.get("description", "").strip())
    return out


def reference(markdown: bool = True) -> str:
    """The config reference generated from the models: every key with its meaning, type/allowed values, bounds and
    default. ``docs/config.md`` is ``reference()``; a test keeps them equal. ``markdown=False``: terminal text."""
    rows = _rows()
    lines = ["# lossglass config reference", "",
             "Generated from `lossglass/config.py` (`lossglass config --markdown`). Set a key in a TOML file "
             "(`[walk]` then `steps = 500`) or on the command line (`--set walk.steps=500`).", ""]
    current = None
    for doc, key, typ, default, meaning in rows:
        sec = key.rsplit(".", 1)[0] if "." in key else "top level"
        if sec != current:
            current = sec
            if markdown:
                lines += ["", f"## {sec if sec == 'top level' else '[' + sec + ']'}", "", doc, "",
                          "| key | type / allowed | default | meaning |", "|---|---|---|---|"]
            else:
                lines += ["", f"[{sec}]  {doc}" if sec != "top level" else f"(top level)  {doc}"]
        if markdown:
            lines.append(f"| `{key}` | {typ} | `{default}` | {meaning.replace('|', '/')} |")
        else:
            lines.append(f"  {key} = {default}    ({typ})")
            lines.append(f"      {meaning}")
    text = "\n".join(lines if markdown else lines[4:]).strip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)

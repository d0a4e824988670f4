#!/usr/bin/env python
"""Fit loss-vs-compute and loss-vs-size power laws to short runs and extrapolate them to the 4B flavor.

Why: before a 4B run costs a cluster-week, a few small runs say how fast the loss falls with
compute and with parameters; the fitted exponents and the band around the extrapolation say
how much to trust the number (DESIGN §9). Two ways in:

    # run the points: one trainer subprocess per size, each in OUT/runs/<label>
    python scripts/scaling_analysis.py --runs --out /tmp/scaling_out \\
        --sizes dim=64,n_heads=2,n_kv_heads=1,head_dim=16 dim=128,n_heads=4,n_kv_heads=2,head_dim=16 ... \\
        [--model hydra] [--config train_configs/debug.toml] [--steps 80 | --steps 40 60 80 100] [--seq-len 64]
        [--run-seeds 2] [--params active|non_embedding|total] [--form auto|saturating|loglinear] [-- TRAINER ARGS]

    # read runs that exist: run folders, folders of run folders, or training.db files
    python scripts/scaling_analysis.py --from outputs/sweep_a outputs/sweep_b/run3 --out /tmp/scaling_out

A size is a flavor name (``debug``, ``100M``) or comma-separated model overrides on the base
config's flavor (``dim=96,n_mor_blocks=3``; ``flavor=NAME`` picks another flavor). ``--steps``
takes one value for every size or one per size: with one token budget for all runs, C = f·N·D
is a fixed multiple of N and L(C) is L(N) on another axis; different budgets separate them.
A finished run of the same config already in its folder is reused (``--force`` retrains).

At these sizes the seed moves the final loss by about as much as a 1.5x wider model does (on
the debug corpus at 200 steps: 0.1-0.2 nats), so ``--run-seeds N`` trains every size N times
(job.seed + 0..N-1). Runs whose resolved configs differ only in the seed (and folder), at equal
tokens seen, are one point: its loss is their mean, weighted by sigma_i = s / sqrt(n_i), s the
seed std pooled over the points with repeats. This holds for ``--from`` too.

Per run (read from DIR/training.db when there is one, else DIR/metrics.jsonl + DIR/config.toml):
parameters (total, non-embedding = total minus the input embedding table, and active = applied
per token: every recursion counted, routing capacities applied, LM head in), training FLOPs =
executed FLOPs per token (fwd+bwd, capacities applied) x tokens seen at the final validation,
and that final validation loss. Without a database, tokens seen = step x batch x seq_len x
accumulation x world size, the world size being dp_replicate x dp_shard of the config (1 when
dp_shard = -1, as the config alone cannot say).

The loss-vs-parameters fit uses ``--params`` (default ``active``: HYDRA shares block weights
across recursions, so stored parameters understate what a token meets; active parameters are
HYDRA's counterpart of Kaplan's non-embedding N in C ~ 6·N·D). Fits are
L = a·(X/x0)^(-b) + c, or the log-log line (c = 0) when c is not identifiable; the band is a
parametric bootstrap from the fit covariance (``hydra_titan/components/scaling.py`` says how).
Targets: ``--target-flavor`` (default 4B) of the runs' model, its parameters of the fitted
kind at ``--target-seq-len``; and ``--flop-budget`` (default: that flavor at 20 tokens per
parameter, i.e. executed FLOPs/token x 20 x total parameters).

Writes OUT/scaling_report.json, OUT/loss_vs_flops.png and OUT/loss_vs_params.png (written
under temporary names and renamed, only once every step has succeeded). Fewer than 3 usable
points, a folder without runs or a size the trainer would refuse: a message and exit status 2,
nothing written (under --runs: before any run starts).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra_titan.components.scaling import FitError, PowerLawFit, fit_power_law  # noqa: E402
from hydra_titan.components.tracking import TrackingError, open_database  # noqa: E402
from hydra_titan.config import ConfigError, config_to_dict, load_config  # noqa: E402
from hydra_titan.config.job_config import JobConfig  # noqa: E402

PARAM_KINDS = ("active", "non_embedding", "total")
REPORT = "scaling_report.json"
PLOTS = {"flops": "loss_vs_flops.png", "params": "loss_vs_params.png"}
# CPU-sized defaults: the debug flavor's compressions (C1 = 2, C2 = 4) at four widths
DEFAULT_SIZES = ["dim=64,n_heads=2,n_kv_heads=1,head_dim=16", "dim=128,n_heads=4,n_kv_heads=2,head_dim=16",
                 "dim=192,n_heads=6,n_kv_heads=3,head_dim=16", "dim=256,n_heads=8,n_kv_heads=4,head_dim=16"]
TOKENS_PER_PARAM = 20  # the default FLOP budget: Chinchilla's compute-optimal ratio


class InputError(Exception):
    """Bad input (no runs, too few points, a size the trainer refuses): exit status 2."""


# ---------------------------------------------------------------------------
# One run as a point
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts and training FLOPs per token of one model config."""

    total: int
    non_embedding: int
    active: float
    flops_per_token: float        # executed (capacities applied), forward + backward
    flops_per_token_dense: float  # every capacity at 1

    def params(self, kind: str) -> float:
        return float(getattr(self, kind))


@dataclass(frozen=True)
class RunPoint:
    """What the fits need from one finished run."""

    name: str
    folder: str
    source: str              # "training.db" or "metrics.jsonl"
    model: str
    flavor: str
    overrides: dict[str, Any]
    seq_len: int
    size: ModelSize
    step: int                # the step of the final validation
    tokens_seen: int
    val_loss: float
    val_bpb: float | None
    notes: tuple[str, ...] = ()
    # the resolved config less the seed and the folder: runs with equal keys are repeats of one point
    config_key: str = field(default="", repr=False)

    @property
    def flops(self) -> float:
        return self.size.flops_per_token * self.tokens_seen

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("config_key")
        out.update(flops=self.flops, notes=list(self.notes))
        return out


@dataclass(frozen=True)
class Skipped:
    folder: str
    reason: str


@dataclass(frozen=True)
class Group:
    """The runs of one model config and token budget (seeds apart): one point of the fits.

    Its loss is the mean over the runs; see `pooled_seed_std` for how the points are weighted."""

    members: tuple[RunPoint, ...]

    @property
    def name(self) -> str:
        return self.members[0].name if len(self.members) == 1 else f"{self.members[0].name} (+{len(self.members) - 1})"

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def loss(self) -> float:
        return sum(p.val_loss for p in self.members) / self.n

    @property
    def loss_std(self) -> float:
        if self.n < 2:
            return 0.0
        return math.sqrt(sum((p.val_loss - self.loss) ** 2 for p in self.members) / (self.n - 1))

    def x(self, axis: str, param_kind: str) -> float:
        first = self.members[0]
        return first.flops if axis == "flops" else first.size.params(param_kind)

    def to_dict(self, param_kind: str) -> dict[str, Any]:
        return {"name": self.name, "members": [p.name for p in self.members], "n": self.n, "val_loss": self.loss,
                "val_loss_std": self.loss_std, "flops": self.x("flops", param_kind),
                "params": self.x("params", param_kind)}


def pooled_seed_std(groups: list[Group]) -> float | None:
    """The seed-to-seed std of the final loss, pooled over every point with >= 2 runs (None: no repeats).

    Two or three seeds per point estimate a point's own std poorly (weighting by it would let the
    point whose seeds happened to agree pull the fit), so the noise is taken as one level for all
    points, sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)), and point i gets sigma = pooled / sqrt(n_i):
    points with more runs weigh more."""
    dof = sum(g.n - 1 for g in groups)
    if dof == 0:
        return None
    pooled = math.sqrt(sum((g.n - 1) * g.loss_std ** 2 for g in groups) / dof)
    return pooled if pooled > 0 else None


def group_runs(points: list[RunPoint]) -> list[Group]:
    """Runs whose configs differ only in the seed (and folder), at equal tokens seen, form one point (order: FLOPs)."""
    groups: dict[tuple, list[RunPoint]] = {}
    for p in points:
        groups.setdefault((p.config_key, p.tokens_seen), []).append(p)
    return sorted((Group(tuple(sorted(m, key=lambda p: p.name))) for m in groups.values()),
                  key=lambda g: g.members[0].flops)


def model_size(cfg: JobConfig) -> ModelSize:
    """Counts of the model the trainer would build for `cfg` (vocabulary sized to its tokenizer)."""
    from hydra_titan.components.tokenizer import build_tokenizer
    from hydra_titan.models import get_model_spec
    from hydra_titan.train import resolve_model_args

    spec = get_model_spec(cfg.model.name)
    args = resolve_model_args(spec, cfg, build_tokenizer(cfg.tokenizer.name))
    return size_of_args(spec, args, cfg.training.seq_len)


def size_of_args(spec, args, seq_len: int) -> ModelSize:
    report = spec.param_report(args, seq_len)
    flops = spec.flops_per_token(args, seq_len)
    return ModelSize(total=report.total, non_embedding=report.non_embedding, active=float(report.active),
                     flops_per_token=float(flops.executed), flops_per_token_dense=float(flops.dense))


def load_config_text(text: str) -> JobConfig:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text, encoding="utf-8")
        return load_config(["--config", str(path)])


def tokens_per_step(cfg: JobConfig, world_size: int | None = None) -> tuple[int, list[str]]:
    """Global tokens per optimizer step; the world size from the database, else from the config."""
    t, p = cfg.training, cfg.parallelism
    notes = []
    if world_size:
        world = world_size
    elif p.dp_shard == -1:
        world = p.dp_replicate
        notes.append(f"world size not recorded (dp_shard = -1): assumed dp_replicate = {world}")
    else:
        world = p.dp_replicate * p.dp_shard
    return t.local_batch_size * t.seq_len * t.gradient_accumulation_steps * world, notes


def read_jsonl_run(folder: Path) -> RunPoint:
    """A run from metrics.jsonl + config.toml: the last validation/loss line."""
    config, metrics = folder / "config.toml", folder / "metrics.jsonl"
    if not config.is_file() or not metrics.is_file():
        raise InputError("no config.toml + metrics.jsonl")
    cfg = load_config(["--config", str(config)])
    evals = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if isinstance(row, dict) and "validation/loss" in row:
            evals.append(row)
    if not evals:
        raise InputError("metrics.jsonl has no validation/loss")
    last = max(evals, key=lambda r: r["step"])
    per_step, notes = tokens_per_step(cfg)
    return make_point(folder, "metrics.jsonl", cfg, step=int(last["step"]), tokens=int(last["step"]) * per_step,
                      val_loss=float(last["validation/loss"]), val_bpb=last.get("validation/bpb"), notes=notes)


def read_db_runs(db: Path) -> list[RunPoint]:
    """The runs of a training.db (schema v1), each at its last evaluation.

    A dump folder's database holds every run started there; of runs with the same config only the
    newest counts (a rerun replaces a point, it does not add one)."""
    try:
        con = open_database(db, readonly=True)  # refuses a newer schema
        try:
            rows = con.execute(
                "SELECT r.run_id, r.config_toml, e.step, e.tokens_seen, e.val_loss, e.val_bpb, r.world_size "
                "FROM runs r JOIN evals e ON e.run_id = r.run_id AND e.step = "
                "(SELECT max(step) FROM evals WHERE run_id = r.run_id) ORDER BY r.run_id DESC").fetchall()
        finally:
            con.close()
    except (sqlite3.Error, TrackingError) as err:
        raise InputError(f"{db.name} is not a readable run database: {err}") from None
    if not rows:
        raise InputError(f"{db.name} holds no evaluations")
    points, seen, errors = [], set(), []
    for run_id, config_toml, step, tokens, val_loss, val_bpb, world in rows:
        if config_toml in seen:
            continue
        seen.add(config_toml)
        cfg = load_config_text(config_toml)
        notes = []
        if tokens is None:
            per_step, notes = tokens_per_step(cfg, world)
            tokens = step * per_step
        name = db.parent.name if len(rows) == 1 else f"{db.parent.name}#{run_id}"
        try:
            points.append(make_point(db.parent, "training.db", cfg, name=name, step=int(step), tokens=int(tokens),
                                     val_loss=float(val_loss), val_bpb=val_bpb, notes=notes))
        except InputError as err:
            errors.append(f"run {run_id}: {err}")
    if not points:
        raise InputError("; ".join(errors))
    return points


def make_point(folder: Path, source: str, cfg: JobConfig, *, name: str | None = None, step: int, tokens: int, val_loss: float,
               val_bpb: float | None, notes: list[str]) -> RunPoint:
    if step < cfg.training.steps:
        raise InputError(f"unfinished: last validation at step {step} of {cfg.training.steps}")
    if not math.isfinite(val_loss):
        raise InputError(f"final validation loss is {val_loss}")
    return RunPoint(name=name or folder.name, folder=str(folder), source=source, model=cfg.model.name,
                    flavor=cfg.model.flavor, overrides=dict(cfg.model.overrides), seq_len=cfg.training.seq_len,
                    size=model_size(cfg), step=step, tokens_seen=tokens, val_loss=val_loss,
                    val_bpb=None if val_bpb is None else float(val_bpb), notes=tuple(notes),
                    config_key=config_key(cfg))


def config_key(cfg: JobConfig) -> str:
    data = config_to_dict(cfg)
    for key in ("seed", "dump_folder", "description"):
        data["job"].pop(key, None)
    return json.dumps(data, sort_keys=True, default=str)


def read_run(path: Path) -> list[RunPoint]:
    """The runs of a training.db file, or of a folder: its training.db, else metrics.jsonl + config.toml."""
    if path.is_file():
        return read_db_runs(path)
    db = path / "training.db"
    if db.is_file():
        try:
            return read_db_runs(db)
        except InputError as err:
            if not (path / "metrics.jsonl").is_file():
                raise
            point = read_jsonl_run(path)
            return [dataclasses.replace(point, notes=point.notes + (f"training.db unusable ({err})",))]
    return [read_jsonl_run(path)]


def run_folders(root: Path) -> list[Path]:
    """`root` if it is a run, else every run folder below it (a folder with training.db or config.toml)."""
    if root.is_file() or _is_run(root):
        return [root]
    found = sorted({p.parent for name in ("training.db", "config.toml", "metrics.jsonl") for p in root.rglob(name)})
    return [f for f in found if not any(other in f.parents for other in found)]  # not a run's own subfolders


def _is_run(folder: Path) -> bool:
    return (folder / "training.db").is_file() or (folder / "metrics.jsonl").is_file()


def collect(paths: list[Path]) -> tuple[list[RunPoint], list[Skipped]]:
    points, skipped = [], []
    for root in paths:
        if not root.exists():
            raise InputError(f"{root}: no such file or folder")
        folders = run_folders(root)
        if not folders:
            skipped.append(Skipped(str(root), "no runs found (no training.db, metrics.jsonl or config.toml)"))
        for folder in folders:
            try:
                points.extend(read_run(folder))
            except (InputError, ConfigError, ValueError) as err:
                skipped.append(Skipped(str(folder), str(err)))
    return points, skipped


# ---------------------------------------------------------------------------
# Running the points
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeSpec:
    """One size of --runs: a flavor and model overrides (TOML literals, as the trainer parses them)."""

    label: str
    flavor: str | None
    overrides: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> "SizeSpec":
        flavor, overrides = None, []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, sep, value = part.partition("=")
            if not sep:
                if flavor is not None or overrides:
                    raise InputError(f"size {text!r}: a bare name ({part!r}) must be the only item, a flavor")
                flavor = part
            elif key.strip() == "flavor":
                flavor = value.strip()
            elif not key.strip() or not value.strip():
                raise InputError(f"size {text!r}: {part!r} is not KEY=VALUE")
            else:
                overrides.append((key.strip(), value.strip()))
        if flavor is None and not overrides:
            raise InputError(f"size {text!r} is empty")
        label = "_".join(([flavor] if flavor else []) + [f"{k}{v}" for k, v in overrides])
        return cls(label="".join(c if c.isalnum() or c in "._-" else "-" for c in label), flavor=flavor,
                   overrides=tuple(overrides))

    def trainer_args(self) -> list[str]:
        args = ["--model.flavor", self.flavor] if self.flavor else []
        for key, value in self.overrides:
            args += [f"--model.overrides.{key}", value]
        return args


@dataclass(frozen=True)
class RunPlan:
    label: str
    steps: int
    argv: list[str] = field(hash=False)
    folder: Path = field(hash=False)


def plan_runs(opts) -> list[RunPlan]:
    """Every run's trainer arguments, each checked as the trainer would check it (nothing runs yet)."""
    sizes = [SizeSpec.parse(s) for s in opts.sizes]
    if len(sizes) < 3:
        raise InputError(f"--runs needs at least 3 sizes for a 3-point fit, got {len(sizes)}")
    if len({s.label for s in sizes}) != len(sizes):
        raise InputError("two sizes are the same")
    if len(opts.steps) not in (1, len(sizes)):
        raise InputError(f"--steps takes one value or one per size ({len(sizes)}), got {len(opts.steps)}")
    steps = opts.steps * len(sizes) if len(opts.steps) == 1 else opts.steps
    if opts.run_seeds < 1:
        raise InputError(f"--run-seeds must be >= 1, got {opts.run_seeds}")
    try:
        base_seed = load_config(["--config", str(opts.config), *opts.trainer_args]).job.seed
    except ConfigError as err:
        raise InputError(f"the base config does not build: {err}") from None
    plans = []
    for (size, n), i in ((pair, i) for pair in zip(sizes, steps) for i in range(opts.run_seeds)):
        seed_args = ["--job.seed", str(base_seed + i)] if opts.run_seeds > 1 else []
        label = f"{size.label}_seed{base_seed + i}" if seed_args else size.label
        folder = opts.out / "runs" / label
        argv = ["--config", str(opts.config), "--model.name", opts.model, *size.trainer_args(),
                "--training.steps", str(n), "--training.seq_len", str(opts.seq_len),
                "--training.local_batch_size", str(opts.batch_size),
                "--lr_scheduler.warmup_steps", str(max(1, n // 10)),
                "--validation.enable", "true", "--validation.freq", str(n), "--validation.steps", str(opts.val_steps),
                "--metrics.log_freq", str(max(1, n // 4)), "--metrics.enable_tensorboard", "false",
                "--checkpoint.enable", "false", *opts.trainer_args, *seed_args]
        try:
            cfg = load_config(argv + ["--job.dump_folder", str(folder)])
            model_size(cfg)
        except (ConfigError, ValueError) as err:
            raise InputError(f"size {size.label}: {err}") from None
        plans.append(RunPlan(label=label, steps=n, argv=argv, folder=folder))
    return plans


def execute(plan: RunPlan, *, force: bool, timeout: float) -> None:
    """Train one point (a finished run of the same config in its folder is kept unless --force)."""
    if plan.folder.exists() and not force and _same_finished_run(plan):
        print(f"  {plan.label}: finished run found in {plan.folder}, reused", flush=True)
        return
    shutil.rmtree(plan.folder, ignore_errors=True)  # metrics.jsonl appends: never mix two runs
    log = plan.folder.parent.parent / "logs" / f"{plan.label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"  {plan.label}: {plan.steps} steps -> {plan.folder}", flush=True)
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *plan.argv, "--job.dump_folder",
                               str(plan.folder)], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        err = InputError if proc.returncode == 2 else RuntimeError
        raise err(f"run {plan.label} failed (exit {proc.returncode}), log {log}:\n{tail}")


def _same_finished_run(plan: RunPlan) -> bool:
    try:
        old = load_config(["--config", str(plan.folder / "config.toml")])
        new = load_config(plan.argv + ["--job.dump_folder", str(plan.folder)])
        read_run(plan.folder)
    except (InputError, ConfigError, ValueError, OSError):
        return False
    return old == new


# ---------------------------------------------------------------------------
# Fits, targets, report
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    label: str
    x: float


@dataclass(frozen=True)
class AxisFit:
    """One axis (FLOPs or parameters): its points, fit and extrapolation."""

    axis: str
    xlabel: str
    groups: tuple[Group, ...]
    param_kind: str
    fit: PowerLawFit
    target: Target

    @property
    def xs(self) -> tuple[float, ...]:
        return tuple(g.x(self.axis, self.param_kind) for g in self.groups)

    @property
    def ys(self) -> tuple[float, ...]:
        return tuple(g.loss for g in self.groups)

    seed_std: float | None  # pooled over the points with repeats; None: unweighted

    def extrapolate(self, level: float, seed: int):
        return self.fit.interval(self.target.x, level=level, seed=seed)


def targets(opts, model: str) -> tuple[Target, Target, dict[str, Any]]:
    from hydra_titan.models import get_model_spec

    spec = get_model_spec(model)
    try:
        args = spec.args(opts.target_flavor)
    except ValueError as err:
        raise InputError(f"--target-flavor: {err}") from None
    size = size_of_args(spec, args, opts.target_seq_len)
    budget = opts.flop_budget or size.flops_per_token * TOKENS_PER_PARAM * size.total
    label = f"{model} {opts.target_flavor}"
    info = {"model": model, "flavor": opts.target_flavor, "seq_len": opts.target_seq_len,
            **dataclasses.asdict(size),
            "flop_budget": budget, "flop_budget_source": "--flop-budget" if opts.flop_budget else
            f"{label} at {TOKENS_PER_PARAM} tokens per (total) parameter"}
    return (Target(f"{label} ({opts.params} params)", size.params(opts.params)),
            Target(f"{budget:.3g} FLOPs", budget), info)


def fit_axes(groups: list[Group], opts, param_target: Target, flop_target: Target) -> list[AxisFit]:
    seed_std = pooled_seed_std(groups)
    sigma = None if seed_std is None else [seed_std / math.sqrt(g.n) for g in groups]
    fits = []
    for axis, xlabel, target in (("flops", "training FLOPs (executed, fwd+bwd)", flop_target),
                                 ("params", f"{opts.params} parameters", param_target)):
        xs = [g.x(axis, opts.params) for g in groups]
        try:
            fit = fit_power_law(xs, [g.loss for g in groups], form=opts.form, sigma=sigma)
        except FitError as err:
            raise InputError(f"cannot fit loss vs {axis}: {err}") from None
        fits.append(AxisFit(axis=axis, xlabel=xlabel, groups=tuple(groups), param_kind=opts.params, fit=fit,
                            target=target, seed_std=seed_std))
    return fits


def build_report(points, groups, skipped, fits: list[AxisFit], target_info, opts) -> dict[str, Any]:
    extrap = {}
    for f in fits:
        interval = f.extrapolate(opts.level, opts.seed)
        extrap[f.axis] = {"target": f.target.label, **interval.to_dict(),
                          "extrapolation_factor": f.target.x / max(f.xs)}
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "param_kind": opts.params,
        "param_kinds": {"total": "every parameter", "non_embedding": "total minus the input embedding table",
                        "active": "applied per token: each recursion counted, routing capacities applied, "
                                  "LM head in (ModelSpec.active_params)"},
        "flops": "executed training FLOPs per token (fwd+bwd, capacities applied) x tokens seen at the final "
                 "validation",
        "loss": "final validation loss (nats/token)",
        "fit_method": "scipy.optimize.curve_fit of L = a*(X/x0)^(-b) + c (x0: geometric mean of X); "
                      "log-log line (c = 0) when c is not identifiable (see each fit's note)",
        "uncertainty_method": f"parametric bootstrap: 4000 draws from N(theta, cov) (cov from curve_fit, scaled "
                              f"by the residual variance), central {opts.level:.0%} percentile band; "
                              "delta-method std alongside",
        "runs": [p.to_dict() for p in points],
        "points": [g.to_dict(opts.params) for g in groups],
        "seed_std_pooled": fits[0].seed_std,
        "weighting": "a point is the mean final validation loss of the runs that differ only in seed; "
                     + ("sigma_i = pooled seed std / sqrt(n_i)" if fits[0].seed_std else "unweighted (no repeats)"),
        "skipped": [dataclasses.asdict(s) for s in skipped],
        "fits": {f.axis: {"x": f.xlabel, **f.fit.to_dict()} for f in fits},
        "target": target_info,
        "extrapolation": extrap,
        "plots": [PLOTS[f.axis] for f in fits],
    }


def plot(f: AxisFit, interval, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    lo = min(f.xs) / 2
    hi = max(f.target.x * 2, max(f.xs) * 2)
    grid = np.logspace(math.log10(lo), math.log10(hi), 200)
    draws = np.random.default_rng(0).multivariate_normal(np.asarray(f.fit.theta), np.asarray(f.fit.cov),
                                                         size=2000, method="eigh")
    preds = f.fit.predict(grid, draws)
    tail = 100 * (1 - interval.level) / 2
    band_lo, band_hi = np.nanpercentile(preds, [tail, 100 - tail], axis=0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    inside = grid <= max(f.xs)
    ax.fill_between(grid, band_lo, band_hi, color="C0", alpha=0.2, label=f"{interval.level:.0%} band")
    ax.plot(grid[inside], f.fit.predict(grid[inside]), color="C0", label=f"fit: {f.fit.law()}")
    ax.plot(grid[~inside], f.fit.predict(grid[~inside]), color="C0", ls="--", label="extrapolation")
    runs = [(g.x(f.axis, f.param_kind), p.val_loss) for g in f.groups for p in g.members]
    if any(g.n > 1 for g in f.groups):
        ax.scatter(*zip(*runs), color="0.55", s=10, zorder=5, label="runs (final val loss)")
        ax.errorbar(f.xs, f.ys, yerr=[g.loss_std for g in f.groups], fmt="o", color="k", capsize=3, zorder=4,
                    label="mean over seeds ± std")
    else:
        ax.scatter(f.xs, f.ys, color="k", zorder=3, label="runs (final val loss)")
    ax.errorbar([f.target.x], [interval.value], yerr=[[interval.value - interval.lower],
                                                    [interval.upper - interval.value]],
                fmt="o", color="C3", capsize=4, label=f"{f.target.label}: {interval.value:.3f} "
                                                       f"[{interval.lower:.3f}, {interval.upper:.3f}]")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(f.xlabel)
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, fits: list[AxisFit], out: Path, opts) -> list[Path]:
    """Plots and report under temporary names first; renamed only when all of them are written."""
    out.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for f in fits:
            final = out / PLOTS[f.axis]
            tmp = final.with_name(f".{final.stem}.tmp.png")
            plot(f, f.extrapolate(opts.level, opts.seed), tmp, f"loss vs {f.axis} ({report['fits'][f.axis]['form']})")
            staged.append((tmp, final))
        final = out / REPORT
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        staged.append((tmp, final))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    return [final for _, final in staged]


def print_summary(points: list[RunPoint], groups: list[Group], skipped: list[Skipped], report: dict) -> None:
    print(f"\n{len(points)} runs (params = {report['param_kind']}):")
    print(f"  {'run':<44} {'total':>10} {'non-emb':>10} {'active':>10} {'tokens':>10} {'FLOPs':>10} {'val loss':>9}")
    for p in sorted(points, key=lambda p: p.flops):
        print(f"  {p.name[:44]:<44} {p.size.total:>10,} {p.size.non_embedding:>10,} {p.size.active:>10,.0f} "
              f"{p.tokens_seen:>10,} {p.flops:>10.3g} {p.val_loss:>9.4f}")
    for s in skipped:
        print(f"  skipped {s.folder}: {s.reason}")
    if len(groups) < len(points):
        noise = report["seed_std_pooled"]
        print(f"\n{len(groups)} points (runs that differ only in seed averaged; pooled seed std "
              f"{noise if noise is None else f'{noise:.4f}'}, sigma_i = pooled / sqrt(n_i)):")
        for g in groups:
            print(f"  {g.name[:50]:<50} n={g.n}  val loss {g.loss:.4f} ± {g.loss_std:.4f}")
    for axis, fit in report["fits"].items():
        e = report["extrapolation"][axis]
        print(f"\nloss vs {axis} [{fit['form']}]: {fit['law']}   (rms residual {fit['rms_residual']:.4f})")
        print(f"  exponent b = {fit['b']:.4f} ± {fit['stderr']['b']:.4f}" + (f"; {fit['note']}" if fit["note"] else ""))
        print(f"  at {e['target']} (x = {e['x']:.3g}, {e['extrapolation_factor']:.3g}x the largest run): "
              f"L = {e['value']:.4f}, {e['level']:.0%} band [{e['lower']:.4f}, {e['upper']:.4f}], "
              f"delta-method std {e['delta_std']:.4f}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--runs", action="store_true", help="train one short run per --sizes entry, then fit")
    mode.add_argument("--from", dest="sources", nargs="+", type=Path, metavar="DIR",
                      help="run folders, folders of run folders, or training.db files to read")
    parser.add_argument("--out", type=Path, default=Path("outputs/scaling"), help="report, plots (and --runs folders)")
    parser.add_argument("--model", default="hydra", help="--runs: model family")
    parser.add_argument("--config", type=Path, default=REPO / "train_configs" / "debug.toml", help="--runs: base config")
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="--runs: flavors or KEY=VALUE,... overrides")
    parser.add_argument("--steps", nargs="+", type=int, default=[80], help="--runs: steps, one or one per size")
    parser.add_argument("--seq-len", type=int, default=64, help="--runs: sequence length")
    parser.add_argument("--batch-size", type=int, default=8, help="--runs: local batch size")
    parser.add_argument("--val-steps", type=int, default=8, help="--runs: validation batches of the final eval")
    parser.add_argument("--run-seeds", type=int, default=1, help="--runs: runs per size (job.seed + 0..N-1), "
                        "averaged into one point")
    parser.add_argument("--force", action="store_true", help="--runs: retrain points that are already there")
    parser.add_argument("--run-timeout", type=float, default=3600, help="--runs: seconds per run")
    parser.add_argument("--params", choices=PARAM_KINDS, default="active", help="parameter count the size fit uses")
    parser.add_argument("--form", choices=("auto", "saturating", "loglinear"), default="auto",
                        help="auto: L = a X^-b + c, the log-log line when c is not identifiable")
    parser.add_argument("--target-flavor", default="4B", help="flavor to extrapolate to (of the runs' model)")
    parser.add_argument("--target-seq-len", type=int, default=2048, help="its sequence length (active params, FLOPs)")
    parser.add_argument("--flop-budget", type=float, default=None, help="FLOPs to extrapolate to (default: the "
                        f"target flavor at {TOKENS_PER_PARAM} tokens per parameter)")
    parser.add_argument("--level", type=float, default=0.95, help="coverage of the uncertainty band")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    parser.add_argument("trainer_args", nargs="*", default=[],
                        help="after --: extra trainer arguments for every --runs run (e.g. -- --optimizer.lr 3e-3)")
    return parser.parse_args(argv)


def analyse(opts) -> int:
    if opts.runs:
        plans = plan_runs(opts)
        print(f"training {len(plans)} runs under {opts.out / 'runs'}", flush=True)
        for plan in plans:
            execute(plan, force=opts.force, timeout=opts.run_timeout)
        points, skipped = collect([plan.folder for plan in plans])
    else:
        points, skipped = collect(opts.sources)
    groups = group_runs(points)
    if len(groups) < 3:
        why = "; ".join(f"{s.folder}: {s.reason}" for s in skipped) or "none skipped"
        raise InputError(f"need at least 3 finished runs (of 3 different sizes or budgets) with a final validation "
                         f"loss, found {len(points)} run(s) at {len(groups)} point(s) ({why})")
    models = sorted({p.model for p in points})
    if len(models) > 1:
        raise InputError(f"runs of several model families ({', '.join(models)}): fit one family at a time")
    param_target, flop_target, target_info = targets(opts, models[0])
    fits = fit_axes(groups, opts, param_target, flop_target)
    report = build_report(points, groups, skipped, fits, target_info, opts)
    written = write_outputs(report, fits, opts.out, opts)
    print_summary(points, groups, skipped, report)
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        return analyse(opts)
    except InputError as err:
        print(f"scaling_analysis: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

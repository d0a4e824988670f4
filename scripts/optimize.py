#!/usr/bin/env python
"""Tune a small flavor's optimizer and routing hyperparameters with Optuna, at a fixed token budget.

Why: learning rate, warmup, weight decay and HYDRA's routing capacities interact, and a
hand sweep over five of them is slow and easy to get wrong. Optuna's TPE sampler proposes
values from the trials so far, the median pruner stops a trial whose intermediate
validation loss is worse than the median of earlier trials at the same step, and SQLite
storage makes a study resumable: run the script again with the same --study-name and it
adds trials to the same study (DESIGN §9).

    python scripts/optimize.py [--config train_configs/debug.toml] [--out outputs/optimize]
        [--n-trials 4] [--timeout SECONDS] [--study-name optimize] [--storage sqlite:///OUT/study.db]
        [--steps 40] [--seq-len 64] [--batch-size 8] [--val-freq 10] [--val-steps 4]
        [--space lr warmup_steps weight_decay mod_capacity mor_keep] [-- EXTRA TRAINER ARGS]

Every trial is a trainer subprocess (train.py) in OUT/trials/<study>/trial_NNNN with the
base config (--config, the budget flags and the extra trainer arguments) plus the trial's
values. The script polls the trial's metrics.jsonl for validation/loss lines, reports each
with trial.report(value, step) and, when trial.should_prune(), sends the trainer SIGTERM (it
stops after the current step) and marks the trial pruned. The objective is the validation
loss at the last step; the token budget is steps x batch x seq_len for every trial.

Search space (names for --space; the routing ones only where the model has them):

* lr: log-uniform in --lr-range (default 1e-4 .. 3e-2)
* warmup_steps: integer in 0 .. steps/2
* weight_decay: uniform in 0 .. 0.3
* mod_capacity (hydra with MoD): uniform in 0.25 .. 1, the fraction of tokens a MoD block takes
* mor_keep (hydra with top-k MoR and >= 2 recursions): uniform in 0.25 .. 1; the MoR
  capacities are keep^r for recursion step r (1, keep, keep^2, ...), so they start at 1 and
  never increase, as the model requires, with one parameter for any number of recursions

At the end the best trial is printed and its config written (--best-toml, default
OUT/best.toml): the resolved base config with the best values filled in, written by the same
TOML writer as the trainer's config.toml, checked to load back equal, then renamed into
place. The trainer takes it as is: ``python train.py --config OUT/best.toml``.

A base config that does not build (a missing --config, a value the trainer refuses) or a
resumed study whose budget or space differs: a message and exit status 2, before any trial
runs and with nothing written. Without optuna: exit 2 naming ``pip install -e ".[tune]"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra_titan.config import ConfigError, config_to_dict, load_config  # noqa: E402
from hydra_titan.config.job_config import JobConfig  # noqa: E402
from hydra_titan.config.toml_writer import to_toml  # noqa: E402

PARAMS = ("lr", "warmup_steps", "weight_decay", "mod_capacity", "mor_keep")
ROUTING_RANGE = (0.25, 1.0)
WEIGHT_DECAY_RANGE = (0.0, 0.3)
POLL_S = 0.5


class UsageError(Exception):
    """Bad input (config, storage, a resumed study of another budget): exit status 2."""


class TrialCrashed(Exception):
    """The trainer of one trial failed after start-up (the study goes on)."""


# ---------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """Which hyperparameters are searched, over what, and how a trial's values become trainer flags."""

    names: tuple[str, ...]
    lr_range: tuple[float, float]
    max_warmup: int
    recursions: int

    def suggest(self, trial) -> dict[str, Any]:
        suggest = {
            "lr": lambda: trial.suggest_float("lr", *self.lr_range, log=True),
            "warmup_steps": lambda: trial.suggest_int("warmup_steps", 0, self.max_warmup),
            "weight_decay": lambda: trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE),
            "mod_capacity": lambda: trial.suggest_float("mod_capacity", *ROUTING_RANGE),
            "mor_keep": lambda: trial.suggest_float("mor_keep", *ROUTING_RANGE),
        }
        return {name: suggest[name]() for name in self.names}

    def trainer_args(self, values: dict[str, Any]) -> list[str]:
        flags = {"lr": "--optimizer.lr", "warmup_steps": "--lr_scheduler.warmup_steps",
                 "weight_decay": "--optimizer.weight_decay", "mod_capacity": "--model.overrides.mod_capacity"}
        args = []
        for name, value in values.items():
            if name == "mor_keep":
                args += ["--model.overrides.mor_capacities", json.dumps(self.mor_capacities(value))]
            else:
                args += [flags[name], repr(value)]
        return args

    def mor_capacities(self, keep: float) -> list[float]:
        return [keep ** r for r in range(self.recursions)]

    def describe(self) -> dict[str, Any]:
        return {"names": list(self.names), "lr_range": list(self.lr_range), "max_warmup": self.max_warmup,
                "weight_decay_range": list(WEIGHT_DECAY_RANGE), "routing_range": list(ROUTING_RANGE),
                "recursions": self.recursions}


def applicable(model_args) -> dict[str, str]:
    """Searchable names -> '' when the model has them, else why not."""
    # asked of the model's arguments, not of its family's name: any model with these knobs qualifies
    has_mod = getattr(model_args, "mod_every", 0) > 0
    has_mor = getattr(model_args, "mor_mode", None) == "topk" and getattr(model_args, "recursions", 1) > 1
    return {
        "lr": "", "warmup_steps": "", "weight_decay": "",
        "mod_capacity": "" if has_mod else "the model has no MoD blocks",
        "mor_keep": "" if has_mor else "the model has no top-k MoR with >= 2 recursions",
    }


# ---------------------------------------------------------------------------
# The base config and the study's identity
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    steps: int
    seq_len: int
    batch_size: int
    val_freq: int
    val_steps: int

    @property
    def tokens(self) -> int:
        return self.steps * self.seq_len * self.batch_size

    def trainer_args(self) -> list[str]:
        return ["--training.steps", str(self.steps), "--training.seq_len", str(self.seq_len),
                "--training.local_batch_size", str(self.batch_size), "--validation.enable", "true",
                "--validation.freq", str(self.val_freq), "--validation.steps", str(self.val_steps),
                "--metrics.log_freq", str(self.val_freq), "--metrics.enable_tensorboard", "false"]


@dataclass(frozen=True)
class Base:
    """The resolved base config every trial starts from, and the model args it builds."""

    argv: list[str]
    cfg: JobConfig
    model_args: Any

    def fingerprint(self, space: SearchSpace, budget: Budget) -> str:
        """What makes two invocations the same study: resolved config (less the folder), budget, space."""
        cfg = config_to_dict(self.cfg)
        cfg["job"].pop("dump_folder")
        return json.dumps({"config": cfg, "budget": dataclasses.asdict(budget), "space": space.describe()},
                          sort_keys=True, default=str)


def build_base(opts, budget: Budget) -> Base:
    """Load and check the base config as the trainer would, in-process (milliseconds, no trial yet)."""
    from hydra_titan.components.tokenizer import build_tokenizer
    from hydra_titan.models import get_model_spec
    from hydra_titan.train import resolve_model_args

    argv = ["--config", str(opts.config), *budget.trainer_args(), *opts.trainer_args]
    try:
        cfg = load_config(argv + ["--job.dump_folder", str(opts.out / "base")])
        spec = get_model_spec(cfg.model.name)
        model_args = resolve_model_args(spec, cfg, build_tokenizer(cfg.tokenizer.name))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise UsageError(f"the base config does not build: {err}") from None
    return Base(argv=argv, cfg=cfg, model_args=model_args)


def build_space(opts, base: Base, budget: Budget) -> SearchSpace:
    reasons = applicable(base.model_args)
    names = opts.space if opts.space else [n for n in PARAMS if not reasons[n]]
    unusable = [f"{n}: {reasons[n]}" for n in names if reasons[n]]
    if unusable:
        raise UsageError("cannot search " + "; ".join(unusable))
    lo, hi = opts.lr_range
    if not 0 < lo < hi:
        raise UsageError(f"--lr-range needs 0 < LO < HI, got {lo} {hi}")
    return SearchSpace(names=tuple(dict.fromkeys(names)), lr_range=(lo, hi), max_warmup=budget.steps // 2,
                       recursions=getattr(base.model_args, "recursions", 1))


def trial_config(base: Base, space: SearchSpace, values: dict[str, Any], dump_folder: Path) -> JobConfig:
    return load_config(base.argv + space.trainer_args(values) + ["--job.dump_folder", str(dump_folder)])


# ---------------------------------------------------------------------------
# One trial: a trainer subprocess, watched through its metrics.jsonl
# ---------------------------------------------------------------------------


class MetricsTail:
    """Reads the validation/loss lines a running trainer appends to metrics.jsonl, once each."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def new_validations(self) -> list[tuple[int, float]]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        out = []
        for line in complete.decode("utf-8").splitlines():
            row = json.loads(line)
            if "validation/loss" in row:
                out.append((int(row["step"]), float(row["validation/loss"])))
        return out


@dataclass(frozen=True)
class TrialRunner:
    base: Base
    space: SearchSpace
    budget: Budget
    folder: Path           # OUT/trials/<study>
    trial_timeout: float

    def __call__(self, trial) -> float:
        values = self.space.suggest(trial)
        dump = self.folder / f"trial_{trial.number:04d}"
        shutil.rmtree(dump, ignore_errors=True)  # metrics.jsonl appends: a stale one would mix two trials
        dump.mkdir(parents=True)
        log = self.folder / f"trial_{trial.number:04d}.log"
        argv = self.base.argv + self.space.trainer_args(values) + ["--job.dump_folder", str(dump)]
        print(f"trial {trial.number}: {format_values(values)}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with log.open("w") as fh:
            proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env,
                                    stdout=fh, stderr=subprocess.STDOUT)
            try:
                last = self._watch(proc, trial, MetricsTail(dump / "metrics.jsonl"))
            except BaseException:
                stop(proc)
                raise
        if proc.returncode == 2:
            raise UsageError(f"trial {trial.number}: the trainer refused the config (exit 2), log {log}:\n"
                             + tail(log))
        if proc.returncode != 0:
            raise TrialCrashed(f"trial {trial.number}: trainer exit {proc.returncode}, log {log}:\n" + tail(log))
        if last is None or last[0] != self.budget.steps or not math.isfinite(last[1]):
            raise TrialCrashed(f"trial {trial.number}: no finite validation loss at step {self.budget.steps} "
                               f"(last: {last}), log {log}")
        print(f"trial {trial.number}: validation loss {last[1]:.4f}", flush=True)
        trial.set_user_attr("dump_folder", str(dump))
        return last[1]

    def _watch(self, proc: subprocess.Popen, trial, metrics: MetricsTail) -> tuple[int, float] | None:
        """Report validation losses as they appear; prune (SIGTERM) when the pruner says so."""
        import optuna

        deadline = time.monotonic() + self.trial_timeout
        last = None
        while True:
            done = proc.poll() is not None
            for step, value in metrics.new_validations():
                last = (step, value)
                trial.report(value, step)
                if step < self.budget.steps and trial.should_prune():
                    stop(proc)
                    print(f"trial {trial.number}: pruned at step {step} (validation loss {value:.4f})", flush=True)
                    raise optuna.TrialPruned(f"validation loss {value:.4f} at step {step}")
            if done:
                return last
            if time.monotonic() > deadline:
                stop(proc)
                raise TrialCrashed(f"trial {trial.number}: over --trial-timeout ({self.trial_timeout:g} s)")
            time.sleep(POLL_S)


def stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM (the trainer stops after its current step), then SIGKILL if it has not left in grace_s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def format_values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------


def open_study(optuna, opts, fingerprint: str):
    """Create the study, or load it (load_if_exists) after checking it was made for this budget and space.

    The TPE seed is offset by the trials already there, so a resumed study does not re-propose the
    startup trials of its first invocation.
    """
    try:
        existing = optuna.load_study(study_name=opts.study_name, storage=opts.storage)
    except KeyError:
        existing = None
    except Exception as err:  # a storage URL that does not open
        raise UsageError(f"--storage {opts.storage}: {err}") from None
    if existing is not None and existing.user_attrs.get("fingerprint", fingerprint) != fingerprint:
        raise UsageError(f"study {opts.study_name!r} in {opts.storage} was made for another base config, budget "
                         "or search space; pick another --study-name (or --storage) for this one")
    n_done = len(existing.trials) if existing is not None else 0
    sampler = optuna.samplers.TPESampler(seed=opts.seed + n_done)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=opts.prune_startup, n_warmup_steps=0)
    study = optuna.create_study(study_name=opts.study_name, storage=opts.storage, sampler=sampler, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    study.set_user_attr("fingerprint", fingerprint)
    return study, n_done


def print_trials(study) -> None:
    print(f"\nstudy {study.study_name}: {len(study.trials)} trials")
    for t in study.trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        if t.state.name == "PRUNED" and t.intermediate_values:
            step = max(t.intermediate_values)
            value = f"{t.intermediate_values[step]:.4f} @{step}"
        print(f"  #{t.number:<3} {t.state.name:<9} {value:>12}  {format_values(t.params)}")


def write_best_toml(cfg: JobConfig, path: Path, header: str) -> None:
    """The config as TOML (the trainer's writer), checked to load back equal, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + to_toml(config_to_dict(cfg)), encoding="utf-8")
    try:
        if load_config(["--config", str(tmp)]) != cfg:
            raise RuntimeError(f"{tmp} does not load back to the best trial's config")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def run_study(optuna, opts) -> int:
    budget = Budget(steps=opts.steps, seq_len=opts.seq_len, batch_size=opts.batch_size, val_freq=opts.val_freq,
                    val_steps=opts.val_steps)
    base = build_base(opts, budget)
    space = build_space(opts, base, budget)
    opts.out.mkdir(parents=True, exist_ok=True)
    study, n_done = open_study(optuna, opts, base.fingerprint(space, budget))
    print(f"study {opts.study_name!r} ({opts.storage}): {n_done} earlier trials; "
          f"{base.cfg.model.name}/{base.cfg.model.flavor}, {budget.steps} steps x {budget.batch_size} x "
          f"{budget.seq_len} = {budget.tokens:,} tokens per trial, validation every {budget.val_freq}; "
          f"searching {', '.join(space.names)}", flush=True)
    runner = TrialRunner(base=base, space=space, budget=budget, folder=opts.out / "trials" / opts.study_name,
                         trial_timeout=opts.trial_timeout)
    study.optimize(runner, n_trials=opts.n_trials, timeout=opts.timeout, catch=(TrialCrashed,))
    print_trials(study)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        print("no trial completed: nothing to write", file=sys.stderr)
        return 1
    best = study.best_trial
    cfg = trial_config(base, space, best.params, opts.out / "best_run")
    header = (f"# Best trial #{best.number} of Optuna study {opts.study_name!r} ({opts.storage}):\n"
              f"# validation loss {best.value:.4f} after {budget.tokens:,} tokens; {format_values(best.params)}\n"
              f"# train it: python train.py --config {opts.best_toml}\n\n")
    write_best_toml(cfg, opts.best_toml, header)
    print(f"\nbest trial #{best.number}: validation loss {best.value:.4f}  {format_values(best.params)}")
    if "mor_keep" in best.params:
        print(f"  mor_capacities = {space.mor_capacities(best.params['mor_keep'])}")
    print(f"best config written to {opts.best_toml} (python train.py --config {opts.best_toml})")
    return 0


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "train_configs" / "debug.toml"),
                        help="base config (a path or a name in train_configs/)")
    parser.add_argument("--out", type=Path, default=Path("outputs/optimize"), help="trials, study.db, best.toml")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///OUT/study.db)")
    parser.add_argument("--study-name", default="optimize", help="a study of this name in --storage resumes")
    parser.add_argument("--n-trials", type=int, default=4, help="trials to add in this invocation")
    parser.add_argument("--timeout", type=float, default=None, help="start no trial after this many seconds")
    parser.add_argument("--trial-timeout", type=float, default=1800, help="fail a trial running longer (s)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per trial (the token budget)")
    parser.add_argument("--seq-len", type=int, default=64, help="sequence length")
    parser.add_argument("--batch-size", type=int, default=8, help="local batch size")
    parser.add_argument("--val-freq", type=int, default=10, help="validate (and report to the pruner) every N steps")
    parser.add_argument("--val-steps", type=int, default=4, help="validation batches")
    parser.add_argument("--space", nargs="+", choices=PARAMS, default=None,
                        help="hyperparameters to search (default: every one the model has)")
    parser.add_argument("--lr-range", nargs=2, type=float, default=(1e-4, 3e-2), metavar=("LO", "HI"))
    parser.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    parser.add_argument("--prune-startup", type=int, default=2, help="trials completed before pruning starts")
    parser.add_argument("--best-toml", type=Path, default=None, help="where the best config goes (OUT/best.toml)")
    parser.add_argument("trainer_args", nargs="*", default=[], help="after --: extra trainer arguments for every trial")
    opts = parser.parse_args(argv)
    opts.storage = opts.storage or f"sqlite:///{(opts.out / 'study.db').resolve()}"
    opts.best_toml = opts.best_toml or opts.out / "best.toml"
    for name in ("n_trials", "steps", "seq_len", "batch_size", "val_freq", "val_steps"):
        if getattr(opts, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        import optuna
    except ImportError as err:
        print(f'optimize: optuna is not installed ({err}); install it with: pip install -e ".[tune]"',
              file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return run_study(optuna, opts)
    except UsageError as err:
        print(f"optimize: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

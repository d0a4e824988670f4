#!/usr/bin/env python
"""Does HYDRA pay? Train a list of arms at one token budget, then compare them per token, FLOP and second.

Why: the architecture exists to reach a loss sooner than a dense model. Loss per token says nothing
about that when a token costs 4x the compute; the question is answered on the wall-clock axis, with
compile time left out (a one-off) and the seed-to-seed spread beside the answer. Two steps:

    # train: one trainer subprocess per arm and seed, all in OUT/study.db (the run database)
    python scripts/ab_study.py run --out OUT --train SHARDS/train --val SHARDS/val --tokenizer TOK.tiktoken \\
        [--arms llama:0,llama:1,hydra_default:0,...] [--seq-len 2048 --batch 16 --passes 1 --evals 8] \\
        [-- TRAINER ARGS]
    # compare: PNGs (held-out bits/byte vs tokens, vs training FLOPs, vs wall-clock) + table.md/json
    python scripts/ab_study.py report --db OUT/study.db [MORE.db ...] --out docs/figures/study

Every arm gets the same data order (job.seed only seeds the weights and the shuffle; a second seed
changes both), the same token budget (``--passes`` over the training shards: one pass = each window
once), lr schedule, batch and sequence length, and the held-out split is evaluated in full every
``budget / evals`` steps. Wall-clock is summed from the log intervals (tokens / tokens-per-second;
the trainer leaves validation out of them) with the first step, which holds the compile, counted as
a typical step; the compile time is reported separately. An arm already completed in the database
is not trained again, so a study can be spread over several sessions or machines.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sqlite3
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Arm:
    """One architecture/optimizer setting: a config file plus trainer overrides."""

    config: str
    overrides: tuple[str, ...] = ()
    note: str = ""


MUON = ("--optimizer.name", "muon")
HYDRA_BEST = ("--model.overrides.mod_capacity", "0.125", "--model.overrides.mod_every", "2",
              "--model.overrides.recursions", "3")

ARMS: dict[str, Arm] = {
    "llama": Arm("train_configs/llama_100M.toml", note="dense baseline, same width and unique depth as hydra 100M"),
    "hydra_default": Arm("train_configs/100M.toml", note="original HYDRA: MoD 0.75 on every block, MoR 4 recursions"),
    "hydra_best": Arm("train_configs/100M.toml", HYDRA_BEST,
                      note="papers' best: MoD 12.5% on every other block, MoR 3 recursions (expert-choice)"),
    "hybrid_v1": Arm("train_configs/hybrid_v1.toml", ("--model.flavor", "125M"),
                     note="Mamba-2 on odd layers, attention on even"),
    "waaagh": Arm("train_configs/waaagh_100M.toml", note="SSM + local/sparse/memory/prediction heads + MoE"),
    "llama_muon": Arm("train_configs/llama_100M.toml", MUON, note="llama with torch Muon on the hidden matrices"),
    "hydra_muon": Arm("train_configs/100M.toml", MUON, note="hydra_default with torch Muon on the hidden matrices"),
}
DEFAULT_PLAN = ("llama:0", "llama:1", "hydra_default:0", "hydra_default:1", "hydra_best:0", "hybrid_v1:0",
                "waaagh:0", "llama_muon:0", "hydra_muon:0")
BASELINE = "llama"
# the same for every arm whatever its config file says (the configs differ in lr, schedule, AC, compile)
SHARED_SETTINGS = ("--lr_scheduler.decay_type", "wsd", "--lr_scheduler.decay_ratio", "0.2",
                   "--lr_scheduler.min_lr_factor", "0.1", "--optimizer.weight_decay", "0.1",
                   "--training.max_norm", "1.0", "--activation_checkpoint.mode", "none", "--compile.enable", "true")


class StudyError(Exception):
    """Bad input: the message names it; exit status 2."""


def parse_plan(text: str) -> list[tuple[str, int]]:
    """"llama:0,hydra_default:1" -> [("llama", 0), ("hydra_default", 1)] (a bare name is seed 0)."""
    plan = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, seed = item.partition(":")
        if name not in ARMS:
            raise StudyError(f"unknown arm {name!r}; known: {', '.join(ARMS)}")
        try:
            plan.append((name, int(seed or 0)))
        except ValueError:
            raise StudyError(f"arm {item!r}: the seed after ':' must be an integer") from None
    if not plan:
        raise StudyError("--arms names no arm")
    return plan


# ----------------------------------------------------------------------------------------------- run
def train_windows(train: str, tokenizer: str, seq_len: int) -> int:
    from hydra_titan.components.dataloader import load_windows

    return len(load_windows(source="shards", path=train, tokenizer=tokenizer, seq_len=seq_len))


def trainer_args(name: str, seed: int, opts, steps: int, db: Path) -> list[str]:
    arm = ARMS[name]
    warmup = max(1, round(opts.warmup_frac * steps))
    return ["--config", arm.config, *arm.overrides,
            "--job.dump_folder", str(opts.out / "runs" / f"{name}_s{seed}"), "--job.seed", str(seed),
            "--job.description", f"{name}:{seed}", "--training.steps", str(steps),
            "--training.local_batch_size", str(opts.batch), "--training.seq_len", str(opts.seq_len),
            "--data.source", "shards", "--data.path", opts.train, "--data.val_path", opts.val,
            "--tokenizer.name", opts.tokenizer, "--optimizer.lr", str(opts.lr),
            "--lr_scheduler.warmup_steps", str(warmup), *SHARED_SETTINGS,
            "--validation.enable", "true", "--validation.freq", str(max(1, steps // opts.evals)),
            "--validation.steps", "1000000", "--checkpoint.enable", "false",
            "--metrics.log_freq", str(opts.log_freq), "--metrics.enable_tensorboard", "false",
            "--metrics.db_file", str(db.resolve()), *opts.trainer_args]


def completed(db: Path) -> set[str]:
    if not db.exists():
        return set()
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT config_toml FROM runs WHERE status = 'completed'").fetchall()
    return {tomllib.loads(text)["job"]["description"] for (text,) in rows}


def cmd_run(opts) -> int:
    plan = parse_plan(opts.arms)
    for path in (opts.train, opts.val):
        if not (Path(path).exists() or glob.glob(path)):
            raise StudyError(f"{path} does not exist")
    try:
        windows = train_windows(opts.train, opts.tokenizer, opts.seq_len)
    except (OSError, ValueError) as e:  # a bad tokenizer or shard: the loader's message names it
        raise StudyError(str(e)) from None
    steps = int(opts.passes * windows) // opts.batch
    if steps < opts.evals:
        raise StudyError(f"the budget is {steps} steps ({windows} windows x {opts.passes} passes / batch "
                         f"{opts.batch}): fewer than --evals {opts.evals}")
    opts.out.mkdir(parents=True, exist_ok=True)
    db = opts.out / "study.db"
    print(f"budget: {steps} steps x {opts.batch} x {opts.seq_len} = {steps * opts.batch * opts.seq_len:,} tokens "
          f"({opts.passes} pass(es) over {windows} windows)", flush=True)
    for name, seed in plan:
        label = f"{name}:{seed}"
        if label in completed(db):
            print(f"{label}: already completed in {db}, skipped", flush=True)
            continue
        args = trainer_args(name, seed, opts, steps, db)
        log = opts.out / "runs" / f"{name}_s{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"{label}: {' '.join(args)}", flush=True)
        began = time.monotonic()
        with open(log, "w") as out:
            code = subprocess.call([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
        print(f"{label}: exit {code} after {time.monotonic() - began:.0f} s (log {log})", flush=True)
        if code != 0:
            print(open(log).read()[-3000:], file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------------- report
@dataclass
class RunCurve:
    """One trained arm and seed, read back from a run database."""

    arm: str
    seed: int
    params: int
    flops_per_token: float
    tokens_per_sec: float                     # median over the log intervals after the first
    compile_s: float                          # first interval minus a typical step
    evals: list[tuple[int, float, float]]     # (tokens seen, training seconds, bits/byte)
    train_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.train_s = self.evals[-1][1]

    @property
    def final_bpb(self) -> float:
        return self.evals[-1][2]


def training_seconds(rows: list[tuple[int, float]], tokens_per_step: int) -> tuple[dict[int, float], float, float]:
    """From (log step, tokens/s of the interval ending there) rows: ({step: cumulative training s},
    median tokens/s, compile s).

    The first interval (step 1 only) holds the compile; it is counted as one typical step and the rest
    is reported as compile time."""
    if len(rows) < 3:
        raise StudyError("a run needs at least 3 log rows to tell its step time from its compile time")
    rows = sorted(rows)
    if rows[0][0] != 1:
        raise StudyError(f"the first log row is step {rows[0][0]}, not 1: the compile cannot be told apart")
    per_step = [tokens_per_step / tps for _, tps in rows[1:]]
    step_s = statistics.median(per_step)
    clock, seconds = {1: step_s}, step_s
    for (s0, _), (s1, tps) in zip(rows, rows[1:]):
        seconds += (s1 - s0) * tokens_per_step / tps
        clock[s1] = seconds
    return clock, tokens_per_step / step_s, max(0.0, tokens_per_step / rows[0][1] - step_s)


def read_curves(dbs: list[Path]) -> list[RunCurve]:
    curves = []
    for db in dbs:
        if not db.exists():
            raise StudyError(f"{db} does not exist")
        with sqlite3.connect(db) as con:
            runs = con.execute("SELECT run_id, config_toml, params, flops_per_token, tokens_per_step FROM runs "
                               "WHERE status = 'completed'").fetchall()
            for run_id, text, params, fpt, tokens_per_step in runs:
                name, _, seed = tomllib.loads(text)["job"]["description"].partition(":")
                rows = con.execute("SELECT step, tokens_per_sec FROM steps WHERE run_id = ? ORDER BY step",
                                   (run_id,)).fetchall()
                clock, tps, compile_s = training_seconds(rows, tokens_per_step)
                evals = [(tokens, _clock_at(clock, step), bpb) for step, tokens, bpb in con.execute(
                    "SELECT step, tokens_seen, val_bpb FROM evals WHERE run_id = ? ORDER BY step", (run_id,))]
                if not evals:
                    raise StudyError(f"{db}: run {name}:{seed} has no validation rows")
                curves.append(RunCurve(name, int(seed or 0), params, fpt, tps, compile_s, evals))
    if not curves:
        raise StudyError(f"no completed run in {', '.join(map(str, dbs))}")
    return curves


def _clock_at(clock: dict[int, float], step: int) -> float:
    """Training seconds at ``step``, interpolated between log steps."""
    steps = sorted(clock)
    lo = max((s for s in steps if s <= step), default=steps[0])
    hi = min((s for s in steps if s >= step), default=steps[-1])
    if hi == lo:
        return clock[lo]
    return clock[lo] + (clock[hi] - clock[lo]) * (step - lo) / (hi - lo)


def time_to_reach(curve: RunCurve, target: float) -> float | None:
    """Training seconds at which the held-out bits/byte first reaches ``target`` (linear between evals)."""
    prev = None
    for _, seconds, bpb in curve.evals:
        if bpb <= target:
            if prev is None:
                return seconds
            (s0, b0) = prev
            return s0 + (seconds - s0) * (b0 - target) / (b0 - bpb)
        prev = (seconds, bpb)
    return None


def summarize(curves: list[RunCurve]) -> dict:
    """The table: per arm, final bpb, tokens/s, and the wall-clock ratio to reach llama's final bpb."""
    base = [c for c in curves if c.arm == BASELINE]
    if not base:
        raise StudyError(f"no completed {BASELINE!r} run: the wall-clock ratio needs the baseline")
    # the worse baseline seed's final bpb: every baseline seed reaches it, so its time is measured, not guessed
    target = max(c.final_bpb for c in base)
    base_time = statistics.mean(time_to_reach(c, target) for c in base)
    rows, ratios_by_arm = [], {}
    for arm in dict.fromkeys(c.arm for c in curves):
        runs = [c for c in curves if c.arm == arm]
        times = [time_to_reach(c, target) for c in runs]
        ratios = [t / base_time if t is not None else None for t in times]
        ratios_by_arm[arm] = ratios
        finals = [c.final_bpb for c in runs]
        rows.append({"arm": arm, "note": ARMS[arm].note if arm in ARMS else "", "seeds": [c.seed for c in runs],
                     "params": runs[0].params, "final_bpb": finals, "tokens_per_sec": [c.tokens_per_sec for c in runs],
                     "train_s": [c.train_s for c in runs], "compile_s": [c.compile_s for c in runs],
                     "train_pflop": [c.flops_per_token * c.evals[-1][0] / 1e15 for c in runs],
                     "time_to_target_s": times, "ratio": ratios})
    # seed-to-seed spread: the largest relative gap between two seeds of one arm, in time ratio and in bpb
    spread_ratio = max((max(r) - min(r) for r in ratios_by_arm.values() if len(r) > 1 and None not in r),
                       default=None)
    spread_bpb = max((max(r["final_bpb"]) - min(r["final_bpb"]) for r in rows if len(r["seeds"]) > 1),
                     default=None)
    for row in rows:
        known = [r for r in row["ratio"] if r is not None]
        if row["arm"] == BASELINE:
            row["verdict"] = "the baseline (mean ratio 1 by definition)"
        elif not known or len(known) < len(row["ratio"]):
            row["verdict"] = "does not reach the target within the budget"
        elif spread_ratio is None:
            row["verdict"] = "no second seed: spread unknown"
        else:
            mean = statistics.mean(known)
            outside = abs(mean - 1.0) > spread_ratio
            row["verdict"] = (("faster" if mean < 1 else "slower") + " than llama, "
                              + ("outside" if outside else "within") + " the seed spread")
    return {"target_bpb": target, "baseline_seconds": base_time, "seed_spread_ratio": spread_ratio,
            "seed_spread_bpb": spread_bpb, "rows": rows}


def _fmt(values: list, spec: str) -> str:
    shown = [format(v, spec) if v is not None else "-" for v in values]
    return " / ".join(shown)


def table_markdown(summary: dict) -> str:
    lines = [f"Target: llama's final held-out bits/byte {summary['target_bpb']:.4f} (the worse of its seeds), "
             f"reached by llama in {summary['baseline_seconds']:.1f} s of training on average.", "",
             "| arm | seeds | params | final bpb | tokens/s | train s | compile s | train PFLOP | s to target "
             "| ratio to llama | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['arm']} | {_fmt(r['seeds'], 'd')} | {r['params'] / 1e6:.1f}M | {_fmt(r['final_bpb'], '.4f')} "
                     f"| {_fmt(r['tokens_per_sec'], ',.0f')} | {_fmt(r['train_s'], '.1f')} "
                     f"| {_fmt(r['compile_s'], '.0f')} | {_fmt(r['train_pflop'], '.1f')} "
                     f"| {_fmt(r['time_to_target_s'], '.1f')} | {_fmt(r['ratio'], '.2f')} | {r['verdict']} |")
    if summary["seed_spread_ratio"] is not None:
        lines += ["", f"Seed-to-seed spread: {summary['seed_spread_ratio']:.3f} in the time ratio, "
                      f"{summary['seed_spread_bpb']:.4f} in final bits/byte (largest gap between two seeds of one arm)."]
    return "\n".join(lines) + "\n"


AXES = {  # file name -> (x label, x value of one eval of one run)
    "bpb_vs_tokens.png": ("tokens seen (millions)", lambda c, e: e[0] / 1e6),
    "bpb_vs_flops.png": ("training FLOPs executed (PFLOP)", lambda c, e: c.flops_per_token * e[0] / 1e15),
    "bpb_vs_wallclock.png": ("training wall-clock (s, compile and evaluation excluded)", lambda c, e: e[1]),
}


def plot(curves: list[RunCurve], summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {arm: plt.get_cmap("tab10")(i) for i, arm in enumerate(dict.fromkeys(c.arm for c in curves))}
    written = []
    for filename, (xlabel, x_of) in AXES.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in curves:
            ax.plot([x_of(c, e) for e in c.evals], [e[2] for e in c.evals], marker="o", markersize=3,
                    color=colors[c.arm], linestyle="-" if c.seed == 0 else "--", label=f"{c.arm} (seed {c.seed})")
        ax.axhline(summary["target_bpb"], color="grey", linewidth=0.8, linestyle=":", label="llama's final bpb")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out bits per byte")
        finals = [c.final_bpb for c in curves]
        ax.set_ylim(min(finals) - 0.05, max(e[2] for c in curves for e in c.evals[1:]) + 0.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def cmd_report(opts) -> int:
    curves = read_curves(opts.db)
    summary = summarize(curves)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "table.md").write_text(table_markdown(summary))
    (opts.out / "summary.json").write_text(json.dumps({**summary, "runs": [asdict(c) for c in curves]}, indent=1))
    for path in plot(curves, summary, opts.out):
        print(f"wrote {path}")
    print(table_markdown(summary))
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the arms into OUT/study.db")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--train", required=True, help="training shards (folder, file or glob)")
    run.add_argument("--val", required=True, help="held-out shards")
    run.add_argument("--tokenizer", required=True, help="the tiktoken file the shards were written with")
    run.add_argument("--arms", default=",".join(DEFAULT_PLAN), help="NAME[:SEED],... from: " + ", ".join(ARMS))
    run.add_argument("--seq-len", type=int, default=2048)
    run.add_argument("--batch", type=int, default=16)
    run.add_argument("--passes", type=float, default=1.0, help="token budget in passes over the training shards")
    run.add_argument("--evals", type=int, default=8, help="held-out evaluations over the budget")
    run.add_argument("--lr", type=float, default=6e-4)
    run.add_argument("--warmup-frac", type=float, default=0.1)
    run.add_argument("--log-freq", type=int, default=8)
    run.add_argument("trainer_args", nargs="*", help="after --: passed to every trainer run")
    report = sub.add_parser("report", help="plots and table from one or more study databases")
    report.add_argument("--db", type=Path, nargs="+", required=True)
    report.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    for name in ("batch", "seq_len", "evals", "log_freq"):
        if getattr(opts, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(opts, "passes", 1.0) <= 0 or not 0 <= getattr(opts, "warmup_frac", 0.0) < 1:
        parser.error("--passes must be > 0 and --warmup-frac in [0, 1)")
    try:
        return {"run": cmd_run, "report": cmd_report}[opts.command](opts)
    except StudyError as e:
        print(f"ab_study: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

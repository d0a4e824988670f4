#!/usr/bin/env python
"""Training throughput benchmark on synthetic tokens: one table, one JSON file.

Each case builds the model exactly as the trainer does (same parallelize path:
float8 -> AC -> compile -> FSDP2) and times full training steps (forward,
backward, clipping, AdamW) on random tokens after a warm-up. Reported per
device: tokens/s, step time, MFU on executed FLOPs and on dense-equivalent
FLOPs (DESIGN §4), TFLOP/s, peak memory. The bf16 GEMM peak is measured once
(8192^3) and printed beside the spec value.

    python scripts/benchmark.py --cases hydra:1B llama:1B --seq-len 2048 --batch 4 --ac selective
    python scripts/benchmark.py --cases hydra:1B --float8 none tensorwise rowwise
    python scripts/benchmark.py --cases llama:1B llama:1B:moe_num_experts=8,moe_every=2   # dense vs MoE
    torchrun --nproc_per_node=2 scripts/benchmark.py --cases hydra:1B      # FSDP over 2 GPUs
    torchrun --nproc_per_node=8 scripts/benchmark.py --cases hydra:1B --baseline 1gpu.json  # + efficiency
    torchrun --nproc_per_node=8 scripts/benchmark.py --cases hydra:1B -- --parallelism.dp_replicate 2  # HSDP 2x4
    python scripts/benchmark.py --cases hydra:1B llama:1B --batch 8 --cuda-graph off on   # whole-step capture

`--compare-torchtitan ANCHOR` runs torchtitan v0.2.2's own trainer (the folder
`bash ../shared/anchor/prepare.sh .anchor` lays out) and then our llama of its
shape (Llama-3.2-1B: 16 layers, 32 q / 8 kv heads of 64, FFN 8192, vocab
128256, batch 4, seq 2048) in the same process lifetime, for each of bf16 with
selective AC, bf16 without AC and float8 with selective AC, and prints the
tokens/s ratios. Under torchrun both run on every GPU of the launch (the anchor with NGPU = the
world size, started by rank 0 while the other ranks wait on the host):

    python scripts/benchmark.py --compare-torchtitan .anchor --cuda-graph on
    torchrun --nproc_per_node=8 scripts/benchmark.py --compare-torchtitan .anchor
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_titan.components.metrics import peak_flops  # noqa: E402
from hydra_titan.config import load_config  # noqa: E402
from hydra_titan.distributed.utils import (DistInfo, all_reduce, init_distributed, resolve_device_type,  # noqa: E402
                                           shutdown_and_exit)
from hydra_titan.models.common.moe import expert_load_summary  # noqa: E402
from hydra_titan.train import Trainer  # noqa: E402

logger = logging.getLogger("benchmark")


def measure_gemm_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def trainer_argv(model: str, flavor: str, *, seq_len: int, batch: int, steps: int, ac: str, compile_: bool,
                 float8: str = "none", fsdp_float8_all_gather: bool = False, cuda_graph: bool = False,
                 dtype: str = "bfloat16",
                 vocab_size: int = 100_352, dump_folder: str = "/tmp/hydra_titan_benchmark") -> list[str]:
    """Trainer overrides for a synthetic-token run of one case (shared with profile_step.py)."""
    argv = ["--model.name", model, "--model.flavor", flavor, "--training.seq_len", str(seq_len),
            "--training.local_batch_size", str(batch), "--training.steps", str(steps),
            "--training.mixed_precision_param", dtype, "--activation_checkpoint.mode", ac,
            "--compile.enable", str(compile_).lower(), "--training.cuda_graph", str(cuda_graph).lower(),
            "--validation.enable", "false",
            "--metrics.enable_tensorboard", "false", "--job.dump_folder", dump_folder,
            "--lr_scheduler.warmup_steps", "10", "--data.val_fraction", "0",
            # the flavor's real vocabulary (the built-in tokenizer only feeds the loader)
            "--model.overrides.vocab_size", str(vocab_size)]
    if float8 != "none":
        argv += ["--float8.enable", "true", "--float8.recipe", float8]
        if float8 == "tensorwise" and fsdp_float8_all_gather:
            argv += ["--float8.enable_fsdp_float8_all_gather", "true"]
    return argv


# torchtitan v0.2.2's Llama-3.2-1B-shaped anchor (../shared/anchor/run_tt.py) as our llama's overrides
ANCHOR_SHAPE = {"n_layers": "16", "n_heads": "32", "n_kv_heads": "8", "head_dim": "64",
                "ffn_dim_multiplier": "1.5", "rope_theta": "500000"}
ANCHOR_VOCAB, ANCHOR_BATCH = 128_256, 4
# anchor mode -> (our activation checkpointing, our float8 recipe)
ANCHOR_MODES = {"bf16_sel": ("selective", "none"), "bf16_noac": ("none", "none"), "f8_sel": ("selective", "tensorwise")}


def torchtitan_tokens_per_sec(anchor: Path, mode: str, out: Path, ngpu: int = 1) -> float:
    """Run the anchor's trainer for `mode` on `ngpu` GPUs and return its tokens/s per GPU: the mean
    of the `tps` of its step-30 and step-40 log lines (each the mean over the 10 steps before it)."""
    proc = subprocess.run(["bash", str(anchor / "run.sh"), mode], env={**os.environ, "OUT": str(out),
                                                                      "NGPU": str(ngpu)},
                          capture_output=True, text=True, timeout=600)
    tps = {int(step): float(value.replace(",", "")) for step, value in
           re.findall(r"step:\s*(\d+)\s.*?tps:\s*([\d,]+)", proc.stdout)}
    if 30 not in tps or 40 not in tps:
        raise RuntimeError(f"torchtitan {mode}: no step 30/40 tokens/s in its output (see {out}):\n"
                           + (proc.stdout + proc.stderr)[-2000:])
    return (tps[30] + tps[40]) / 2


def parse_case(case: str) -> tuple[str, str, dict[str, str]]:
    """`model:flavor[:key=value,...]` -> (model, flavor, model-arg overrides)."""
    parts = case.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"--cases: {case!r} is not model:flavor[:key=value,...]")
    overrides = {}
    for item in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--cases: {item!r} in {case!r} is not key=value")
        overrides[key] = value
    return parts[0], parts[1], overrides


def override_argv(overrides: dict[str, str]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in (f"--model.overrides.{key}", value)]


@dataclass(frozen=True)
class BenchRun:
    """One timed case: a model flavor (with model-arg overrides) and the switches it trains under;
    `anchor` names the torchtitan mode it is set beside, if any."""

    model: str
    flavor: str
    overrides: dict = field(default_factory=dict)
    compile: str = "on"
    ac: str = "selective"
    float8: str = "none"
    cuda_graph: str = "off"
    anchor: str | None = None

    def label(self) -> dict:
        flavor = " ".join([self.flavor, *(f"{k}={v}" for k, v in self.overrides.items())])
        label = {"model": self.model, "flavor": flavor, "compile": self.compile, "ac": self.ac,
                 "float8": self.float8, "cuda_graph": self.cuda_graph}
        return label if self.anchor is None else {"anchor": self.anchor, **label}

    def argv(self, opts) -> list[str]:
        return trainer_argv(self.model, self.flavor, seq_len=opts.seq_len, batch=opts.batch,
                            steps=opts.warmup + opts.steps, ac=self.ac, compile_=self.compile == "on",
                            float8=self.float8, fsdp_float8_all_gather=opts.fsdp_float8_all_gather,
                            cuda_graph=self.cuda_graph == "on", dtype=opts.dtype, vocab_size=opts.vocab_size,
                            dump_folder=opts.dump_folder) + override_argv(self.overrides) + opts.extra


# what makes two rows the same case in different layouts (the baseline match of --baseline)
CASE_KEYS = ("model", "flavor", "compile", "ac", "float8", "cuda_graph", "local_batch", "seq_len")


def add_efficiency(rows: list[dict], baseline_rows: list[dict]) -> None:
    """Per-device tokens/s of each row over that of the same case in `baseline_rows` (e.g. 1 GPU):
    the scaling efficiency, as `efficiency_vs_baseline` (absent when the baseline lacks the case)."""
    base = {tuple(r.get(k) for k in CASE_KEYS): r["tokens_per_sec_per_device"]
            for r in baseline_rows if "tokens_per_sec_per_device" in r}
    for row in rows:
        ref = base.get(tuple(row.get(k) for k in CASE_KEYS))
        if ref and "tokens_per_sec_per_device" in row:
            row["efficiency_vs_baseline"] = row["tokens_per_sec_per_device"] / ref


def run_case(argv: list[str], opts, dist_info: DistInfo, peak: float | None) -> dict:
    device = dist_info.device
    cfg = load_config(argv)
    trainer = Trainer(cfg, dist=dist_info)
    vocab = trainer.model_args.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (opts.batch, opts.seq_len + 1), generator=gen) for _ in range(4)]
    times, losses = [], []
    for i in range(opts.warmup + opts.steps):
        if i == opts.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tokens = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = trainer.train_step([(tokens[:, :-1], tokens[:, 1:])])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i % 10 == 0 or i == opts.warmup + opts.steps - 1:
            losses.append(all_reduce(result["parts"]["ce"]).item())  # each rank holds its share of the mean
    step_s = sorted(times[opts.warmup:])[len(times[opts.warmup:]) // 2]  # median: robust to stragglers
    tps = opts.batch * opts.seq_len / step_s
    dims = trainer.parallel_dims
    row = {"mesh": f"{dims.dp_replicate}x{dims.dp_shard}", "tokens_per_sec_per_device": tps, "step_ms": 1e3 * step_s,
           "tflops_exec": tps * trainer.flops.executed / 1e12, "tflops_dense": tps * trainer.flops.dense / 1e12,
           "mfu_exec_pct": 100 * tps * trainer.flops.executed / peak if peak else float("nan"),
           "mfu_dense_pct": 100 * tps * trainer.flops.dense / peak if peak else float("nan"),
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
           # a captured step's memory is the graph's private pool: reserved, counted here
           "peak_reserved_gib": (torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda"
                                 else float("nan")),
           "first_loss": losses[0], "last_loss": losses[-1],
           "finite": all(math.isfinite(x) for x in losses), "steps": opts.warmup + opts.steps}
    if "moe_load" in result["stats"]:  # the last step's global expert load, worst layer
        row["moe_load_max_over_min"] = expert_load_summary(result["stats"]["moe_load"])["max_over_min"].max().item()
    trainer.metrics.close()
    del trainer
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["hydra:1B", "llama:1B"],
                        help="model:flavor[:key=value,...] ... (model-arg overrides per case)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="local batch per device")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (compile happens here)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--compile", nargs="+", default=["on"], choices=["on", "off"])
    parser.add_argument("--ac", nargs="+", default=["selective"], choices=["none", "full", "selective"])
    parser.add_argument("--float8", nargs="+", default=["none"], choices=["none", "tensorwise", "rowwise"])
    parser.add_argument("--fsdp-float8-all-gather", action="store_true")
    parser.add_argument("--cuda-graph", nargs="+", default=["off"], choices=["on", "off"],
                        help="training.cuda_graph: replay each micro-step as a CUDA graph")
    parser.add_argument("--compare-torchtitan", metavar="ANCHOR", type=Path,
                        help="the anchor folder: run torchtitan v0.2.2 and our llama of its shape in each of "
                             f"{', '.join(ANCHOR_MODES)}; replaces --cases, --batch, --ac, --float8, --vocab-size")
    parser.add_argument("--baseline", type=Path, metavar="JSON",
                        help="a benchmark JSON of the same cases (e.g. on 1 GPU): adds each case's per-device "
                             "tokens/s over the baseline's (the scaling efficiency)")
    parser.add_argument("--vocab-size", type=int, default=100_352)
    parser.add_argument("--json", default="benchmark.json", help="where to write the results")
    parser.add_argument("--dump-folder", default="/tmp/hydra_titan_benchmark")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then trainer overrides for every case")
    opts = parser.parse_args()
    opts.extra = [a for a in opts.extra if a != "--"]
    if opts.compare_torchtitan is not None:
        if not (opts.compare_torchtitan / "run.sh").is_file():
            parser.error(f"--compare-torchtitan: {opts.compare_torchtitan} has no run.sh "
                         "(lay it out with: bash ../shared/anchor/prepare.sh .anchor)")
        opts.batch, opts.vocab_size, opts.cases = ANCHOR_BATCH, ANCHOR_VOCAB, []
    baseline_rows = []
    if opts.baseline is not None:
        try:
            baseline_rows = json.loads(opts.baseline.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--baseline: {opts.baseline} is not a benchmark JSON ({type(e).__name__}: {e})")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    dist_info = init_distributed(resolve_device_type("auto"))  # one group, shared by every case's Trainer
    device, rank0, world = dist_info.device, dist_info.rank == 0, dist_info.world_size
    gemm = measure_gemm_peak(device)
    spec_peak = peak_flops(device)
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "world_size": world, "seq_len": opts.seq_len, "local_batch": opts.batch,
              "measured_bf16_gemm_tflops": gemm / 1e12 if gemm else None,
              "spec_bf16_tflops": spec_peak / 1e12 if spec_peak else None}
    if rank0:
        print(json.dumps(header), flush=True)

    runs = [BenchRun(model, flavor, overrides, compile_, ac, float8, graph)  # all parsed before the first runs
            for (model, flavor, overrides), compile_, ac, float8, graph in itertools.product(
                [parse_case(case) for case in opts.cases], opts.compile, opts.ac, opts.float8, opts.cuda_graph)]
    torchtitan = {}
    if opts.compare_torchtitan is not None:
        out = Path(opts.json).resolve().parent
        for mode, (ac, float8) in ANCHOR_MODES.items():
            # the anchor runs on every GPU of this launch before any case holds GPU memory; rank 0 starts
            # it, the other ranks wait on the host (gloo), so they take no GPU time meanwhile
            if rank0:
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the GEMM probe's buffers
                torchtitan[mode] = torchtitan_tokens_per_sec(opts.compare_torchtitan.resolve(), mode, out, world)
                print(json.dumps({"torchtitan": mode, "ngpu": world, "tokens_per_sec": torchtitan[mode]}),
                      flush=True)
            if world > 1:
                torch.distributed.barrier(group=dist_info.cpu_group)
            runs += [BenchRun("llama", "1B", ANCHOR_SHAPE, "on", ac, float8, graph, anchor=mode)
                     for graph in opts.cuda_graph]

    rows = []
    for run in runs:
        label = {**run.label(), "local_batch": opts.batch, "seq_len": opts.seq_len, "world_size": world}
        try:
            row = {**label, **run_case(run.argv(opts), opts, dist_info, spec_peak)}
        except Exception as e:  # keep going: one failing case must not hide the others
            logger.exception("case %s failed", label)
            row = {**label, "error": f"{type(e).__name__}: {e}"}
        if run.anchor is not None and "tokens_per_sec_per_device" in row and rank0:
            row["torchtitan_tokens_per_sec"] = torchtitan[run.anchor]
            row["ratio_to_torchtitan"] = row["tokens_per_sec_per_device"] / torchtitan[run.anchor]
        rows.append(row)
        if rank0:
            print(json.dumps(row), flush=True)

    add_efficiency(rows, baseline_rows)
    if rank0:
        cols = ["model", "flavor", "mesh", "compile", "ac", "float8", "cuda_graph", "tokens_per_sec_per_device", "step_ms",
                "mfu_exec_pct", "mfu_dense_pct", "tflops_exec", "peak_mem_gib", "peak_reserved_gib", "first_loss",
                "last_loss"]
        if torchtitan:
            cols = ["anchor", *cols, "torchtitan_tokens_per_sec", "ratio_to_torchtitan"]
        cols += [c for c in ("efficiency_vs_baseline", "moe_load_max_over_min") if any(c in row for row in rows)]
        print(f"\n{header['device']}, torch {header['torch']}, {world} rank(s), seq {opts.seq_len}, "
              f"local batch {opts.batch}; bf16 GEMM measured {header['measured_bf16_gemm_tflops'] or 0:.0f} "
              f"TFLOP/s, spec {header['spec_bf16_tflops'] or 0:.0f}")
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
        for row in rows:
            cells = [row.get(c, "") for c in cols]
            if "error" in row:  # a failed case: its error where its figures would be
                cells[cols.index("tokens_per_sec_per_device")] = row["error"]
            print("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
        Path(opts.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    shutdown_and_exit(1 if any("error" in row for row in rows) else 0)


if __name__ == "__main__":
    main()

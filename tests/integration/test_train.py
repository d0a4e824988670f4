"""The trainer end to end on CPU: start-up errors, outputs, loss, signals, torchrun."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
# a tiny HYDRA so each run takes seconds on 2 cores
TINY = ["--config", "train_configs/debug.toml", "--training.seq_len", "64", "--training.local_batch_size", "4",
        "--model.overrides.dim", "128", "--model.overrides.n_heads", "2", "--model.overrides.head_dim", "32",
        "--metrics.log_freq", "1", "--validation.freq", "5", "--validation.steps", "2"]


def run_train(args: list[str], dump: Path, *, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(launcher + TINY + args + ["--job.dump_folder", str(dump)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(dump: Path) -> list[dict]:
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("args,needle", [
    (["--training.stepz", "3"], "training.stepz"),
    (["--training.steps", "three"], "training.steps"),
    (["--optimizer.name", "sgd"], "optimizer.name"),
    (["--debug.faults", "explode@3"], "debug.faults: unknown point 'explode'"),
    (["--checkpoint.on_save_error", "retry"], "checkpoint.on_save_error"),
    (["--config", "does/not/exist.toml"], "does/not/exist.toml"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, args, needle):
    proc = subprocess.run([sys.executable, "train.py", *args, "--job.dump_folder", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr + proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model.overrides.mod_capactiy", "0.5"], "mod_capactiy"),
    (["--model.overrides.vocab_size", "100"], "vocab_size"),
    (["--model.flavor", "2B"], "2B"),
    (["--data.source", "text", "--data.path", "/nonexistent/*.txt"], "/nonexistent"),
    (["--tokenizer.name", "/nonexistent/tok.tiktoken"], "/nonexistent/tok.tiktoken"),
    (["--data.source", "text", "--data.path", "README.md", "--data.val_path", "/nonexistent/val.txt"],
     "/nonexistent/val.txt"),
    (["--data.val_path", "README.md"], "data.val_path needs data.source = 'text' or 'shards', got 'demo'"),
    (["--training.cuda_graph", "true", "--training.device", "cpu"], "training.cuda_graph = true needs a CUDA device"),
])
def test_bad_model_or_data_settings_fail_at_start_up(tmp_path, args, needle):
    proc = run_train(["--training.steps", "2", *args], tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert needle in proc.stdout + proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("fault,needle", [
    ("id", "id 5000 at token offset 100 is outside the vocabulary"),
    ("tokenizer", "was written with tokenizer 'another'"),
    ("truncated", "(truncated write?)"),
])
def test_a_bad_shard_stops_the_run_before_a_step_naming_the_file(tmp_path, fault, needle):
    shard = tmp_path / "data" / "kjv.bin"
    text = tmp_path / "kjv.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n\n" * 400)
    made = subprocess.run([sys.executable, "scripts/prepare_data.py", "--input", str(text), "--output", str(shard)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    if fault == "id":
        tokens = np.fromfile(shard, dtype=np.uint16)
        tokens[100] = 5000
        tokens.tofile(shard)
    elif fault == "tokenizer":
        header = json.loads(shard.with_suffix(".json").read_text())
        header["tokenizer"], header["tokenizer_fingerprint"] = "another", "f" * 64
        shard.with_suffix(".json").write_text(json.dumps(header))
    else:
        shard.write_bytes(shard.read_bytes()[:-1])
    dump = tmp_path / "run"
    proc = run_train(["--data.source", "shards", "--data.path", str(shard), "--training.steps", "2"], dump)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert needle in out and str(shard) in out
    assert "step     1" not in out and not (dump / "metrics.jsonl").exists()


def test_validation_split_smaller_than_a_batch_turns_validation_off(tmp_path):
    proc = run_train(["--training.steps", "2", "--data.val_fraction", "0.0001",
                      "--training.local_batch_size", "4"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "validation is off" in proc.stdout + proc.stderr
    assert not any("validation/loss" in r for r in read_metrics(tmp_path))


def test_short_run_writes_metrics_tensorboard_and_config(tmp_path):
    proc = run_train(["--training.steps", "5"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = read_metrics(tmp_path)
    steps = [r["step"] for r in rows if "loss/ce" in r]
    assert steps == [1, 2, 3, 4, 5]
    first = rows[0]
    for key in ("loss/total", "loss/ce", "grad_norm", "lr", "throughput/tokens_per_sec_per_device",
                "memory/peak_gib", "routing/mod_selected_frac/block_0", "routing/mor_mean_depth/block_1"):
        assert key in first, key
    # training top-k keeps ceil(0.75 * 64) = 48 of 64 tokens in every routed block
    assert first["routing/mod_selected_frac/block_0"] == pytest.approx(48 / 64)
    assert any("validation/loss" in r for r in rows)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # the resolved config reloads to the same run
    from hydra_titan.config import load_config
    cfg = load_config(["--config", str(tmp_path / "config.toml")])
    assert cfg.training.seq_len == 64 and cfg.model.overrides["dim"] == 128


def test_loss_falls_on_the_builtin_corpus(tmp_path):
    proc = run_train(["--training.steps", "60", "--training.local_batch_size", "8", "--lr_scheduler.warmup_steps", "5",
                      "--validation.enable", "false"],
                     tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    losses = [r["loss/ce"] for r in read_metrics(tmp_path)]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    """2 micro-batches of 2 sequences == 1 batch of 4 (same windows, loss over global tokens)."""
    a = run_train(["--training.steps", "3", "--validation.enable", "false"], tmp_path / "a")
    b = run_train(["--training.steps", "3", "--validation.enable", "false", "--training.local_batch_size", "2",
                   "--training.gradient_accumulation_steps", "2", "--training.mixed_precision_param", "float32"],
                  tmp_path / "b")
    assert a.returncode == 0 and b.returncode == 0, b.stdout[-3000:]
    la = [r["loss/ce"] for r in read_metrics(tmp_path / "a")]
    lb = [r["loss/ce"] for r in read_metrics(tmp_path / "b")]
    assert la[0] == pytest.approx(lb[0], abs=1e-5)


def test_sigterm_stops_cleanly_between_steps(tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--training.steps", "10000", "--job.dump_folder",
                             str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by signal" in out
    assert len(read_metrics(tmp_path)) < 10000


def test_torchrun_two_cpu_ranks_runs_to_the_end(tmp_path):
    proc = subprocess.run(["./run_train.sh", *TINY[2:], "--training.steps", "6", "--metrics.rank_0_only", "false",
                           "--job.dump_folder", str(tmp_path)],
                          cwd=REPO, env={**os.environ, "NGPU": "2", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout
    assert "[rank0] " in proc.stdout and "[rank0]:" not in proc.stdout  # one rank prefix per line
    assert [r["step"] for r in read_metrics(tmp_path) if "loss/ce" in r][-1] == 6
    # every rank logs when asked to, each to its own file; the global loss is the same on both
    rank1 = [json.loads(line) for line in (tmp_path / "metrics_rank1.jsonl").read_text().splitlines()]
    assert len(rank1) == len(read_metrics(tmp_path))
    assert [r.get("loss/ce") for r in rank1] == [r.get("loss/ce") for r in read_metrics(tmp_path)]
    # rank 0 alone writes the run database: one run row of 2 ranks and each logged step once
    conn = sqlite3.connect(tmp_path / "training.db")
    assert conn.execute("SELECT count(*), world_size, status, last_step FROM runs").fetchone() == (1, 2, "completed", 6)
    steps = conn.execute("SELECT step, loss FROM steps ORDER BY step").fetchall()
    assert steps == [(r["step"], r["loss/total"]) for r in read_metrics(tmp_path) if "loss/total" in r]
    assert [s for s, _ in steps] == list(range(1, 7))
    assert conn.execute("SELECT step FROM evals").fetchall() == [(5,), (6,)]


def _text_file(path: Path, words: list[str], n: int) -> Path:
    rng = np.random.default_rng(len(words) + n)
    path.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(n)) + "\n")
    return path


def test_val_path_validates_on_a_held_out_set_and_trains_on_all_of_data_path(tmp_path):
    train = _text_file(tmp_path / "train.txt", ["the", "lord", "said", "unto", "moses", "and", "israel"], 400)
    held_out = _text_file(tmp_path / "held_out.txt", ["light", "darkness", "waters", "heaven", "earth"], 120)
    other = _text_file(tmp_path / "other.txt", ["seven", "golden", "candlesticks", "angel", "church"], 120)
    common = ["--training.steps", "3", "--validation.freq", "3", "--validation.steps", "1000",
              "--data.source", "text", "--data.path", str(train), "--data.val_fraction", "0.5"]
    a = run_train(common + ["--data.val_path", str(held_out)], tmp_path / "a")
    b = run_train(common + ["--data.val_path", str(other)], tmp_path / "b")
    for proc in (a, b):
        assert proc.returncode == 0, proc.stdout[-3000:]
    # all of data.path trains (val_fraction is not used), all of val_path validates
    import re
    train_windows = re.search(r"data text/\S+train.txt: \d+ tokens, (\d+) windows", a.stdout)
    assert train_windows and f"split train = windows [0, {train_windows.group(1)})" in a.stdout
    held = re.search(r"data text/\S+held_out.txt: \d+ tokens, (\d+) windows", a.stdout)
    assert held and f"held-out validation set = all {held.group(1)} windows" in a.stdout
    val_a = [r["validation/bpb"] for r in read_metrics(tmp_path / "a") if "validation/bpb" in r]
    val_b = [r["validation/bpb"] for r in read_metrics(tmp_path / "b") if "validation/bpb" in r]
    assert len(val_a) == len(val_b) == 1
    assert abs(val_a[0] - val_b[0]) > 1e-3  # the same weights scored on different held-out text
    # training itself did not change with the held-out set
    train_a = [r["loss/ce"] for r in read_metrics(tmp_path / "a") if "loss/ce" in r]
    assert train_a == [r["loss/ce"] for r in read_metrics(tmp_path / "b") if "loss/ce" in r]


def test_a_val_path_smaller_than_a_batch_turns_validation_off_naming_val_path(tmp_path):
    train = _text_file(tmp_path / "train.txt", ["the", "lord", "said", "unto", "moses", "and", "israel"], 400)
    tiny = _text_file(tmp_path / "tiny.txt", ["light", "darkness"], 10)  # under one window of 65 tokens
    proc = run_train(["--training.steps", "2", "--data.source", "text", "--data.path", str(train),
                      "--data.val_path", str(tiny)], tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout + proc.stderr
    assert "validation is off: data.val_path holds less than one global batch (a larger data.val_path" in out
    assert "val_fraction" not in out.split("validation is off")[1].splitlines()[0]


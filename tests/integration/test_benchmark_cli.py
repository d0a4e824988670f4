"""scripts/benchmark.py on CPU: the 2-rank table with the scaling efficiency against a 1-rank
baseline, the per-case mesh label, and the torchtitan anchor launched on the launch's GPU count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, load_script

# a tiny llama, timed for 3 steps after 1 warm-up (CPU, eager)
CASE = ["--cases", "llama:debug:dim=64,n_layers=2,n_heads=2,n_kv_heads=1,head_dim=32", "--seq-len", "32",
        "--batch", "2", "--steps", "3", "--warmup", "1", "--compile", "off", "--vocab-size", "4096"]


def _benchmark(args, tmp_path, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "localhost:0"]
    proc = subprocess.run(launcher + ["scripts/benchmark.py", *CASE, "--dump-folder", str(tmp_path / "dump"), *args],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_report_their_mesh_and_efficiency_against_one_rank(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _benchmark(["--json", str(one)], tmp_path)
    proc = _benchmark(["--json", str(two), "--baseline", str(one)], tmp_path, nproc=2)
    base, = json.loads(one.read_text())["rows"]
    row, = json.loads(two.read_text())["rows"]
    assert base["mesh"] == "1x1" and row["mesh"] == "1x2" and row["world_size"] == 2
    assert row["efficiency_vs_baseline"] == pytest.approx(
        row["tokens_per_sec_per_device"] / base["tokens_per_sec_per_device"])
    assert "efficiency_vs_baseline" in proc.stdout.splitlines()[-3]   # a column of the printed table


def test_a_failed_case_shows_its_error_and_the_run_exits_non_zero(tmp_path):
    out = tmp_path / "failed.json"
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", *CASE, "--vocab-size", "256", "--json", str(out),
                           "--dump-folder", str(tmp_path / "dump")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    row, = json.loads(out.read_text())["rows"]
    assert proc.returncode == 1 and "smaller than the vocabulary" in row["error"]
    table_row = proc.stdout.splitlines()[-1]
    assert table_row.count("smaller than the vocabulary") == 1      # once, not in every column


def test_hsdp_rows_say_their_mesh(tmp_path):
    out = tmp_path / "hsdp.json"
    _benchmark(["--json", str(out), "--", "--parallelism.dp_replicate", "2"], tmp_path, nproc=2)
    row, = json.loads(out.read_text())["rows"]
    assert row["mesh"] == "2x1" and row["last_loss"] > 0


def test_a_baseline_that_is_not_a_benchmark_json_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", *CASE, "--baseline", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--baseline" in proc.stderr and "not a benchmark JSON" in proc.stderr


def test_efficiency_matches_cases_by_label_not_by_order():
    bench = load_script("benchmark")
    case = {"model": "llama", "flavor": "1B", "compile": "on", "ac": "selective", "float8": "none",
            "cuda_graph": "off", "local_batch": 8, "seq_len": 2048}
    base = [{**case, "float8": "tensorwise", "tokens_per_sec_per_device": 300.0},
            {**case, "tokens_per_sec_per_device": 200.0}]
    rows = [{**case, "tokens_per_sec_per_device": 190.0}, {**case, "model": "hydra", "tokens_per_sec_per_device": 1.0},
            {**case, "error": "OutOfMemoryError"}]
    bench.add_efficiency(rows, base)
    assert rows[0]["efficiency_vs_baseline"] == pytest.approx(0.95)
    assert "efficiency_vs_baseline" not in rows[1] and "efficiency_vs_baseline" not in rows[2]


def test_the_anchor_runs_on_the_launch_gpu_count_and_its_tps_is_read(tmp_path):
    anchor = tmp_path / "anchor"
    anchor.mkdir()
    # a stand-in for the anchor's run.sh: echoes torchtitan's step lines, tps scaled by NGPU to show it arrived
    (anchor / "run.sh").write_text(
        'n=${NGPU:-1}\nfor s in 20 30 40; do echo "step: $s  loss: 9.1  tps: $((1000 * n + s)),0  mfu: 40%"; done\n')
    bench = load_script("benchmark")
    assert bench.torchtitan_tokens_per_sec(anchor, "bf16_sel", tmp_path, ngpu=8) == pytest.approx((80300 + 80400) / 2)
    (anchor / "run.sh").write_text('echo "== torchtitan bf16_sel rc=1"\n')
    with pytest.raises(RuntimeError, match="no step 30/40"):
        bench.torchtitan_tokens_per_sec(anchor, "bf16_sel", tmp_path)

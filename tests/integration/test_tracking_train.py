"""The run database through the trainer (DESIGN §9): a resume continues the run row without duplicate
steps, a database the trainer must not touch stops it at start-up, and query_training_db.py reads it."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys

from helpers import REPO, TINY_MODEL, TINY_RUN, losses, run_trainer

RUN = TINY_RUN + TINY_MODEL + ["--validation.freq", "3", "--validation.steps", "1"]


def query(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/query_training_db.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_a_resumed_run_continues_its_row_and_the_queries_read_it(tmp_path):
    ckpt = ["--checkpoint.enable", "true", "--checkpoint.interval", "4"]
    first = run_trainer(RUN + ckpt + ["--training.steps", "6"], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    straight = losses(tmp_path, "loss/total")
    # the run died after logging step 6 but before its checkpoint: it comes back from step 4
    shutil.rmtree(tmp_path / "checkpoint" / "step-6")
    second = run_trainer(RUN + ckpt + ["--training.steps", "8"], tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    conn = sqlite3.connect(tmp_path / "training.db")
    assert conn.execute("SELECT count(*), status, resumes, last_step FROM runs").fetchone() == (1, "completed", 1, 8)
    steps = conn.execute("SELECT step, loss FROM steps ORDER BY step").fetchall()
    assert [s for s, _ in steps] == list(range(1, 9))
    assert [loss for _, loss in steps[:6]] == straight  # steps 5 and 6 again, bitwise the same
    assert conn.execute("SELECT step FROM evals ORDER BY step").fetchall() == [(3,), (6,), (8,)]
    assert conn.execute("SELECT count(*) FROM routing_mor WHERE step = 1").fetchone()[0] == 2  # debug: 2 MoR blocks

    stats = query(str(tmp_path), "--stats")
    assert stats.returncode == 0, stats.stderr
    assert "| 1 | hydra/debug | completed | 1 | 8 |" in stats.stdout
    for flag in ("--ema", "--milestones", "--routing", "--spikes"):
        out = query(str(tmp_path / "training.db"), flag)
        assert out.returncode == 0 and out.stdout.strip(), (flag, out.stderr)
    assert "routing_mod at step" in query(str(tmp_path), "--routing").stdout
    assert query(str(tmp_path), "--compare", "1", "1").returncode == 0
    bad = query(str(tmp_path), "--run", "7")
    assert bad.returncode == 2 and "no run 7" in bad.stderr
    missing = query(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such run database" in missing.stderr


def test_a_database_from_a_newer_schema_stops_the_run_and_is_left_alone(tmp_path):
    db = tmp_path / "training.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '7')")
    before = db.read_bytes()
    proc = run_trainer(RUN + ["--training.steps", "2"], tmp_path)
    assert proc.returncode == 2
    assert "newer hydra_titan (schema 7" in proc.stdout + proc.stderr
    assert db.read_bytes() == before
    assert not (tmp_path / "config.toml").exists() and not (tmp_path / "metrics.jsonl").exists()
    # and with the database off the same folder trains
    off = run_trainer(RUN + ["--training.steps", "2", "--metrics.enable_db", "false"], tmp_path)
    assert off.returncode == 0 and db.read_bytes() == before

"""The run database (components/tracking.py): EMAs against the per-step recursion, spikes, resumes
without duplicate steps, routing rows, schema versions (newer refused, older migrated), locks."""

from __future__ import annotations

import sqlite3

import pytest

from hydra_titan.components import tracking
from hydra_titan.components.tracking import (EMA_DECAYS, LossEMAs, RunInfo, RunTracker, TrackingError, open_database,
                                             routing_rows)

INFO = RunInfo(model="hydra", flavor="debug", params=1000, active_params=800, flops_per_token=6e3, world_size=1,
               tokens_per_step=512, config_toml="[job]\n")


def scalars(loss: float, **extra) -> dict:
    return {"loss/total": loss, "loss/ce": loss - 0.1, "lr": 1e-3, "grad_norm": 0.5, **extra}


def reference_emas(losses_by_step: dict[int, float]) -> dict[str, float]:
    """The EMAs of a per-step recursion that sees each logged loss until the next log step."""
    out = {}
    for name, decay in EMA_DECAYS.items():
        ema, previous = None, None
        for step, loss in sorted(losses_by_step.items()):
            if ema is None:
                ema = loss
            else:
                for _ in range(step - previous):
                    ema = decay * ema + (1 - decay) * loss
            previous = step
        out[name] = ema
    return out


def test_the_emas_follow_the_per_step_recursion_at_any_log_frequency(tmp_path):
    logged = {1: 5.0, 3: 4.0, 13: 3.5, 14: 3.0, 50: 2.9}
    tracker = RunTracker(tmp_path / "t.db")
    tracker.start(INFO)
    for step, loss in logged.items():
        tracker.log_step(step, scalars(loss), tokens_seen=step * 512)
    row = tracker.conn.execute("SELECT * FROM steps WHERE step = 50").fetchone()
    for name, value in reference_emas(logged).items():
        assert row[name] == pytest.approx(value, rel=1e-12), name
    assert row["ce"] == pytest.approx(2.8) and row["tokens_seen"] == 50 * 512
    assert LossEMAs().update(7.0) == {name: 7.0 for name in EMA_DECAYS}


def test_a_planted_spike_is_detected_and_recorded(tmp_path):
    tracker = RunTracker(tmp_path / "t.db", spike_factor=1.5, spike_warmup=5)
    tracker.start(INFO)
    found = [tracker.log_step(step, scalars(3.0 if step != 20 else 6.0), 0) for step in range(1, 25)]
    spikes = [s for s in found if s is not None]
    assert [s.step for s in spikes] == [20] and spikes[0].ratio == pytest.approx(2.0)
    assert [tuple(r) for r in tracker.conn.execute("SELECT step, spike FROM steps WHERE spike = 1")] == [(20, 1)]
    (row,) = tracker.conn.execute("SELECT step, loss, ema_short, ratio FROM spikes").fetchall()
    assert tuple(row) == (20, 6.0, 3.0, 2.0)
    # before the warm-up, nothing counts as a spike
    early = RunTracker(tmp_path / "e.db", spike_factor=1.5, spike_warmup=5)
    early.start(INFO)
    assert [early.log_step(s, scalars(3.0 if s != 3 else 9.0), 0) for s in range(1, 5)] == [None] * 4


def test_a_resumed_run_continues_its_row_without_duplicate_steps(tmp_path):
    path = tmp_path / "t.db"
    losses = {step: 6.0 - 0.1 * step for step in range(1, 11)}
    straight = RunTracker(tmp_path / "straight.db")
    straight.start(INFO)
    for step, loss in losses.items():
        straight.log_step(step, scalars(loss), step)
    first = RunTracker(path)
    assert first.start(INFO) == 1
    for step in range(1, 9):  # logged up to 8, the last checkpoint was at 6
        first.log_step(step, scalars(losses[step]), step)
        if step % 2 == 0:
            first.log_eval(step, losses[step] + 0.2, 1.0, step)
    first.close()  # killed: no finish()
    second = RunTracker(path)
    assert second.start(INFO, resume_step=6) == 1
    for step in range(7, 11):
        second.log_step(step, scalars(losses[step]), step)
    second.finish("completed")
    conn = second.conn
    assert [r[0] for r in conn.execute("SELECT step FROM steps ORDER BY step")] == list(range(1, 11))
    assert [r[0] for r in conn.execute("SELECT step FROM evals ORDER BY step")] == [2, 4, 6]
    run = conn.execute("SELECT * FROM runs").fetchone()
    assert (run["status"], run["resumes"], run["last_step"]) == ("completed", 1, 10)
    assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    assert run["best_loss"] == pytest.approx(5.0) and run["best_val_loss"] == pytest.approx(losses[6] + 0.2)
    want = straight.conn.execute("SELECT ema_short, ema_medium, ema_long FROM steps WHERE step = 10").fetchone()
    got = conn.execute("SELECT ema_short, ema_medium, ema_long FROM steps WHERE step = 10").fetchone()
    assert tuple(got) == pytest.approx(tuple(want), rel=1e-12)  # the EMAs carried across the restart
    # a fresh start (step 0) in the same folder is a new run
    third = RunTracker(path)
    assert third.start(INFO) == 2


def test_routing_scalars_become_per_layer_rows():
    rows = routing_rows({"routing/mod_selected_frac/block_0": 0.7, "routing/mod_selected_frac/block_1": 0.6,
                         "routing/mor_mean_depth/block_0": 1.5, "routing/mor_depth_hist/block_0/depth_0": 0.0,
                         "routing/mor_depth_hist/block_0/depth_1": 0.5, "routing/mor_depth_hist/block_0/depth_2": 0.5,
                         "routing/moe_load_max_over_min/layer_3": 2.0, "routing/moe_dead_experts/layer_3": 1.0,
                         "moe/load_entropy_min": 1.2, "loss/total": 3.0})
    assert rows["routing_mod"] == {0: {"selected_frac": 0.7}, 1: {"selected_frac": 0.6}}
    assert rows["routing_mor"] == {0: {"mean_depth": 1.5, "depth_hist": "[0.0, 0.5, 0.5]"}}
    assert rows["routing_moe"] == {3: {"max_over_min": 2.0, "dead_experts": 1.0}}


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "t.db"
    open_database(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    before = path.read_bytes()
    with pytest.raises(TrackingError, match=r"newer hydra_titan \(schema 99; this version reads up to 1\)"):
        RunTracker(path)
    with pytest.raises(TrackingError, match="newer"):
        open_database(path, readonly=True)
    assert path.read_bytes() == before


def test_an_older_schema_is_migrated_forward(tmp_path, monkeypatch):
    path = tmp_path / "t.db"
    tracker = RunTracker(path)
    tracker.start(INFO)
    tracker.log_step(1, scalars(4.0), 1)
    tracker.close()
    monkeypatch.setattr(tracking, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(tracking, "MIGRATIONS", {1: ("ALTER TABLE runs ADD COLUMN note TEXT",)})
    conn = open_database(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
    assert conn.execute("SELECT loss, note FROM steps JOIN runs USING (run_id)").fetchone()[:] == (4.0, None)


def test_a_locked_database_and_a_foreign_file_are_clear_errors(tmp_path):
    path = tmp_path / "t.db"
    open_database(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer
    try:
        with pytest.raises(TrackingError, match="locked by another process"):
            open_database(path, timeout=0.1)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE things (x)")
    with pytest.raises(TrackingError, match="not a hydra_titan run database"):
        open_database(foreign)
    (tmp_path / "junk.db").write_text("not sqlite at all " * 100)
    with pytest.raises(TrackingError, match="junk.db"):
        open_database(tmp_path / "junk.db")
    with pytest.raises(TrackingError, match="no such run database"):
        open_database(tmp_path / "missing.db", readonly=True)

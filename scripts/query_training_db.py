#!/usr/bin/env python
"""Questions across the runs of a dump folder, answered from its run database (DESIGN §9).

    python scripts/query_training_db.py outputs/debug                    # --stats: every run
    python scripts/query_training_db.py outputs/debug/training.db --milestones --run 2
    python scripts/query_training_db.py outputs/debug --ema --start 1000
    python scripts/query_training_db.py outputs/debug --routing
    python scripts/query_training_db.py outputs/debug --compare 1 2

DB is the database file or the dump folder holding `training.db`. The database is opened read-only
(a running trainer may keep writing). --run picks the run (default: the newest). Exit status 2 for a
missing or unreadable database, an unknown run, or a database from a newer schema.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_titan.components.tracking import TrackingError, open_database  # noqa: E402


def table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def thin(rows: list, limit: int) -> list:
    """At most `limit` rows, evenly spaced, always keeping the last."""
    if len(rows) <= limit:
        return rows
    stride = len(rows) / limit
    picked = [rows[int(i * stride)] for i in range(limit - 1)]
    return picked + [rows[-1]]


def stats(conn: sqlite3.Connection, _run: int, _opts) -> str:
    rows = conn.execute("""
        SELECT r.run_id, r.model || '/' || r.flavor, r.status, r.world_size, r.last_step,
               (SELECT max(tokens_seen) FROM steps s WHERE s.run_id = r.run_id),
               (SELECT max(wall_s) FROM steps s WHERE s.run_id = r.run_id),
               (SELECT loss FROM steps s WHERE s.run_id = r.run_id ORDER BY step DESC LIMIT 1),
               r.best_loss, r.best_val_loss,
               (SELECT count(*) FROM spikes p WHERE p.run_id = r.run_id), r.resumes, r.started_at
        FROM runs r ORDER BY r.run_id""").fetchall()
    header = ["run", "model", "status", "ranks", "last step", "tokens", "wall s", "last loss", "best loss",
              "best val loss", "spikes", "resumes", "started"]
    return table(header, [list(r) for r in rows])


def milestones(conn: sqlite3.Connection, run: int, opts) -> str:
    """The first logged step at which the loss went below each level (levels --every apart, from the
    first logged loss down)."""
    rows = conn.execute("SELECT step, tokens_seen, wall_s, loss FROM steps WHERE run_id = ? AND loss IS NOT NULL "
                        "ORDER BY step", (run,)).fetchall()
    if not rows:
        return f"run {run} has no logged steps"
    first = rows[0]["loss"]
    out, level = [], first - opts.every
    for row in rows:
        while level > 0 and row["loss"] < level:
            out.append([round(level, 6), row["step"], row["tokens_seen"], row["wall_s"]])
            level -= opts.every
    return (f"run {run}: loss {first:.4f} at step {rows[0]['step']}; the first step below each level\n"
            + table(["loss below", "step", "tokens", "wall s"], out))


def ema(conn: sqlite3.Connection, run: int, opts) -> str:
    rows = conn.execute("SELECT step, loss, ema_short, ema_medium, ema_long, spike FROM steps "
                        "WHERE run_id = ? AND step >= ? ORDER BY step", (run, opts.start)).fetchall()
    return f"run {run}\n" + table(["step", "loss", "ema 0.99", "ema 0.999", "ema 0.9999", "spike"],
                                  [list(r) for r in thin(rows, opts.rows)])


def routing(conn: sqlite3.Connection, run: int, _opts) -> str:
    """Per layer, the newest routing statistics of each kind."""
    parts = []
    for name, columns in (("routing_mod", "selected_frac"), ("routing_mor", "mean_depth, depth_hist"),
                          ("routing_moe", "max_over_min, entropy, dead_experts")):
        last = conn.execute(f"SELECT max(step) FROM {name} WHERE run_id = ?", (run,)).fetchone()[0]
        if last is None:
            continue
        rows = conn.execute(f"SELECT layer, {columns} FROM {name} WHERE run_id = ? AND step = ? ORDER BY layer",
                            (run, last)).fetchall()
        header = ["layer", *[c.strip() for c in columns.split(",")]]
        parts.append(f"{name} at step {last}\n" + table(header, [list(r) for r in rows]))
    return "\n\n".join(parts) if parts else f"run {run} recorded no routing statistics (a dense model?)"


def spikes(conn: sqlite3.Connection, run: int, _opts) -> str:
    rows = conn.execute("SELECT step, loss, ema_short, ratio FROM spikes WHERE run_id = ? ORDER BY step",
                        (run,)).fetchall()
    return f"run {run}: {len(rows)} spike(s)\n" + table(["step", "loss", "short EMA", "ratio"], [list(r) for r in rows])


def compare(conn: sqlite3.Connection, _run: int, opts) -> str:
    a, b = opts.compare
    for run in (a, b):
        check_run(conn, run)
    rows = conn.execute("""
        SELECT x.step, x.loss, y.loss, x.loss - y.loss, x.ema_short - y.ema_short
        FROM steps x JOIN steps y ON x.step = y.step WHERE x.run_id = ? AND y.run_id = ? ORDER BY x.step""",
                        (a, b)).fetchall()
    evals = conn.execute("""
        SELECT x.step, x.val_loss, y.val_loss, x.val_loss - y.val_loss
        FROM evals x JOIN evals y ON x.step = y.step WHERE x.run_id = ? AND y.run_id = ? ORDER BY x.step""",
                         (a, b)).fetchall()
    out = [f"runs {a} and {b}: {len(rows)} common log steps",
           table(["step", f"loss {a}", f"loss {b}", "difference", "short EMA difference"],
                 [list(r) for r in thin(rows, opts.rows)])]
    if evals:
        out.append(table(["step", f"val loss {a}", f"val loss {b}", "difference"], [list(r) for r in evals]))
    return "\n\n".join(out)


QUERIES = {"stats": stats, "milestones": milestones, "ema": ema, "routing": routing, "spikes": spikes,
           "compare": compare}


def check_run(conn: sqlite3.Connection, run: int) -> None:
    if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run,)).fetchone() is None:
        known = [r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY run_id")]
        raise LookupError(f"no run {run} in this database (runs: {known})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("db", help="training.db, or the dump folder holding it")
    which = parser.add_mutually_exclusive_group()
    for name in ("stats", "milestones", "ema", "routing", "spikes"):
        which.add_argument(f"--{name}", dest="query", action="store_const", const=name)
    which.add_argument("--compare", nargs=2, type=int, metavar=("RUN", "RUN"))
    parser.add_argument("--run", type=int, help="the run to query (default: the newest)")
    parser.add_argument("--start", type=int, default=0, help="--ema: from this step")
    parser.add_argument("--rows", type=int, default=20, help="--ema / --compare: at most this many rows")
    parser.add_argument("--every", type=float, default=0.5, help="--milestones: loss levels this far apart (nats)")
    opts = parser.parse_args(argv)
    query = "compare" if opts.compare else (opts.query or "stats")
    if opts.rows < 2 or opts.every <= 0:
        parser.error("--rows must be >= 2 and --every > 0")
    path = Path(opts.db)
    if path.is_dir():
        path = path / "training.db"
    try:
        conn = open_database(path, readonly=True)
    except TrackingError as e:
        parser.error(str(e))
    try:
        newest = conn.execute("SELECT max(run_id) FROM runs").fetchone()[0]
        if newest is None:
            parser.error(f"{path} holds no runs yet")
        run = opts.run if opts.run is not None else newest
        check_run(conn, run)
        print(QUERIES[query](conn, run, opts))
    except LookupError as e:
        parser.error(str(e))
    except sqlite3.DatabaseError as e:
        parser.error(f"{path}: {e}")
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

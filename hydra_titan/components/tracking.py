"""The run database (DESIGN §9): every run of a dump folder in one SQLite file, for cross-run queries.

metrics.jsonl and TensorBoard hold one run's curves; researchers also ask questions across runs
(which capacity reached 3.5 first, where did the loss spike, how did routing drift after the
resume). The original HYDRA answers them from `training.db`; this is that database on stdlib
`sqlite3`:

* `runs`: one row per run (model, flavor, sizes, FLOPs per token, config, git commit, start/end,
  status, last step, best losses). A resumed run continues its row.
* `steps`: the scalars of each log step plus EMAs of the loss at 0.99 / 0.999 / 0.9999 (short,
  medium, long) and a spike flag; `evals`: validation loss and bits-per-byte;
  `routing_mod` / `routing_mor` / `routing_moe`: per-layer routing statistics; `spikes`.

Only rank 0 writes, at log steps, from the scalars the trainer has already copied to the host (no
extra device sync). WAL mode lets `scripts/query_training_db.py` read while a run writes. The
schema version is stored in `meta` and older databases are migrated forward (`MIGRATIONS`); a
database from a newer schema, or one another process holds locked, is refused with a clear error
before anything is written.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
EMA_DECAYS = {"ema_short": 0.99, "ema_medium": 0.999, "ema_long": 0.9999}

_TABLES = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE runs (
        run_id INTEGER PRIMARY KEY AUTOINCREMENT, started_at TEXT NOT NULL, ended_at TEXT,
        status TEXT NOT NULL, model TEXT, flavor TEXT, params INTEGER, active_params INTEGER,
        flops_per_token REAL, world_size INTEGER, tokens_per_step INTEGER, git_commit TEXT,
        config_toml TEXT, last_step INTEGER NOT NULL DEFAULT 0, best_loss REAL, best_val_loss REAL,
        resumes INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE steps (
        run_id INTEGER NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL, tokens_seen INTEGER,
        wall_s REAL, loss REAL, ce REAL, aux REAL, ponder REAL, lr REAL, grad_norm REAL,
        tokens_per_sec REAL, mfu REAL, memory_gib REAL, ema_short REAL, ema_medium REAL,
        ema_long REAL, spike INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run_id, step))""",
    """CREATE TABLE evals (
        run_id INTEGER NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL, tokens_seen INTEGER,
        val_loss REAL, val_bpb REAL, PRIMARY KEY (run_id, step))""",
    """CREATE TABLE routing_mod (
        run_id INTEGER NOT NULL, step INTEGER NOT NULL, layer INTEGER NOT NULL, selected_frac REAL,
        PRIMARY KEY (run_id, step, layer))""",
    """CREATE TABLE routing_mor (
        run_id INTEGER NOT NULL, step INTEGER NOT NULL, layer INTEGER NOT NULL, mean_depth REAL,
        depth_hist TEXT, PRIMARY KEY (run_id, step, layer))""",
    """CREATE TABLE routing_moe (
        run_id INTEGER NOT NULL, step INTEGER NOT NULL, layer INTEGER NOT NULL, max_over_min REAL,
        entropy REAL, dead_experts REAL, PRIMARY KEY (run_id, step, layer))""",
    """CREATE TABLE spikes (
        run_id INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL, ema_short REAL, ratio REAL,
        PRIMARY KEY (run_id, step))""",
)
STEP_TABLES = ("steps", "evals", "routing_mod", "routing_mor", "routing_moe", "spikes")

# version v -> the statements that bring a database from v to v + 1
MIGRATIONS: dict[int, tuple[str, ...]] = {}

# trainer scalar name -> steps column
STEP_COLUMNS = {"loss/total": "loss", "loss/ce": "ce", "loss/aux": "aux", "loss/ponder": "ponder", "lr": "lr",
                "grad_norm": "grad_norm", "throughput/tokens_per_sec_per_device": "tokens_per_sec",
                "throughput/mfu_pct": "mfu", "memory/peak_gib": "memory_gib"}
_ROUTING_KEY = re.compile(r"routing/(?P<name>[a-z_]+)/(?:block|layer)_(?P<layer>\d+)(?:/depth_(?P<depth>\d+))?$")
_MOE_COLUMNS = {"moe_load_max_over_min": "max_over_min", "moe_load_entropy": "entropy",
                "moe_dead_experts": "dead_experts"}


class TrackingError(RuntimeError):
    """The database cannot be used (newer schema, locked, not a database); nothing was written."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN ... COMMIT (ROLLBACK on error) on an autocommit connection: a log step lands whole or not."""
    conn.execute("BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int | None:
    """The stored schema version; None for an empty database."""
    has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    if not has_meta:
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if tables:
            raise TrackingError("it holds tables but no schema version: not a hydra_titan run database")
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else int(row[0])


def open_database(path: str | Path, *, readonly: bool = False, timeout: float = 5.0) -> sqlite3.Connection:
    """A connection to the run database at `path` (rows as sqlite3.Row).

    Writable: created with the current schema if new, migrated forward if older, and held with a
    write lock taken up front, so a database another run is writing fails here and not mid-run.
    Readonly: the file must exist and is never changed (an older schema is read as it is)."""
    path = Path(path)
    if readonly and not path.is_file():
        raise TrackingError(f"{path}: no such run database")
    try:
        conn = (sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout) if readonly
                else sqlite3.connect(path, timeout=timeout, isolation_level=None))
        conn.row_factory = sqlite3.Row
        version = schema_version(conn)
    except sqlite3.DatabaseError as e:
        raise TrackingError(f"{path}: {e}") from None
    except TrackingError as e:
        raise TrackingError(f"{path}: {e}") from None
    if version is not None and version > SCHEMA_VERSION:
        conn.close()
        raise TrackingError(f"{path} was written by a newer hydra_titan (schema {version}; this version reads up "
                            f"to {SCHEMA_VERSION}); it was left untouched: upgrade, or point metrics.db_file "
                            "elsewhere")
    if readonly:
        return conn
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")  # the write lock now: a locked database is a start-up error
        if version is None:
            for statement in _TABLES:
                conn.execute(statement)
            version = SCHEMA_VERSION
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            version += 1
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(version),))
        conn.execute("COMMIT")
    except sqlite3.OperationalError as e:
        conn.close()
        if "locked" in str(e) or "busy" in str(e):
            raise TrackingError(f"{path} is locked by another process (another run writing this dump folder?); "
                                "nothing was written") from None
        raise TrackingError(f"{path}: {e}") from None
    return conn


@dataclass
class LossEMAs:
    """Per-step EMAs of the loss (ema <- d·ema + (1 - d)·loss for each decay of EMA_DECAYS), kept at log
    steps: `steps` training steps since the last update count as that many steps at this loss,
    ema <- d^steps·ema + (1 - d^steps)·loss, so the windows are in steps whatever metrics.log_freq is.
    Started at the first loss."""

    values: dict[str, float] = field(default_factory=dict)

    def update(self, loss: float, steps: int = 1) -> dict[str, float]:
        for name, decay in EMA_DECAYS.items():
            previous = self.values.get(name)
            keep = decay ** steps
            self.values[name] = loss if previous is None else keep * previous + (1 - keep) * loss
        return dict(self.values)


@dataclass(frozen=True)
class RunInfo:
    """What a run row records about the run."""

    model: str
    flavor: str
    params: int
    active_params: int
    flops_per_token: float
    world_size: int
    tokens_per_step: int
    config_toml: str
    git_commit: str | None = None


@dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    ema_short: float

    @property
    def ratio(self) -> float:
        return self.loss / self.ema_short


def routing_rows(scalars: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """The trainer's flat routing scalars (`routing/<name>/block_<i>[/depth_<d>]`) as per-layer rows of
    routing_mod, routing_mor and routing_moe."""
    tables: dict[str, dict[int, dict[str, Any]]] = {"routing_mod": {}, "routing_mor": {}, "routing_moe": {}}
    for key, value in scalars.items():
        match = _ROUTING_KEY.match(key)
        if match is None:
            continue
        name, layer = match["name"], int(match["layer"])
        if name == "mod_selected_frac":
            tables["routing_mod"].setdefault(layer, {})["selected_frac"] = value
        elif name == "mor_mean_depth":
            tables["routing_mor"].setdefault(layer, {})["mean_depth"] = value
        elif name == "mor_depth_hist" and match["depth"] is not None:
            tables["routing_mor"].setdefault(layer, {}).setdefault("hist", {})[int(match["depth"])] = value
        elif name in _MOE_COLUMNS:
            tables["routing_moe"].setdefault(layer, {})[_MOE_COLUMNS[name]] = value
    for row in tables["routing_mor"].values():
        hist = row.pop("hist", {})
        row["depth_hist"] = json.dumps([hist[d] for d in sorted(hist)])
    return tables


class RunTracker:
    """Rank 0's writer: one run row, its steps, evaluations, routing and spikes.

    A spike is a logged loss above `spike_factor` × the short EMA before it, once `spike_warmup`
    log steps have set the EMA."""

    def __init__(self, path: str | Path, *, spike_factor: float = 1.5, spike_warmup: int = 10):
        self.path = Path(path)
        self.spike_factor, self.spike_warmup = spike_factor, spike_warmup
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = open_database(self.path)
        self.run_id: int | None = None
        self.emas = LossEMAs()
        self._logged = 0
        self._last_step = 0
        self._wall_base = 0.0
        self._started = time.monotonic()

    def start(self, info: RunInfo, resume_step: int = 0) -> int:
        """Open the run row: the newest run when resuming from `resume_step` > 0 (rows past it, the work
        the restart repeats, are dropped), else a new one. Returns the run id."""
        latest = self.conn.execute("SELECT run_id FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
        with transaction(self.conn):
            if resume_step > 0 and latest is not None:
                self.run_id = latest["run_id"]
                for table in STEP_TABLES:
                    self.conn.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", (self.run_id, resume_step))
                self.conn.execute("UPDATE runs SET status = 'running', ended_at = NULL, last_step = ?, "
                                  "resumes = resumes + 1, world_size = ?, git_commit = ? WHERE run_id = ?",
                                  (resume_step, info.world_size, info.git_commit, self.run_id))
                self._restore(resume_step)
            else:
                cur = self.conn.execute(
                    "INSERT INTO runs (started_at, status, model, flavor, params, active_params, flops_per_token, "
                    "world_size, tokens_per_step, git_commit, config_toml, last_step) "
                    "VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (_now(), info.model, info.flavor, info.params, info.active_params, info.flops_per_token,
                     info.world_size, info.tokens_per_step, info.git_commit, info.config_toml, resume_step))
                self.run_id = cur.lastrowid
        return self.run_id

    def _restore(self, resume_step: int) -> None:
        """EMAs, the warm-up count and the wall clock as they were at `resume_step`."""
        row = self.conn.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY step DESC LIMIT 1",
                                (self.run_id,)).fetchone()
        count = self.conn.execute("SELECT count(*) FROM steps WHERE run_id = ?", (self.run_id,)).fetchone()[0]
        if row is not None:
            self.emas = LossEMAs({name: row[name] for name in EMA_DECAYS if row[name] is not None})
            self._wall_base = row["wall_s"] or 0.0
            self._last_step = row["step"]
        self._logged = count
        self._refresh_best()

    def log_step(self, step: int, scalars: dict[str, Any], tokens_seen: int) -> Spike | None:
        """Record one log step (the trainer's scalars, host values); returns the spike it is, if any."""
        loss = scalars.get("loss/total")
        if loss is not None and not math.isfinite(loss):
            loss = None  # a step the non-finite guard skipped: it moves neither the EMAs nor the best loss
        spike = None
        if loss is not None:
            short = self.emas.values.get("ema_short")
            if short is not None and self._logged >= self.spike_warmup and loss > self.spike_factor * short:
                spike = Spike(step, loss, short)
            emas = self.emas.update(loss, max(1, step - self._last_step))
        else:
            emas = dict(self.emas.values)
        self._logged += 1
        self._last_step = step
        columns = {col: scalars.get(key) for key, col in STEP_COLUMNS.items()}
        row = {"run_id": self.run_id, "step": step, "tokens_seen": tokens_seen, "wall_s": self._wall(),
               **columns, **{name: emas.get(name) for name in EMA_DECAYS}, "spike": int(spike is not None)}
        with transaction(self.conn):
            self._upsert("steps", row)
            for table, layers in routing_rows(scalars).items():
                for layer, values in layers.items():
                    self._upsert(table, {"run_id": self.run_id, "step": step, "layer": layer, **values})
            if spike is not None:
                self._upsert("spikes", {"run_id": self.run_id, "step": step, "loss": spike.loss,
                                        "ema_short": spike.ema_short, "ratio": spike.ratio})
            self.conn.execute("UPDATE runs SET last_step = ? WHERE run_id = ?", (step, self.run_id))
            if loss is not None:
                self.conn.execute("UPDATE runs SET best_loss = min(coalesce(best_loss, ?), ?) WHERE run_id = ?",
                                  (loss, loss, self.run_id))
        return spike

    def log_eval(self, step: int, val_loss: float, val_bpb: float, tokens_seen: int) -> None:
        with transaction(self.conn):
            self._upsert("evals", {"run_id": self.run_id, "step": step, "tokens_seen": tokens_seen,
                                   "val_loss": val_loss, "val_bpb": val_bpb})
            self.conn.execute("UPDATE runs SET best_val_loss = min(coalesce(best_val_loss, ?), ?) WHERE run_id = ?",
                              (val_loss, val_loss, self.run_id))

    def finish(self, status: str) -> None:
        """Close the run row: 'completed', 'stopped' (a signal) or 'failed'."""
        with transaction(self.conn):
            self.conn.execute("UPDATE runs SET status = ?, ended_at = ? WHERE run_id = ?", (status, _now(), self.run_id))

    def close(self) -> None:
        self.conn.close()

    def _wall(self) -> float:
        return self._wall_base + time.monotonic() - self._started

    def _refresh_best(self) -> None:
        """Best losses over the rows that survive a resume."""
        self.conn.execute(
            "UPDATE runs SET best_loss = (SELECT min(loss) FROM steps WHERE run_id = :r), "
            "best_val_loss = (SELECT min(val_loss) FROM evals WHERE run_id = :r) WHERE run_id = :r",
            {"r": self.run_id})

    def _upsert(self, table: str, row: dict[str, Any]) -> None:
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.conn.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", tuple(row.values()))

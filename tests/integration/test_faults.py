"""DESIGN §12 with real processes: ranks SIGKILLed mid-step and mid-save under `torchrun --max-restarts`,
NaN steps, a full disk. Each faulted run must end with the per-step losses of one uninterrupted run
(bitwise), from the checkpoint the fault left. The faults come from `--debug.faults`
(components/faults.py); each fires once per dump folder, so the restarted run goes on past it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_titan.components.checkpoint import load_model_weights
from helpers import REPO, TINY_MODEL, TINY_RUN, losses_by_step, run_trainer

STEPS = 8
# two CPU ranks, a checkpoint every 2 steps (sync unless a test says async)
RUN = [*TINY_RUN, *TINY_MODEL, "--training.steps", str(STEPS), "--training.local_batch_size", "2",
       "--validation.enable", "false", "--checkpoint.enable", "true", "--checkpoint.interval", "2",
       "--metrics.enable_db", "false"]


def output(proc) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The per-step losses of the uninterrupted 2-rank run."""
    dump = tmp_path_factory.mktemp("reference")
    proc = run_trainer(RUN, dump, nproc=2)
    assert proc.returncode == 0, output(proc)[-3000:]
    found = losses_by_step(dump)
    assert sorted(found) == list(range(1, STEPS + 1))
    return found


def checkpoints(dump) -> list[str]:
    return sorted(p.name for p in (dump / "checkpoint").iterdir())


def run_train_sh(args: list[str], dump, *, nproc: int, max_restarts: int) -> subprocess.CompletedProcess:
    """./run_train.sh (NGPU ranks, MAX_RESTARTS) with the config of RUN."""
    env = {**os.environ, "NGPU": str(nproc), "MAX_RESTARTS": str(max_restarts), "OMP_NUM_THREADS": "1",
           "CONFIG_FILE": RUN[RUN.index("--config") + 1],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # this python first
    config_free = [a for i, a in enumerate(args) if "--config" not in (a, args[i - 1] if i else "")]
    return subprocess.run(["bash", "run_train.sh", *config_free, "--job.dump_folder", str(dump)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fault,extra,resumed_at", [
    ("kill_mid_step@5:rank1", [], 4),                                        # rank 1 dies before step 5's update
    ("kill_mid_save@4:rank1", [], 2),                                        # in the sync write of step-4
    ("kill_mid_save@4:rank1", ["--checkpoint.async_mode", "async"], 2),     # in the background write
    ("kill_after_publish@4:rank0", [], 4),                                   # step-4 is complete: keep it
])
def test_a_killed_rank_comes_back_under_max_restarts_with_the_uninterrupted_losses(tmp_path, reference, fault,
                                                                                    extra, resumed_at):
    launch = run_train_sh if fault.startswith("kill_mid_step") else run_trainer  # run_train.sh's MAX_RESTARTS too
    proc = launch([*RUN, *extra, "--debug.faults", fault], tmp_path, nproc=2, max_restarts=1)
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    assert f"fault injection {fault}: SIGKILL" in out
    assert f"torchrun restart 1 (of --max-restarts 1): resuming at step {resumed_at}" in out
    if resumed_at == 2:  # the interrupted save was never published, and the restart removed it
        assert "removed step-4.tmp" in out
    assert losses_by_step(tmp_path) == reference  # bitwise: every step, the replayed ones included
    assert checkpoints(tmp_path) == [f"step-{s}" for s in (2, 4, 6, 8)]


def test_nan_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path):
    """Steps 3-5 have a NaN loss: each is skipped (no update), the third in a row stops the run with
    exit 1 and the guard's message. step-4, saved between them, holds step 2's weights (nothing bad is
    saved), and the same command resumes from it to the end once the fault is spent."""
    args = [*RUN, "--training.max_skipped_steps", "3", "--debug.faults", "nan_loss@3x3"]
    proc = run_trainer(args, tmp_path)
    out = output(proc)
    assert proc.returncode == 1, out[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient norm (the last at step 5)" in out
    assert "skipped 1 step(s) with a non-finite loss" in out and "step     6" not in out
    assert checkpoints(tmp_path) == ["step-2", "step-4"]
    step2, step4 = (load_model_weights(tmp_path / "checkpoint" / name) for name in ("step-2", "step-4"))
    assert all(torch.equal(step2[k], step4[k]) for k in step2)

    again = run_trainer(args, tmp_path)
    assert again.returncode == 0, output(again)[-3000:]
    assert "resuming at step 4" in output(again)
    assert checkpoints(tmp_path)[-1] == f"step-{STEPS}"


def test_a_full_disk_fails_the_save_keeps_the_last_checkpoint_and_the_restart_loads_it(tmp_path, reference):
    """ENOSPC on rank 1 while writing step-4 (keep_latest_k = 1): the save fails on both ranks, the run
    stops (on_save_error = stop), step-2 is neither pruned nor replaced, and the rerun resumes from it
    with the uninterrupted losses."""
    args = [*RUN, "--checkpoint.keep_latest_k", "1", "--debug.faults", "enospc_save@4:rank1"]
    proc = run_trainer(args, tmp_path, nproc=2)
    out = output(proc)
    assert proc.returncode != 0, out[-3000:]
    assert "checkpoint step-4 (interval) could not be written: rank 1: OSError: [Errno 28] No space left" in out
    assert "step-2 is the newest complete checkpoint and is kept" in out
    assert checkpoints(tmp_path) == ["step-2"]

    again = run_trainer(args, tmp_path, nproc=2)
    assert again.returncode == 0, output(again)[-3000:]
    assert "resuming at step 2" in output(again)
    assert losses_by_step(tmp_path) == reference
    assert checkpoints(tmp_path) == [f"step-{STEPS}"]


def test_a_full_disk_with_on_save_error_continue_trains_on_and_saves_next_time(tmp_path):
    args = [*RUN, "--checkpoint.on_save_error", "continue", "--debug.faults", "enospc_save@4"]
    proc = run_trainer(args, tmp_path)
    out = output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "training on (checkpoint.on_save_error = continue)" in out
    assert checkpoints(tmp_path) == ["step-2", "step-6", "step-8"]

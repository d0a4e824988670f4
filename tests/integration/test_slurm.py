"""scripts/slurm/train.sbatch on a real (one-node, localhost) Slurm cluster.

The module fixture brings the cluster up with scripts/slurm/local_cluster.sh (which installs
slurm-wlm and munge with apt-get when missing) and stops it again afterwards, unless it was already
running before the module started (then it is left as found; HYDRA_SLURM_KEEP=1 keeps it up
always). Each job runs the debug model on 2 CPU ranks (gloo) for a few tiny steps.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "slurm" / "local_cluster.sh"
SBATCH_SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
JOB_TIMEOUT_S = 240
TINY = ["--training.seq_len", "64", "--training.local_batch_size", "2", "--validation.enable", "false",
        "--metrics.log_freq", "1"]


@pytest.fixture(scope="module")
def slurm_cluster():
    if not sys.platform.startswith("linux"):
        pytest.skip("the local Slurm cluster needs Linux")
    if os.geteuid() != 0:
        pytest.skip("starting a local Slurm cluster needs root (it writes /etc/slurm and starts daemons)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is unavailable to install it")
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, timeout=60).returncode == 0
    started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, f"local_cluster.sh start failed:\n{started.stdout}\n{started.stderr}"
    try:
        yield
    finally:
        if not was_up and os.environ.get("HYDRA_SLURM_KEEP", "0") != "1":
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


def _job_env() -> dict[str, str]:
    """The environment sbatch passes to the job (--export=ALL): this interpreter/venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_"))
           and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env["HYDRA_TITAN_ROOT"] = str(REPO)
    env["NPROC_PER_NODE"] = "2"
    return env


def _sbatch_cmd(tmp_path: Path, name: str, *extra: str) -> list[str]:
    """One node, no GPUs, both CPUs: overrides of the script's multi-node GPU defaults."""
    return ["sbatch", f"--job-name={name}", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
            f"--output={tmp_path}/job-%j.out", *extra, str(SBATCH_SCRIPT)]


def _submit_and_wait(tmp_path: Path, *trainer_args: str) -> tuple[int, str]:
    name = f"hydra_titan_test_{uuid.uuid4().hex[:8]}"
    cmd = _sbatch_cmd(tmp_path, name, "--wait") + list(trainer_args)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
        raise
    logs = sorted(tmp_path.glob("job-*.out"))
    assert logs, f"no job log in {tmp_path}; sbatch said:\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, logs[-1].read_text()


def _wait_for(pattern: str, path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text, re.MULTILINE):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s:\n{path.read_text() if path.exists() else ''}")


def test_sbatch_trains_two_cpu_ranks(slurm_cluster, tmp_path):
    rc, log = _submit_and_wait(tmp_path, "--training.steps", "3", *TINY, "--job.dump_folder", str(tmp_path / "dump"))
    assert rc == 0, log
    assert "2 process(es) per node" in log, log
    assert re.search(r"step\s+3\s+loss", log), log
    assert "on 2 rank(s)" in log, log
    assert "training step exited with status 0" in log, log


def test_sbatch_fails_on_bad_config(slurm_cluster, tmp_path):
    rc, log = _submit_and_wait(tmp_path, "--training.stepz", "3", "--job.dump_folder", str(tmp_path / "dump"))
    assert rc != 0, log
    assert "stepz" in log, log
    assert re.search(r"training step exited with status [1-9]", log), log


def test_usr1_stops_between_steps_and_requeues(slurm_cluster, tmp_path):
    """The time-limit warning (--signal=B:USR1@120), sent by hand: the trainer stops after its
    current step on every rank and the script requeues the job."""
    name = f"hydra_titan_test_{uuid.uuid4().hex[:8]}"
    cmd = _sbatch_cmd(tmp_path, name, "--parsable") + [
        "--training.steps", "1000", *TINY, "--job.dump_folder", str(tmp_path / "dump")]
    proc = subprocess.run(cmd, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log = tmp_path / f"job-{job_id}.out"
    try:
        _wait_for(r"step\s+2\s+loss", log, JOB_TIMEOUT_S / 2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
        text = _wait_for(r"requeueing job", log, 90)
        assert "SIGUSR1" in text
        assert "stopped by signal at step" in text, text  # the trainer stopped between steps
        assert re.search(r"training step exited with status", text), text
        info = ""
        for _ in range(40):  # the requeue is recorded as the job ends
            info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
            if "Restarts=1" in info:
                break
            time.sleep(0.5)
        assert "Restarts=1" in info, info
    finally:
        subprocess.run(["scancel", job_id], timeout=30)

"""Checkpoints through the real trainer: 2 gloo processes (FSDP2) on CPU, and 1 process.

One reference run (10 steps, FSDP over 2 ranks, full activation checkpointing,
a checkpoint every 3 steps, keep_latest_k 3) is shared by the module; every
other test resumes from, converts or damages a copy of its checkpoints. Runs
are a tiny fp32 HYDRA (dim 64) so each takes a few seconds on 2 cores. The
last tests drive the CheckpointManager alone (FSDP2 MLP, 2 ranks) on CPU and,
marked gpu, on CUDA (NCCL training, gloo checkpoint coordination).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from hydra_titan.components.checkpoint import COMPLETE_MARKER, checkpoint_problem, list_checkpoints, read_meta

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "train.py"

TINY = ["--config", str(REPO / "train_configs" / "debug.toml"), "--training.steps", "10",
        "--lr_scheduler.warmup_steps", "3", "--training.seq_len", "32", "--model.overrides.dim", "64",
        "--model.overrides.n_heads", "2", "--model.overrides.n_kv_heads", "2", "--model.overrides.head_dim", "16",
        "--training.mixed_precision_param", "float32", "--metrics.log_freq", "1",
        "--metrics.enable_tensorboard", "false", "--validation.enable", "false", "--checkpoint.enable", "true",
        "--checkpoint.interval", "3"]
GLOO_EXIT_FLAKE = "terminate called without an active exception"  # PLATFORM_NOTES: after all work is done


def train(dump: Path, *args: str, nproc: int = 2, local_batch: int | None = None, ok: bool = True,
          timeout: int = 240) -> str:
    """Run the trainer (torchrun for nproc > 1, a plain 1-rank process otherwise); returns its output."""
    batch = local_batch if local_batch is not None else 4 // nproc  # global batch 4 by default
    launcher = [sys.executable, str(ENTRY)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "localhost:0", str(ENTRY)]
    cmd = [*launcher, *TINY, "--training.local_batch_size", str(batch), *args, "--job.dump_folder", str(dump)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if ok:
        finished = "done in" in out and GLOO_EXIT_FLAKE in out  # the known exit-time abort: work was done
        assert proc.returncode == 0 or finished, f"exit {proc.returncode}\n{out[-5000:]}"
    else:
        assert proc.returncode != 0, out[-5000:]
    return out


def metrics(dump: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss/ce" in r}  # a resumed run appends: the last record wins


def full_state(path: Path) -> dict:
    """Everything a DCP checkpoint holds, as plain tensors/objects (through the conversion script)."""
    with tempfile.TemporaryDirectory() as tmp:
        convert("dcp-to-torch", path, Path(tmp) / "state.pt")
        return torch.load(Path(tmp) / "state.pt", weights_only=False)


def convert(*args) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def copy_checkpoints(src: Path, dump: Path, *steps: int) -> Path:
    folder = dump / "checkpoint"
    folder.mkdir(parents=True)
    for step in steps:
        shutil.copytree(src / "checkpoint" / f"step-{step}", folder / f"step-{step}")
    return folder


def assert_same_steps(a: dict, b: dict, steps, keys=("loss/ce", "loss/total", "lr", "grad_norm")) -> None:
    for step in steps:
        for key in keys:
            assert a[step][key] == b[step][key], f"step {step} {key}: {a[step][key]!r} != {b[step][key]!r}"


def assert_states_equal(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """10 steps straight, FSDP over 2 ranks with full AC; checkpoints at 3, 6, 9 and 10, keep_latest_k 3."""
    dump = tmp_path_factory.mktemp("reference")
    train(dump, "--activation_checkpoint.mode", "full", "--checkpoint.keep_latest_k", "3")
    return dump


# --------------------------------------------------------------------------- acceptance


def test_exact_resume_fsdp2_with_activation_checkpointing(ref, tmp_path):
    """6 steps + stop + resume to 10 gives bitwise the losses, lr and data position of 10 straight steps."""
    copy_checkpoints(ref, tmp_path, 6)  # the state of a run stopped after step 6
    out = train(tmp_path, "--activation_checkpoint.mode", "full", "--checkpoint.async_mode", "async")
    assert "resuming at step 6" in out
    got, want = metrics(tmp_path), metrics(ref)
    assert sorted(got) == [7, 8, 9, 10]  # no step repeated or skipped
    assert_same_steps(got, want, range(7, 11))
    # step-9 was written in the background (async) and published; the final states are identical
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoint")] == [6, 9, 10]
    a, b = full_state(ref / "checkpoint" / "step-10"), full_state(tmp_path / "checkpoint" / "step-10")
    assert a["dataloader"] == b["dataloader"] and a["train_state"] == b["train_state"]
    assert a["train_state"]["step"] == 10 and a["dataloader"]["samples_in_epoch"] == 40
    for key in ("model", "optimizer", "lr_scheduler", "rng"):
        assert_states_equal(a[key], b[key], key)


def test_keep_latest_k_leaves_k_complete_checkpoints(ref):
    found = list_checkpoints(ref / "checkpoint")
    assert [s for s, _ in found] == [6, 9, 10]  # step-3 was deleted when step-10 was published
    assert all(checkpoint_problem(p) is None for _, p in found)
    assert not list((ref / "checkpoint").glob("*.tmp"))
    assert read_meta(found[-1][1])["reason"] == "last"


def test_interrupted_saves_are_skipped(ref, tmp_path):
    """step-11.tmp (never published), step-10 without its marker, step-9 with a truncated shard -> step-6."""
    folder = copy_checkpoints(ref, tmp_path, 6, 9, 10)
    shutil.copytree(folder / "step-10", folder / "step-11.tmp")
    (folder / "step-10" / COMPLETE_MARKER).unlink()
    shard = folder / "step-9" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    out = train(tmp_path, "--activation_checkpoint.mode", "full")
    assert "removed step-11.tmp" in out and not (folder / "step-11.tmp").exists()
    assert "skipping checkpoint" in out and "step-10" in out and "no COMPLETE marker" in out
    assert "step-9" in out and "truncated" in out
    assert "resuming at step 6" in out
    assert_same_steps(metrics(tmp_path), metrics(ref), range(7, 11))
    # the new saves replaced the broken folders and cleared the debris
    assert [s for s, _ in list_checkpoints(folder)] == [6, 9, 10]
    assert all(checkpoint_problem(p) is None for _, p in list_checkpoints(folder))
    assert not list(folder.glob("*.tmp"))


def test_conversion_round_trip_loads_into_fsdp2(ref, tmp_path):
    """DCP -> torch.save -> DCP, resumed by FSDP over 2 ranks: the next steps are bitwise the same."""
    convert("dcp-to-torch", ref / "checkpoint" / "step-6", tmp_path / "step-6.pt")
    state = torch.load(tmp_path / "step-6.pt", weights_only=False)
    assert state["train_state"]["step"] == 6 and "tok_embeddings.weight" in state["model"]
    dump = tmp_path / "run"
    convert("torch-to-dcp", tmp_path / "step-6.pt", dump / "checkpoint" / "step-6")
    train(dump, "--activation_checkpoint.mode", "full")
    assert_same_steps(metrics(dump), metrics(ref), range(7, 11))


LOGITS_WORKER = """
import sys, torch
from hydra_titan import train
from hydra_titan.config import load_config
from hydra_titan.distributed import shutdown_and_exit
trainer = train.Trainer(load_config(sys.argv[2:]))
assert trainer.checkpointer.load()
tokens = torch.arange(64).reshape(2, 32) * 37 % trainer.model_args.vocab_size
with torch.no_grad():
    logits = trainer.model(tokens)["logits"]
if trainer.dist.rank == 0:
    torch.save(logits, sys.argv[1])
shutdown_and_exit(0)
"""


def test_safetensors_export_matches_fsdp_logits(ref, tmp_path):
    """DCP -> safetensors (bf16) -> a plain single-process model: logits match FSDP(2)'s within bf16 tolerance."""
    from safetensors.torch import load_file

    from hydra_titan.models import get_model_spec

    step10 = ref / "checkpoint" / "step-10"
    worker = tmp_path / "logits_worker.py"
    worker.write_text(LOGITS_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", str(worker), str(tmp_path / "fsdp.pt"),
           *TINY, "--training.local_batch_size", "2", "--job.dump_folder", str(tmp_path / "dump"),
           "--checkpoint.initial_load_path", str(step10)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=240)
    assert (tmp_path / "fsdp.pt").is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    fsdp_logits = torch.load(tmp_path / "fsdp.pt")

    def single_process_logits(folder: Path) -> torch.Tensor:
        config = json.loads((folder / "config.json").read_text())
        spec = get_model_spec(config["model_name"])
        model = spec.model_cls(spec.args_cls(**config["model_args"]))
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)  # rope_cache: a buffer
        missing = set(model.state_dict()) - set(load_file(str(folder / "model.safetensors")))
        assert not missing, missing
        model.train()  # the trainer's routing mode (static top-k)
        with torch.no_grad():
            return model(torch.arange(64).reshape(2, 32) * 37 % model.args.vocab_size)["logits"]

    convert("dcp-to-safetensors", step10, tmp_path / "bf16", "--dtype", "bfloat16")
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    assert not any("_orig_mod" in k or "_checkpoint_wrapped_module" in k for k in weights)
    bf16 = single_process_logits(tmp_path / "bf16")
    scale = fsdp_logits.abs().max().item()
    torch.testing.assert_close(bf16, fsdp_logits, rtol=0, atol=2e-2 * scale)
    convert("dcp-to-safetensors", step10, tmp_path / "fp32")  # the saved dtype: agrees to fp32 round-off
    torch.testing.assert_close(single_process_logits(tmp_path / "fp32"), fsdp_logits, rtol=1e-5, atol=1e-5)


def test_resume_two_processes_on_one(ref, tmp_path):
    """2 ranks -> 1 rank at the same global batch: model, optimizer, lr and data position carry over."""
    copy_checkpoints(ref, tmp_path, 6)
    out = train(tmp_path, nproc=1, local_batch=4)
    assert "resuming at step 6" in out
    got, want = metrics(tmp_path), metrics(ref)
    assert sorted(got) == [7, 8, 9, 10]
    for step in range(7, 11):
        assert abs(got[step]["loss/ce"] - want[step]["loss/ce"]) <= 1e-5, (step, got[step], want[step])
        assert got[step]["lr"] == want[step]["lr"]
    a, b = full_state(ref / "checkpoint" / "step-10"), full_state(tmp_path / "checkpoint" / "step-10")
    assert a["dataloader"] == b["dataloader"]  # same position in the same epoch: no data repeated or skipped


def test_resume_with_an_incompatible_global_batch_stops_clearly(ref, tmp_path):
    copy_checkpoints(ref, tmp_path, 6)  # 24 samples consumed; a global batch of 5 cannot continue from there
    out = train(tmp_path, nproc=1, local_batch=5, ok=False)
    assert "cannot restore the data position" in out and "global batch" in out
    assert not (tmp_path / "metrics.jsonl").exists() or not metrics(tmp_path)


def test_seed_checkpoint_same_first_loss_on_any_layout(tmp_path):
    """FSDP(2) and 1 process started from one seed checkpoint: the same first-step loss (fp32)."""
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    seed = [sys.executable, str(REPO / "scripts" / "create_seed_checkpoint.py"), *TINY, "--job.seed", "1234",
            "--job.dump_folder", str(fsdp)]
    proc = subprocess.run(seed, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = subprocess.run(seed, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "refusing" in again.stderr  # never overwrites
    shutil.copytree(fsdp / "checkpoint", single / "checkpoint")
    # the trainer's own init uses another seed: the weights can only come from the seed checkpoint
    short = ["--training.steps", "1", "--lr_scheduler.warmup_steps", "0"]
    out = train(fsdp, *short)
    assert "loaded checkpoint" in out and "step-0" in out
    train(single, *short, nproc=1, local_batch=4)
    a, b = metrics(fsdp)[1]["loss/ce"], metrics(single)[1]["loss/ce"]
    assert abs(a - b) <= 1e-6, (a, b)


def test_checkpoint_of_another_flavor_fails_naming_the_mismatch(ref, tmp_path):
    copy_checkpoints(ref, tmp_path, 6)
    out = train(tmp_path, "--model.overrides.dim", "128", nproc=1, ok=False)
    assert "does not fit the model" in out
    assert "shape mismatch: " in out and "ffn_norm.weight: checkpoint [64] vs model [128]" in out
    assert "dim: checkpoint 64 vs this run 128" in out


def test_missing_paths_fail_clearly(tmp_path):
    out = train(tmp_path / "a", "--checkpoint.initial_load_path", str(tmp_path / "nowhere"), nproc=1, ok=False)
    assert f"{tmp_path / 'nowhere'} does not exist" in out
    out = train(tmp_path / "b", "--checkpoint.load_step", "5", nproc=1, ok=False)
    assert "load_step = 5" in out and "step-5" in out


def test_sigterm_saves_and_the_run_resumes(tmp_path):
    """A stop signal ends the step, saves step-N (reason "signal") and a restart resumes from it (1 process)."""
    cmd = [sys.executable, str(ENTRY), *TINY, "--training.local_batch_size", "4", "--training.steps", "3000",
           "--checkpoint.interval", "1000", "--job.dump_folder", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (tmp_path / "metrics.jsonl").is_file() and len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    (step, path), = list_checkpoints(tmp_path / "checkpoint")
    assert read_meta(path)["reason"] == "signal" and 3 <= step < 3000
    assert checkpoint_problem(path) is None
    out = train(tmp_path, "--training.steps", str(step + 1), nproc=1)  # a restart picks it up
    assert f"resuming at step {step}" in out and max(metrics(tmp_path)) == step + 1


# --------------------------------------------------------------------------- the manager alone (any device)

MANAGER_WORKER = """
import json, os, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from hydra_titan.components.checkpoint import CheckpointManager
from hydra_titan.components.lr_scheduler import build_lr_scheduler
from hydra_titan.config.job_config import Checkpoint

cuda = torch.cuda.is_available()
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if cuda:
    torch.cuda.set_device(rank)
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", rank) if cuda else torch.device("cpu")
mesh = init_device_mesh(device.type, (world,))
folder, phase = sys.argv[1], sys.argv[2]

class State:
    step = 0
    def state_dict(self): return {"step": self.step}
    def load_state_dict(self, s): self.step = int(s["step"])

class Loader:  # global batch 8, split over the ranks
    pos = 0
    def state_dict(self): return {"samples": self.pos}
    def load_state_dict(self, s): self.pos = int(s["samples"])
    def batch(self):
        g = torch.Generator().manual_seed(self.pos)
        x = torch.randn(8, 32, generator=g).chunk(world)[rank]
        self.pos += 8
        return x.to(device)

torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(3)]).to(device)
for layer in model:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
sched = build_lr_scheduler(opt, warmup_steps=2, decay_type="cosine", decay_ratio=0.2, min_lr_factor=0.1,
                           total_steps=6)
state, loader = State(), Loader()
ckpt = CheckpointManager(Checkpoint(enable=True, interval=3, async_mode=sys.argv[3]), folder=folder, model=model,
                         optimizer=opt, lr_scheduler=sched, dataloader=loader, train_state=state,
                         model_args={"width": 32}, model_name="mlp")
ckpt.load()
losses = {}
while state.step < 6:
    state.step += 1
    loss = model(loader.batch()).pow(2).mean() + 0 * torch.rand((), device=device)  # RNG is state too
    loss.backward()
    opt.step(); sched.step(); opt.zero_grad()
    total = loss.detach().clone()
    dist.all_reduce(total)
    losses[state.step] = [total.item(), torch.rand(()).item(), sched.get_last_lr()[0]]
    ckpt.maybe_save(state.step, last_step=state.step == 6)
ckpt.close()
if rank == 0:
    with open(os.path.join(folder, f"losses-{phase}.json"), "w") as f:
        json.dump(losses, f)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def _manager_run(worker: Path, folder: Path, phase: str, async_mode: str, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", str(worker), str(folder), phase, async_mode]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    result = folder / f"losses-{phase}.json"
    assert result.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(result.read_text())


def _manager_resume(tmp_path: Path, nproc: int) -> None:
    worker = tmp_path / "manager_worker.py"
    worker.write_text(MANAGER_WORKER)
    folder = tmp_path / "ck"
    straight = _manager_run(worker, folder, "straight", "async", nproc)  # async save at 3, sync at 6
    assert [s for s, _ in list_checkpoints(folder)] == [3, 6]
    shutil.rmtree(folder / "step-6")
    resumed = _manager_run(worker, folder, "resumed", "disabled", nproc)
    assert sorted(resumed) == ["4", "5", "6"]
    for step in ("4", "5", "6"):
        assert resumed[step] == straight[step], step  # loss, RNG draw and lr: bitwise


def test_manager_resumes_fsdp2_bitwise_on_cpu(tmp_path):
    """The manager alone (no trainer) on a 2-rank FSDP2 MLP over gloo: async + sync saves, exact resume."""
    _manager_resume(tmp_path, nproc=2)


@pytest.mark.gpu
def test_manager_resumes_fsdp2_bitwise_on_gpu(tmp_path):
    """The same on CUDA (NCCL for training, gloo groups for checkpoint coordination and async saves)."""
    _manager_resume(tmp_path, nproc=min(2, torch.cuda.device_count()))

"""CheckpointManager and the conversion scripts, single process (no process group), tiny model."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from hydra_titan.components.checkpoint import (COMPLETE_MARKER, META_FILE, CheckpointError, CheckpointManager,
                                               checkpoint_problem, list_checkpoints, load_model_weights,
                                               read_meta, strip_wrapper_prefixes)
from hydra_titan.components.faults import FaultInjector
from hydra_titan.components.lr_scheduler import build_lr_scheduler
from hydra_titan.config.job_config import Checkpoint
from hydra_titan.train import TrainState

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]


@dataclass
class TinyArgs:
    dim: int = 8
    hidden: int = 16


class TinyModel(nn.Module):
    def __init__(self, args: TinyArgs):
        super().__init__()
        self.inp = nn.Linear(args.dim, args.hidden)
        self.out = nn.Linear(args.hidden, 4)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


class FakeLoader:
    """The dataloader's contract: a few ints, and ValueError for an incompatible state."""

    def __init__(self, global_batch: int = 4):
        self.global_batch, self.position = global_batch, 0

    def next_batch(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.position)
        self.position += self.global_batch
        return torch.randn(self.global_batch, 8, generator=g)

    def state_dict(self):
        return {"samples": self.position, "seed": 7}

    def load_state_dict(self, state):
        if int(state["samples"]) % self.global_batch:
            raise ValueError(f"{state['samples']} samples is not a multiple of the global batch {self.global_batch}")
        self.position = int(state["samples"])


class Run:
    """Model + AdamW + schedule + loader + train state + manager, like the trainer wires them."""

    def __init__(self, folder: Path, args: TinyArgs = TinyArgs(), name: str = "tiny", faults=None, **cfg):
        torch.manual_seed(0)
        self.model = TinyModel(args)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.scheduler = build_lr_scheduler(self.optimizer, warmup_steps=2, decay_type="cosine", decay_ratio=0.2,
                                            min_lr_factor=0.1, total_steps=20)
        self.loader = FakeLoader(cfg.pop("global_batch", 4))
        self.state = TrainState()
        cfg.setdefault("enable", True)
        self.cfg = Checkpoint(interval=cfg.pop("interval", 2), **cfg)
        self.ckpt = CheckpointManager(self.cfg, folder=folder, model=self.model, optimizer=self.optimizer,
                                      lr_scheduler=self.scheduler, dataloader=self.loader, train_state=self.state,
                                      model_args=args, model_name=name, faults=faults)

    def step(self, total: int = 20, save: bool = True) -> tuple[float, float]:
        self.state.step += 1
        x = self.loader.next_batch()
        loss = (self.model(x) + torch.rand(()) * 0).pow(2).mean()  # the RNG is part of the state
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if save:
            self.ckpt.maybe_save(self.state.step, last_step=self.state.step == total)
        return loss.item(), self.scheduler.get_last_lr()[0]


def _steps(run: Run, n: int, **kw) -> list[tuple[float, float]]:
    return [run.step(**kw) for _ in range(n)]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- save / load


def test_resume_is_bitwise_and_restores_everything(tmp_path):
    ref = Run(tmp_path / "a")
    _steps(ref, 4)  # saves step-2 and step-4
    expected = _steps(ref, 3, save=False)
    rng_after = torch.rand(3)

    run = Run(tmp_path / "a")
    assert run.ckpt.load() is True
    assert run.state.step == 4 and run.loader.position == 16
    got = _steps(run, 3, save=False)
    assert got == expected  # losses and lrs, bitwise
    assert torch.equal(torch.rand(3), rng_after)
    for k, v in _weights(ref.model).items():
        assert torch.equal(v, _weights(run.model)[k])


def test_checkpoint_layout(tmp_path):
    run = Run(tmp_path / "ck")
    _steps(run, 2)
    assert [p.name for _, p in list_checkpoints(tmp_path / "ck")] == ["step-2"]
    folder = tmp_path / "ck" / "step-2"
    names = {p.name for p in folder.iterdir()}
    assert {".metadata", COMPLETE_MARKER, META_FILE} <= names and any(n.endswith(".distcp") for n in names)
    meta = read_meta(folder)
    assert meta["model_name"] == "tiny" and meta["model_args"] == {"dim": 8, "hidden": 16} and meta["step"] == 2
    assert meta["contents"] == ["model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng"]
    assert not list((tmp_path / "ck").glob("*.tmp"))
    assert checkpoint_problem(folder) is None


def test_disabled_manager_does_nothing(tmp_path):
    run = Run(tmp_path / "off", enable=False)
    _steps(run, 4)
    assert run.ckpt.load() is False and not (tmp_path / "off").exists()


def test_interrupted_saves_are_skipped(tmp_path, caplog):
    folder = tmp_path / "ck"
    run = Run(folder)
    _steps(run, 6)  # step-2, step-4, step-6
    # step-8.tmp: a save that never finished; step-6: truncated data file; step-4: no marker
    shutil.copytree(folder / "step-6", folder / "step-8.tmp")
    (folder / "step-8.tmp" / COMPLETE_MARKER).unlink()
    shard = next((folder / "step-6").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (folder / "step-4" / COMPLETE_MARKER).unlink()
    with caplog.at_level(logging.WARNING):
        resumed = Run(folder)
        assert resumed.ckpt.load() is True
    assert resumed.state.step == 2
    text = caplog.text
    assert "removed step-8.tmp" in text and "interrupted" in text
    assert not (folder / "step-8.tmp").exists()  # cleaned up at start: no save of this run was under way
    assert "step-6" in text and "truncated" in text
    assert "step-4" in text and COMPLETE_MARKER in text


def test_unreadable_shard_falls_back(tmp_path, caplog):
    """A shard of the right size but garbage content fails in DCP's read: the previous one is used."""
    folder = tmp_path / "ck"
    _steps(Run(folder), 4)
    shard = next((folder / "step-4").glob("*.distcp"))
    shard.write_bytes(b"\0" * shard.stat().st_size)
    resumed = Run(folder)
    with caplog.at_level(logging.WARNING):
        assert resumed.ckpt.load() is True
    assert resumed.state.step == 2 and "step-4" in caplog.text
    # what was read before the failure is overwritten by the fallback: identical to loading step-2 alone
    shutil.rmtree(folder / "step-4")
    clean = Run(folder)
    clean.ckpt.load()
    assert all(torch.equal(v, _weights(clean.model)[k]) for k, v in _weights(resumed.model).items())


def test_all_checkpoints_broken_is_an_error(tmp_path):
    folder = tmp_path / "ck"
    _steps(Run(folder), 2)
    (folder / "step-2" / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint .* could be loaded"):
        Run(folder).ckpt.load()


def test_keep_latest_k(tmp_path):
    folder = tmp_path / "ck"
    (folder / "step-1.tmp").mkdir(parents=True)  # debris of an old crash is cleared too
    run = Run(folder, interval=1, keep_latest_k=3)
    _steps(run, 7)
    assert [s for s, _ in list_checkpoints(folder)] == [5, 6, 7]
    assert all((p / COMPLETE_MARKER).is_file() for _, p in list_checkpoints(folder))
    assert not list(folder.glob("*.tmp"))


def test_load_step_and_missing_paths(tmp_path):
    folder = tmp_path / "ck"
    _steps(Run(folder), 6)
    run = Run(folder, load_step=4)
    assert run.ckpt.load() and run.state.step == 4
    with pytest.raises(FileNotFoundError, match="load_step = 5"):
        Run(folder, load_step=5).ckpt.load()
    with pytest.raises(FileNotFoundError, match="initial_load_path.*does not exist"):
        Run(tmp_path / "empty", initial_load_path=str(tmp_path / "nowhere")).ckpt.load()
    # an empty folder without initial_load_path starts from scratch
    assert Run(tmp_path / "empty").ckpt.load() is False
    # with checkpointing off, asking for a step or a path is an error, not a silent fresh start
    with pytest.raises(CheckpointError, match=r"checkpoint.load_step = 4 needs checkpoint.enable = true"):
        Run(folder, enable=False, load_step=4).ckpt.load()
    with pytest.raises(CheckpointError, match=r"initial_load_path = .* needs checkpoint.enable = true"):
        Run(tmp_path / "off", enable=False, initial_load_path=str(folder / "step-4")).ckpt.load()
    assert Run(tmp_path / "off", enable=False).ckpt.load() is False


def test_initial_load_path(tmp_path):
    _steps(Run(tmp_path / "a"), 4)
    run = Run(tmp_path / "b", initial_load_path=str(tmp_path / "a"))  # a folder of step-N: newest used
    assert run.ckpt.load() and run.state.step == 4
    run = Run(tmp_path / "c", initial_load_path=str(tmp_path / "a" / "step-2"))
    assert run.ckpt.load() and run.state.step == 2
    _steps(run, 2)  # saves go to the run's own folder, which is preferred from then on
    assert [s for s, _ in list_checkpoints(tmp_path / "c")] == [4]


def test_exclude_from_loading(tmp_path):
    _steps(Run(tmp_path / "a"), 4)
    run = Run(tmp_path / "a", exclude_from_loading=["optimizer", "dataloader"])
    assert run.ckpt.load()
    assert run.state.step == 4 and run.loader.position == 0 and not run.optimizer.state
    assert run.optimizer.param_groups[0]["lr"] == run.scheduler.get_last_lr()[0]  # lr follows the schedule
    with pytest.raises(ValueError, match="unknown entries .*'model'"):
        Run(tmp_path / "a", exclude_from_loading=["model"])


def test_other_flavor_fails_naming_the_mismatch(tmp_path):
    _steps(Run(tmp_path / "a"), 2)
    with pytest.raises(CheckpointError) as err:
        Run(tmp_path / "a", args=TinyArgs(hidden=24)).ckpt.load()
    text = str(err.value)
    assert "inp.weight: checkpoint [16, 8] vs model [24, 8]" in text and "hidden: checkpoint 16 vs this run 24" in text
    with pytest.raises(CheckpointError, match="of model 'tiny', this run trains 'other'"):
        Run(tmp_path / "a", name="other").ckpt.load()


def test_dcp_mismatch_errors_are_reraised_with_key_names(tmp_path):
    """A mismatch only DCP sees (here: optimizer state of a parameter the checkpoint lacks)."""
    _steps(Run(tmp_path / "a"), 2)
    run = Run(tmp_path / "a")
    run.model.extra = nn.Linear(2, 2)  # model keys now differ: caught before DCP by the shape check
    with pytest.raises(CheckpointError, match="missing from the checkpoint: extra.bias, extra.weight"):
        run.ckpt.load()
    run = Run(tmp_path / "a")
    run.optimizer = torch.optim.SGD(run.model.parameters(), lr=0.1, momentum=0.9)
    run.ckpt.optimizer = run.optimizer
    with pytest.raises(CheckpointError, match=r"optimizer\.state\..*momentum_buffer"):
        run.ckpt.load()


def test_incompatible_data_position_stops_with_a_clear_message(tmp_path):
    _steps(Run(tmp_path / "a"), 2)  # 8 samples consumed at global batch 4
    with pytest.raises(CheckpointError, match="cannot restore the data position.*global batch"):
        Run(tmp_path / "a", global_batch=3).ckpt.load()
    run = Run(tmp_path / "a", global_batch=8)  # same samples, other batch: continues at the same position
    assert run.ckpt.load() and run.loader.position == 8


def test_last_save_model_only_in_bfloat16(tmp_path):
    run = Run(tmp_path / "a", last_save_model_only=True, export_dtype="bfloat16")
    _steps(run, 4, total=3)  # step 2 full, step 3 = last: model only in bf16
    meta = read_meta(tmp_path / "a" / "step-3")
    assert meta["contents"] == ["model"] and meta["export_dtype"] == "bfloat16"
    weights = load_model_weights(tmp_path / "a" / "step-3")
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    fresh = Run(tmp_path / "a", load_step=3)
    assert fresh.ckpt.load() and fresh.state.step == 0  # model only: the rest starts fresh
    for k, v in fresh.model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, weights[k].float())


def test_async_save_captures_the_state_at_save_time(tmp_path):
    run = Run(tmp_path / "a", async_mode="async", interval=2)
    _steps(run, 2)  # step-2 is written in the background
    saved = _weights(run.model)
    _steps(run, 1)  # the step after it changes the weights (and may publish step-2)
    run.ckpt.close()
    assert [s for s, _ in list_checkpoints(tmp_path / "a")] == [2]
    loaded = Run(tmp_path / "a")
    loaded.ckpt.load()
    assert all(torch.equal(v, _weights(loaded.model)[k]) for k, v in saved.items())
    run.ckpt.close()  # idempotent


def test_same_step_is_not_saved_twice(tmp_path, caplog):
    run = Run(tmp_path / "a")
    _steps(run, 2)
    mtime = (tmp_path / "a" / "step-2" / COMPLETE_MARKER).stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        run.ckpt.save(2, reason="signal")
    assert (tmp_path / "a" / "step-2" / COMPLETE_MARKER).stat().st_mtime_ns == mtime
    run.ckpt.save(3, reason="signal")
    assert [s for s, _ in list_checkpoints(tmp_path / "a")] == [2, 3]


def test_strip_wrapper_prefixes():
    assert strip_wrapper_prefixes("layers.0._orig_mod._checkpoint_wrapped_module.attn.wq.weight") == \
        "layers.0.attn.wq.weight"


# --------------------------------------------------------------------------- conversion script


def test_convert_round_trip_and_safetensors(tmp_path):
    from safetensors.torch import load_file

    convert = load_script("convert_checkpoint")
    run = Run(tmp_path / "a")
    _steps(run, 2)
    expected = _steps(run, 2, save=False)
    src = tmp_path / "a" / "step-2"
    assert convert.main(["dcp-to-torch", str(src), str(tmp_path / "c.pt")]) == 0
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng"} <= set(state)
    assert state[convert.META_KEY]["model_name"] == "tiny"
    assert convert.main(["torch-to-dcp", str(tmp_path / "c.pt"), str(tmp_path / "b" / "step-2")]) == 0
    assert checkpoint_problem(tmp_path / "b" / "step-2") is None
    resumed = Run(tmp_path / "b")
    assert resumed.ckpt.load() and _steps(resumed, 2, save=False) == expected

    assert convert.main(["dcp-to-safetensors", str(tmp_path / "a"), str(tmp_path / "st"), "--dtype", "bfloat16"]) == 0
    weights = load_file(str(tmp_path / "st" / "model.safetensors"))
    config = (tmp_path / "st" / "config.json").read_text()
    assert '"model_name": "tiny"' in config and '"bfloat16"' in config
    loaded = Run(tmp_path / "a", load_step=2)
    loaded.ckpt.load()
    for k, v in loaded.model.state_dict().items():
        assert weights[k].dtype == torch.bfloat16 and torch.equal(weights[k], v.to(torch.bfloat16))


def test_convert_refuses_overwrite_and_missing_input(tmp_path, capsys):
    convert = load_script("convert_checkpoint")
    _steps(Run(tmp_path / "a"), 2)
    (tmp_path / "exists.pt").write_bytes(b"x")
    assert convert.main(["dcp-to-torch", str(tmp_path / "a"), str(tmp_path / "exists.pt")]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert convert.main(["dcp-to-torch", str(tmp_path / "missing"), str(tmp_path / "o.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert convert.main(["torch-to-dcp", str(tmp_path / "missing.pt"), str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert convert.main(["dcp-to-safetensors", str(tmp_path), str(tmp_path / "o")]) == 1
    assert "neither a DCP checkpoint" in capsys.readouterr().err


def test_convert_cli_exit_codes_and_help(tmp_path):
    script = str(REPO / "scripts" / "convert_checkpoint.py")
    out = subprocess.run([sys.executable, script, "dcp-to-torch", str(tmp_path / "nope"), str(tmp_path / "o.pt")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "does not exist" in out.stderr
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("dcp-to-torch", "torch-to-dcp", "dcp-to-safetensors"):
        assert command in out.stdout


# --------------------------------------------------------------------------- seed checkpoint


def test_seed_checkpoint_is_model_only_and_refuses_overwrite(tmp_path):
    seed = load_script("create_seed_checkpoint")
    from hydra_titan.config import load_config

    argv = ["--job.dump_folder", str(tmp_path), "--model.overrides.dim", "64", "--model.overrides.n_heads", "2",
            "--model.overrides.n_kv_heads", "2", "--model.overrides.head_dim", "16", "--training.seq_len", "32"]
    path = seed.create_seed_checkpoint(load_config(argv))
    assert path == tmp_path / "checkpoint" / "step-0" and checkpoint_problem(path) is None
    meta = read_meta(path)
    assert meta["contents"] == ["model"] and meta["model_name"] == "hydra" and meta["model_args"]["dim"] == 64
    weights = load_model_weights(path)
    assert "tok_embeddings.weight" in weights and all(v.dtype == torch.float32 for v in weights.values())
    assert seed.main(argv) == 1  # refuses: the folder holds a checkpoint
    # same config, same seed -> the same weights
    again = seed.create_seed_checkpoint(load_config(argv[:1] + [str(tmp_path / "again")] + argv[2:]))
    assert all(torch.equal(v, load_model_weights(again)[k]) for k, v in weights.items())


def test_checkpoint_config_defaults_are_valid():
    cfg = dataclasses.replace(Checkpoint(), enable=True)
    assert cfg.interval > 0 and cfg.async_mode in ("disabled", "async")


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_a_full_disk_fails_the_save_and_on_save_error_continue_trains_on(tmp_path, caplog, async_mode):
    """ENOSPC (injected at the DCP write) while saving step-4, keep_latest_k = 1: the partial folder goes,
    step-2 stays (it is pruned only once step-6 is complete), and the run goes on."""
    folder = tmp_path / "ck"
    faults = FaultInjector(["enospc_save@4"], rank=0, folder=tmp_path)
    run = Run(folder, faults=faults, keep_latest_k=1, on_save_error="continue", async_mode=async_mode)
    with caplog.at_level(logging.ERROR):
        _steps(run, 5)
        run.ckpt.close()  # an async failure is handled at the next collective point
    assert "checkpoint step-4 (interval) could not be written: rank 0: OSError: [Errno 28] No space left" in caplog.text
    assert "step-2 is the newest complete checkpoint and is kept" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["step-2"]
    _steps(run, 1)
    run.ckpt.close()
    assert sorted(p.name for p in folder.iterdir()) == ["step-6"]


def test_a_failed_save_stops_the_run_with_on_save_error_stop_and_a_failed_final_save_always(tmp_path):
    faults = FaultInjector(["enospc_save@4", "enospc_save@6"], rank=0, folder=tmp_path)
    run = Run(tmp_path / "ck", faults=faults)
    _steps(run, 3)
    with pytest.raises(CheckpointError, match=r"step-4 .*No space left on device.*step-2 is the newest"):
        run.step()
    run = Run(tmp_path / "ck2", faults=faults, on_save_error="continue")
    _steps(run, 5)  # step-4's failure does not stop it (its fault has fired)
    with pytest.raises(CheckpointError, match=r"step-6 \(last\).*the final save"):
        run.step(total=6)

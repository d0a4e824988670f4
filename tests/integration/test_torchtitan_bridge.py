"""torchtitan_patches on CPU: upstream torchtitan 0.3.0's trainer training hydra_titan models (DESIGN §11).

One tiny HYDRA (debug.toml at dim 128, seq 64, batch 4, constant lr) is trained 8 steps by torchtitan's
trainer, launched the upstream way (``torchrun -m torchtitan.train --module ... --config ...``), and by
hydra_titan's own trainer, both checkpointing at step 7. The tests compare the two runs step by step,
move checkpoints both ways, and train again on two gloo processes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY_MODEL, run_trainer

pytest.importorskip("torchtitan", minversion="0.3.0",
                    reason="the torchtitan extra is not installed: pip install -e '.[torchtitan]' torch==<yours>")

from hydra_titan.components.checkpoint_files import (COMPLETE_MARKER, load_inference_model,  # noqa: E402
                                                     load_model_weights, read_meta)
from hydra_titan.components.dataloader import build_dataloader  # noqa: E402
from hydra_titan.components.loss import build_loss_fn, count_target_tokens  # noqa: E402
from hydra_titan.components.tokenizer import build_tokenizer  # noqa: E402
from hydra_titan.config import load_config  # noqa: E402
from hydra_titan.models import get_model_spec  # noqa: E402
from hydra_titan.train import resolve_model_args  # noqa: E402

SEQ_LEN, BATCH, SEED, VAL_FRACTION = 64, 4, 42, 0.01  # debug.toml's seed and val_fraction
# hydra_titan-style overrides of debug.toml, used by both trainers. A constant lr: the two warmup formulas
# differ (torchtitan ramps (i+1)/w, hydra_titan (i+1)/(w+1)), and with it every step can be compared.
OVERRIDES = ["--training.seq_len", str(SEQ_LEN), "--training.local_batch_size", str(BATCH), *TINY_MODEL,
             "--lr_scheduler.warmup_steps", "0", "--lr_scheduler.decay_type", "constant",
             "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false"]
# a config registry of the user's own, the way torchtitan finds any: --module bridge_tiny_configs --config tiny
REGISTRY = f'''
from torchtitan_patches.job_config import load_trainer_config

def tiny():
    return load_trainer_config("debug.toml", {OVERRIDES!r})
'''
STEPS, SAVE_AT = 8, 7
TITAN_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.]+)\s+grad_norm:\s*([-\d.]+)")


def run_titan(args: list[str], dump: Path, registry: Path, *, nproc: int = 1,
              entry: str = "torchtitan_patches.train") -> subprocess.CompletedProcess:
    """torchrun -m `entry` on the tiny registry config; OMP_NUM_THREADS=1 as hydra_titan's runs use."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", "-m", entry, "--module", "bridge_tiny_configs", "--config", "tiny",
           "--metrics.disable_color_printing", "--dump_folder", str(dump), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(registry), str(REPO)]), "OMP_NUM_THREADS": "1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def rows(dump: Path) -> list[dict]:
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


def titan_log(proc: subprocess.CompletedProcess) -> dict[int, tuple[float, float]]:
    """{step: (loss, grad_norm)} as torchtitan's own metrics line prints them (5 and 4 decimals)."""
    return {int(s): (float(loss), float(norm)) for s, loss, norm in TITAN_LINE.findall(proc.stdout + proc.stderr)}


def loss_of(checkpoint: Path, batch_index: int) -> float:
    """The training loss (ce + aux) of a checkpoint's weights on the run's `batch_index`-th batch, in this
    process: the model is rebuilt from the checkpoint alone, as scripts/generate.py rebuilds it."""
    model, _ = load_inference_model(checkpoint)
    model.train()  # training routing (top-k), as in a step
    loader = build_dataloader(source="demo", path="", tokenizer="kjv_bpe_4k", seq_len=SEQ_LEN, local_batch_size=BATCH,
                              dp_rank=0, dp_world_size=1, split="train", val_fraction=VAL_FRACTION, seed=SEED)
    inputs, labels = next(itertools.islice(iter(loader), batch_index, None))
    loss_fn = build_loss_fn(chunked=False, chunk_size=1, z_loss_weight=0.0, aux_loss_weight=1.0,
                            ponder_loss_weight=0.0)
    with torch.no_grad():
        return loss_fn(model(inputs), labels, count_target_tokens(labels))[0].item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bridge")
    (root / "registry").mkdir()
    (root / "registry" / "bridge_tiny_configs.py").write_text(REGISTRY)
    save = ["--checkpoint.interval", str(SAVE_AT)]
    hydra = run_trainer(["--config", "train_configs/debug.toml", *OVERRIDES, "--training.steps", str(STEPS),
                         "--validation.enable", "false", "--checkpoint.enable", "true", *save], root / "hydra")
    assert hydra.returncode == 0, hydra.stdout[-3000:] + hydra.stderr[-3000:]
    titan = run_titan(["--training.steps", str(STEPS), "--checkpoint.enable", *save], root / "titan",
                      root / "registry", entry="torchtitan.train")  # upstream's own entry point
    return {"root": root, "registry": root / "registry", "hydra": root / "hydra", "titan": root / "titan",
            "titan_log": titan_log(titan)}


def test_torchtitan_trains_hydra_debug_with_the_aux_loss_in_its_loss(runs):
    steps = rows(runs["titan"])
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    first, last = steps[0]["loss/total"], steps[-1]["loss/total"]
    assert first > 8.5 and last < first - 0.25, (first, last)  # from ~ln(4096) = 8.3 + init noise, falling
    for r in steps:
        assert 1e-4 < r["loss/aux"] < 1e-2  # the MoD + MoR router terms
        assert r["loss/total"] == pytest.approx(r["loss/ce"] + r["loss/aux"], abs=1e-5)  # ponder weight is 0
        # the loss torchtitan itself logs (its global_avg_loss, 5 decimals) is that total: aux is in it
        assert runs["titan_log"][r["step"]][0] == pytest.approx(r["loss/total"], abs=6e-6)


def test_same_losses_and_grad_norms_as_hydra_titans_trainer(runs):
    hydra, titan = rows(runs["hydra"]), rows(runs["titan"])
    assert abs(hydra[0]["loss/total"] - titan[0]["loss/total"]) <= 1e-4  # first step: same init, data, loss
    for h, t in zip(hydra, titan, strict=True):  # and every later one: same optimizer groups and clipping
        assert h["step"] == t["step"]
        assert abs(h["loss/total"] - t["loss/total"]) <= 1e-4, (h["step"], h["loss/total"], t["loss/total"])
        assert abs(h["loss/aux"] - t["loss/aux"]) <= 1e-6
        assert runs["titan_log"][h["step"]][1] == pytest.approx(h["grad_norm"], abs=6e-5)


def test_a_torchtitan_checkpoint_opens_in_generate_py(runs, tmp_path):
    folder = runs["titan"] / "checkpoint"
    step = folder / f"step-{SAVE_AT}"
    meta = read_meta(step)
    assert (meta["model_name"], meta["tokenizer"], meta["model_args"]["dim"]) == ("hydra", "kjv_bpe_4k", 128)
    assert (step / COMPLETE_MARKER).is_file()
    # the weights hydra_titan rebuilds are the ones torchtitan trained: they give torchtitan's next-step loss
    assert loss_of(step, batch_index=SAVE_AT) == pytest.approx(rows(runs["titan"])[SAVE_AT]["loss/total"], abs=1e-5)
    # and they are exactly the weights hydra_titan's own trainer reached
    mine, theirs = load_model_weights(step), load_model_weights(runs["hydra"] / "checkpoint" / f"step-{SAVE_AT}")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    out = tmp_path / "generated.json"
    proc = subprocess.run([sys.executable, "scripts/generate.py", "--checkpoint", str(folder), "--prompt",
                           "In the beginning", "--temperature", "0", "--max-new-tokens", "6", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    generated = json.loads(out.read_text())
    assert len(generated["new_ids"]) == 6 and generated["text"]
    assert all(0 <= i < 4096 for i in generated["new_ids"])


def test_a_hydra_titan_checkpoint_initializes_a_torchtitan_run(runs, tmp_path):
    step = runs["hydra"] / "checkpoint" / f"step-{SAVE_AT}"
    run_titan(["--training.steps", "1", "--checkpoint.enable", "--checkpoint.initial_load_path", str(step)],
              tmp_path / "titan", runs["registry"])
    loaded = rows(tmp_path / "titan")[0]["loss/total"]
    assert loaded == pytest.approx(loss_of(step, batch_index=0), abs=1e-5)  # hydra_titan's weights, batch 1
    assert loaded < rows(runs["titan"])[0]["loss/total"] - 0.2  # not the fresh initialisation


def test_two_gloo_processes_train_as_one(runs, tmp_path):
    """FSDP over 2 ranks x batch 2 = the same global batch as 1 rank x 4: same losses, same global grad norm
    (gradients summed over ranks, as torchtitan's loss normalization needs)."""
    proc = run_titan(["--training.steps", "3", "--training.local_batch_size", "2"], tmp_path / "titan",
                     runs["registry"], nproc=2)
    two, one = rows(tmp_path / "titan"), rows(runs["titan"])[:3]
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):
        assert a["loss/total"] == pytest.approx(b["loss/total"], abs=1e-5)
    norms = titan_log(proc)
    assert all(norms[s][1] == pytest.approx(runs["titan_log"][s][1], abs=2e-4) for s in (1, 2, 3))


# through torchtitan's model protocol, in a fresh process (torchtitan stays out of pytest's)
BUILD_ALL = r'''
import json, sys, torch
from hydra_titan.config import ConfigError
from torchtitan_patches import config_registry
from torchtitan_patches.job_config import load_trainer_config
from torchtitan_patches.model import HydraTitanModel
out = {}
for name in sys.argv[1:]:
    cfg = getattr(config_registry, name)()
    model_cfg = cfg.model_spec.model
    model_cfg.update_from_config(config=cfg)
    with torch.device("meta"):
        model = model_cfg.build()
    model.verify_module_protocol()
    params, flops = model_cfg.get_nparams_and_flops(model, cfg.training.seq_len)
    out[name] = {"trainer": type(cfg).__qualname__, "params": params, "flops": flops,
                 "lr": cfg.optimizer.param_groups[0].optimizer_kwargs["lr"], "steps": cfg.training.steps,
                 "batch": cfg.training.local_batch_size, "seq_len": cfg.training.seq_len,
                 "compile": cfg.compile.enable, "ac": type(cfg.activation_checkpoint).__qualname__,
                 "dump_folder": cfg.dump_folder}
errors = []
for bad in (lambda: load_trainer_config("debug.toml", ["--float8.enable", "true"]),
            lambda: load_trainer_config("debug.toml", ["--training.z_loss_weight", "0.1"]),
            lambda: HydraTitanModel.Config(name="gpt")):
    try:
        bad()
        errors.append("no error")
    except (ConfigError, ValueError) as e:
        errors.append(str(e))
print(json.dumps({"configs": out, "errors": errors}))
'''
CONFIGS = {"hydra_debug": "debug.toml", "hydra_1B": "1B.toml", "llama_debug": "llama_debug.toml",
           "llama_1B": "llama_1B.toml", "hybrid_debug": "hybrid_debug.toml", "waaagh_debug": "waaagh_debug.toml"}


def test_every_registry_config_reports_hydra_titans_params_and_flops():
    proc = subprocess.run([sys.executable, "-c", BUILD_ALL, *CONFIGS], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, toml in CONFIGS.items():
        job = load_config(["--config", toml])
        spec = get_model_spec(job.model.name)
        args = resolve_model_args(spec, job, build_tokenizer(job.tokenizer.name))
        seq = job.training.seq_len
        got = report["configs"][name]
        assert got["trainer"] == "HydraTrainer.Config"
        assert got["params"] == spec.param_report(args, seq).total
        assert got["flops"] == int(spec.flops_per_token(args, seq).executed)
        assert (got["lr"], got["steps"], got["batch"], got["seq_len"], got["compile"]) == (
            job.optimizer.lr, job.training.steps, job.training.local_batch_size, seq, job.compile.enable)
        assert got["ac"] == {"none": "NoneType", "selective": "SelectiveAC.Config"}[job.activation_checkpoint.mode]
        assert got["dump_folder"] == job.job.dump_folder + "_torchtitan"
    assert report["configs"]["hydra_1B"]["params"] > 1e9 > report["configs"]["hydra_debug"]["params"]
    float8, z_loss, unknown = report["errors"]
    assert "float8.enable" in float8 and "training.z_loss_weight" in z_loss
    assert "unknown model 'gpt'" in unknown and "hydra" in unknown

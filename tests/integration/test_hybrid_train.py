"""Each hybrid variant learns on the built-in corpus (CPU, the PyTorch chunked SSD).

A shortened form of `CONFIG_FILE=train_configs/hybrid_debug.toml ./run_train.sh` (150 steps at
the full debug size), sized so CI runs all three variants in about a minute.
"""

from __future__ import annotations

import json

import pytest

from helpers import run_trainer

SMALL = ["--config", "hybrid_debug", "--training.seq_len", "64", "--training.local_batch_size", "8",
         "--training.steps", "60", "--lr_scheduler.warmup_steps", "5", "--validation.enable", "false",
         "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
         "--model.overrides.dim", "128", "--model.overrides.n_heads", "2", "--model.overrides.head_dim", "32",
         "--model.overrides.ssm_chunk_size", "16"]


@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_loss_falls_for_every_variant(tmp_path, variant):
    proc = run_trainer([*SMALL, "--model.overrides.variant", variant], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/ce"] for r in rows if "loss/ce" in r]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]
    if variant == "v2":  # the routed fraction is logged
        assert any("routing/mod_selected_frac/block_0" in r for r in rows)

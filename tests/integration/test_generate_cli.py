"""The inference CLI round trip on CPU (DESIGN §3.11): train the debug model 60 steps with a checkpoint,
generate from the DCP folder, convert it (safetensors and one torch file), generate the same greedy
tokens from each, evaluate; and the usage errors that must exit 2 without loading anything."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_trainer

# the debug HYDRA (MoD + MoR routing) at a CPU-friendly batch: the checkpoint is what matters here
TRAIN = ["--config", "debug", "--training.steps", "60", "--training.seq_len", "64", "--training.local_batch_size", "4",
         "--checkpoint.enable", "true", "--checkpoint.interval", "60", "--validation.freq", "60",
         "--metrics.enable_tensorboard", "false"]


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("run")
    proc = run_trainer(TRAIN, dump)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # validation also reports bits per byte
    assert re.search(r"step 60  validation loss [\d.]+  bits/byte [\d.]+", proc.stderr + proc.stdout)
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("validation/bpb", 0) > 0 for r in rows)
    return dump / "checkpoint"


def greedy(checkpoint: Path, out: Path) -> dict:
    proc = script("generate.py", "--checkpoint", str(checkpoint), "--prompt", "And God said", "--temperature", "0",
                  "--max-new-tokens", "12", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("And God said") and len(proc.stdout) > len("And God said")
    assert "tokens/s" in proc.stderr
    return json.loads(out.read_text())


def test_generate_convert_generate_evaluate(trained, tmp_path):
    from_dcp = greedy(trained, tmp_path / "a.json")
    assert len(from_dcp["new_ids"]) == 12
    export = tmp_path / "export"
    assert script("convert_checkpoint.py", "dcp-to-safetensors", str(trained), str(export)).returncode == 0
    assert json.loads((export / "config.json").read_text())["tokenizer"] == "kjv_bpe_4k"
    assert greedy(export, tmp_path / "b.json")["new_ids"] == from_dcp["new_ids"]
    torch_file = tmp_path / "ckpt.pt"
    assert script("convert_checkpoint.py", "dcp-to-torch", str(trained), str(torch_file)).returncode == 0
    assert greedy(torch_file, tmp_path / "c.json")["new_ids"] == from_dcp["new_ids"]

    text = tmp_path / "held_out.txt"
    text.write_text("And the LORD spake unto Moses, saying.\n\nIn the beginning was the Word.\n")
    proc = script("evaluate.py", "--checkpoint", str(export), "--data", str(text), "--seq-len", "32",
                  "--json", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"loss [\d.]+  perplexity [\d.]+  bits/byte [\d.]+", proc.stdout)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["bytes"] == len(text.read_text().encode())  # BOS/EOS count no bytes
    assert abs(result["perplexity"] - 2.718281828 ** result["loss"]) < 1e-6 * result["perplexity"]
    nats = result["loss"] * result["tokens"]
    assert abs(result["bits_per_byte"] - nats / math.log(2) / result["bytes"]) < 1e-9


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint", "/no/such/path"], "does not exist"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
])
def test_bad_arguments_exit_2(args, needle, tmp_path):
    base = {"--checkpoint": str(tmp_path), "--prompt": "x"}
    base.update(dict(zip(args[::2], args[1::2])))
    proc = script("generate.py", *[a for kv in base.items() for a in kv])
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_a_folder_that_is_no_checkpoint_and_a_too_long_prompt_exit_2(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for name in ("generate.py", "evaluate.py"):
        extra = ["--prompt", "x"] if name == "generate.py" else ["--data", str(tmp_path / "notes.txt")]
        proc = script(name, "--checkpoint", str(tmp_path), *extra)
        assert proc.returncode == 2 and "neither a DCP checkpoint" in proc.stderr, proc.stderr
    proc = script("generate.py", "--checkpoint", str(trained), "--prompt", "word " * 5000)
    assert proc.returncode == 2 and "max_seq_len is 4096" in proc.stderr, proc.stderr[-500:]
    proc = script("evaluate.py", "--checkpoint", str(trained), "--data", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "matches no files" in proc.stderr, proc.stderr[-500:]

"""scripts/waaagh_demo.py (the seed's four demonstrations) end to end on CPU at its smallest sizes,
and its usage errors (exit 2, before any model is built)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, load_script

SMALLEST = ["--device", "cpu", "--train-dim", "64", "--train-layers", "1",
            "--ablation-steps", "2", "--ablation-batch", "2", "--ablation-seq-len", "32", "--ablation-eval-batches", "1",
            "--seq-lens", "64", "--tokens-per-step", "128", "--warmup-steps", "1", "--timed-steps", "1",
            "--memory-steps", "2", "--memory-batch", "2", "--memory-period", "8", "--memory-repeats", "2"]


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/waaagh_demo.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_every_demo_prints_its_figures_and_writes_them_to_json(tmp_path):
    out = tmp_path / "demo.json"
    proc = demo(*SMALLEST, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "logits (2, 64, 1000)" in text and "-> (2, 114)" in text  # the seed's example, unchanged
    for header in ("| arm | parameters |", "| seq len | waaagh tok/s |", "recall accuracy"):
        assert header in text
    report = json.loads(out.read_text())
    assert report["basic"]["logits_shape"] == [2, 64, 1000] and report["basic"]["generated_shape"] == [2, 114]
    assert report["basic"]["prompt_kept"] and report["basic"]["parameters"] > 0
    arms = {a["arm"]: a for a in report["ablation"]["arms"]}
    assert list(arms) == ["full", "-ssm", "-local", "-sparse", "-memory", "-prediction", "-moe"]
    assert all(a["val_loss"]["mean"] > 0 and a["parameters"] < arms["full"]["parameters"]
               for name, a in arms.items() if name != "full")
    (point,) = report["speed"]["points"]
    assert point["seq_len"] == 64 and point["batch"] == 2
    assert point["waaagh"]["tokens_per_s"] > 0 and point["llama"]["tokens_per_s"] > 0
    assert point["waaagh"]["peak_gib"] is None and not report["speed"]["memory_measured"]  # CPU: not measured
    memory = {a["arm"]: a for a in report["memory"]["arms"]}
    assert set(memory) == {"with memory head", "without (ablate memory)"}
    assert all(0 <= a["recall_accuracy"]["mean"] <= 1 for a in memory.values())
    assert memory["without (ablate memory)"]["ablate"] == ["memory"]


def test_a_bad_demo_name_exits_2():
    proc = demo("--device", "cpu", "--demos", "basic", "nope")
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def demo_module():
    return load_script("waaagh_demo")


@pytest.mark.parametrize("args,needle", [
    (["--ablation-steps", "0"], "--ablation-steps: must be positive, got 0"),
    (["--seq-lens", "256", "-1"], "--seq-lens: must be positive, got -1"),
    (["--tokens-per-step", "x"], "expected a positive integer, got 'x'"),
    (["--memory-repeats", "1"], "--memory-repeats must be >= 2"),
    (["--train-dim", "100"], "--train-dim 100"),
])
def test_bad_sizes_exit_2_with_a_message(demo_module, capsys, args, needle):
    with pytest.raises(SystemExit) as exit_info:
        demo_module.main(["--device", "cpu", *args])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err

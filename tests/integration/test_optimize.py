"""scripts/optimize.py: a real two-trial study on a tiny HYDRA, its resumption, the best config trained,
pruning of a running trainer, and the exits for bad input (no optuna, a config that does not build)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, load_script, run_trainer

optuna = pytest.importorskip("optuna")

SCRIPT = REPO / "scripts" / "optimize.py"
# 4 steps of a dim-64 HYDRA with a validation every 2: a trial is one trainer start-up and a second of work
TINY = ["--steps", "4", "--val-freq", "2", "--val-steps", "1", "--batch-size", "2", "--seq-len", "64", "--",
        "--model.overrides.dim", "64", "--model.overrides.n_heads", "2", "--model.overrides.n_kv_heads", "1",
        "--model.overrides.head_dim", "16"]


def optimize(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def script():
    return load_script("optimize")


def test_a_study_runs_resumes_and_its_best_config_trains(tmp_path):
    out = tmp_path / "study"
    proc = optimize("--out", out, "--n-trials", "2", "--study-name", "tiny", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    storage = f"sqlite:///{out / 'study.db'}"
    assert (out / "study.db").is_file()
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == 2
    assert all(set(t.params) == {"lr", "warmup_steps", "weight_decay", "mod_capacity", "mor_keep"}
               for t in study.trials)
    # every reported intermediate value is a validation loss of the trial's own metrics.jsonl
    first = study.trials[0]
    rows = [json.loads(line) for line in (out / "trials" / "tiny" / "trial_0000" / "metrics.jsonl").read_text().splitlines()]
    assert first.intermediate_values == {r["step"]: pytest.approx(r["validation/loss"]) for r in rows
                                         if "validation/loss" in r}
    assert first.value == pytest.approx(first.intermediate_values[4])
    assert "best trial #" in proc.stdout

    # the same command again adds to the same study
    proc = optimize("--out", out, "--n-trials", "1", "--study-name", "tiny", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 earlier trials" in proc.stdout
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == 3
    new_params = study.trials[2].params
    assert all(new_params != t.params for t in study.trials[:2])  # the reseeded sampler proposes something new

    # best.toml: the best trial's values in a config the trainer takes as it is
    best = study.best_trial
    text = (out / "best.toml").read_text()
    assert f"# Best trial #{best.number}" in text
    from hydra_titan.config import load_config
    cfg = load_config(["--config", str(out / "best.toml")])
    assert cfg.optimizer.lr == best.params["lr"] and cfg.optimizer.weight_decay == best.params["weight_decay"]
    assert cfg.lr_scheduler.warmup_steps == best.params["warmup_steps"]
    assert cfg.model.overrides["mod_capacity"] == best.params["mod_capacity"]
    assert cfg.model.overrides["mor_capacities"] == [1.0, best.params["mor_keep"]]
    assert cfg.model.overrides["dim"] == 64  # the extra trainer arguments are part of the base config
    dump = tmp_path / "from_best"
    proc = run_trainer(["--config", str(out / "best.toml"), "--training.steps", "2"], dump)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [json.loads(line)["step"] for line in (dump / "metrics.jsonl").read_text().splitlines()][-1] == 2

    # another budget under the same study name is refused, nothing is touched
    before = (out / "best.toml").read_bytes()
    proc = optimize("--out", out, "--n-trials", "1", "--study-name", "tiny", "--steps", "6",
                    *TINY[2:])
    assert proc.returncode == 2 and "another base config, budget or search space" in proc.stderr
    assert (out / "best.toml").read_bytes() == before
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 3


@pytest.mark.parametrize("args,needle", [
    (["--config", "does/not/exist.toml"], "does/not/exist.toml"),
    (["--", "--training.max_norm", "-1"], "training.max_norm"),
    (["--", "--model.overrides.mod_capactiy", "0.5"], "mod_capactiy"),
    (["--storage", "nosuchdb://x"], "--storage nosuchdb://x"),
    (["--space", "mod_capacity", "--", "--model.name", "llama"], "mod_capacity: the model has no MoD blocks"),
])
def test_a_config_the_study_cannot_build_exits_2_and_writes_nothing(script, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.toml").write_text("# an earlier study's best\n")
    assert script.main(["--out", str(out), "--n-trials", "1", *args]) == 2
    assert needle in capsys.readouterr().err
    assert (out / "best.toml").read_text() == "# an earlier study's best\n"
    assert not (out / "study.db").exists() and not (out / "trials").exists()


def test_without_optuna_exit_2_names_the_extra(tmp_path):
    blocker = tmp_path / "optuna"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('No module named optuna')\n")
    proc = optimize("--out", tmp_path / "out", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2 and 'pip install -e ".[tune]"' in proc.stderr
    assert not (tmp_path / "out").exists()


FAKE_TRAINER = textwrap.dedent("""
    import json, signal, sys, time
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(sys.argv[1], "a") as fh:
        for step in range(1, 1000):
            if step % 2 == 0:
                fh.write(json.dumps({"step": step, "validation/loss": 5.0}) + "\\n")
                fh.flush()
            if stop:
                sys.exit(0)
            time.sleep(0.05)
""")


def test_a_pruned_trial_stops_its_trainer_with_sigterm(script, tmp_path):
    """A trainer stand-in (it stops on SIGTERM, as train.py does) and a trial whose pruner says stop at step 4."""

    class Trial:
        number = 0
        reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return self.reported[-1][0] >= 4

    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", FAKE_TRAINER, str(metrics)])
    runner = script.TrialRunner(base=None, space=None, budget=script.Budget(100, 64, 2, 2, 1), folder=tmp_path,
                                trial_timeout=60)
    with pytest.raises(optuna.TrialPruned):
        runner._watch(proc, Trial(), script.MetricsTail(metrics))
    assert proc.poll() == 0  # it left by itself after the SIGTERM, not by a kill
    assert [step for step, _ in Trial.reported] == [2, 4]

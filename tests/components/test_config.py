"""Tests of the job config schema and its TOML + command-line loader."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hydra_titan.config import ConfigError, JobConfig, config_to_dict, load_config, parse_or_exit, save_config
from hydra_titan.config.job_config import validate_config
from hydra_titan.config.manager import format_help


def write_toml(tmp_path: Path, text: str, name: str = "job.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def config_error(argv: list[str]) -> str:
    """The message of the ConfigError that load_config(argv) must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return str(info.value)


# --- defaults -----------------------------------------------------------------


def test_defaults_without_arguments():
    cfg = load_config([])
    assert cfg == JobConfig()
    assert cfg.training.steps == 1000
    assert cfg.training.mixed_precision_param == "bfloat16"
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.parallelism.dp_shard == -1
    assert cfg.tokenizer.name == "kjv_bpe_4k"
    assert cfg.checkpoint.exclude_from_loading == []
    assert cfg.model.overrides == {}


def test_mutable_defaults_are_not_shared():
    a, b = JobConfig(), JobConfig()
    a.model.overrides["mod_capacity"] = 0.5
    a.checkpoint.exclude_from_loading.append("optimizer")
    assert b.model.overrides == {}
    assert b.checkpoint.exclude_from_loading == []


# --- TOML and precedence ------------------------------------------------------


def test_toml_values_are_loaded(tmp_path):
    path = write_toml(
        tmp_path,
        """
        [training]
        steps = 20
        seq_len = 256
        [optimizer]
        lr = 1          # an int in a float field is widened
        name = "adamw8bit"
        [model]
        flavor = "100M"
        [model.overrides]
        mod_capacity = 0.125
        [checkpoint]
        exclude_from_loading = ["optimizer"]
        """,
    )
    cfg = load_config(["--config", path])
    assert (cfg.training.steps, cfg.training.seq_len) == (20, 256)
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.name == "adamw8bit"
    assert cfg.model.flavor == "100M"
    assert cfg.model.overrides == {"mod_capacity": 0.125}
    assert cfg.checkpoint.exclude_from_loading == ["optimizer"]
    assert cfg.training.local_batch_size == 8  # untouched keys keep defaults


def test_cli_override_beats_toml_and_last_flag_wins(tmp_path):
    path = write_toml(tmp_path, "[training]\nsteps = 20\nseq_len = 256\n")
    cfg = load_config(["--training.steps", "7", "--config", path, "--training.seq_len=64", "--training.seq_len", "32"])
    assert cfg.training.steps == 7
    assert cfg.training.seq_len == 32


def test_toml_bool_accepted_for_true_false_choice(tmp_path):
    path = write_toml(tmp_path, "[optimizer]\nfused = true\n")
    assert load_config(["--config", path]).optimizer.fused == "true"


# --- value parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected", [("true", True), ("True", True), ("1", True), ("false", False), ("0", False)]
)
def test_bool_values(text, expected):
    assert load_config(["--compile.fullgraph", text]).compile.fullgraph is expected


def test_bare_bool_flags():
    cfg = load_config(["--compile.enable", "--float8.enable", "--training.steps", "5", "--checkpoint.enable"])
    assert cfg.compile.enable and cfg.float8.enable and cfg.checkpoint.enable
    assert cfg.training.steps == 5


def test_bad_bool_and_bare_non_bool():
    assert "compile.enable" in config_error(["--compile.enable", "yes"])
    assert "training.steps" in config_error(["--training.steps"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optimizer,lr_scheduler", ["optimizer", "lr_scheduler"]),
        (" optimizer , dataloader ", ["optimizer", "dataloader"]),
        ('["optimizer", "train_state"]', ["optimizer", "train_state"]),
        ("", []),
    ],
)
def test_list_values(text, expected):
    cfg = load_config(["--checkpoint.exclude_from_loading", text])
    assert cfg.checkpoint.exclude_from_loading == expected


def test_dict_overrides_via_dotted_keys_merge_with_toml(tmp_path):
    path = write_toml(tmp_path, "[model.overrides]\nn_mor_blocks = 4\nmod_capacity = 0.75\n")
    cfg = load_config(
        [
            "--config", path,
            "--model.overrides.mod_capacity", "0.5",
            "--model.overrides.use_moe=true",
            "--model.overrides.attn_backend", "sdpa",  # not a TOML literal -> string
            "--model.overrides.capacities", "[1.0, 0.5]",
            "--model.overrides.mor.recursions", "3",  # nested dotted key -> nested table
        ]
    )  # fmt: skip
    assert cfg.model.overrides == {
        "n_mor_blocks": 4,
        "mod_capacity": 0.5,
        "use_moe": True,
        "attn_backend": "sdpa",
        "capacities": [1.0, 0.5],
        "mor": {"recursions": 3},
    }


def test_dict_override_as_inline_table_replaces():
    cfg = load_config(["--model.overrides", "{ mod_capacity = 0.25, dim = 256 }"])
    assert cfg.model.overrides == {"mod_capacity": 0.25, "dim": 256}


# --- errors: unknown keys ---------------------------------------------------------


def test_unknown_cli_key_suggests_closest():
    message = config_error(["--training.stepz", "3"])
    assert "training.stepz" in message
    assert "did you mean 'training.steps'" in message


def test_key_in_wrong_section_suggests_the_right_one():
    message = config_error(["--training.lr", "0.1"])
    assert "training.lr" in message and "optimizer.lr" in message


def test_unknown_section_in_toml_names_it_and_suggests(tmp_path):
    path = write_toml(tmp_path, "[trainig]\nsteps = 3\n")
    message = config_error(["--config", path])
    assert "trainig.steps" in message
    assert "did you mean 'training'" in message
    assert path in message


def test_unknown_key_in_toml_names_full_key_and_file(tmp_path):
    path = write_toml(tmp_path, "[optimizer]\nweight_decy = 0.0\n")
    message = config_error(["--config", path])
    assert "optimizer.weight_decy" in message
    assert "did you mean 'optimizer.weight_decay'" in message
    assert path in message


def test_unknown_key_without_close_match_lists_valid_keys():
    message = config_error(["--compile.zzzzzz", "1"])
    assert "compile.zzzzzz" in message and "enable" in message and "fullgraph" in message


def test_malformed_arguments():
    assert "--steps" in config_error(["--steps", "3"])  # no section
    assert "needs a path" in config_error(["--config"])
    assert "stray" in config_error(["stray"])
    assert "model.flavor" in config_error(["--model.flavor.size", "1"])  # not a table


# --- errors: values -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--training.steps", "ten"], "training.steps"),
        (["--training.steps", "2.5"], "training.steps"),
        (["--optimizer.lr", "fast"], "optimizer.lr"),
    ],
)
def test_wrong_type_on_cli(argv, key):
    assert key in config_error(argv)


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[training]\nsteps = 'ten'\n", "training.steps"),
        ("[training]\nsteps = true\n", "training.steps"),  # bool is not an int here
        ("[compile]\nenable = 1\n", "compile.enable"),
        ("[checkpoint]\nexclude_from_loading = 'optimizer'\n", "checkpoint.exclude_from_loading"),
        ("[model]\noverrides = 3\n", "model.overrides"),
        ("training = 3\n", "training"),  # a section must be a table
    ],
)
def test_wrong_type_in_toml(tmp_path, toml, key):
    path = write_toml(tmp_path, toml)
    assert key in config_error(["--config", path])


def test_value_outside_allowed_set_lists_allowed_values(tmp_path):
    message = config_error(["--optimizer.name", "adam"])
    assert "optimizer.name" in message and "adamw, adamw8bit, muon" in message
    path = write_toml(tmp_path, "[lr_scheduler]\ndecay_type = 'step'\n")
    message = config_error(["--config", path])
    assert "lr_scheduler.decay_type" in message and "cosine, linear, wsd, constant" in message


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--training.steps", "0"], "training.steps"),
        (["--training.local_batch_size", "-1"], "training.local_batch_size"),
        (["--data.val_fraction", "1.0"], "data.val_fraction"),
        (["--parallelism.dp_shard", "0"], "parallelism.dp_shard"),
        (["--checkpoint.load_step", "-2"], "checkpoint.load_step"),
        (["--optimizer.beta2", "1"], "optimizer.beta2"),
        (["--training.max_norm", "nan"], "training.max_norm"),
    ],
)
def test_value_outside_range(argv, key):
    assert key in config_error(argv)


def test_range_error_says_what_the_key_is_for():
    message = config_error(["--data.num_workers", "4"])
    assert "data.num_workers: must be >= 0 and <= 0, got 4" in message
    assert "memory-mapped" in message  # why the knob does nothing, from its help line
    assert load_config(["--data.num_workers", "0"]).data.num_workers == 0  # saved configs still load


def test_sentinel_values_inside_range():
    cfg = load_config(["--parallelism.dp_shard", "-1", "--checkpoint.load_step", "-1", "--data.val_fraction", "0"])
    assert (cfg.parallelism.dp_shard, cfg.checkpoint.load_step, cfg.data.val_fraction) == (-1, -1, 0.0)


def test_validate_config_catches_values_set_in_code():
    cfg = JobConfig()
    validate_config(cfg)  # defaults are valid
    cfg.activation_checkpoint.mode = "partial"
    with pytest.raises(ConfigError, match="activation_checkpoint.mode"):
        validate_config(cfg)


# --- errors: files ---------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert missing in config_error(["--config", missing])


def test_malformed_toml_names_the_path(tmp_path):
    path = write_toml(tmp_path, "[training\nsteps = 3\n")
    assert path in config_error(["--config", path])


# --- entry points ------------------------------------------------------------------------


def test_parse_or_exit_exits_2_with_message(capsys):
    with pytest.raises(SystemExit) as info:
        parse_or_exit(["--training.stepz", "3"])
    assert info.value.code == 2
    assert "training.stepz" in capsys.readouterr().err


def test_parse_or_exit_returns_config_when_valid():
    assert parse_or_exit(["--training.steps", "3"]).training.steps == 3


def test_help_lists_sections_keys_and_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--training.stepz", "3", "--help"])  # help wins over errors
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out == format_help()
    assert "[training]" in out and "[float8]" in out
    assert "--training.steps int = 1000" in out
    assert "--optimizer.name {adamw|adamw8bit|muon}" in out


def test_subprocess_exit_code_and_stderr():
    code = "from hydra_titan.config.manager import parse_or_exit; parse_or_exit(['--training.stepz','3'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "training.stepz" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- round trip ---------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(
        [
            "--job.description", 'quotes " back\\slash \t tab, newline\n, unicode é, del \x7f',
            "--optimizer.eps", "1e-12",
            "--optimizer.lr", "1e20",
            "--training.z_loss_weight", "0",
            "--model.overrides.mod_capacity", "0.125",
            "--model.overrides.layer caps", "[0.4, 0.8]",  # key needing quotes
            "--model.overrides.mor.router", "'expert_choice'",
            "--checkpoint.exclude_from_loading", "optimizer,lr_scheduler",
            "--compile.enable",
        ]
    )  # fmt: skip
    path = save_config(cfg, tmp_path / "sub" / "config.toml")
    reloaded = load_config(["--config", str(path)])
    assert reloaded == cfg
    assert config_to_dict(reloaded) == config_to_dict(cfg)
    assert not list(path.parent.glob("*.tmp"))  # written atomically, no leftover


def test_config_to_dict_is_a_deep_copy():
    cfg = load_config(["--model.overrides.mor.recursions", "3"])
    data = config_to_dict(cfg)
    data["model"]["overrides"]["mor"]["recursions"] = 9
    assert cfg.model.overrides == {"mor": {"recursions": 3}}
    assert set(data) == {
        "job", "model", "training", "optimizer", "lr_scheduler", "data", "tokenizer", "parallelism",
        "checkpoint", "activation_checkpoint", "compile", "float8", "metrics", "validation", "debug",
    }  # fmt: skip


# ----------------------------------------------------------------------------- config names

def test_a_bare_config_name_is_found_in_train_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the name still resolves to its train_configs/
    assert load_config(["--config", "1B.toml"]).model.flavor == "1B"
    cfg = load_config(["--config", "llama_1B"])  # the .toml may be left out
    assert (cfg.model.name, cfg.model.flavor) == ("llama", "1B")


def test_a_path_wins_over_a_config_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "1B.toml").write_text('[model]\nflavor = "250M"\n')
    assert load_config(["--config", "1B.toml"]).model.flavor == "250M"


def test_an_unknown_config_name_lists_the_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config file not found: 3B.toml") as e:
        load_config(["--config", "3B.toml"])
    assert "available configs:" in str(e.value) and "1B.toml" in str(e.value) and "moe_500M.toml" in str(e.value)


def test_the_trainer_lists_the_configs_for_an_unknown_name(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    bad = subprocess.run([sys.executable, str(repo / "train.py"), "--config", "nope.toml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "available configs:" in bad.stderr

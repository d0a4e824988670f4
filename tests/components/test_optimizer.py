"""Tests for hydra_titan.components.optimizer (CPU)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from hydra_titan.components.optimizer import (
    NO_DECAY_NAME_PATTERNS,
    OPTIMIZER_NAMES,
    build_optimizer,
    build_param_groups,
    is_no_decay,
)

HPARAMS = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


class _Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.wq = nn.Linear(dim, dim, bias=True)
        # 2-D on purpose: only the name rule can exempt it.
        self.log_beta = nn.Parameter(torch.zeros(2, 1))


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = _Attention(dim)
        self.router = nn.Linear(dim, 1, bias=False)  # 2-D weight: name rule
        self.recursion_emb = nn.Parameter(torch.zeros(3, dim))  # 2-D: name rule
        self.w1 = nn.Linear(dim, 2 * dim, bias=False)


class _TinyModel(nn.Module):
    def __init__(self, dim: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.pos_embedding = nn.Parameter(torch.zeros(4, dim))
        self.layers = nn.ModuleDict({"0": _Block(dim)})
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.frozen = nn.Parameter(torch.zeros(dim, dim), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) + self.pos_embedding[: tokens.shape[1]]
        block = self.layers["0"]
        h = h + block.attention.wq(block.attention_norm(h)) * block.attention.log_beta.sum().exp()
        h = h + block.w1(h)[..., : h.shape[-1]] * block.router(h).sigmoid()
        h = h + block.recursion_emb[0]
        return self.output(self.norm(h))


EXPECTED_DECAY = {"layers.0.attention.wq.weight", "layers.0.w1.weight", "output.weight"}
EXPECTED_NO_DECAY = {
    "tok_embeddings.weight",
    "pos_embedding",
    "layers.0.attention_norm.weight",
    "layers.0.attention_norm.bias",
    "layers.0.attention.wq.bias",
    "layers.0.attention.log_beta",
    "layers.0.router.weight",
    "layers.0.recursion_emb",
    "norm.weight",
    "norm.bias",
}


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def _one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tokens = torch.arange(6).reshape(2, 3)
    model(tokens).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_param_groups_put_each_parameter_in_the_right_group():
    model = _TinyModel()
    optimizer = build_optimizer(model, **HPARAMS)
    groups = _group_names(model, optimizer)
    assert groups["decay"] == EXPECTED_DECAY
    assert groups["no_decay"] == EXPECTED_NO_DECAY


def test_param_groups_weight_decay_values_and_hparams():
    optimizer = build_optimizer(_TinyModel(), **HPARAMS)
    wd = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}
    for group in optimizer.param_groups:
        assert group["lr"] == 1e-3
        assert group["betas"] == (0.9, 0.95)
        assert group["eps"] == 1e-8


def test_frozen_parameters_are_left_out():
    model = _TinyModel()
    optimizer = build_optimizer(model, **HPARAMS)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.frozen) not in in_optimizer
    assert len(in_optimizer) == len(EXPECTED_DECAY) + len(EXPECTED_NO_DECAY)


def test_no_decay_patterns_can_be_extended():
    model = _TinyModel()
    optimizer = build_optimizer(
        model, **HPARAMS, no_decay_patterns=NO_DECAY_NAME_PATTERNS + ("w1",)
    )
    groups = _group_names(model, optimizer)
    assert "layers.0.w1.weight" in groups["no_decay"]
    assert "layers.0.w1.weight" not in groups["decay"]


def test_is_no_decay_rules():
    matrix, vector = torch.zeros(4, 4), torch.zeros(4)
    assert is_no_decay("layers.0.w1.bias", vector)
    assert not is_no_decay("layers.0.w1.weight", matrix)
    special = ("tok_embeddings.weight", "mor.router.proj.weight", "x.recursion_emb", "a.log_beta")
    for name in special:
        assert is_no_decay(name, matrix), name
    # A compile / checkpoint wrapper prefix must not hide the rule.
    assert is_no_decay("layers.0._orig_mod.router.weight", matrix)


def test_empty_group_is_dropped_and_no_trainable_params_raises():
    only_matrices = nn.Linear(4, 4, bias=False)
    groups = build_param_groups(only_matrices, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay"]
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(frozen, **HPARAMS)


def test_group_sizes_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="hydra_titan.components.optimizer"):
        build_optimizer(_TinyModel(dim=8, vocab=16), **HPARAMS)
    decay_params = 8 * 8 + 2 * 8 * 8 + 16 * 8  # wq, w1, output
    assert f"decay: {len(EXPECTED_DECAY)} tensors / {decay_params:,} params" in caplog.text
    assert f"no_decay: {len(EXPECTED_NO_DECAY)} tensors" in caplog.text


def test_fused_auto_on_cpu_is_fused_and_false_is_foreach():
    # fused on CPU too: its found_inf input is how the non-finite guard skips a step on the device
    assert build_optimizer(_TinyModel(), **HPARAMS, fused="auto").defaults["fused"] is True
    optimizer = build_optimizer(_TinyModel(), **HPARAMS, fused="false")
    assert not optimizer.defaults.get("fused")
    assert optimizer.defaults["foreach"] is True


@pytest.mark.parametrize("flag", ["true", True, "TRUE"])
def test_fused_true_on_cpu_is_fused_and_matches_foreach(flag):
    torch.manual_seed(0)
    fused_model = _TinyModel()
    foreach_model = _TinyModel()
    foreach_model.load_state_dict(fused_model.state_dict())
    initial = fused_model.output.weight.detach().clone()
    fused_opt = build_optimizer(fused_model, **HPARAMS, fused=flag)
    foreach_opt = build_optimizer(foreach_model, **HPARAMS, fused="false")
    assert fused_opt.defaults["fused"] is True
    assert not foreach_opt.defaults.get("fused")
    for _ in range(2):
        _one_step(fused_model, fused_opt)
        _one_step(foreach_model, foreach_opt)
    pairs = zip(fused_model.named_parameters(), foreach_model.named_parameters())
    for (name, fused_p), (_, foreach_p) in pairs:
        torch.testing.assert_close(fused_p, foreach_p, msg=name)
    assert not torch.equal(fused_model.output.weight, initial)  # the steps did something


def test_fused_failure_falls_back_to_foreach_with_warning(monkeypatch, caplog):
    real_adamw = torch.optim.AdamW

    class NoFusedAdamW(real_adamw):  # type: ignore[misc, valid-type]
        def __init__(self, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("fused=True requires all the params to be on CUDA")
            super().__init__(*args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedAdamW)
    with caplog.at_level(logging.WARNING, logger="hydra_titan.components.optimizer"):
        optimizer = build_optimizer(_TinyModel(), **HPARAMS, fused="true")
    assert isinstance(optimizer, NoFusedAdamW)
    assert optimizer.defaults["foreach"] is True
    assert "falling back to foreach" in caplog.text


def test_bad_fused_value_raises():
    with pytest.raises(ValueError, match="fused"):
        build_optimizer(_TinyModel(), **HPARAMS, fused="sometimes")


def test_unknown_optimizer_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown optimizer") as info:
        build_optimizer(_TinyModel(), name="lion", **HPARAMS)
    for name in OPTIMIZER_NAMES:
        assert name in str(info.value)
    assert set(OPTIMIZER_NAMES) == {"adamw", "adamw8bit", "muon"}


def test_adamw8bit_without_torchao_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # makes the import fail
    with pytest.raises(ImportError, match="torchao") as info:
        build_optimizer(_TinyModel(), name="adamw8bit", **HPARAMS)
    assert "float8" in str(info.value)


def test_adamw8bit_builds_with_the_same_groups():
    pytest.importorskip("torchao.optim")
    model = _TinyModel()
    optimizer = build_optimizer(model, name="adamw8bit", **HPARAMS)
    assert type(optimizer).__name__ == "AdamW8bit"
    assert _group_names(model, optimizer) == {
        "decay": EXPECTED_DECAY,
        "no_decay": EXPECTED_NO_DECAY,
    }
    wd = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}


@pytest.mark.slow
def test_adamw8bit_steps_on_cpu():
    """torchao compiles its step; on CPU this takes ~15 s and needs a C++ compiler."""
    pytest.importorskip("torchao.optim")
    model = nn.Sequential(nn.Linear(64, 64, bias=True))  # 4096-element weight: 8-bit state
    optimizer = build_optimizer(model, name="adamw8bit", **HPARAMS)
    before = model[0].weight.detach().clone()
    model(torch.randn(4, 64)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(before, model[0].weight)
    assert type(optimizer.state[model[0].weight]["exp_avg"]).__name__ == "OptimState8bit"


def test_works_with_fsdp2_dtensor_parameters(single_rank_group):
    """Groups and a step work after fully_shard (1-rank gloo group on CPU)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _TinyModel()
    fully_shard(model)
    assert isinstance(model.output.weight, DTensor)
    optimizer = build_optimizer(model, **HPARAMS)
    assert _group_names(model, optimizer) == {
        "decay": EXPECTED_DECAY,
        "no_decay": EXPECTED_NO_DECAY,
    }
    before = model.output.weight.full_tensor().clone()
    _one_step(model, optimizer)
    assert not torch.equal(before, model.output.weight.full_tensor())

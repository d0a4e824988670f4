"""Tests for hydra_titan.components.lr_scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from hydra_titan.components.lr_scheduler import (
    DECAY_TYPES,
    build_lr_scheduler,
    lr_multiplier,
)


def _schedule(**overrides):
    args = dict(
        warmup_steps=10, decay_type="cosine", decay_ratio=0.2, min_lr_factor=0.1, total_steps=110
    )
    args.update(overrides)
    return args


def _multipliers(n: int, **overrides) -> list[float]:
    args = _schedule(**overrides)
    return [lr_multiplier(step, **args) for step in range(n)]


def _optimizer(base_lr: float = 0.5, n_groups: int = 1) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(n_groups)]
    return torch.optim.SGD(groups, lr=base_lr)


@pytest.mark.parametrize("decay_type", DECAY_TYPES)
def test_warmup_starts_above_zero_and_reaches_one(decay_type):
    values = _multipliers(11, decay_type=decay_type)
    assert values[0] == pytest.approx(1 / 11)
    assert values[0] > 0
    assert values[9] == pytest.approx(10 / 11)
    assert values[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:10], values[1:11]))


def test_no_warmup_starts_at_one():
    assert lr_multiplier(0, **_schedule(warmup_steps=0)) == pytest.approx(1.0)


def test_cosine_midpoint_and_end():
    args = _schedule(decay_type="cosine", min_lr_factor=0.1)
    assert lr_multiplier(60, **args) == pytest.approx(0.1 + 0.9 * 0.5)  # half of [10, 110]
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_multiplier(35, **args) == pytest.approx(quarter)
    assert lr_multiplier(110, **args) == pytest.approx(0.1)
    assert lr_multiplier(500, **args) == pytest.approx(0.1)  # held after the end
    decay = _multipliers(111, **args)[10:]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_linear_midpoint_and_end():
    args = _schedule(decay_type="linear", min_lr_factor=0.2)
    assert lr_multiplier(60, **args) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_multiplier(110, **args) == pytest.approx(0.2)
    assert lr_multiplier(35, **args) == pytest.approx(0.2 + 0.8 * 0.75)


def test_wsd_is_constant_then_decays_over_exactly_the_last_fraction():
    total, ratio, warmup = 100, 0.25, 10
    args = _schedule(decay_type="wsd", decay_ratio=ratio, total_steps=total, warmup_steps=warmup)
    values = _multipliers(total + 1, **args)
    decay_start = total - round(ratio * total)  # 75
    assert all(v == 1.0 for v in values[warmup : decay_start + 1])
    decaying = values[decay_start + 1 :]
    assert len(decaying) == round(ratio * total)
    assert all(a > b for a, b in zip([1.0] + decaying, decaying))
    assert values[total] == pytest.approx(args["min_lr_factor"])
    assert values[decay_start + 13] == pytest.approx(0.1 + 0.9 * (1 - 13 / 25))


def test_wsd_rounds_the_decay_length():
    # 0.29 * 100 = 28.999... in floating point: the decay must still be 29 steps.
    values = _multipliers(101, decay_type="wsd", decay_ratio=0.29, total_steps=100)
    assert sum(v < 1.0 for v in values[10:]) == 29


def test_wsd_with_zero_decay_ratio_stays_constant():
    values = _multipliers(120, decay_type="wsd", decay_ratio=0.0)
    assert all(v == 1.0 for v in values[10:])


def test_constant_after_warmup_ignores_min_lr():
    values = _multipliers(200, decay_type="constant", min_lr_factor=0.0)
    assert all(v == 1.0 for v in values[10:])


def test_scheduler_sets_every_group_lr_to_base_times_multiplier():
    optimizer = _optimizer(base_lr=0.5, n_groups=2)
    args = _schedule(total_steps=30, warmup_steps=5)
    scheduler = build_lr_scheduler(optimizer, **args)
    for step in range(35):
        expected = 0.5 * lr_multiplier(step, **args)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected, expected])
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("decay_type", DECAY_TYPES)
def test_state_dict_round_trip_continues_the_same_sequence(decay_type):
    args = _schedule(decay_type=decay_type, total_steps=40, warmup_steps=4)
    optimizer = _optimizer()
    scheduler = build_lr_scheduler(optimizer, **args)
    reference = []
    for step in range(40):
        if step == 17:
            saved = scheduler.state_dict()
            saved_optimizer = optimizer.state_dict()
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    fresh_optimizer = _optimizer()
    resumed = build_lr_scheduler(fresh_optimizer, **args)
    # As the checkpointer does: optimizer (its groups hold the current lr) and schedule.
    fresh_optimizer.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved)
    continued = []
    for _ in range(17, 40):
        continued.append(fresh_optimizer.param_groups[0]["lr"])
        fresh_optimizer.step()
        resumed.step()
    assert continued == pytest.approx(reference[17:])
    assert saved["last_epoch"] == 17


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=200), "warmup_steps"),
        (dict(min_lr_factor=1.5), "min_lr_factor"),
        (dict(min_lr_factor=-0.1), "min_lr_factor"),
        (dict(decay_ratio=1.5), "decay_ratio"),
        (dict(decay_ratio=-0.1), "decay_ratio"),
        (dict(total_steps=0), "total_steps"),
        (dict(decay_type="wsd", decay_ratio=0.95), "decay_ratio"),  # overlaps warmup
    ],
)
def test_bad_arguments_raise_naming_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        build_lr_scheduler(_optimizer(), **_schedule(**overrides))


def test_unknown_decay_type_lists_the_known_ones():
    with pytest.raises(ValueError, match="decay_type") as info:
        build_lr_scheduler(_optimizer(), **_schedule(decay_type="exponential"))
    for name in ("cosine", "linear", "wsd", "constant"):
        assert name in str(info.value)


def test_fit_warmup_leaves_room_for_the_decay():
    from hydra_titan.components.lr_scheduler import fit_warmup, validate_schedule

    assert fit_warmup(200, decay_type="cosine", decay_ratio=0.2, total_steps=1000) == 200
    assert fit_warmup(2000, decay_type="cosine", decay_ratio=0.2, total_steps=20) == 20
    assert fit_warmup(2000, decay_type="wsd", decay_ratio=0.2, total_steps=20) == 16
    validate_schedule(warmup_steps=16, decay_type="wsd", decay_ratio=0.2, min_lr_factor=0.1, total_steps=20)

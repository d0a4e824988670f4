"""Mixture-of-Depths routing (DESIGN §3.2, §3.4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hydra_titan.models.hydra import HydraModel
from hydra_titan.models.hydra.args import HYDRA_FLAVORS, HydraModelArgs
from hydra_titan.models.common.mod import MoDRouter
from hydra_titan.models.common.routing import static_capacity, threshold_indices, threshold_select


class RecordingInner:
    """A stand-in block: Δ(x) = 2x + position, and it records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, positions, valid):
        self.calls.append((x.detach().clone(), positions.clone(), None if valid is None else valid.clone()))
        return 2 * x + positions.unsqueeze(-1).to(x.dtype), {}


def make_router(capacity=0.5, dim=8, mode="topk") -> MoDRouter:
    router = MoDRouter(dim, capacity, mode)
    router.init_weights(0.5)
    return router


@pytest.mark.parametrize("capacity,seq_len", [(0.75, 16), (0.5, 7), (0.125, 64), (1.0, 9), (0.1, 10), (0.3, 10)])
def test_training_keeps_exactly_ceil_capacity_tokens(capacity, seq_len):
    router = make_router(capacity)
    inner = RecordingInner()
    x = torch.randn(3, seq_len, 8)
    pos = torch.arange(seq_len).expand(3, seq_len)
    _, stats = router(x, pos, inner)
    k = math.ceil(capacity * seq_len - 1e-9)
    assert inner.calls[0][0].shape == (3, k, 8)
    assert stats["mod_frac"].item() == pytest.approx(k / seq_len)


def test_static_capacity_values():
    assert [static_capacity(0.75, 16), static_capacity(0.7, 10), static_capacity(0.01, 10),
            static_capacity(1.0, 5)] == [12, 7, 1, 5]


def test_selection_is_top_k_of_router_scores_in_causal_order():
    router = make_router(0.5)
    inner = RecordingInner()
    x = torch.randn(2, 10, 8)
    pos = torch.arange(10).expand(2, 10)
    router(x, pos, inner)
    logits = router.router(x).squeeze(-1)
    chosen = inner.calls[0][1]
    for b in range(2):
        expected = sorted(logits[b].topk(5).indices.tolist())
        assert chosen[b].tolist() == expected  # positions, increasing


def test_output_is_router_weighted_update_on_selected_and_identity_elsewhere():
    router = make_router(0.5)
    x = torch.randn(2, 10, 8)
    pos = torch.arange(10).expand(2, 10)
    out, _ = router(x, pos, RecordingInner())
    logits = router.router(x).squeeze(-1)
    for b in range(2):
        sel = set(logits[b].topk(5).indices.tolist())
        for t in range(10):
            if t in sel:
                delta = 2 * x[b, t] + t
                torch.testing.assert_close(out[b, t], x[b, t] + torch.sigmoid(logits[b, t]) * delta)
            else:
                assert torch.equal(out[b, t], x[b, t])


def test_aux_loss_is_bce_against_topk_membership():
    router = make_router(0.25)
    x = torch.randn(2, 12, 8)
    _, stats = router(x, torch.arange(12).expand(2, 12), RecordingInner())
    logits = router.router(x).squeeze(-1)
    target = torch.zeros(2, 12)
    for b in range(2):
        target[b, logits[b].topk(3).indices] = 1.0
    torch.testing.assert_close(stats["mod_aux"], F.binary_cross_entropy_with_logits(logits, target))


def test_threshold_routing_selects_positive_logits_and_is_batch_consistent():
    router = make_router(0.5).eval()
    x = torch.randn(3, 9, 8)
    pos = torch.arange(9).expand(3, 9)
    out, stats = router(x, pos, RecordingInner())
    logits = router.router(x).squeeze(-1)
    assert stats["mod_frac"].item() == pytest.approx((logits > 0).float().mean().item())
    for b in range(3):
        single, _ = router(x[b:b + 1], pos[b:b + 1], RecordingInner())
        torch.testing.assert_close(out[b:b + 1], single)  # padding never leaks across sequences
        for t in range(9):
            if logits[b, t] <= 0:
                assert torch.equal(out[b, t], x[b, t])


def test_threshold_indices_pad_to_largest_count():
    mask = torch.tensor([[True, False, True, True], [False, False, True, False], [False] * 4])
    idx, valid = threshold_indices(mask)
    assert idx.shape == (3, 3)
    assert idx[0].tolist() == [0, 2, 3] and valid[0].tolist() == [True, True, True]
    assert idx[1, 0].item() == 2 and valid[1].tolist() == [True, False, False]
    assert valid[2].tolist() == [False, False, False]


def test_threshold_select_masks_one_token_and_selects_several():
    one = torch.tensor([[True], [False]])
    idx, valid = threshold_select(one)
    assert idx is None and torch.equal(valid, one)        # one token: nothing gathered, its mask kept
    mask = torch.tensor([[True, False, True], [False, False, True]])
    idx, valid = threshold_select(mask)
    ref_idx, ref_valid = threshold_indices(mask)
    assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)


def test_threshold_mode_masks_a_one_token_step_instead_of_gathering():
    torch.manual_seed(0)
    router = make_router(0.5).eval()
    inner = RecordingInner()
    x = torch.randn(8, 1, 8)
    pos = torch.full((8, 1), 7)
    out, _ = router(x, pos, inner)
    keep = router.router(x).squeeze(-1) > 0
    assert 0 < keep.sum() < 8                             # rows that run the block and rows that skip it
    assert inner.calls[0][0].shape == (8, 1, 8) and torch.equal(inner.calls[0][2], keep)
    w = torch.sigmoid(router.router(x)) * keep.unsqueeze(-1)
    torch.testing.assert_close(out, x + w * (2 * x + pos.unsqueeze(-1)))


def test_soft_mode_processes_every_token_and_weights_by_sigmoid():
    router = make_router(0.5, mode="soft")
    inner = RecordingInner()
    x = torch.randn(2, 6, 8)
    pos = torch.arange(6).expand(2, 6)
    out, stats = router(x, pos, inner)
    assert inner.calls[0][0].shape == (2, 6, 8)
    w = torch.sigmoid(router.router(x))
    torch.testing.assert_close(out, x + w * (2 * x + pos.unsqueeze(-1)))
    assert stats["mod_aux"].item() == 0.0


def tiny_args(**kw) -> HydraModelArgs:
    base = dict(vocab_size=97, dim=32, n_mor_blocks=2, recursions=2, n_heads=2, n_kv_heads=2, head_dim=16,
                max_seq_len=64, mod_capacity=0.5)
    base.update(kw)
    return HydraModelArgs(**base)


def test_router_gets_gradient_from_cross_entropy_alone():
    """The lesson of the original HYDRA: the router must be on the task-gradient path."""
    model = HydraModel(tiny_args())
    model.init_weights()
    tokens = torch.randint(0, 97, (2, 16))
    out = model(tokens)
    F.cross_entropy(out["logits"].flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    for i in model.mod_layer_ids:
        grad = model.layers[str(i)].mod.router.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_mod_every_routes_every_other_block():
    model = HydraModel(tiny_args(n_mor_blocks=4, mod_every=2))
    assert [model.layers[str(i)].mod is not None for i in range(4)] == [False, True, False, True]
    assert HydraModel(tiny_args(mod_every=0)).mod_layer_ids == []


def test_auto_scaled_aux_weight():
    args = HYDRA_FLAVORS["1B"]  # L = 24 * 4 = 96, dim 2048
    assert args.mod_aux_weight_value == pytest.approx(0.01 * (96 / 32) * math.sqrt(2048 / 768))
    assert tiny_args(mod_aux_weight=0.5).mod_aux_weight_value == 0.5


@pytest.mark.parametrize("capacity", [0.0, -0.1, 1.01, 2.0])
def test_capacity_outside_unit_interval_is_rejected(capacity):
    with pytest.raises(ValueError, match="mod_capacity"):
        tiny_args(mod_capacity=capacity)

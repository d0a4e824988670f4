"""Mixture-of-Recursions: expert-choice hierarchical routing with static capacities (DESIGN §3.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hydra_titan.models.common.rope import rope_cache
from hydra_titan.models.hydra.args import HydraModelArgs
from hydra_titan.models.hydra.mor import MoRBlock


def mor_args(**kw) -> HydraModelArgs:
    base = dict(vocab_size=64, dim=32, n_mor_blocks=1, recursions=3, n_heads=2, n_kv_heads=2, head_dim=16,
                max_seq_len=128)
    base.update(kw)
    return HydraModelArgs(**base)


def build_block(**kw) -> MoRBlock:
    block = MoRBlock(mor_args(**kw))
    block.init_weights(0.2, 0.05)
    return block


def record_steps(block: MoRBlock) -> list:
    """Wrap the shared block so each recursion records (input, positions) it was given."""
    calls = []
    inner = block.block.residual_update

    def recording(x, positions, rope, cache=None):
        calls.append((x.detach().clone(), positions.clone()))
        return inner(x, positions, rope, cache)

    block.block.residual_update = recording
    return calls


def run(block, bsz=2, seq_len=20, valid=None):
    x = torch.randn(bsz, seq_len, 32)
    pos = torch.arange(seq_len).expand(bsz, seq_len)
    delta, stats = block(x, pos, rope_cache(16, 128), valid)
    return x, pos, delta, stats


@pytest.mark.parametrize("caps,seq_len", [((1.0, 0.75, 0.5), 20), ((0.8, 0.5, 0.2), 10), ((1.0, 1.0, 0.3), 16)])
def test_selected_sets_are_nested_with_configured_sizes(caps, seq_len):
    block = build_block(mor_capacities=caps)
    calls = record_steps(block)
    run(block, seq_len=seq_len)
    sizes = [c[1].shape[1] for c in calls]
    assert sizes == [min(seq_len, math.ceil(c * seq_len - 1e-9)) for c in caps]
    for b in range(2):
        sets = [set(c[1][b].tolist()) for c in calls]
        for earlier, later in zip(sets, sets[1:]):
            assert later <= earlier
        for c in calls:
            assert c[1][b].tolist() == sorted(c[1][b].tolist())  # causal order kept


def test_default_capacities_decrease_linearly():
    assert mor_args(recursions=4).mor_step_capacities == (1.0, 0.75, 0.5, 0.25)


def test_step_selects_top_k_router_scores_among_active_tokens():
    block = build_block(recursions=2, mor_capacities=(0.5, 0.25))
    calls = record_steps(block)
    x, _, _, _ = run(block, bsz=1, seq_len=8)
    logits0 = block.routers[0](x).squeeze(-1)
    assert calls[0][1][0].tolist() == sorted(logits0[0].topk(4).indices.tolist())
    # step 1 ranks the 4 survivors by the step-1 router on the updated stream; keeps 2 of them
    assert len(calls[1][1][0]) == 2 and set(calls[1][1][0].tolist()) <= set(calls[0][1][0].tolist())


def test_depth_histogram_counts_recursions_per_token():
    block = build_block(mor_capacities=(0.5, 0.25, 0.25))
    _, _, _, stats = run(block, bsz=2, seq_len=16)
    # 8 tokens ran >= 1 step, 4 ran 3 steps (steps 2 and 3 keep the same 4): depth 0: 8, 1: 4, 3: 4
    torch.testing.assert_close(stats["mor_depth_hist"], torch.tensor([0.5, 0.25, 0.0, 0.25]))


def test_single_recursion_output_formula():
    """out = x + alpha * sigmoid(router(x)) * f(x + e_0) for every token (capacity 1)."""
    block = build_block(recursions=1, mor_capacities=(1.0,), mor_router_alpha=0.7)
    x, pos, delta, _ = run(block, seq_len=6)
    cache = rope_cache(16, 128)
    gate = 0.7 * torch.sigmoid(block.routers[0](x))
    expected = gate * block.block.residual_update(x + block.recursion_emb[0], pos, cache)[0]
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)


def test_recursion_embedding_is_added_to_each_step_input():
    block = build_block(mor_capacities=(1.0, 1.0, 1.0))
    calls = record_steps(block)
    x, _, _, _ = run(block, seq_len=5)
    torch.testing.assert_close(calls[0][0], x + block.recursion_emb[0])
    assert not torch.allclose(calls[1][0] - block.recursion_emb[1], calls[0][0] - block.recursion_emb[0])


def test_tokens_that_leave_the_loop_are_not_updated_later():
    block = build_block(mor_capacities=(1.0, 0.5, 0.25))
    calls = record_steps(block)
    x, _, delta, _ = run(block, bsz=1, seq_len=8)
    last_step = set(calls[2][1][0].tolist())
    # tokens out after step 1 got exactly one update: recompute it
    cache = rope_cache(16, 128)
    pos = torch.arange(8).expand(1, 8)
    gate = torch.sigmoid(block.routers[0](x).squeeze(-1))
    step0 = gate.unsqueeze(-1) * block.block.residual_update(x + block.recursion_emb[0], pos, cache)[0]
    kept_after_0 = set(calls[1][1][0].tolist())
    for t in range(8):
        if t not in kept_after_0:
            torch.testing.assert_close(delta[0, t], step0[0, t], atol=1e-6, rtol=1e-5)
    assert last_step <= kept_after_0


def test_aux_loss_is_bce_on_selection_and_routers_get_task_gradient():
    block = build_block(mor_capacities=(1.0, 0.5, 0.25))
    x, _, delta, stats = run(block, seq_len=12)
    assert stats["mor_aux"] > 0
    delta.square().sum().backward()  # a task-like loss, no aux term
    for r in range(3):
        assert block.routers[r].weight.grad.abs().sum() > 0


def test_aux_loss_value_for_one_step():
    block = build_block(recursions=1, mor_capacities=(0.5,))
    x, _, _, stats = run(block, bsz=1, seq_len=10)
    logits = block.routers[0](x).squeeze(-1)
    target = torch.zeros_like(logits)
    target[0, logits[0].topk(5).indices] = 1
    torch.testing.assert_close(stats["mor_aux"], F.binary_cross_entropy_with_logits(logits, target))


def test_threshold_eval_routing_is_nested_and_causal():
    block = build_block(mor_capacities=(1.0, 0.5, 0.5)).eval()
    calls = record_steps(block)
    x, pos, delta, stats = run(block, bsz=1, seq_len=16)
    assert calls[0][1].shape[1] == 16  # full-capacity step keeps everyone, as in training
    sets = [set(c[1][0].tolist()) for c in calls]
    assert sets[2] <= sets[1] <= sets[0]
    # causality: perturbing token 9 leaves tokens 0..8 unchanged
    x2 = x.clone()
    x2[:, 9] += 2.0
    delta2, _ = block(x2, pos, rope_cache(16, 128))
    torch.testing.assert_close(delta[:, :9], delta2[:, :9])


def test_threshold_eval_is_batch_consistent():
    block = build_block(mor_capacities=(0.9, 0.6, 0.3)).eval()
    x = torch.randn(3, 14, 32)
    pos = torch.arange(14).expand(3, 14)
    cache = rope_cache(16, 128)
    batched, _ = block(x, pos, cache)
    for b in range(3):
        single, _ = block(x[b:b + 1], pos[b:b + 1], cache)
        torch.testing.assert_close(batched[b:b + 1], single, atol=1e-6, rtol=1e-5)


def test_padding_marked_invalid_is_never_processed():
    block = build_block(mor_capacities=(1.0, 0.5, 0.5)).eval()
    valid = torch.tensor([[True] * 6 + [False] * 4])
    _, _, delta, stats = run(block, bsz=1, seq_len=10, valid=valid)
    assert torch.equal(delta[0, 6:], torch.zeros(4, 32))
    assert stats["mor_depth_hist"][0].item() == 0.0  # every valid token ran step 0


def test_gaussian_mode_mixes_recursion_outputs():
    block = build_block(mor_mode="gaussian", mor_gaussian_sigma=0.8)
    calls = record_steps(block)
    x, pos, delta, stats = run(block, seq_len=7)
    assert [c[0].shape[1] for c in calls] == [7, 7, 7]  # dense: every token, every recursion
    cache = rope_cache(16, 128)
    mu = 1 + 2 * torch.sigmoid(block.routers[0](x).squeeze(-1))
    w = torch.softmax(-((torch.arange(1, 4.0) - mu.unsqueeze(-1)) ** 2) / (2 * 0.8 ** 2), dim=-1)
    h, mixed = x, torch.zeros_like(x)
    for r in range(3):
        h = h + block.block.residual_update(h + block.recursion_emb[r], pos, cache)[0]
        mixed = mixed + w[..., r:r + 1] * h
    torch.testing.assert_close(delta, mixed - x, atol=1e-5, rtol=1e-4)
    assert stats["mor_depth_hist"].sum().item() == pytest.approx(1.0)
    assert 1 / 3 <= stats["ponder"].item() <= 1.0


@pytest.mark.parametrize("caps,match", [((1.0, 0.5), "entries"), ((0.5, 0.8, 0.2), "increase"),
                                        ((1.0, 0.0, 0.0), r"\(0, 1\]")])
def test_bad_capacities_are_rejected(caps, match):
    with pytest.raises(ValueError, match=match):
        mor_args(mor_capacities=caps)

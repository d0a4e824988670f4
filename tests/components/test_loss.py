"""Tests for hydra_titan.components.loss (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hydra_titan.components.loss import (
    IGNORE_INDEX,
    build_loss_fn,
    chunked_cross_entropy_sum,
    count_target_tokens,
    cross_entropy_sum,
    z_loss,
)

B, S, V = 3, 7, 50  # 21 tokens: chunk sizes 4 and 8 do not divide it, 7 and 21 do


def _data(dtype=torch.float32, ignore_some=True, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, S, V, generator=gen) * scale).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=gen)
    if ignore_some:
        labels[0, :2] = IGNORE_INDEX
        labels[2, -1] = IGNORE_INDEX
    return logits, labels


def _value_and_grad(fn, logits, labels):
    leaf = logits.detach().clone().requires_grad_()
    value = fn(leaf, labels)
    value.backward()
    return value.detach(), leaf.grad


def _loss_fn(chunked: bool, z=0.0, aux=0.0, ponder=0.0, chunk_size=4):
    return build_loss_fn(
        chunked=chunked,
        chunk_size=chunk_size,
        z_loss_weight=z,
        aux_loss_weight=aux,
        ponder_loss_weight=ponder,
    )


# ----------------------------------------------------------------- plain CE


def test_cross_entropy_sum_matches_torch_sum():
    logits, labels = _data(ignore_some=False)
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(cross_entropy_sum(logits, labels), expected)


def test_cross_entropy_sum_upcasts_bf16_to_fp32():
    logits, labels = _data(dtype=torch.bfloat16)
    result = cross_entropy_sum(logits, labels)
    assert result.dtype == torch.float32
    expected = F.cross_entropy(
        logits.float().reshape(-1, V),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    torch.testing.assert_close(result, expected)


def test_ignore_index_tokens_do_not_count():
    logits, labels = _data()
    keep = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    per_token = -log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    expected = per_token[keep].sum()
    torch.testing.assert_close(cross_entropy_sum(logits, labels), expected)
    all_ignored = torch.full_like(labels, IGNORE_INDEX)
    assert cross_entropy_sum(logits, all_ignored).item() == 0.0
    assert chunked_cross_entropy_sum(logits, all_ignored, 4).item() == 0.0


def test_count_target_tokens_is_a_tensor():
    _, labels = _data()
    count = count_target_tokens(labels)
    assert isinstance(count, torch.Tensor)
    assert count.item() == B * S - 3
    assert count_target_tokens(labels, ignore_index=labels[1, 1].item()).item() == B * S - (
        labels == labels[1, 1]
    ).sum().item()


def test_shape_mismatch_raises():
    logits, labels = _data()
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy_sum(logits, labels[:, :-1])


# --------------------------------------------------------------- chunked CE


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 8, 21, 1000])
def test_chunked_matches_plain_fp32_value_and_grad(chunk_size):
    logits, labels = _data()
    plain_v, plain_g = _value_and_grad(cross_entropy_sum, logits, labels)
    chunk_v, chunk_g = _value_and_grad(
        lambda x, y: chunked_cross_entropy_sum(x, y, chunk_size), logits, labels
    )
    torch.testing.assert_close(chunk_v, plain_v, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(chunk_g, plain_g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [5, 7])
def test_chunked_matches_plain_bf16_value_and_grad(chunk_size):
    logits, labels = _data(dtype=torch.bfloat16)
    plain_v, plain_g = _value_and_grad(cross_entropy_sum, logits, labels)
    chunk_v, chunk_g = _value_and_grad(
        lambda x, y: chunked_cross_entropy_sum(x, y, chunk_size), logits, labels
    )
    assert chunk_v.dtype == torch.float32
    assert chunk_g.dtype == torch.bfloat16
    torch.testing.assert_close(chunk_v, plain_v, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(chunk_g.float(), plain_g.float(), atol=1e-2, rtol=1.6e-2)


def test_chunked_fp64_gradient_is_exact_and_scales_with_grad_output():
    logits, labels = _data(dtype=torch.float64)
    plain_v, plain_g = _value_and_grad(lambda x, y: 2.5 * cross_entropy_sum(x, y), logits, labels)
    chunk_v, chunk_g = _value_and_grad(
        lambda x, y: 2.5 * chunked_cross_entropy_sum(x, y, 4), logits, labels
    )
    torch.testing.assert_close(chunk_v, plain_v, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(chunk_g, plain_g, atol=1e-12, rtol=1e-12)


def test_chunked_ignored_rows_get_zero_gradient():
    logits, labels = _data()
    _, grad = _value_and_grad(lambda x, y: chunked_cross_entropy_sum(x, y, 4), logits, labels)
    assert torch.all(grad[0, :2] == 0) and torch.all(grad[2, -1] == 0)
    assert torch.all(grad[1].abs().sum(-1) > 0)


def test_chunked_does_not_modify_fp32_logits_and_works_without_grad():
    logits, labels = _data()
    before = logits.detach().clone()
    with torch.no_grad():
        value = chunked_cross_entropy_sum(logits, labels, 4)
    assert torch.equal(logits.detach(), before)
    torch.testing.assert_close(value, cross_entropy_sum(before, labels))


def test_chunked_cannot_backward_twice():
    logits, labels = _data()
    loss = chunked_cross_entropy_sum(logits, labels, 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_chunked_rejects_bad_chunk_size():
    logits, labels = _data()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy_sum(logits, labels, 0)


class _Fp32AllocationRecorder(TorchDispatchMode):
    """Records the largest fp32 tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest_fp32 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest_fp32 = max(self.largest_fp32, tensor.numel())
        return out


@pytest.mark.parametrize(
    ("loss", "bounded"),
    [
        (lambda x, y: chunked_cross_entropy_sum(x, y, 4), True),
        (cross_entropy_sum, False),  # the control: plain CE does upcast all of it
    ],
)
def test_chunked_fp32_temporaries_are_bounded_by_one_chunk(loss, bounded):
    logits, labels = _data(dtype=torch.bfloat16)
    recorder = _Fp32AllocationRecorder()
    with recorder:
        loss(logits, labels).backward()
    if bounded:
        assert recorder.largest_fp32 <= 4 * V
    else:
        assert recorder.largest_fp32 >= B * S * V


# ------------------------------------------------------------------ z-loss


def test_z_loss_matches_hand_formula_with_ignore_mask():
    logits, labels = _data()
    keep = labels != IGNORE_INDEX
    lse = torch.log(torch.exp(logits.double()).sum(-1))
    expected = (lse[keep] ** 2).mean().float()
    torch.testing.assert_close(z_loss(logits, labels), expected)
    assert z_loss(logits, torch.full_like(labels, IGNORE_INDEX)).item() == 0.0


# ------------------------------------------------------------- build_loss_fn


def _outputs(logits, aux=0.3, ponder=0.7):
    return {"logits": logits, "aux_loss": torch.tensor(aux), "ponder_loss": torch.tensor(ponder)}


@pytest.mark.parametrize("chunked", [False, True])
def test_loss_fn_total_matches_hand_computation(chunked):
    logits, labels = _data()
    weights = dict(z=1e-2, aux=0.5, ponder=0.25)
    loss_fn = _loss_fn(chunked, **weights)
    num_global = 40  # e.g. more target tokens on the other micro-batches / ranks
    total, parts = loss_fn(_outputs(logits), labels, torch.tensor(num_global))

    local = (labels != IGNORE_INDEX).sum().item()
    fraction = local / num_global
    ce = F.cross_entropy(
        logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    ) / num_global
    z = z_loss(logits, labels) * local / num_global
    expected = ce + 1e-2 * z + 0.5 * fraction * 0.3 + 0.25 * fraction * 0.7
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["z"], z.detach())
    torch.testing.assert_close(parts["aux"], torch.tensor(fraction * 0.3))
    torch.testing.assert_close(parts["ponder"], torch.tensor(fraction * 0.7))
    assert set(parts) == {"ce", "z", "aux", "ponder"}
    assert all(not p.requires_grad for p in parts.values())


@pytest.mark.parametrize("chunked", [False, True])
def test_loss_fn_gradient_chunked_equals_plain_with_z_loss(chunked):
    logits, labels = _data()
    reference = _loss_fn(False, z=0.1)
    candidate = _loss_fn(chunked, z=0.1, chunk_size=8)
    ref_v, ref_g = _value_and_grad(lambda x, y: reference({"logits": x}, y, 30)[0], logits, labels)
    val, grad = _value_and_grad(lambda x, y: candidate({"logits": x}, y, 30)[0], logits, labels)
    torch.testing.assert_close(val, ref_v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_g, atol=1e-6, rtol=1e-5)
    # and the z term really contributes to the gradient
    no_z = _loss_fn(chunked)
    _, no_z_grad = _value_and_grad(lambda x, y: no_z({"logits": x}, y, 30)[0], logits, labels)
    assert not torch.allclose(grad, no_z_grad)


def test_loss_fn_int_and_tensor_token_counts_agree_and_missing_terms_are_zero():
    logits, labels = _data()
    loss_fn = _loss_fn(False, aux=1.0, ponder=1.0)
    from_int, parts = loss_fn({"logits": logits}, labels, 18)
    from_tensor, _ = loss_fn({"logits": logits}, labels, torch.tensor(18))
    torch.testing.assert_close(from_int, from_tensor)
    assert parts["aux"].item() == 0.0 and parts["ponder"].item() == 0.0
    assert parts["z"].item() == 0.0  # z_loss_weight == 0: not computed


def test_loss_fn_explicit_micro_batch_fraction_scales_aux_terms():
    logits, labels = _data()
    loss_fn = _loss_fn(False, aux=2.0, ponder=1.0)
    outputs = _outputs(logits, aux=0.5, ponder=0.1)
    total, parts = loss_fn(outputs, labels, 18, micro_batch_fraction=0.25)
    torch.testing.assert_close(parts["aux"], torch.tensor(0.125))
    torch.testing.assert_close(parts["ponder"], torch.tensor(0.025))
    torch.testing.assert_close(total, parts["ce"] + 2.0 * 0.125 + 0.025)


def test_loss_fn_zero_global_tokens_is_finite():
    logits, _ = _data()
    labels = torch.full((B, S), IGNORE_INDEX)
    total, _ = _loss_fn(True, z=0.1)({"logits": logits}, labels, torch.tensor(0))
    assert torch.isfinite(total) and total.item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(chunked=True, chunk_size=0), "chunk_size"),
        (dict(z_loss_weight=-1.0), "z_loss_weight"),
        (dict(aux_loss_weight=-1.0), "aux_loss_weight"),
        (dict(ponder_loss_weight=-0.5), "ponder_loss_weight"),
    ],
)
def test_build_loss_fn_rejects_bad_arguments(kwargs, argument):
    args = dict(
        chunked=False, chunk_size=4, z_loss_weight=0.0, aux_loss_weight=1.0, ponder_loss_weight=0.0
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        build_loss_fn(**args)


class _TinyLM(torch.nn.Module):
    """Embedding -> linear head, with an aux/ponder term that depends on the weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 16)
        self.router = torch.nn.Linear(16, 1)
        self.head = torch.nn.Linear(16, V)

    def forward(self, tokens):
        h = self.embed(tokens)
        gate = torch.sigmoid(self.router(h))
        logits = self.head(h * gate)
        return {
            "logits": logits,
            "aux_loss": gate.square().mean(),  # a mean over this micro-batch's tokens
            "ponder_loss": gate.mean(),
        }


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunked", [False, True])
def test_grad_accumulation_over_micro_batches_equals_full_batch(chunked):
    """Two half micro-batches, summed, give the full batch's loss and gradient.

    Every position is a target here (packed pretraining), so the model's
    per-micro-batch mean aux terms recombine exactly by token fraction.
    """
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (4, 6), generator=gen)
    labels = torch.randint(0, V, (4, 6), generator=gen)
    loss_fn = _loss_fn(chunked, z=1e-2, aux=0.5, ponder=0.1, chunk_size=5)

    model = _TinyLM()
    full_total, _ = loss_fn(model(tokens), labels, count_target_tokens(labels))
    full_total.backward()
    full_grads = _grads(model)

    model.zero_grad()
    num_global = count_target_tokens(labels)
    summed_total = 0.0
    for micro in (slice(0, 1), slice(1, 4)):  # unequal halves on purpose
        total, _ = loss_fn(model(tokens[micro]), labels[micro], num_global)
        total.backward()
        summed_total = summed_total + total.detach()
    torch.testing.assert_close(summed_total, full_total.detach())
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_grad_accumulation_ce_with_uneven_ignore_masks():
    """Token-level mean across micro-batches holding different target counts."""
    logits, labels = _data()
    labels[0] = IGNORE_INDEX  # micro-batch 0 keeps far fewer targets than micro-batch 1
    labels[1, 0] = 3
    loss_fn = _loss_fn(True, chunk_size=3)
    num_global = count_target_tokens(labels)
    full_v, full_g = _value_and_grad(
        lambda x, y: loss_fn({"logits": x}, y, num_global)[0], logits, labels
    )

    leaf = logits.detach().clone().requires_grad_()
    parts_ce = 0.0
    for micro in (slice(0, 2), slice(2, 3)):
        total, parts = loss_fn({"logits": leaf[micro]}, labels[micro], num_global)
        total.backward()
        parts_ce = parts_ce + parts["ce"]
    torch.testing.assert_close(parts_ce, full_v)
    torch.testing.assert_close(leaf.grad, full_g)
    expected_mean = F.cross_entropy(
        logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(full_v, expected_mean.detach())


# ------------------------------------------------------------- compiled plain CE


@pytest.mark.parametrize("z", [0.0, 1e-3])
def test_compiled_loss_matches_eager_in_value_and_gradient(z):
    logits, labels = _data(dtype=torch.bfloat16)  # some labels ignored
    outputs = {"aux_loss": torch.tensor(0.5), "ponder_loss": torch.tensor(0.25)}
    results = []
    for compile_ in (False, True):
        loss_fn = build_loss_fn(chunked=False, chunk_size=4, z_loss_weight=z, aux_loss_weight=0.1,
                                ponder_loss_weight=0.01, compile=compile_)
        assert loss_fn.compile is compile_
        leaf = logits.detach().clone().requires_grad_()
        loss, parts = loss_fn({"logits": leaf, **outputs}, labels, count_target_tokens(labels))
        loss.backward()
        results.append((loss.detach(), parts["ce"], parts["z"], leaf.grad.float()))
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_compile_does_not_apply_to_the_chunked_path():
    assert not build_loss_fn(chunked=True, chunk_size=4, z_loss_weight=0.0, aux_loss_weight=1.0,
                             ponder_loss_weight=0.0, compile=True).compile

"""The MoE FFN (DESIGN §3.6): dispatch against a per-token reference, routing, balancing, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hydra_titan.models.common.moe import (MoE, MoEArgs, expert_load_summary, moe_layers, switch_loss,
                                           update_expert_biases)
from hydra_titan.models.hydra import HydraModel, HydraModelArgs
from hydra_titan.models.llama import LlamaModel, LlamaModelArgs

DIM, HIDDEN = 32, 48


def build_moe(**kw) -> MoE:
    args = MoEArgs(**{"moe_num_experts": 4, **kw})
    moe = MoE(DIM, HIDDEN, args)
    moe.init_weights(0.2, 0.2)
    return moe


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through its k chosen experts one by one (float64), weighted by its gates."""
    tokens = x.reshape(-1, x.shape[-1]).double()
    experts, gates, _ = moe.route(x.reshape(-1, x.shape[-1]))
    w1, w2, w3 = (w.double() for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3))
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(moe.top_k):
            e = experts[t, j]
            y = (F.silu(tokens[t] @ w1[e]) * (tokens[t] @ w3[e])) @ w2[e]
            out[t] += gates[t, j].double() * y
    if moe.shared_experts is not None:
        s = moe.shared_experts
        out += (F.silu(tokens @ s.w1.weight.double().T) * (tokens @ s.w3.weight.double().T)) @ s.w2.weight.double().T
    return out.view(x.shape)


@pytest.mark.parametrize("kw", [
    dict(),                                               # top-1, sigmoid, bias balancing
    dict(moe_top_k=2, moe_score_func="softmax"),          # gates renormalised over the 2
    dict(moe_top_k=3, moe_shared_experts=1),              # plus a shared expert
])
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_every_tokens_k_slots_are_computed(kw, backend):
    """Dropless: the output is, for every token, the gated sum of its k experts (no capacity, no drops)."""
    moe = build_moe(moe_backend=backend, **kw)
    with torch.no_grad():
        moe.router.weight[0] += 1.0  # lopsided: expert 0 gets most tokens, some experts few or none
    x = torch.randn(2, 13, DIM)
    out, stats = moe(x)
    torch.testing.assert_close(out.double(), per_token_reference(moe, x), atol=1e-5, rtol=1e-5)
    assert stats["moe_load"].sum().item() == 2 * 13 * moe.top_k
    experts, _, _ = moe.route(x.reshape(-1, DIM))
    torch.testing.assert_close(stats["moe_load"], torch.bincount(experts.flatten(), minlength=4).float())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_mm_equals_the_loop_reference_forward_and_backward(dtype, tol):
    torch.manual_seed(1)
    grouped = build_moe(moe_top_k=2, moe_backend="grouped_mm").to(dtype)
    loop = build_moe(moe_top_k=2, moe_backend="loop").to(dtype)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(3, 17, DIM, dtype=dtype)
    grad_out = torch.randn(3, 17, DIM, dtype=dtype)
    results = []
    for moe in (grouped, loop):
        xi = x.clone().requires_grad_(True)
        out, _ = moe(xi)
        out.backward(grad_out)
        results.append((out, xi.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (out_g, gx_g, grads_g), (out_l, gx_l, grads_l) = results
    torch.testing.assert_close(out_g, out_l, atol=tol, rtol=tol)
    torch.testing.assert_close(gx_g, gx_l, atol=tol, rtol=tol)
    assert grads_g.keys() == grads_l.keys()
    for name in grads_g:
        assert grads_g[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_g[name], grads_l[name], atol=tol, rtol=tol, msg=name)


def test_router_scores_are_fp32_and_gates_are_the_unbiased_scores():
    moe = build_moe(moe_top_k=2).to(torch.bfloat16)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))  # forces expert 1 into every choice
    x = torch.randn(10, DIM, dtype=torch.bfloat16)
    experts, gates, scores = moe.route(x)
    assert scores.dtype == torch.float32 and gates.dtype == torch.float32
    assert (experts == 1).any(dim=-1).all()
    raw = torch.sigmoid(x.float() @ moe.router.weight.float().T)
    torch.testing.assert_close(scores, raw)
    chosen = raw.gather(-1, experts)
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))  # renormalised over k = 2


def tiny_llama(**kw) -> LlamaModel:
    args = LlamaModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, multiple_of=16,
                          max_seq_len=32, moe_num_experts=4, **kw)
    model = LlamaModel(args)
    model.init_weights()
    return model


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_top1_router_learns_from_cross_entropy_alone(score_func):
    """At k = 1 the gate is the chosen expert's score, so the task loss reaches the router (the original's
    softmax over one logit was the constant 1)."""
    model = tiny_llama(moe_top_k=1, moe_balance="none", moe_score_func=score_func)
    tokens = torch.randint(0, 64, (2, 16))
    out = model(tokens)
    assert out["aux_loss"].item() == 0.0
    F.cross_entropy(out["logits"].flatten(0, 1), tokens.flatten()).backward()
    for moe in moe_layers(model):
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def skewed_moe(balance: str, rate: float) -> tuple[MoE, torch.Tensor]:
    torch.manual_seed(3)
    moe = build_moe(moe_num_experts=8, moe_balance=balance, moe_bias_update_rate=rate)
    x = torch.randn(512, DIM) + 0.5  # inputs share a mean direction ...
    with torch.no_grad():  # ... which the router aligns with expert 0 and against expert 7
        moe.router.weight.normal_(0, 0.05)
        moe.router.weight[0] += 0.05
        moe.router.weight[7] -= 0.05
    return moe, x


@pytest.mark.parametrize("balance", ["bias", "none"])
def test_bias_balancing_evens_out_a_skewed_router(balance):
    moe, x = skewed_moe(balance, rate=MoEArgs().moe_bias_update_rate)  # the default rate
    ratio = lambda: expert_load_summary(moe(x)[1]["moe_load"][None])["max_over_min"].item()  # noqa: E731
    start = ratio()
    assert start > 20
    for _ in range(200):
        _, stats = moe(x)
        update_expert_biases([moe], stats["moe_load"][None])
    if balance == "bias":
        assert ratio() < 1.5, ratio()
        assert abs(moe.expert_bias.sum().item()) < 1e-5  # centred: only differences matter to the choice
        assert moe.expert_bias[0] < 0 < moe.expert_bias[7]
    else:
        assert ratio() == start and moe.expert_bias.abs().sum() == 0


def test_bias_moves_in_proportion_to_the_relative_load_error():
    moe = build_moe(moe_bias_update_rate=0.01)
    moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5: errors -1, +1, 0, 0 (already centred)
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    moe.update_bias(torch.tensor([5.0, 5.0, 5.0, 5.0]))   # even: nothing moves
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    moe.expert_bias.zero_()
    moe.update_bias(torch.tensor([20.0, 0.0, 0.0, 0.0]))  # collapsed: -3 and +1 rate, centred
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.03, 0.01, 0.01, 0.01]))


def test_aux_balance_adds_the_switch_loss():
    model = tiny_llama(moe_balance="aux", moe_aux_weight=0.05, moe_top_k=2)
    tokens = torch.randint(0, 64, (2, 16))
    terms = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: terms.append(
        (mod.route(inp[0].reshape(-1, 32)), out[1]["moe_load"]))) for m in moe_layers(model)]
    out = model(tokens)
    for h in hooks:
        h.remove()
    expected = []
    for (experts, _, scores), load in terms:
        f = torch.bincount(experts.flatten(), minlength=4).float() / experts.numel()
        p = (scores / scores.sum(-1, keepdim=True)).mean(0)
        torch.testing.assert_close(load, torch.bincount(experts.flatten(), minlength=4).float())
        expected.append(4 * (f * p).sum())
    torch.testing.assert_close(out["aux_loss"], 0.05 * torch.stack(expected).mean())
    torch.testing.assert_close(out["moe_aux_loss"], torch.stack(expected).mean())
    out["aux_loss"].backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in moe_layers(model))


def test_switch_loss_is_one_when_uniform():
    scores = torch.full((6, 3), 0.5)
    assert switch_loss(scores, torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(1.0)
    assert switch_loss(scores, torch.tensor([6.0, 0.0, 0.0])).item() == pytest.approx(1.0)  # P is uniform
    skewed = torch.tensor([[0.9, 0.05, 0.05]] * 6)
    assert switch_loss(skewed, torch.tensor([6.0, 0.0, 0.0])).item() == pytest.approx(2.7)


def test_expert_load_summary():
    s = expert_load_summary(torch.tensor([[4.0, 4.0, 4.0, 4.0], [10.0, 2.0, 0.0, 4.0]]))
    torch.testing.assert_close(s["max_over_min"], torch.tensor([1.0, 10.0]))  # a dead expert: max / 1
    torch.testing.assert_close(s["dead_experts"], torch.tensor([0.0, 1.0]))
    assert s["entropy"][0].item() == pytest.approx(1.0)
    p = torch.tensor([10.0, 2.0, 4.0]) / 16
    assert s["entropy"][1].item() == pytest.approx(-(p * p.log()).sum().item() / math.log(4))


def test_placement_and_the_model_outputs():
    args = HydraModelArgs(vocab_size=64, dim=32, n_mor_blocks=4, recursions=2, n_heads=2, n_kv_heads=2,
                          head_dim=16, multiple_of=16, max_seq_len=32, moe_num_experts=4, moe_every=2)
    model = HydraModel(args)
    model.init_weights()
    assert model.moe_layer_ids == [1, 3]
    assert isinstance(model.layers["1"].mor.block.feed_forward, MoE)
    assert not isinstance(model.layers["0"].mor.block.feed_forward, MoE)
    out = model(torch.randint(0, 64, (2, 16)))
    # MoD keeps 12 of 16 tokens, MoR's two steps 12 and 6 of them: 18 token slots per sequence per block
    assert out["moe_load"].shape == (2, 4) and out["moe_load"].sum(-1).tolist() == [36.0, 36.0]
    skip = args.replace(moe_every=1, moe_skip_ends=True)
    assert [i for i in range(4) if skip.is_moe_layer(i, 4)] == [1, 2]
    assert "layers.1.mor.block.feed_forward.expert_bias" in model.state_dict()  # persistent: checkpoints hold it


def test_dense_models_report_no_expert_loads():
    model = LlamaModel(LlamaModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                      multiple_of=16, max_seq_len=32))
    model.init_weights()
    assert model.moe_layer_ids == [] and "moe_load" not in model(torch.randint(0, 64, (1, 8)))


@pytest.mark.parametrize("kw,name", [
    (dict(moe_top_k=5), "moe_top_k"),
    (dict(moe_top_k=0), "moe_top_k"),
    (dict(moe_balance="loss"), "moe_balance"),
    (dict(moe_score_func="relu"), "moe_score_func"),
    (dict(moe_backend="triton"), "moe_backend"),
    (dict(moe_hidden_dim=100), "moe_hidden_dim"),            # not a multiple of 8: grouped_mm's alignment
    (dict(moe_every=0), "moe_every"),
    (dict(moe_every=3), "moe_every"),                        # 2 layers: (i + 1) % 3 never 0
    (dict(moe_shared_experts=-1), "moe_shared_experts"),
])
def test_bad_moe_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        LlamaModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                       moe_num_experts=4, **kw)


def test_grouped_mm_alignment_is_checked_for_the_model_dim_but_loop_accepts_any():
    kw = dict(vocab_size=64, dim=36, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=18, moe_num_experts=4)
    with pytest.raises(ValueError, match=r"dim \(36\)"):
        LlamaModelArgs(**kw)
    LlamaModelArgs(**kw, moe_backend="loop")


def test_active_params_count_k_experts_and_total_counts_all():
    from hydra_titan.models.llama import LLAMA_SPEC
    from hydra_titan.models.llama.flops import attention_weight_params

    args = LlamaModelArgs(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, multiple_of=16,
                          max_seq_len=32, moe_num_experts=4, moe_top_k=2, moe_shared_experts=1, moe_every=2)
    model = LlamaModel(args)
    report = LLAMA_SPEC.param_report(args, model=model)
    assert report.total == sum(p.numel() for p in model.parameters())
    hidden, dense_ffn = args.ffn_hidden_dim, 3 * args.dim * args.ffn_hidden_dim
    moe = model.layers["1"].feed_forward
    assert moe.experts.w1.numel() + moe.experts.w2.numel() + moe.experts.w3.numel() == 4 * dense_ffn
    # layer 1 applies its router, 2 of 4 experts and the shared one; layers 0 and 2 are dense
    expected = (3 * attention_weight_params(args) + 2 * dense_ffn + (args.dim * 4 + 3 * 3 * args.dim * hidden)
                + args.dim * args.vocab_size)
    assert report.active == expected


def test_compiled_moe_block_matches_eager(monkeypatch, tmp_path):
    """A llama block with a MoE FFN compiles whole (fullgraph) and matches eager (bf16: the compiled
    grouped GEMM needs it)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    model = tiny_llama(moe_top_k=2)
    block = model.layers["0"].to(torch.bfloat16)
    rope = model.rope_cache
    x0 = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    positions = torch.arange(16).expand(2, 16)

    def run(fn):
        x = x0.clone().requires_grad_(True)
        out, stats = fn(x, positions, rope)
        block.zero_grad(set_to_none=True)
        (out.float() ** 2).mean().backward()
        return out.detach(), stats["moe_load"], x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}

    eager = run(block)
    compiled = run(torch.compile(block, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], atol=2e-2, rtol=2e-2)
    assert torch.equal(compiled[1], eager[1])
    torch.testing.assert_close(compiled[2], eager[2], atol=2e-2, rtol=2e-2)
    for name in eager[3]:
        torch.testing.assert_close(compiled[3][name], eager[3][name], atol=2e-2, rtol=5e-2, msg=name)

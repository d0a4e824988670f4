"""The decode protocol (DESIGN §3.11) for every family: a cached prefill + token-by-token decode gives
the logits of one full eval forward, rows of a batch of different prompt lengths stay independent,
and cached greedy generation equals the recomputing one."""

from __future__ import annotations

import pytest
import torch

from hydra_titan.components.generation import SamplingConfig, generate, loglikelihood, sample_next
from hydra_titan.models import get_model_spec

VOCAB = 512
# family, flavor overrides: every routing path in eval (MoD + nested MoR thresholds, v2's routed
# attention), CCGQA's convs and value shift, SSM states, v3's chunk summaries, MoE FFNs
CASES = {
    "llama": ("llama", {}),
    "llama_moe": ("llama", {"moe_num_experts": 4, "moe_top_k": 2, "moe_every": 2}),
    "hydra": ("hydra", {"recursions": 3, "conv_kernel_seq": 3, "dim": 384, "head_dim": 32, "n_heads": 6,
                        "n_kv_heads": 3}),
    "hydra_moe": ("hydra", {"moe_num_experts": 4, "mod_every": 2}),
    "hydra_soft": ("hydra", {"mod_mode": "soft", "mor_mode": "gaussian"}),
    "hybrid_v1": ("hybrid", {"variant": "v1", "ssm_chunk_size": 16}),
    "hybrid_v2": ("hybrid", {"variant": "v2", "ssm_chunk_size": 16}),
    "hybrid_v3": ("hybrid", {"variant": "v3", "ssm_chunk_size": 16, "global_chunk": (8, 16)}),
    "hybrid_v1_moe": ("hybrid", {"variant": "v1", "ssm_chunk_size": 16, "moe_num_experts": 4}),
    "waaagh": ("waaagh", {"ssm_chunk_size": 16, "window": 8, "sparse_k": 4, "sparse_query_chunk": 16}),
}


def build(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    name, overrides = CASES[case]
    model = get_model_spec(name).build("debug", vocab_size=VOCAB, max_seq_len=256, **overrides)
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def model(request):
    return build(request.param)


def decode_logits(model, tokens: torch.Tensor, lengths: list[int], total: int) -> list[torch.Tensor]:
    """Prefill each row's first lengths[i] tokens (right padded, one batch), then feed the rest one by one."""
    bsz = tokens.shape[0]
    width = max(lengths)
    valid = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    cache = model.init_cache(bsz, total + width)
    first = model(tokens[:, :width] * valid, cache=cache, valid=valid)["logits"]
    rows = [[first[i, :n]] for i, n in enumerate(lengths)]
    for step in range(total - min(lengths)):
        pos = torch.tensor([min(n + step, total - 1) for n in lengths])
        logits = model(tokens[torch.arange(bsz), pos][:, None], cache=cache)["logits"][:, 0]
        for i, n in enumerate(lengths):
            if n + step < total:
                rows[i].append(logits[i:i + 1])
    return [torch.cat(r) for r in rows]


@torch.no_grad()
def test_prefill_then_decode_equals_one_full_eval_forward(model):
    tokens = torch.randint(0, VOCAB, (3, 40))
    full = model(tokens)["logits"]
    # rows with prompts of 21, 1 and 34 tokens (two chunks of the SSM scan and of v3's 16-token level):
    # the cached path must match every row on its own
    for i, got in enumerate(decode_logits(model, tokens, [21, 1, 34], 40)):
        assert got.shape == full[i].shape
        assert (got - full[i]).abs().max().item() < 1e-4, i


@torch.no_grad()
def test_cached_greedy_generation_equals_recomputing(model):
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 12)]
    cached = generate(model, prompts, 14, temperature=0)
    recomputed = generate(model, prompts, 14, temperature=0, use_cache=False)
    assert cached == recomputed
    assert [len(r) for r in cached] == [14, 14]
    # and a row generates what it generates alone
    assert generate(model, prompts[1], 14, temperature=0) == [cached[1]]


@torch.no_grad()
def test_loglikelihood_is_the_sum_of_the_eval_forwards_logprobs(model):
    context, continuation = torch.randint(0, VOCAB, (9,)).tolist(), torch.randint(0, VOCAB, (6,)).tolist()
    seq = torch.tensor(context + continuation)
    logprobs = model(seq[None, :-1])["logits"][0].float().log_softmax(-1)
    expected = sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))
    result = loglikelihood(model, context, continuation)
    assert abs(result.logprob - expected) < 1e-4
    assert not result.is_greedy  # a random continuation of a 512-token vocabulary
    greedy = generate(model, context, 6, temperature=0)[0]
    assert loglikelihood(model, context, greedy).is_greedy


def test_sampling_truncation_and_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 4.0]])
    assert sample_next(logits, SamplingConfig(temperature=0), None).tolist() == [1, 0]
    assert sample_next(logits, SamplingConfig(top_k=1), None).tolist() == [1, 0]     # top-1 = greedy
    assert sample_next(logits, SamplingConfig(top_p=0.01), None).tolist() == [1, 0]  # nucleus of one
    two = {tuple(sample_next(logits, SamplingConfig(top_k=2), torch.Generator().manual_seed(s)).tolist())
           for s in range(40)}
    assert {t[0] for t in two} == {1, 3} and {t[1] for t in two} == {0, 3}  # only the two best ever
    draw = [sample_next(logits, SamplingConfig(), torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert draw[0] == draw[1]
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)


def test_cache_misuse_is_a_clear_error():
    model = build("llama")
    with pytest.raises(ValueError, match="decode cache full"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=model.init_cache(1, 8))
    with pytest.raises(ValueError, match="valid is a decode-cache argument"):
        model(torch.zeros(1, 4, dtype=torch.long), valid=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch 2"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=model.init_cache(2, 8))
    model.train()
    with pytest.raises(ValueError, match="model.eval()"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=model.init_cache(1, 8))
    with pytest.raises(ValueError, match="max_seq_len 256"):
        generate(model, [[1] * 257], 4)

"""The decode protocol (DESIGN §3.11) for every family: a cached prefill + token-by-token decode gives
the logits of one full eval forward, rows of a batch of different prompt lengths stay independent,
and cached greedy generation equals the recomputing one."""

from __future__ import annotations

import pytest
import torch

from helpers import DECODE_CASES as CASES
from helpers import DECODE_VOCAB as VOCAB
from helpers import build_decode_case
from torch.utils._python_dispatch import TorchDispatchMode

from hydra_titan.components.generation import SamplingConfig, generate, loglikelihood, sample_next
from hydra_titan.models.common import decoder as decoder_module

def build(case: str) -> torch.nn.Module:
    return build_decode_case(case)


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
def test_a_row_stops_at_its_stop_id_and_the_others_go_on():
    model = build("llama")
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (4, 9)]
    free = generate(model, prompts, 10, temperature=0)
    stop = free[0][3]
    first = free[0].index(stop)  # the first time row 0 draws it
    stopped = generate(model, prompts, 10, temperature=0, stop_ids=[stop])
    assert stopped[0] == free[0][:first + 1]  # kept, and nothing after it
    row1 = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert stopped[1] == row1
    seen: list[list[int | None]] = []
    generate(model, prompts, 10, temperature=0, stop_ids=[stop], on_tokens=seen.append)
    assert [t[0] for t in seen][:first + 1] == stopped[0] and all(t[0] is None for t in seen[first + 1:])


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


class _HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value back to the host (item/int/bool) or whose output
    shape depends on the data: what a CUDA graph cannot capture."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in self.SYNCING:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _state_tensors(tree) -> dict[str, torch.Tensor]:
    """Every tensor of a cache's state tree (dicts, and the attributes of objects such as KVCache)."""
    out: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            out[path] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif hasattr(node, "__dict__"):
            for k, v in vars(node).items():
                walk(v, f"{path}.{k}")

    walk(tree, "")
    return out


@torch.no_grad()
def test_a_decode_step_is_static_and_updates_its_state_in_place(model, monkeypatch):
    """What CapturedDecodeStep relies on: a one-token step reads nothing back to the host and writes
    every state into the tensor it already had (a graph replays into the same memory)."""
    # on CPU the id check reads min/max exactly; on CUDA it is an async device assert
    monkeypatch.setattr(decoder_module, "check_token_ids", lambda *args: None)
    prompts = torch.randint(0, VOCAB, (2, 12))
    valid = torch.arange(12)[None] < torch.tensor([[12], [7]])
    cache = model.init_cache(2, 20)
    model(prompts, cache=cache, valid=valid)
    model(torch.randint(0, VOCAB, (2, 1)), cache=cache)   # first step: every namespace exists
    before = _state_tensors(cache.store)
    snapshot = {k: t.clone() for k, t in before.items()}
    with _HostReads() as reads:
        model(torch.randint(0, VOCAB, (2, 1)), cache=cache)
    assert reads.ops == []
    after = _state_tensors(cache.store)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), [k for k in before if after[k] is not before[k]]
    changed = [k for k in before if not torch.equal(before[k], snapshot[k])]
    assert changed, "the step wrote no state at all"

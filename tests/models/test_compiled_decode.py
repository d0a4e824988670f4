"""The compiled decode step (components/generation.py::CompiledDecodeStep) on CPU, without the CUDA graph
that records it on a GPU (tests/gpu/test_decode_graph.py covers that, for every family): the logits of
the eager cached step, token after token, and one compile for the whole decode (no compile per token).

Inductor's C++ backend takes ~20-40 s per model on two cores, so the llama and HYDRA cases compile
with backend "aot_eager" (dynamo + AOTAutograd's functionalization of the in-place cache updates, the
parts that decide guards and recompiles, then eager kernels); one llama case runs inductor itself.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DECODE_VOCAB, build_decode_case
from torch._dynamo.testing import CompileCounterWithBackend

from hydra_titan.components.generation import CompiledDecodeStep, generate

STEPS = 6


def compare_to_eager(model, backend: str, tol: float) -> list[int]:
    """Decode STEPS tokens after a prefill both compiled and eagerly (two caches); the graphs compiled
    so far after each compiled step."""
    prompt = torch.randint(0, DECODE_VOCAB, (2, 9))
    feed = torch.randint(0, DECODE_VOCAB, (2, STEPS))
    caches = [model.init_cache(2, 9 + STEPS) for _ in range(2)]
    for cache in caches:
        model(prompt, cache=cache)
    counter = CompileCounterWithBackend(backend)
    step = CompiledDecodeStep(model, caches[1], backend=counter)
    compiled = []
    for i in range(STEPS):
        got = step(feed[:, i:i + 1])
        compiled.append(counter.frame_count)
        want = model(feed[:, i:i + 1], cache=caches[0])["logits"][:, -1]
        assert got.shape == want.shape == (2, DECODE_VOCAB)
        assert (got - want).abs().max().item() < tol, i
    assert caches[1].appended == caches[0].appended == 9 + STEPS
    assert torch.equal(caches[1].lengths, caches[0].lengths)
    return compiled


@pytest.mark.parametrize("case", ["llama", "hydra"])
@torch.no_grad()
def test_compiled_step_gives_the_eager_logits_and_compiles_once(case):
    compiled = compare_to_eager(build_decode_case(case), "aot_eager", 1e-5)
    # every block of these models has one structure: one graph, compiled at the first step, none later
    assert compiled[1] == compiled[-1] == 1, compiled


@torch.no_grad()
def test_inductor_compiled_step_gives_the_eager_logits():
    compiled = compare_to_eager(build_decode_case("llama"), "inductor", 1e-5)
    assert compiled[1] == compiled[-1] == 1, compiled


@torch.no_grad()
def test_a_step_that_would_compile_again_is_a_clear_error():
    """A cache with no state yet (no prefill): the first step creates every module's state inside the
    compiled block, so the next one sees another state tree and would recompile, at every token of a
    family that did so: an error naming the model, not a silent slow path."""
    model = build_decode_case("llama")
    step = CompiledDecodeStep(model, model.init_cache(1, 8), backend="eager")
    with pytest.raises(ValueError, match="LlamaModel cannot run its decode step compiled.*TransformerBlock"):
        for _ in range(2):
            step(torch.zeros(1, 1, dtype=torch.long))


def test_compile_step_needs_the_cuda_graph():
    model = build_decode_case("llama")
    with pytest.raises(ValueError, match="needs cuda_graph=True"):
        generate(model, [[1, 2]], 2, compile_step=True)
    with pytest.raises(ValueError, match="blocks replace the 2 layers"):
        model.run_layers(torch.zeros(1, 1, dtype=torch.long), blocks=list(model.layers.values()))

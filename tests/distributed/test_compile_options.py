"""Per-block compile: every block compiled in place, inductor options passed through."""

from __future__ import annotations

import torch

from hydra_titan.distributed.compile import apply_compile
from hydra_titan.models import get_model_spec


def test_apply_compile_compiles_each_block_with_options(monkeypatch):
    spec = get_model_spec("llama")
    with torch.device("meta"):
        model = spec.build("debug", vocab_size=64, dim=64, n_heads=4, n_kv_heads=2, head_dim=16)
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((self, kw)))
    apply_compile(model, fullgraph=True, inductor_options={"coordinate_descent_tuning": True})
    assert [c[0] for c in calls] == list(model.layers.values())
    assert all(kw == {"fullgraph": True, "options": {"coordinate_descent_tuning": True}} for _, kw in calls)
    names = [n for n, _ in model.named_parameters()]
    assert not any("_orig_mod" in n for n in names)  # in place: state-dict keys unchanged

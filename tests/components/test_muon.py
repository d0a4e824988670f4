"""optimizer.name = "muon": torch Muon on the hidden matrices, AdamW on the rest (CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hydra_titan.components.lr_scheduler import build_lr_scheduler
from hydra_titan.components.muon import MUON_ADJUST_LR, MuonWithAdamW
from hydra_titan.components.optimizer import build_optimizer, muon_matrices
from hydra_titan.models.registry import get_model_spec

HPARAMS = dict(lr=2e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


class _Tiny(nn.Module):
    def __init__(self, dim: int = 16, vocab: int = 32) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.wq = nn.Linear(dim, dim, bias=True)
        self.conv = nn.Parameter(torch.randn(dim, 3))  # 2-D but not a Linear: AdamW, decayed
        self.router = nn.Linear(dim, 1, bias=False)  # a Linear, but no-decay by name: AdamW
        self.w1 = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)  # the head: AdamW

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        h = h + self.wq(h) * self.conv.sum(-1) * self.router(h).sigmoid()
        h = h + self.w1(h)[..., : h.shape[-1]].relu()
        return self.output(self.norm(h))


def _tokens() -> torch.Tensor:
    return torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(3))


def _loss(model: nn.Module) -> torch.Tensor:
    tokens = _tokens()
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, scheduler=None) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = _loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def _twin() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = _Tiny()
    b = _Tiny()
    b.load_state_dict(a.state_dict())
    return a, b


def test_groups_hidden_linear_weights_to_muon_the_rest_to_adamw():
    model = _Tiny()
    optimizer = build_optimizer(model, name="muon", **HPARAMS)
    assert isinstance(optimizer, MuonWithAdamW)
    assert _names(model, optimizer) == {
        "muon": {"wq.weight", "w1.weight"},
        "decay": {"output.weight", "conv"},  # 2-D, decayed, but not a linear map: AdamW
        "no_decay": {"tok_embeddings.weight", "wq.bias", "router.weight", "norm.weight", "norm.bias"},
    }
    algorithm = {g["name"]: g["algorithm"] for g in optimizer.param_groups}
    assert algorithm == {"muon": "muon", "decay": "adamw", "no_decay": "adamw"}
    wd = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert wd == {"muon": 0.1, "decay": 0.1, "no_decay": 0.0}
    assert optimizer.group_sizes() == {"muon": 16 * 16 + 32 * 16,
                                       "adamw": sum(p.numel() for p in model.parameters()) - 16 * 16 - 32 * 16}


@pytest.mark.parametrize("family", ["llama", "hydra", "waaagh"])
def test_every_family_keeps_head_embeddings_and_experts_on_adamw(family):
    spec = get_model_spec(family)
    model = spec.model_cls(spec.flavors["debug"])
    names = {n for n, p in model.named_parameters() if id(p) in muon_matrices(model)}
    assert names and all(n.endswith(".weight") for n in names)
    assert not any(n.startswith(("output", "tok_embeddings")) for n in names)
    assert not any("experts" in n for n in names)  # 3-D expert tensors are not matrices
    assert any("wqkv" in n for n in names)


def test_step_equals_torch_muon_plus_torch_adamw_bitwise():
    """The wrapper does no arithmetic of its own: two torch optimizers side by side give the same weights."""
    ours, ref = _twin()
    optimizer = build_optimizer(ours, name="muon", **HPARAMS, fused="false")
    scheduler = build_lr_scheduler(optimizer, warmup_steps=2, decay_type="cosine", decay_ratio=0.2, min_lr_factor=0.1, total_steps=6)
    matrices = {id(ref.wq.weight), id(ref.w1.weight)}
    named = dict(ref.named_parameters())
    decay = [named["conv"], named["output.weight"]]
    no_decay = [p for n, p in named.items() if id(p) not in matrices and n not in ("conv", "output.weight")]
    muon = torch.optim.Muon([ref.wq.weight, ref.w1.weight], lr=2e-2, weight_decay=0.1, momentum=0.95, nesterov=True,
                            adjust_lr_fn=MUON_ADJUST_LR)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=2e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    ref_scheds = [build_lr_scheduler(o, warmup_steps=2, decay_type="cosine", decay_ratio=0.2, min_lr_factor=0.1, total_steps=6)
                  for o in (muon, adamw)]
    losses = _train(ours, optimizer, 6, scheduler)
    ref_losses = []
    for _ in range(6):
        loss = _loss(ref)
        loss.backward()
        for o, s in zip((muon, adamw), ref_scheds):
            o.step()
            o.zero_grad(set_to_none=True)
            s.step()
        ref_losses.append(loss.item())
    assert losses == ref_losses
    assert losses[-1] < losses[0] - 0.5
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    assert set(optimizer.state[ours.wq.weight]) == {"momentum_buffer"}
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(optimizer.state[ours.output.weight])


def test_state_dict_round_trip_resumes_bitwise():
    straight, resumed = _twin()
    opt_a = build_optimizer(straight, name="muon", **HPARAMS)
    expected = _train(straight, opt_a, 5)

    opt_b = build_optimizer(resumed, name="muon", **HPARAMS)
    first = _train(resumed, opt_b, 2)
    saved_model = {k: v.clone() for k, v in resumed.state_dict().items()}
    saved_opt = opt_b.state_dict()
    torch.manual_seed(1)
    fresh = _Tiny()
    fresh.load_state_dict(saved_model)
    opt_c = build_optimizer(fresh, name="muon", **HPARAMS)
    opt_c.load_state_dict(saved_opt)
    assert first + _train(fresh, opt_c, 3) == expected


def test_no_hidden_matrix_is_a_clear_error():
    with pytest.raises(ValueError, match="no 2-D hidden weight for Muon"):
        build_optimizer(nn.Sequential(nn.LayerNorm(4)), name="muon", **HPARAMS)


def test_dtensor_parameters_step_like_plain_ones(single_rank_group):
    """After fully_shard on one rank (what a one-GPU run has) Muon steps DTensors bitwise like tensors."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    sharded, plain = _twin()
    fully_shard(sharded)
    assert isinstance(sharded.wq.weight, DTensor)
    opt_s = build_optimizer(sharded, name="muon", **HPARAMS)
    opt_p = build_optimizer(plain, name="muon", **HPARAMS)
    assert _train(sharded, opt_s, 3) == _train(plain, opt_p, 3)
    for (name, p), (_, q) in zip(sharded.named_parameters(), plain.named_parameters()):
        assert torch.equal(p.full_tensor(), q), name
    # DCP's state-dict helpers see one optimizer with fully-qualified names
    osd = get_optimizer_state_dict(sharded, opt_s)
    assert set(osd["state"]["wq.weight"]) == {"momentum_buffer"}
    assert "exp_avg" in osd["state"]["output.weight"]
    set_optimizer_state_dict(sharded, opt_s, optim_state_dict=osd)
    assert _train(sharded, opt_s, 2) == _train(plain, opt_p, 2)

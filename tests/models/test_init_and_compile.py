"""Meta-device construction + init_weights, input validation, torch.compile parity, the original factory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hydra_titan
from hydra_titan.models.hydra import HydraLayer, HydraModel, HydraModelArgs, MoRBlock
from hydra_titan.models.llama import LlamaModel, LlamaModelArgs, TransformerBlock


def hydra_args(**kw) -> HydraModelArgs:
    base = dict(vocab_size=128, dim=64, n_mor_blocks=2, recursions=2, n_heads=2, n_kv_heads=2, head_dim=16,
                multiple_of=32, max_seq_len=64, mod_capacity=0.5, mor_capacities=(1.0, 0.5))
    base.update(kw)
    return HydraModelArgs(**base)


def llama_args(**kw) -> LlamaModelArgs:
    base = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, multiple_of=32,
                max_seq_len=64)
    base.update(kw)
    return LlamaModelArgs(**base)


FAMILIES = {"hydra": (HydraModel, hydra_args), "llama": (LlamaModel, llama_args)}


def meta_then_init(name: str, seed: int = 0):
    model_cls, make_args = FAMILIES[name]
    with torch.device("meta"):
        model = model_cls(make_args())
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


@pytest.mark.parametrize("name", ["hydra", "llama"])
@pytest.mark.parametrize("train", [True, False])
def test_meta_build_then_init_gives_finite_outputs(name, train):
    model = meta_then_init(name).train(train)
    tokens = torch.randint(0, 128, (2, 48))
    out = model(tokens)
    assert out["logits"].shape == (2, 48, 128)
    assert torch.isfinite(out["logits"]).all()
    loss = F.cross_entropy(out["logits"].flatten(0, 1), tokens.flatten())
    # at init the model is close to uniform over the vocabulary
    assert loss.item() == pytest.approx(torch.log(torch.tensor(128.0)).item(), rel=0.25)
    for key in ("aux_loss", "ponder_loss"):
        assert out[key].dim() == 0 and torch.isfinite(out[key])
    total = loss + out["aux_loss"] + out["ponder_loss"]
    if train:
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the non-persistent RoPE table was recomputed (to_empty leaves garbage in it)
    assert torch.equal(model.rope_cache[0], torch.cat([torch.ones(8), torch.zeros(8)]))


def test_hydra_init_scales():
    model = meta_then_init("hydra")
    assert model.tok_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.05)
    layer = model.layers["0"]
    wqkv = layer.mor.block.attention.wqkv.weight
    assert wqkv.std().item() == pytest.approx(0.02, rel=0.15)
    assert wqkv.abs().max().item() <= 3 * 0.02 + 1e-7  # truncated normal
    out_std = 0.02 / (2 * 4) ** 0.5  # depth-scaled: effective depth 2 blocks x 2 recursions
    assert layer.mor.block.attention.wo.weight.std().item() == pytest.approx(out_std, rel=0.15)
    assert torch.equal(layer.mor.block.attention.log_beta, torch.zeros(2))
    assert torch.equal(layer.mor.block.attention_norm.weight, torch.ones(64))


@pytest.mark.parametrize("name", ["hydra", "llama"])
def test_init_weights_is_deterministic(name):
    a = meta_then_init(name, seed=123).state_dict()
    b = meta_then_init(name, seed=123).state_dict()
    c = meta_then_init(name, seed=124).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["output.weight"], c["output.weight"])
    # init twice on the same model with the same seed: same weights again
    model = meta_then_init(name, seed=123)
    torch.manual_seed(123)
    model.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(value, a[key]), key


@pytest.mark.parametrize("name", ["hydra", "llama"])
def test_out_of_range_token_ids_raise(name):
    model = meta_then_init(name)
    tokens = torch.randint(0, 128, (2, 16))
    bad_hi, bad_lo = tokens.clone(), tokens.clone()
    bad_hi[1, 5] = 128
    bad_lo[0, 3] = -1
    with pytest.raises(ValueError, match="vocab_size") as e:
        model(bad_hi)
    assert "128" in str(e.value)
    with pytest.raises(ValueError, match="vocab_size"):
        model(bad_lo)
    model(tokens)  # the boundary ids are fine
    edge = tokens.clone()
    edge[0, 0], edge[0, 1] = 0, 127
    model(edge)


@pytest.mark.parametrize("name", ["hydra", "llama"])
def test_bad_token_shapes_raise(name):
    model = meta_then_init(name)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(16, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 8))


# ----------------------------------------------------------------------------- torch.compile parity

def _compile_parity(module, inputs_fn, forward_to_loss, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)

    def run(fn):
        x = inputs_fn()
        out, loss = forward_to_loss(fn, x)
        module.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return out.detach(), loss.detach(), x.grad.clone(), grads

    eager = run(module)
    comp = run(compiled)
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comp[1], eager[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comp[2], eager[2], rtol=1e-4, atol=1e-4)
    assert comp[3].keys() == eager[3].keys()
    for name in eager[3]:
        torch.testing.assert_close(comp[3][name], eager[3][name], rtol=1e-4, atol=1e-4, msg=name)
    return eager


def test_compile_hydra_layer_matches_eager(monkeypatch, tmp_path):
    args = hydra_args(mod_capacity=0.5, mor_capacities=(0.75, 0.5), max_seq_len=64)
    model = HydraModel(args)
    model.init_weights()
    layer: HydraLayer = model.layers["0"].train()
    assert layer.mod is not None
    rope = model.rope_cache
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 32, args.dim, generator=gen)
    positions = torch.arange(32).expand(2, 32)

    def inputs():
        return x0.clone().requires_grad_(True)

    def to_loss(fn, x):
        out, stats = fn(x, positions, rope)
        loss = (out.float() ** 2).mean() + stats["mod_aux"] + stats["mor_aux"] + stats["ponder"]
        return out, loss

    _, _, x_grad, grads = _compile_parity(layer, inputs, to_loss, monkeypatch, tmp_path)
    # routing really happened: MoD keeps ceil(0.5*32) = 16 tokens and MoR's first step ceil(0.75*16) = 12
    # of those; the other 20 tokens of each sequence pass through unchanged
    with torch.no_grad():
        out, _ = layer(x0, positions, rope)
    unchanged = (out == x0).all(-1)
    assert unchanged.sum(-1).tolist() == [20, 20]
    assert grads["mod.router.weight"].abs().sum() > 0
    assert grads["mor.routers.1.weight"].abs().sum() > 0


def test_compile_llama_block_matches_eager(monkeypatch, tmp_path):
    args = llama_args()
    model = LlamaModel(args)
    model.init_weights()
    block: TransformerBlock = model.layers["0"]
    rope = model.rope_cache
    x0 = torch.randn(2, 24, args.dim)
    positions = torch.arange(24).expand(2, 24)

    def to_loss(fn, x):
        out, stats = fn(x, positions, rope)
        assert stats == {}
        return out, (out ** 2).mean()

    _compile_parity(block, lambda: x0.clone().requires_grad_(True), to_loss, monkeypatch, tmp_path)


# ----------------------------------------------------------------------------- original factory

def test_create_ccgqa_mod_mor_model_readme_usage():
    model = hydra_titan.create_ccgqa_mod_mor_model(
        vocab_size=256, dim=128, n_mor_blocks=2, recursions=3, n_heads=4, n_kv_heads=2,
        compression_factor=2, capacity_ratio=0.75)
    assert isinstance(model, HydraModel)
    args = model.args
    assert (args.head_dim, args.n_heads, args.n_kv_heads, args.mod_capacity) == (16, 4, 2, 0.75)
    assert args.q_compression == 2
    assert not any(p.is_meta for p in model.parameters())
    input_ids = torch.randint(0, 256, (2, 32))
    out = model(input_ids)
    logits, aux_loss, ponder_loss = out["logits"], out["aux_loss"], out["ponder_loss"]
    assert logits.shape == (2, 32, 256)
    assert torch.isfinite(logits).all()
    assert aux_loss.dim() == 0 and aux_loss.item() > 0  # router BCE terms are live in training
    assert 0 < ponder_loss.item() < 1
    (F.cross_entropy(logits.flatten(0, 1), input_ids.flatten()) + aux_loss + ponder_loss).backward()
    assert model.layers["1"].mod.router.weight.grad.abs().sum() > 0


def test_create_ccgqa_mod_mor_model_extra_kwargs():
    model = hydra_titan.create_ccgqa_mod_mor_model(256, 128, 1, 2, 4, 2, 4, 0.5, mod_every=0, max_seq_len=32)
    assert model.args.head_dim == 8 and model.args.mod_every == 0 and model.args.max_seq_len == 32
    assert all(layer.mod is None for layer in model.layers.values())
    # an unknown field is named (HydraModelArgs' constructor raises TypeError for it)
    with pytest.raises((TypeError, ValueError), match="not_a_field"):
        hydra_titan.create_ccgqa_mod_mor_model(256, 128, 1, 2, 4, 2, not_a_field=1)


def test_create_ccgqa_mod_mor_model_rejects_bad_shapes():
    with pytest.raises(ValueError, match="compression_factor") as e:
        hydra_titan.create_ccgqa_mod_mor_model(256, 130, 1, 2, 4, 2, compression_factor=4)
    assert "130" in str(e.value)
    with pytest.raises(ValueError, match="n_heads") as e:
        # latent 128/2 = 64 is not divisible by 6 heads
        hydra_titan.create_ccgqa_mod_mor_model(256, 128, 1, 2, 6, 2, compression_factor=2)
    assert "64" in str(e.value)


def test_the_original_readme_example_runs_as_written():
    """The original HYDRA README's example (seeds/000), as README.md quotes it, executed verbatim."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("from hydra_titan import create_ccgqa_mod_mor_model   # the original")
    code = readme[start:].split("```", 1)[0]
    assert "n_kv_heads=3," in code and "compression_factor=4," in code and "n_heads=12," in code
    namespace = {"torch": torch}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape == (1, 512, 32000)
    assert torch.isfinite(namespace["logits"]).all()
    assert namespace["aux_loss"].dim() == 0 and 0 < namespace["ponder_loss"].item() < 1
    args = namespace["model"].args
    assert (args.head_dim, args.n_kv_heads, args.kv_compression) == (16, 3, 16)


def test_the_seed_public_api_and_class_names():
    from hydra_titan import CCGQAAttention, CCGQABlock, create_ccgqa_mod_mor_model
    from hydra_titan.models.hydra import CCGQAMoDBlockWrapper, CCGQAMoDMoRModel, CCGQAMoRBlock, MoRBlock

    assert CCGQAMoDMoRModel is HydraModel and CCGQAMoDBlockWrapper is HydraLayer and CCGQAMoRBlock is MoRBlock
    model = create_ccgqa_mod_mor_model(256, 128, 2, 2, 4, 2, 2, 0.75, moe_num_experts=8, max_seq_len=64)
    assert isinstance(model, CCGQAMoDMoRModel)
    block = model.layers["0"].mor.block
    assert isinstance(block, CCGQABlock) and isinstance(block.attention, CCGQAAttention)
    out = model(torch.randint(0, 256, (2, 32)))
    assert out["moe_load"].shape == (2, 8)  # both blocks carry 8 experts
    with pytest.raises(AttributeError, match="no attribute"):
        hydra_titan.not_a_name  # noqa: B018

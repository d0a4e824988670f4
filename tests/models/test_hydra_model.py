"""The assembled HYDRA model: output mapping, eval-path causality, argument validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hydra_titan.models.hydra import HydraModel
from hydra_titan.models.hydra.args import HydraModelArgs


def model_args(**kw) -> HydraModelArgs:
    base = dict(vocab_size=101, dim=64, n_mor_blocks=3, recursions=3, n_heads=4, n_kv_heads=2, head_dim=16,
                max_seq_len=64, mod_capacity=0.6, mor_capacities=(1.0, 0.6, 0.3))
    base.update(kw)
    return HydraModelArgs(**base)


def build(**kw) -> HydraModel:
    model = HydraModel(model_args(**kw))
    model.init_weights()
    # routers at init give logits of a few tenths: widen them so threshold routing splits tokens
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.mul_(5.0)
    return model


def test_output_mapping_keys_and_shapes():
    model = build()
    out = model(torch.randint(0, 101, (2, 24)))
    assert out["logits"].shape == (2, 24, 101)
    assert out["aux_loss"].shape == () and out["ponder_loss"].shape == ()
    assert out["mod_selected_frac"].shape == (3,)
    assert out["mor_depth_hist"].shape == (3, 4)
    torch.testing.assert_close(out["mor_depth_hist"].sum(-1), torch.ones(3))
    # training: top-k keeps exactly ceil(0.6 * 24) = 15 of 24 tokens in every routed block
    torch.testing.assert_close(out["mod_selected_frac"], torch.full((3,), 15 / 24))


def test_aux_loss_is_the_weighted_router_losses():
    model = build(mod_aux_weight=0.3, mor_aux_weight=0.02, mor_z_loss_weight=0.0)
    out = model(torch.randint(0, 101, (2, 24)))
    expected = 0.3 * out["mod_aux_loss"] + 0.02 * out["mor_aux_loss"]
    torch.testing.assert_close(out["aux_loss"], expected)
    assert out["mod_aux_loss"] > 0 and out["mor_aux_loss"] > 0


@pytest.mark.parametrize("kw", [dict(), dict(mod_every=2), dict(mod_mode="soft"), dict(mor_mode="gaussian"),
                                dict(mod_every=0, mor_capacities=(1.0, 1.0, 1.0))])
def test_eval_path_is_causal_with_routing_on(kw):
    model = build(**kw).eval()
    tokens = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        out = model(tokens)
        frac = out["mod_selected_frac"]
        if kw.get("mod_every", 1) and kw.get("mod_mode", "topk") == "topk":
            assert ((frac > 0) & (frac < 1)).any(), "threshold routing should split the tokens"
        for t in (5, 17, 31):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % 101
            out2 = model(changed)
            torch.testing.assert_close(out["logits"][:, :t], out2["logits"][:, :t], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(out["logits"][:, t], out2["logits"][:, t])


def test_eval_batch_gives_the_same_logits_as_each_sequence_alone():
    model = build().eval()
    tokens = torch.randint(0, 101, (3, 20))
    with torch.no_grad():
        batched = model(tokens)["logits"]
        for b in range(3):
            torch.testing.assert_close(batched[b:b + 1], model(tokens[b:b + 1])["logits"], atol=1e-5, rtol=1e-5)


def test_eval_prefix_gives_the_same_logits_as_the_full_sequence():
    """Threshold routing is causal: a prefix's logits equal the full sequence's first positions."""
    model = build().eval()
    tokens = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        full = model(tokens)["logits"]
        for n in (1, 7, 19):
            torch.testing.assert_close(model(tokens[:, :n])["logits"], full[:, :n], atol=1e-5, rtol=1e-5)


def test_eval_topk_option_routes_like_training():
    model = build(eval_routing="topk").eval()
    out = model(torch.randint(0, 101, (2, 20)))
    torch.testing.assert_close(out["mod_selected_frac"], torch.full((3,), 12 / 20))


def test_training_step_reduces_loss():
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 101, (4, 24))
    losses = []
    for _ in range(15):
        out = model(tokens[:, :-1])
        loss = F.cross_entropy(out["logits"].flatten(0, 1), tokens[:, 1:].flatten()) + out["aux_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_routed_model_runs_fewer_tokens_through_blocks_than_dense():
    calls = {"routed": 0, "dense": 0}
    for key, kw in (("routed", {}), ("dense", dict(mod_capacity=1.0, mor_capacities=(1.0, 1.0, 1.0)))):
        model = build(**kw)
        for layer in model.layers.values():
            inner = layer.mor.block.residual_update

            def counting(x, p, r, cache=None, _inner=inner, _key=key):
                calls[_key] += x.shape[0] * x.shape[1]
                return _inner(x, p, r, cache)
            layer.mor.block.residual_update = counting
        model(torch.randint(0, 101, (2, 20)))
    # per block: MoD keeps 12 of 20, MoR steps keep 12, 8, 4 of them -> 24 of 60 token-steps
    assert calls["dense"] == 3 * 3 * 40
    assert calls["routed"] == 3 * (12 + 8 + 4) * 2


@pytest.mark.parametrize("kw,name", [
    (dict(dim=72), "dim"),                                          # not divisible by n_heads*head_dim
    (dict(n_heads=4, n_kv_heads=3, dim=192), "n_heads"),            # 4 not divisible by 3
    (dict(head_dim=15, dim=60), "head_dim"),
    (dict(mod_capacity=1.5), "mod_capacity"),
    (dict(mod_mode="hard"), "mod_mode"),
    (dict(recursions=0), "recursions"),
    (dict(mod_every=-1), "mod_every"),
])
def test_bad_arguments_raise_value_error_naming_them(kw, name):
    with pytest.raises(ValueError, match=name):
        model_args(**kw)


def test_odd_kv_heads_build_with_and_without_value_shift():
    for shift in (True, False):
        args = model_args(n_kv_heads=1, n_heads=3, dim=48, value_shift=shift)
        assert args.n_kv_heads == 1


def test_with_overrides_names_unknown_fields():
    with pytest.raises(ValueError, match="mod_capactiy"):
        model_args().replace(mod_capactiy=0.5)
    assert model_args().replace(mod_capacity=0.5).mod_capacity == 0.5

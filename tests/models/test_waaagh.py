"""The Waaagh family (DESIGN §3.10): the seed's API, causality, the sparse head's selection, the
prediction loss, MoE stats, bad arguments, FLOPs. Decoding is in test_decode_cache.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_titan import OrkyHydraWaaaghModel
from hydra_titan.models import get_model_spec
from hydra_titan.models.waaagh.heads import sparse_attention, sparse_select

REPO = Path(__file__).resolve().parents[2]
SPEC = get_model_spec("waaagh")


def build(**kw):
    torch.manual_seed(0)
    model = SPEC.build("debug", vocab_size=512, ssm_chunk_size=16, window=8, sparse_k=4, sparse_query_chunk=16, **kw)
    model.init_weights()
    return model


def test_the_seeds_example_runs_unchanged():
    model = OrkyHydraWaaaghModel(vocab_size=1000, d_model=256, num_layers=4, num_heads=4, num_experts=4,
                                 max_seq_len=512)
    input_ids = torch.randint(0, 1000, (2, 64))
    assert model(input_ids).shape == (2, 64, 1000)
    out = model.generate(input_ids, max_new_tokens=50, temperature=0.8)
    assert out.shape == (2, 114) and torch.equal(out[:, :64], input_ids)
    # both of the seed's sizes build
    for kw in (dict(vocab_size=100, d_model=64, num_layers=2, num_heads=2, num_experts=2),
               dict(vocab_size=50000, d_model=512, num_layers=8, num_heads=8, num_experts=8)):
        model = OrkyHydraWaaaghModel(**kw)
        assert len(model.model.layers) == kw["num_layers"]
        assert model.model.layers["0"].feed_forward.num_experts == kw["num_experts"]


def test_eval_is_causal():
    model = build().eval()
    tokens = torch.randint(0, 512, (2, 60))
    changed = tokens.clone()
    changed[:, 37] = (changed[:, 37] + 1) % 512
    with torch.no_grad():
        a, b = model(tokens)["logits"], model(changed)["logits"]
    assert torch.equal(a[:, :37], b[:, :37])
    assert (a[:, 37:] - b[:, 37:]).abs().max() > 1e-4


def test_the_sparse_head_never_selects_a_future_key():
    torch.manual_seed(1)
    seq, k = 12, 4
    scores = torch.randn(2, 3, seq, seq) * 5
    scores[..., torch.arange(seq)[:, None] < torch.arange(seq)[None, :]] += 100  # the future scores best
    causal = (torch.arange(seq)[None, :] <= torch.arange(seq)[:, None])[None, None]
    keep = sparse_select(scores, causal, k)
    assert not (keep & ~causal).any()
    assert keep.sum(-1).flatten(0, 1).eq(torch.arange(seq).add(1).clamp(max=k)).all()  # min(k, i + 1) keys
    # end to end: future keys and values cannot reach a query, in chunks of any size
    q, kk, v = (torch.randn(2, seq, 3, 8) for _ in range(3))
    kk2, v2 = kk.clone(), v.clone()
    kk2[:, 7:], v2[:, 7:] = kk2[:, 7:] * 50, v2[:, 7:] + 9
    a = sparse_attention(q, kk, v, causal[0], k, query_chunk=5)
    b = sparse_attention(q, kk2, v2, causal[0], k, query_chunk=5)
    assert torch.equal(a[:, :7], b[:, :7])
    assert torch.allclose(a, sparse_attention(q, kk, v, causal[0], k, query_chunk=seq), atol=1e-6)


def test_prediction_loss_trains_the_prediction_head_and_moe_loads_are_reported():
    model = build(predict_aux_weight=0.5)
    out = model(torch.randint(0, 512, (2, 40)))
    assert out["predict_aux_loss"] > 0
    assert out["moe_load"].shape == (4, 4)  # [MoE blocks, experts]
    assert torch.allclose(out["moe_load"].sum(-1), torch.full((4,), 80.0))  # top-1: one slot per token
    out["aux_loss"].backward()
    block = model.layers["0"]
    assert block.prediction.readout.weight.grad.abs().sum() > 0
    assert block.prediction.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("override,needle", [
    ({"dim": 250}, r"divisible by 4 \* n_heads"), ({"window": 0}, "window"), ({"sparse_k": 0}, "sparse_k"),
    ({"moe_num_experts": 0}, "moe_num_experts"), ({"memory_slots": -1}, "memory_slots"),
])
def test_bad_arguments_name_the_key(override, needle):
    with pytest.raises(ValueError, match=needle):
        SPEC.args("debug", **override)


@pytest.mark.parametrize("flag,needle", [("window", "window must be positive"),
                                         ("sparse_k", "sparse_k must be positive")])
def test_the_trainer_exits_2_on_a_bad_waaagh_argument(tmp_path, flag, needle):
    proc = subprocess.run([sys.executable, "train.py", "--config", "waaagh_debug", f"--model.overrides.{flag}", "0",
                           "--job.dump_folder", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_flops_count_the_sparse_scores_over_every_key():
    args = SPEC.args("debug")
    short, long = SPEC.flops_per_token(args, 256), SPEC.flops_per_token(args, 1280)
    # local + sparse scores: 12 * width * 2 per extra key, per layer
    assert long.executed - short.executed == pytest.approx(args.n_layers * 12 * args.head_width * 2 * 1024)
    assert short.executed == short.dense


# ----------------------------------------------------------------------------- ablations (issue 14)

ABLATABLE = ("ssm", "local", "sparse", "memory", "prediction", "moe")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_loss(model, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    out = model(tokens[:, :-1])
    ce = torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), tokens[:, 1:].flatten())
    return ce + out["aux_loss"], out


@pytest.mark.parametrize("component", ABLATABLE)
def test_each_ablation_builds_trains_and_stays_causal(component):
    full, model = build(n_layers=2), build(n_layers=2, ablate=(component,))
    assert model.args.ablate == (component,)
    # every removal drops weights; "moe" swaps 4 experts + a router for one dense FFN of an expert's width
    assert n_params(model) < n_params(full)
    block, args = model.layers["0"], model.args
    assert block.wo.weight.shape == (args.dim, args.dim)  # removed heads give zeros: W_o keeps its shape
    if component == "moe":
        from hydra_titan.models.common.ffn import SwiGLU
        assert isinstance(block.feed_forward, SwiGLU)
        assert block.feed_forward.w1.out_features == args.moe_expert_hidden(args.ffn_hidden_dim)
    else:
        assert getattr(block, component) is None
    loss, out = train_loss(model, torch.randint(0, 512, (2, 41)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing built that the forward skips
    assert ("moe_load" in out) == (component != "moe")
    if component == "prediction":
        assert out["predict_aux_loss"] == 0  # its loss goes with it
    else:
        assert out["predict_aux_loss"] > 0
    model.eval()
    tokens = torch.randint(0, 512, (2, 50))
    changed = tokens.clone()
    changed[:, 29] = (changed[:, 29] + 1) % 512
    with torch.no_grad():
        a, b = model(tokens)["logits"], model(changed)["logits"]
    assert torch.equal(a[:, :29], b[:, :29])
    assert (a[:, 29:] - b[:, 29:]).abs().max() > 1e-4


@pytest.mark.parametrize("head", ["local", "sparse", "memory", "prediction"])
def test_a_removed_head_is_the_full_model_with_that_head_giving_zeros(head):
    full, ablated = build(n_layers=2).eval(), build(n_layers=2, ablate=(head,)).eval()
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected and all(f".{head}." in key for key in unexpected)
    for block in full.layers.values():
        getattr(block, head).register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
    tokens = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ablated(tokens)["logits"], full(tokens)["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("ablate", [("ssm", "memory"), ("local", "sparse", "moe"),
                                    ("local", "sparse", "memory", "prediction")])
def test_an_ablated_model_decodes_with_the_cache(ablate):
    model = build(n_layers=2, ablate=ablate).eval()
    tokens = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full = model(tokens)["logits"]
        cache = model.init_cache(2, 30)
        steps = [model(tokens[:, :13], cache=cache)["logits"]]
        steps += [model(tokens[:, i:i + 1], cache=cache)["logits"] for i in range(13, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4
    if "ssm" in ablate:
        assert "ssm" not in cache.store["0"]
    assert not set(cache.store["0"]) & set(ablate)  # state only for the built parts


def test_ablate_parses_lists_and_comma_strings_and_names_a_bad_component():
    assert SPEC.args("debug", ablate=["moe", "memory"]).ablate == ("memory", "moe")  # TOML array
    assert SPEC.args("debug", ablate="memory, moe").ablate == ("memory", "moe")     # --model.overrides.ablate a,b
    assert SPEC.args("debug", ablate="").ablate == ()
    with pytest.raises(ValueError, match=r"ablate: unknown component\(s\) \['memry'\]; allowed: \('ssm', 'local'"):
        SPEC.args("debug", ablate=("memry",))
    with pytest.raises(ValueError, match="ablate must be a list"):
        SPEC.args("debug", ablate=3)


def test_the_trainer_exits_2_on_a_bad_ablation(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config", "waaagh_debug", "--model.overrides.ablate",
                           "ssm,memry", "--job.dump_folder", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "ablate: unknown component(s) ['memry']" in proc.stdout + proc.stderr


def test_flops_and_active_params_skip_removed_parts():
    base = SPEC.args("debug")
    full = SPEC.flops_per_token(base, 256).executed
    with torch.device("meta"):
        full_params = n_params(SPEC.model_cls(base))
    for component in ABLATABLE:
        args = base.replace(ablate=(component,))
        assert SPEC.flops_per_token(args, 256).executed < full
        with torch.device("meta"):
            removed = full_params - n_params(SPEC.model_cls(args))
        active_drop = SPEC.active_params(base, 256) - SPEC.active_params(args, 256)
        if component in ("local", "sparse", "prediction"):  # only matmul weights go
            assert active_drop == removed
        elif component == "moe":  # top-1: the token still passes one expert's width, less the router
            assert active_drop == base.n_layers * base.dim * base.moe_num_experts
        else:  # the memory bank, the SSM's norm and per-head vectors are not matmul weights
            assert 0 < active_drop < removed

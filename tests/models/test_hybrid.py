"""The hybrid family (DESIGN §3.9): causality of every variant, v2's routing, v3's global path, errors, FLOPs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hydra_titan.models import get_model_spec
from hydra_titan.models.common.ssm import Mamba2Mixer
from hydra_titan.models.hybrid import HybridModel, HybridModelArgs
from hydra_titan.models.hybrid.flops import ssm_weight_params
from hydra_titan.models.hybrid.model import HierarchicalMixer

REPO = Path(__file__).resolve().parents[2]
SPEC = get_model_spec("hybrid")


def build(variant: str, **kw) -> HybridModel:
    model = SPEC.build("debug", variant=variant, vocab_size=512, ssm_chunk_size=16, **kw)
    model.init_weights()
    return model


@pytest.mark.parametrize("variant", ["v1", "v2", "v3", "baseline", "routed", "hierarchical"])
def test_every_variant_is_causal_in_eval(variant):
    model = build(variant).eval()
    tokens = torch.randint(0, 512, (2, 120))
    changed = tokens.clone()
    changed[:, 70] = (changed[:, 70] + 1) % 512
    with torch.no_grad():
        a, b = model(tokens)["logits"], model(changed)["logits"]
    assert torch.equal(a[:, :70], b[:, :70])
    assert (a[:, 70:] - b[:, 70:]).abs().max() > 1e-4


def test_aliases_name_the_variants():
    assert SPEC.args("debug", variant="routed").variant == "v2"
    assert SPEC.args("debug", variant="hierarchical").variant == "v3"
    assert build("v1").layer_kinds == ["A", "S", "A", "S"]
    assert build("v1", layer_pattern="SSAS").layer_kinds == list("SSAS")
    assert build("v2").layer_kinds == ["R"] * 4


@pytest.mark.parametrize("seq_len,capacity", [(100, 0.15), (64, 0.15), (37, 0.5), (10, 1.0)])
def test_v2_attends_exactly_ceil_c_s_tokens_in_training(seq_len, capacity):
    model = build("v2", attn_capacity=capacity).train()
    seen = []
    for layer in model.layers.values():
        layer.attention.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    out = model(torch.randint(0, 512, (2, seq_len)))
    k = math.ceil(capacity * seq_len)
    assert seen == [k] * 4
    torch.testing.assert_close(out["mod_selected_frac"], torch.full((4,), k / seq_len))
    assert out["aux_loss"] > 0  # the BCE router loss, weighted


def test_v2_router_learns_from_the_task_loss_alone():
    model = build("v2", router_aux_weight=0.0).train()
    tokens = torch.randint(0, 512, (2, 65))
    out = model(tokens[:, :-1])
    assert out["aux_loss"] == 0
    F.cross_entropy(out["logits"].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for layer in model.layers.values():
        grad = layer.mod.router.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_v3_global_path_of_chunk_c_reads_only_earlier_chunks():
    model = build("v3", global_chunk=[16, 32])
    mixer = model.layers["1"].attention
    assert isinstance(mixer, HierarchicalMixer) and mixer.chunks == (16, 32)
    x = torch.randn(2, 128, model.args.dim)
    base = mixer.global_context(x)
    for c in (0, 3, 5):  # chunks of 16 tokens
        changed = x.clone()
        changed[:, 16 * c + 5] += 1.0
        diff = (mixer.global_context(changed) - base).abs().amax(dim=(0, 2))
        own_end = 16 * (c + 1)  # its own chunk and everything before it: untouched, at both levels
        assert diff[:own_end].max() == 0, c
        assert diff[own_end:].max() > 0, c


@pytest.mark.parametrize("override,needle", [
    (dict(variant="v4"), "variant"),
    (dict(layer_pattern="SAXS"), "layer_pattern"),
    (dict(layer_pattern="SAS"), "layer_pattern"),
    (dict(attn_capacity=0.0), "attn_capacity"),
    (dict(attn_capacity=1.5), "attn_capacity"),
    (dict(ssm_backend="triton"), "ssm_head_dim"),  # debug's P 32 / N 32: not what the kernels take
    (dict(ssm_backend="mamba"), "ssm_backend"),
    (dict(global_chunk=[16, 0]), "global_chunk"),
    (dict(ssm_groups=3), "ssm_groups"),
])
def test_bad_arguments_name_the_key(override, needle):
    with pytest.raises(ValueError, match=needle):
        SPEC.args("debug", **override)


@pytest.mark.parametrize("flag,needle", [
    ("variant=v4", "variant"), ("layer_pattern=SAXS", "layer_pattern"), ("attn_capacity=1.5", "attn_capacity"),
    ("ssm_state_dim=48", "ssm_state_dim"),
])
def test_the_trainer_exits_2_on_a_bad_hybrid_argument(tmp_path, flag, needle):
    key, value = flag.split("=")
    extra = ["--model.overrides.ssm_backend", "triton", "--model.overrides.ssm_head_dim", "64"] \
        if key == "ssm_state_dim" else []
    proc = subprocess.run([sys.executable, "train.py", "--config", "hybrid_debug", f"--model.overrides.{key}", value,
                           *extra, "--job.dump_folder", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert needle in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_list_prints_every_model_with_variants_flavors_and_config():
    proc = subprocess.run([sys.executable, "train.py", "--list"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("hybrid: SSM-attention hybrids", "variant v2: routed", "flavors: debug, 125M, 350M, 1B",
                 "default config: train_configs/hybrid_debug.toml", "hydra: CCGQA", "llama: dense"):
        assert line in out, line
    for name in ("hybrid", "hydra", "llama"):
        assert (REPO / SPEC.default_config).exists() and f"\n{name}:" in "\n" + out


def test_flops_an_all_attention_hybrid_counts_as_llama():
    args = SPEC.args("125M", layer_pattern="A" * 12)
    llama = get_model_spec("llama")
    largs = llama.args("debug", vocab_size=args.vocab_size, dim=768, n_layers=12, n_heads=12, n_kv_heads=4,
                       head_dim=64)
    for seq in (2048, 8192):
        assert SPEC.flops_per_token(args, seq) == llama.flops_per_token(largs, seq)


def test_flops_ssm_weights_and_routed_discount():
    args = SPEC.args("1B")
    m = Mamba2Mixer(args.dim, args.ssm_config)
    assert ssm_weight_params(args.dim, args.ssm_config) == m.in_proj.weight.numel() + m.out_proj.weight.numel()
    v1 = SPEC.flops_per_token(args, 2048)
    assert v1.executed == v1.dense
    v2 = SPEC.flops_per_token(args.replace(variant="v2"), 2048)
    assert v2.executed < v2.dense
    # attention grows with S, the SSM layers do not: v1's share of attention is half of llama's layers
    grow = SPEC.flops_per_token(args, 32768).executed - v1.executed
    assert grow == pytest.approx(10 * 12 * args.n_heads * args.head_dim * (32768 - 2048))
    with torch.device("meta"):
        model = HybridModel(args)
    report = SPEC.param_report(args, model=model)
    assert report.non_embedding == pytest.approx(1.261e9, rel=1e-3)

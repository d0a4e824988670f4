#!/usr/bin/env python
"""Print parameter counts and FLOPs per token for every registered flavor, and for the configs that change one.

Models are built on the meta device, so even the 4B flavor (or a 4B-parameter MoE) costs no
memory. After the flavors come the configs in train_configs/ whose [model.overrides] switch
experts on (moe_num_experts > 0) or pick another hybrid variant, named by file. For MoE rows
"active/token" and the FLOPs count the k chosen experts (+ shared) and the router, "total"
every expert; for hybrid v2 the attention counts at its routed fraction. The README's size table is
this script's output:

    python scripts/model_table.py [--seq-len 2048] [--models hydra llama] [--no-configs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_titan.config import load_config  # noqa: E402
from hydra_titan.models import get_model_spec, registered_models  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"


def _fmt(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def table_row(model: str, label: str, args, seq_len: int) -> list[str]:
    spec = get_model_spec(model)
    params = spec.param_report(args, seq_len)
    flops = spec.flops_per_token(args, seq_len)
    return [model, label, str(args.dim), _shape(model, args), _fmt(params.total), _fmt(params.non_embedding),
            _fmt(params.active), f"{flops.executed / 1e9:.2f}", f"{flops.dense / 1e9:.2f}",
            f"{flops.executed / flops.dense:.2f}"]


def table_rows(model: str, seq_len: int) -> list[list[str]]:
    spec = get_model_spec(model)
    return [table_row(model, flavor, args, seq_len) for flavor, args in spec.flavors.items()]


def config_rows(models: list[str], seq_len: int, folder: Path = CONFIGS) -> list[list[str]]:
    """One row per config file that changes its flavor's architecture: experts on, or another hybrid
    variant (vocabulary as the flavor's)."""
    rows = []
    for path in sorted(folder.glob("*.toml")):
        cfg = load_config(["--config", str(path)])
        overrides = {k: v for k, v in cfg.model.overrides.items() if k != "vocab_size"}
        if cfg.model.name not in models:
            continue
        spec = get_model_spec(cfg.model.name)
        args = spec.args(cfg.model.flavor, **overrides)
        base = spec.flavors[cfg.model.flavor]
        if not (overrides.get("moe_num_experts") or getattr(args, "variant", None) != getattr(base, "variant", None)):
            continue
        rows.append(table_row(cfg.model.name, f"{cfg.model.flavor} ({path.name})", args, seq_len))
    return rows


def _shape(model: str, args) -> str:
    if model == "hydra":
        shape = (f"{args.n_mor_blocks}x{args.recursions}, {args.n_heads}q/{args.n_kv_heads}kv x {args.head_dim} "
                 f"(C1={args.q_compression:g}, C2={args.kv_compression:g})")
    elif model == "hybrid":
        kinds = args.layer_kinds()
        mix = {"v2": f"{len(kinds)} x (SSM + attention on {args.attn_capacity:g})"}.get(
            args.variant, f"{kinds.count('A')} attn + {kinds.count('S')} SSM")
        shape = (f"{args.variant}: {mix}, {args.n_heads}q/{args.n_kv_heads}kv x {args.head_dim}; "
                 f"SSM {args.ssm_config.n_heads(args.dim)}h x P{args.ssm_head_dim} N{args.ssm_state_dim}")
    elif model == "waaagh":
        shape = (f"{args.n_layers} x (SSM + 4 heads of {args.n_heads} x {args.head_dim}: window {args.window}, "
                 f"top-{args.sparse_k}, {args.memory_slots} memory slots, prediction); "
                 f"SSM {args.ssm_config.n_heads(args.dim)}h x P{args.ssm_head_dim} N{args.ssm_state_dim}")
    else:
        shape = f"{args.n_layers} layers, {args.n_heads}q/{args.n_kv_heads}kv x {args.head_dim}"
    if getattr(args, "moe_num_experts", 0):
        every = "every layer" if args.moe_every == 1 else f"1 layer in {args.moe_every}"
        shape += f"; MoE {args.moe_num_experts} experts top-{args.moe_top_k} on {every}"
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length for FLOPs and capacities")
    parser.add_argument("--models", nargs="*", default=registered_models(), help="model families to list")
    parser.add_argument("--no-configs", action="store_true", help="leave out the MoE / variant rows of train_configs/")
    opts = parser.parse_args()
    header = ["model", "flavor", "dim", "blocks / heads", "total", "non-emb", "active/token",
              "GFLOP/token exec", "GFLOP/token dense", "exec/dense"]
    rows = [row for m in opts.models for row in table_rows(m, opts.seq_len)]
    if not opts.no_configs:
        rows += config_rows(opts.models, opts.seq_len)
    print(f"seq_len={opts.seq_len}; FLOPs = training (fwd+bwd) per token, DESIGN §4 convention")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Print parameter counts and FLOPs per token for every registered flavor.

Models are built on the meta device, so even the 4B flavor costs no memory.
The README's size table is this script's output:

    python scripts/model_table.py [--seq-len 2048] [--models hydra llama]
"""

from __future__ import annotations

import argparse

from hydra_titan.models import get_model_spec, registered_models


def _fmt(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def table_rows(model: str, seq_len: int) -> list[list[str]]:
    spec = get_model_spec(model)
    rows = []
    for flavor, args in spec.flavors.items():
        params = spec.param_report(args, seq_len)
        flops = spec.flops_per_token(args, seq_len)
        rows.append([model, flavor, str(args.dim), _shape(model, args), _fmt(params.total),
                     _fmt(params.non_embedding), _fmt(params.active), f"{flops.executed / 1e9:.2f}",
                     f"{flops.dense / 1e9:.2f}", f"{flops.executed / flops.dense:.2f}"])
    return rows


def _shape(model: str, args) -> str:
    if model == "hydra":
        return (f"{args.n_mor_blocks}x{args.recursions}, {args.n_heads}q/{args.n_kv_heads}kv x {args.head_dim} "
                f"(C1={args.q_compression:g}, C2={args.kv_compression:g})")
    return f"{args.n_layers} layers, {args.n_heads}q/{args.n_kv_heads}kv x {args.head_dim}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length for FLOPs and capacities")
    parser.add_argument("--models", nargs="*", default=registered_models(), help="model families to list")
    opts = parser.parse_args()
    header = ["model", "flavor", "dim", "blocks / heads", "total", "non-emb", "active/token",
              "GFLOP/token exec", "GFLOP/token dense", "exec/dense"]
    rows = [row for m in opts.models for row in table_rows(m, opts.seq_len)]
    print(f"seq_len={opts.seq_len}; FLOPs = training (fwd+bwd) per token, DESIGN §4 convention")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

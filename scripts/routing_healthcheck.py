#!/usr/bin/env python
"""Check a model's routers for collapse on real text: MoD selected fraction, MoR depths, MoE expert load.

Why: a router can collapse silently. The original HYDRA's MoD router ended up routing every token or
none, and a MoE layer can starve an expert for good; the loss curve shows neither. This script runs
the model on real text, in both routing modes, and reports per layer

* MoD: the fraction of tokens the router selects;
* MoR: the histogram of recursion depths (fraction of tokens that ran 0..R steps) and the mean depth;
* MoE: each expert's share of the token slots (its load);

then flags collapse and exits 1 if it finds any (0 when healthy or when the model has no router to
check, e.g. a dense llama; 2 for usage errors: a missing path, a folder that is not a checkpoint, a
bad config).

    python scripts/routing_healthcheck.py --checkpoint outputs/debug/checkpoint
    python scripts/routing_healthcheck.py --config train_configs/debug.toml --batches 2 --json health.json
    python scripts/routing_healthcheck.py --config debug --model.overrides.moe_num_experts 4   # config overrides

The model comes from a checkpoint (any form `load_inference_model` reads: a DCP step folder, a run's
checkpoint folder, a dcp-to-safetensors export or a dcp-to-torch file; its recorded tokenizer is used)
or is built from a trainer config and initialised as the trainer would at step 0 (same seed). The
text is the built-in offline corpus (KJV) unless --data names a .txt/.jsonl(.gz) file, folder or glob,
or .bin token shards; the first --batches x --batch-size windows of --seq-len tokens are used.

Routing modes (DESIGN §3.4), both run under torch.no_grad:

* train (model.train(), top-k): MoD and MoR select a *static* k = ceil(capacity * S) tokens, so their
  fractions and histograms are fixed by the capacities and cannot show a collapse; they are reported
  for comparison only. MoE routing is token choice in both modes and is judged in both.
* eval (model.eval(), threshold): a token is selected when sigmoid(router logit) > 0.5. This is where a
  collapsed MoD/MoR router shows, so MoD/MoR flags are judged on eval routing only, and only for
  routers whose eval selection can vary (threshold routing with a capacity below 1, or the soft /
  Gaussian dense modes); a router evaluated by top-k, or of capacity 1, is reported as "fixed".

Flags (thresholds set by the options of the same names):

* ``mod_always_on``: eval selected fraction >= --mod-always-on (0.99);
* ``mod_never_on``:  eval selected fraction <= --mod-never-on (0.01);
* ``mor_depth_peak``: the largest bin of a block's eval depth histogram > --peak-threshold (0.95);
* ``moe_dead_expert``: an expert's share of the layer's token slots < --dead-expert x (1 / E)
  (default 0.01, 1% of the uniform share; an expert with no token at all, the `dead_experts` count of
  `expert_load_summary`, is always below it), in either mode.

Fractions are means over the batches, depth histograms means over the batches in which tokens reached
the block (a block behind a MoD router that selected nothing has no histogram and is not judged);
expert loads are summed over the batches.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_titan.components.checkpoint_files import CheckpointError, load_inference_model  # noqa: E402
from hydra_titan.components.datasets import cached_token_shard, token_documents  # noqa: E402
from hydra_titan.components.tokenizer import Tokenizer, build_tokenizer  # noqa: E402
from hydra_titan.models.common.mod import MoDRouter  # noqa: E402
from hydra_titan.models.common.moe import expert_load_summary  # noqa: E402
from hydra_titan.models.hydra.mor import MoRBlock  # noqa: E402

MODES = ("train", "eval")
ROUTER_NAMES = {"mod": "MoD", "mor": "MoR", "moe": "MoE"}
DEFAULT_SEQ_LEN = 256  # for a checkpoint (a config's own training.seq_len is its default)


class UsageError(Exception):
    """A bad argument, path or config: reported by parser.error (exit 2)."""


# --------------------------------------------------------------------------- report types


@dataclass(frozen=True)
class Thresholds:
    mor_peak: float = 0.95       # a depth-histogram bin above this = MoR collapse
    mod_always_on: float = 0.99  # eval selected fraction at or above this = always on
    mod_never_on: float = 0.01   # eval selected fraction at or below this = never on
    dead_expert: float = 0.01    # share below this x (1 / E) = a dead expert


@dataclass
class ModRow:
    layer: int
    selected_frac: dict[str, float]   # mode -> fraction of tokens selected
    judged: bool                      # can eval routing vary (else the fraction is fixed by design)?
    note: str = ""


@dataclass
class MorRow:
    layer: int
    depth_hist: dict[str, list[float]]  # mode -> fraction of tokens at depth 0..R
    mean_depth: dict[str, float]
    judged: bool
    note: str = ""


@dataclass
class MoeRow:
    layer: int
    load: dict[str, list[float]]   # mode -> share of the token slots per expert
    slots: dict[str, int]          # mode -> token slots routed (tokens x top-k, over the batches)
    entropy: dict[str, float]      # mode -> load entropy over log E (1 = even), as the trainer logs it
    max_over_min: dict[str, float]  # mode -> busiest / idlest expert (idlest clamped to one slot)


@dataclass
class Flag:
    mode: str
    router: str   # mod | mor | moe
    layer: int
    kind: str     # mod_always_on | mod_never_on | mor_depth_peak | moe_dead_expert
    value: float
    threshold: float
    detail: str
    expert: int | None = None  # moe_dead_expert: which expert

    def message(self) -> str:
        return f"{self.mode} {ROUTER_NAMES[self.router]} layer {self.layer}: {self.kind} ({self.detail})"


@dataclass
class Report:
    source: dict[str, Any]
    thresholds: Thresholds
    mod: list[ModRow] = field(default_factory=list)
    mor: list[MorRow] = field(default_factory=list)
    moe: list[MoeRow] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)

    @property
    def has_routers(self) -> bool:
        return bool(self.mod or self.mor or self.moe)

    def summary(self) -> str:
        counts = f"{len(self.mod)} MoD, {len(self.mor)} MoR, {len(self.moe)} MoE layer(s) reported"
        if not self.has_routers:
            return "healthy: nothing to check (the model has no MoD, MoR or MoE router)"
        if not self.flags:
            return f"healthy: {counts}, no collapse"
        listed = ", ".join(f"{f.mode} {ROUTER_NAMES[f.router]} layer {f.layer} {f.kind}" for f in self.flags)
        return f"COLLAPSE: {len(self.flags)} flag(s) ({counts}): {listed}"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "thresholds": asdict(self.thresholds),
                "mod": [asdict(r) for r in self.mod], "mor": [asdict(r) for r in self.mor],
                "moe": [asdict(r) for r in self.moe], "flags": [asdict(f) for f in self.flags],
                "healthy": not self.flags, "summary": self.summary()}


# --------------------------------------------------------------------------- model and data


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (auto | cpu | cuda | cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return device


def model_from_checkpoint(path: str, device: torch.device, tokenizer_name: str
                          ) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    try:
        model, meta = load_inference_model(path, device)
    except (FileNotFoundError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    name = tokenizer_name or meta.get("tokenizer")
    if not name:
        raise UsageError(f"{path} records no tokenizer (a seed or older checkpoint): pass --tokenizer NAME")
    return model, load_tokenizer(name), {"checkpoint": str(path), "model": meta.get("model_name")}


def model_from_config(path: str, overrides: list[str], device: torch.device, tokenizer_name: str
                      ) -> tuple[nn.Module, Tokenizer, dict[str, Any], int]:
    """The config's model initialised as the trainer's step 0 (same seed), its tokenizer, its seq_len."""
    from hydra_titan.config import ConfigError, load_config
    from hydra_titan.models import get_model_spec
    from hydra_titan.train import resolve_model_args  # the trainer's vocab sizing and overrides

    try:
        cfg = load_config(["--config", path, *overrides])
        tokenizer = load_tokenizer(tokenizer_name or cfg.tokenizer.name)
        spec = get_model_spec(cfg.model.name)
        args = resolve_model_args(spec, cfg, tokenizer)
    except (ConfigError, ValueError) as e:
        raise UsageError(f"bad config {path}: {e}") from None
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device=device)
    torch.manual_seed(cfg.job.seed)
    model.init_weights(buffer_device=device)
    source = {"config": str(path), "model": cfg.model.name, "flavor": cfg.model.flavor}
    return model, tokenizer, source, cfg.training.seq_len


def load_tokenizer(name: str) -> Tokenizer:
    try:
        return build_tokenizer(name)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def _documents(data: str, tokenizer: Tokenizer) -> Iterator[Sequence[int]]:
    """Token ids of `data` (empty: the built-in corpus), document by document, BOS ... EOS."""
    if not data:
        yield cached_token_shard("demo", tokenizer).tokens
    else:
        yield from token_documents(data, tokenizer)


def token_windows(data: str, tokenizer: Tokenizer, seq_len: int, count: int) -> torch.Tensor:
    """The first `count` consecutive windows of `seq_len` tokens of the data (fewer if it is short)."""
    needed = seq_len * count
    parts, have = [], 0
    try:
        for doc in _documents(data, tokenizer):
            part = np.asarray(doc[:needed - have], dtype=np.int64)
            parts.append(part)
            have += len(part)
            if have >= needed:
                break
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UsageError(str(e).strip("'\"")) from None
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = min(count, len(stream) // seq_len)
    if n == 0:
        raise UsageError(f"{data or 'the built-in corpus'} holds {len(stream)} tokens, fewer than one window "
                         f"of --seq-len {seq_len}")
    return torch.from_numpy(stream[:n * seq_len].reshape(n, seq_len).copy())


# --------------------------------------------------------------------------- routing runs


@torch.no_grad()
def routing_stats(model: nn.Module, windows: torch.Tensor, batch_size: int, mode: str,
                  device: torch.device) -> dict[str, np.ndarray]:
    """`mod_selected_frac` / `mor_depth_hist` (means over batches) and `moe_load` (sums) in one mode."""
    model.train(mode == "train")
    sums: dict[str, np.ndarray] = {}
    n_batches = 0
    for start in range(0, len(windows), batch_size):
        out = model(windows[start:start + batch_size].to(device))
        for key in ("mod_selected_frac", "mor_depth_hist", "moe_load"):
            if key in out:
                value = out[key].detach().float().cpu().numpy()
                sums[key] = sums[key] + value if key in sums else value
        n_batches += 1
    model.eval()
    return {key: (value if key == "moe_load" else value / n_batches) for key, value in sums.items()}


def _layer_owners(model: nn.Module, cls: type) -> list[tuple[int, nn.Module]] | None:
    """(layer id, the layer's `cls` module) for the layers that have one; None if the model has no layers."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        return None
    owners = []
    for key, layer in layers.items():
        found = next((m for m in layer.modules() if isinstance(m, cls)), None)
        if found is not None:
            owners.append((int(key), found))
    return owners


def _rows(n_rows: int, owners: list[tuple[int, nn.Module]] | None, n_layers: int
          ) -> list[tuple[int, int, nn.Module | None]]:
    """(row of the stacked output, layer id, router module) for every router the output covers.

    hydra stacks `mod_selected_frac` over every block (1.0 where a block has no MoD router), the hybrid
    family over its routed layers only: both map to the layers that own a router."""
    if owners is None:  # not a decoder of this project: trust the rows
        return [(i, i, None) for i in range(n_rows)]
    if n_rows == len(owners):
        return [(i, layer, module) for i, (layer, module) in enumerate(owners)]
    if n_rows == n_layers:
        return [(layer, layer, module) for layer, module in owners]
    raise ValueError(f"{n_rows} routing rows for {len(owners)} routers in {n_layers} layers")


def _mod_judged(router: nn.Module | None) -> tuple[bool, str]:
    if router is None:
        return True, ""
    if router.mode == "soft":
        return True, "soft (dense) mode"
    if router.eval_routing != "threshold":
        return False, "fixed: eval routing is top-k"
    if router.capacity >= 1.0:
        return False, "fixed: capacity 1"
    return True, ""


def _mor_judged(block: nn.Module | None) -> tuple[bool, str]:
    if block is None:
        return True, ""
    if block.mode == "gaussian":
        return True, "gaussian (dense) mode"
    if block.eval_routing != "threshold":
        return False, "fixed: eval routing is top-k"
    if all(c >= 1.0 for c in block.capacities):
        return False, "fixed: every step has capacity 1"
    return True, ""


def mod_rows(model: nn.Module, stats: dict[str, dict[str, np.ndarray]]) -> list[ModRow]:
    if "mod_selected_frac" not in stats["eval"]:
        return []
    frac = {mode: stats[mode]["mod_selected_frac"] for mode in MODES}
    rows = []
    for row, layer, router in _rows(len(frac["eval"]), _layer_owners(model, MoDRouter), _n_layers(model)):
        judged, note = _mod_judged(router)
        rows.append(ModRow(layer, {m: float(frac[m][row]) for m in MODES}, judged, note))
    return rows


def _normalised(hist: np.ndarray) -> np.ndarray:
    """A mean of per-batch histograms renormalised to sum 1: batches where no token reached the block
    (an enclosing MoD router selected none) contribute an all-zero histogram and are left out."""
    total = hist.sum()
    return hist / total if total > 0 else hist


def mor_rows(model: nn.Module, stats: dict[str, dict[str, np.ndarray]]) -> list[MorRow]:
    if "mor_depth_hist" not in stats["eval"]:
        return []
    hist = {mode: stats[mode]["mor_depth_hist"] for mode in MODES}
    depths = np.arange(hist["eval"].shape[-1])
    rows = []
    for row, layer, block in _rows(len(hist["eval"]), _layer_owners(model, MoRBlock), _n_layers(model)):
        judged, note = _mor_judged(block)
        if not hist["eval"][row].any():
            judged, note = False, "no token reached the block (eval)"
        per_mode = {m: _normalised(hist[m][row]) for m in MODES}
        rows.append(MorRow(layer, {m: [float(v) for v in per_mode[m]] for m in MODES},
                           {m: float((per_mode[m] * depths).sum()) for m in MODES}, judged, note))
    return rows


def moe_rows(model: nn.Module, stats: dict[str, dict[str, np.ndarray]]) -> list[MoeRow]:
    if "moe_load" not in stats["eval"]:
        return []
    load = {mode: stats[mode]["moe_load"] for mode in MODES}
    ids = list(getattr(model, "moe_layer_ids", [])) or list(range(len(load["eval"])))
    rows = []
    summary = {m: expert_load_summary(torch.from_numpy(load[m])) for m in MODES}
    for row, layer in enumerate(ids):
        totals = {m: float(load[m][row].sum()) for m in MODES}
        shares = {m: [float(v) / max(totals[m], 1.0) for v in load[m][row]] for m in MODES}
        rows.append(MoeRow(layer, shares, {m: int(round(totals[m])) for m in MODES},
                           {m: float(summary[m]["entropy"][row]) for m in MODES},
                           {m: float(summary[m]["max_over_min"][row]) for m in MODES}))
    return rows


def _n_layers(model: nn.Module) -> int:
    layers = getattr(model, "layers", None)
    return len(layers) if layers is not None else 0


# --------------------------------------------------------------------------- collapse flags


def mod_flags(rows: list[ModRow], t: Thresholds) -> list[Flag]:
    flags = []
    for r in rows:
        frac = r.selected_frac["eval"]
        if not r.judged:
            continue
        if frac >= t.mod_always_on:
            flags.append(Flag("eval", "mod", r.layer, "mod_always_on", frac, t.mod_always_on,
                              f"selected fraction {frac:.3f} >= {t.mod_always_on}"))
        elif frac <= t.mod_never_on:
            flags.append(Flag("eval", "mod", r.layer, "mod_never_on", frac, t.mod_never_on,
                              f"selected fraction {frac:.3f} <= {t.mod_never_on}"))
    return flags


def mor_flags(rows: list[MorRow], t: Thresholds) -> list[Flag]:
    flags = []
    for r in rows:
        hist = r.depth_hist["eval"]
        peak = max(hist)
        if r.judged and peak > t.mor_peak:
            flags.append(Flag("eval", "mor", r.layer, "mor_depth_peak", peak, t.mor_peak,
                              f"{peak:.3f} of the tokens at depth {hist.index(peak)} > {t.mor_peak}"))
    return flags


def moe_flags(rows: list[MoeRow], t: Thresholds) -> list[Flag]:
    flags = []
    for r in rows:
        for mode in MODES:
            shares = r.load[mode]
            floor = t.dead_expert / len(shares)
            for expert, share in enumerate(shares):
                if share < floor:
                    flags.append(Flag(mode, "moe", r.layer, "moe_dead_expert", share, floor,
                                      f"expert {expert} gets {share:.4f} of the slots < {floor:.4f}", expert))
    return flags


def build_report(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                 thresholds: Thresholds, source: dict[str, Any]) -> Report:
    stats = {mode: routing_stats(model, windows, batch_size, mode, device) for mode in MODES}
    report = Report(source, thresholds, mod_rows(model, stats), mor_rows(model, stats), moe_rows(model, stats))
    report.flags = (mod_flags(report.mod, thresholds) + mor_flags(report.mor, thresholds)
                    + moe_flags(report.moe, thresholds))
    return report


# --------------------------------------------------------------------------- printing


def _status(flags: list[Flag], router: str, layer: int, fallback: str) -> str:
    kinds = [f.kind for f in flags if f.router == router and f.layer == layer]
    return "COLLAPSE: " + ", ".join(kinds) if kinds else fallback


def _fallback(judged: bool, note: str) -> str:
    """Status of a row without a flag: "ok" (with the routing mode's note), or why it is not judged."""
    if not judged:
        return note
    return f"ok ({note})" if note else "ok"


def _hist_text(hist: list[float], mean: float) -> str:
    return " ".join(f"{v:.2f}" for v in hist) + f"  (mean {mean:.2f})"


def _mod_table(report: Report) -> list[str]:
    lines = ["MoD selected fraction (collapse judged on eval/threshold routing)",
             f"  {'layer':>5}  {'train':>7}  {'eval':>7}  status"]
    for r in report.mod:
        lines.append(f"  {r.layer:>5}  {r.selected_frac['train']:>7.3f}  {r.selected_frac['eval']:>7.3f}  "
                     + _status(report.flags, "mod", r.layer, _fallback(r.judged, r.note)))
    return lines


def _mor_table(report: Report) -> list[str]:
    width = len(_hist_text(report.mor[0].depth_hist["train"], 0.0))
    lines = ["MoR depth histogram (fraction of tokens at depth 0..R; judged on eval/threshold routing)",
             f"  {'layer':>5}  {'train':<{width}}  {'eval':<{width}}  status"]
    for r in report.mor:
        train, evald = (_hist_text(r.depth_hist[m], r.mean_depth[m]) for m in MODES)
        lines.append(f"  {r.layer:>5}  {train:<{width}}  {evald:<{width}}  "
                     + _status(report.flags, "mor", r.layer, _fallback(r.judged, r.note)))
    return lines


def _moe_table(report: Report) -> list[str]:
    width = len(" ".join(["0.000"] * len(report.moe[0].load["train"])))
    lines = ["MoE expert load (share of the token slots per expert, load entropy; judged in both modes)",
             f"  {'layer':>5}  {'mode':<5}  {'shares':<{width}}  entropy  status"]
    for r in report.moe:
        for mode in MODES:
            shares = " ".join(f"{v:.3f}" for v in r.load[mode])
            dead = [str(f.expert) for f in report.flags if f.router == "moe" and f.layer == r.layer and f.mode == mode]
            lines.append(f"  {r.layer:>5}  {mode:<5}  {shares:<{width}}  {r.entropy[mode]:>7.3f}  "
                         + ("COLLAPSE: dead expert " + ", ".join(dead) if dead else "ok"))
    return lines


def format_report(report: Report) -> str:
    s = report.source
    lines = [f"routing health check: {s.get('model')} from {s.get('checkpoint') or s.get('config')}, tokenizer "
             f"{s['tokenizer']}, {s['windows']} windows x {s['seq_len']} tokens of {s['data']}"]
    for rows, table in ((report.mod, _mod_table), (report.mor, _mor_table), (report.moe, _moe_table)):
        if rows:
            lines += ["", *table(report)]
    if report.flags:
        lines += ["", "flags:"] + [f"  {f.message()}" for f in report.flags]
    lines += ["", report.summary()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="DCP folder, a run's checkpoint folder, safetensors export or "
                                            "dcp-to-torch file")
    which.add_argument("--config", help="trainer TOML config (a file, or a name in train_configs/); further "
                                        "--section.key VALUE arguments override it as in train.py")
    parser.add_argument("--data", default="", help=".txt/.jsonl(.gz) or .bin file, folder or glob "
                                                   "(default: the built-in offline corpus)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=0,
                        help=f"tokens per window (default: the config's training.seq_len, {DEFAULT_SEQ_LEN} for a "
                             "checkpoint; at most the model's max_seq_len)")
    parser.add_argument("--tokenizer", default="", help="override the tokenizer the checkpoint/config names")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--json", default="", help="write the whole report here")
    t = Thresholds()
    parser.add_argument("--peak-threshold", type=float, default=t.mor_peak,
                        help="MoR collapse: a depth-histogram bin above this (eval)")
    parser.add_argument("--mod-always-on", type=float, default=t.mod_always_on,
                        help="MoD collapse: eval selected fraction at or above this")
    parser.add_argument("--mod-never-on", type=float, default=t.mod_never_on,
                        help="MoD collapse: eval selected fraction at or below this")
    parser.add_argument("--dead-expert", type=float, default=t.dead_expert,
                        help="MoE dead expert: share of the slots below this fraction of the uniform share 1/E")
    return parser


def check_options(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> Thresholds:
    if opts.batches < 1 or opts.batch_size < 1 or opts.seq_len < 0:
        parser.error("--batches and --batch-size must be >= 1, --seq-len >= 0")
    for name in ("peak_threshold", "mod_always_on", "mod_never_on", "dead_expert"):
        if not 0.0 < getattr(opts, name) < 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(opts, name)}")
    if opts.mod_never_on >= opts.mod_always_on:
        parser.error("--mod-never-on must be below --mod-always-on")
    return Thresholds(opts.peak_threshold, opts.mod_always_on, opts.mod_never_on, opts.dead_expert)


def load_model(opts: argparse.Namespace, overrides: list[str], device: torch.device
               ) -> tuple[nn.Module, Tokenizer, dict[str, Any], int]:
    if opts.config:
        model, tokenizer, source, seq_len = model_from_config(opts.config, overrides, device, opts.tokenizer)
    else:
        model, tokenizer, source = model_from_checkpoint(opts.checkpoint, device, opts.tokenizer)
        seq_len = min(DEFAULT_SEQ_LEN, model.args.max_seq_len)
    if tokenizer.n_words > model.args.vocab_size:
        raise UsageError(f"tokenizer {tokenizer.name!r} has {tokenizer.n_words} ids but the model only "
                         f"{model.args.vocab_size}")
    seq_len = opts.seq_len or seq_len
    if seq_len > model.args.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.args.max_seq_len}")
    return model, tokenizer, source, seq_len


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts, overrides = parser.parse_known_args(argv)
    if overrides and not opts.config:
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (--section.key overrides need --config)")
    thresholds = check_options(parser, opts)
    try:
        device = pick_device(opts.device)
        model, tokenizer, source, seq_len = load_model(opts, overrides, device)
        windows = token_windows(opts.data, tokenizer, seq_len, opts.batches * opts.batch_size)
    except UsageError as e:
        parser.error(str(e))
    source.update(tokenizer=tokenizer.name, data=opts.data or "the built-in corpus", seq_len=seq_len,
                  windows=len(windows), batch_size=opts.batch_size)
    report = build_report(model, windows, opts.batch_size, device, thresholds, source)
    print(format_report(report))
    if opts.json:
        Path(opts.json).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return 1 if report.flags else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

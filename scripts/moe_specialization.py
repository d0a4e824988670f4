#!/usr/bin/env python
"""Which tokens does each expert take? The original HYDRA's expert specialisation diagnostic.

Loads a checkpoint of a MoE model (any family), runs text through it and reports,
per MoE layer and expert: the share of the token slots it received, the tokens
most often routed to it (decoded) and how concentrated its intake is; per layer:
the entropy of the load shares and the mean routing entropy of the tokens (both
over log E: 1 = uniform). Writes a text table (stdout), a PNG heatmap of the
shares (layers x experts) and, when asked, the numbers as JSON::

    python scripts/moe_specialization.py --checkpoint outputs/moe_500M/checkpoint [--data corpus.jsonl]
        [--png moe_specialization.png] [--json moe.json] [--batches 8] [--seq-len 512]

Routing is the training-time routing (top-k of every token, MoD/MoR top-k in a
HYDRA), run without gradients; a token that a HYDRA block processes at several
recursion steps counts once per step. The text is the built-in corpus unless
--data gives txt/jsonl files; the tokenizer is the run's (its config.toml beside
the checkpoint folder) unless --tokenizer names one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_titan.components.checkpoint_files import CheckpointError, load_model_from_checkpoint  # noqa: E402
from hydra_titan.components.datasets import demo_documents, iter_file_documents, resolve_files  # noqa: E402
from hydra_titan.components.tokenizer import build_tokenizer  # noqa: E402
from hydra_titan.config import ConfigError, load_config  # noqa: E402
from hydra_titan.models.common.moe import MoE, expert_load_summary  # noqa: E402

logger = logging.getLogger("moe_specialization")


class UsageError(Exception):
    """Bad arguments or a checkpoint this diagnostic cannot read: exit status 2."""


def run_tokenizer_name(checkpoint: Path, given: str | None) -> str:
    """--tokenizer, else the tokenizer of the run that wrote the checkpoint (dump_folder/config.toml)."""
    if given:
        return given
    for folder in (checkpoint.parent.parent, checkpoint.parent):
        config = folder / "config.toml"
        if config.is_file():
            try:
                return load_config(["--config", str(config)]).tokenizer.name
            except ConfigError as e:
                logger.warning("cannot read %s (%s): using the built-in tokenizer", config, e)
    logger.warning("no config.toml beside %s: using the built-in tokenizer kjv_bpe_4k", checkpoint)
    return "kjv_bpe_4k"


def token_windows(data: str | None, tokenizer, seq_len: int, n_windows: int) -> torch.Tensor:
    """[n, seq_len] windows of the packed documents (EOS between them)."""
    docs = (doc for group in iter_file_documents(resolve_files(data)) for doc in group) if data else demo_documents()
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc, eos=True))
        if len(ids) >= seq_len * n_windows:
            break
    n = min(n_windows, len(ids) // seq_len)
    if n == 0:
        raise UsageError(f"the text holds {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


class RoutingRecorder:
    """Forward hooks: the positions each block's attention was given, then the experts its MoE chose.

    A block calls its attention and then its FFN, so the MoE of a block reads the positions its block
    saw last: in a HYDRA those are the gathered tokens' original positions (MoD/MoR routing).
    """

    def __init__(self, model: torch.nn.Module):
        self.tokens: torch.Tensor | None = None
        # layer id -> per call: (token id of each slot, its expert, routing entropy of each token)
        self.records: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._positions: dict[int, torch.Tensor] = {}
        self._handles = []
        self.moe_layer_ids = list(model.moe_layer_ids)
        for layer_id in self.moe_layer_ids:
            layer = model.layers[str(layer_id)]
            block = next(m for m in layer.modules() if isinstance(getattr(m, "feed_forward", None), MoE))
            self._handles.append(block.attention.register_forward_pre_hook(self._attention_hook(layer_id)))
            self._handles.append(block.feed_forward.register_forward_hook(self._moe_hook(layer_id)))

    def _attention_hook(self, layer_id: int):
        def hook(module, args):
            self._positions[layer_id] = args[1]
        return hook

    def _moe_hook(self, layer_id: int):
        def hook(module: MoE, args, output):
            x = args[0]
            experts, _, scores = module.route(x.reshape(-1, x.shape[-1]))
            positions = self._positions[layer_id].expand(x.shape[0], x.shape[1])
            token_ids = self.tokens.gather(1, positions).reshape(-1)
            probs = scores / scores.sum(-1, keepdim=True)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(module.num_experts)
            self.records[layer_id].append((token_ids.repeat_interleave(module.top_k).cpu(),
                                           experts.reshape(-1).cpu(), entropy.cpu()))
        return hook


def analyse(model, windows: torch.Tensor, tokenizer, batch: int, top_tokens: int, device) -> dict:
    recorder = RoutingRecorder(model)
    model.train()  # the routing of training: top-k everywhere, static shapes
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            recorder.tokens = windows[start:start + batch].to(device)
            model(recorder.tokens)
    n_experts = next(m for m in model.modules() if isinstance(m, MoE)).num_experts
    layers = []
    for layer_id in recorder.moe_layer_ids:
        token_ids, experts, entropies = (torch.cat(parts) for parts in zip(*recorder.records[layer_id]))
        token_entropy = entropies.mean().item()
        load = torch.bincount(experts, minlength=n_experts).float()
        share = load / load.sum()
        load_entropy = expert_load_summary(load[None])["entropy"].item()
        rows = []
        for e in range(n_experts):
            ids = token_ids[experts == e]
            counts = torch.bincount(ids, minlength=1)
            top = counts.topk(min(top_tokens, int((counts > 0).sum()))) if ids.numel() else None
            tops = [] if top is None else [
                {"token": tokenizer.decode([int(i)]), "id": int(i), "count": int(c)}
                for c, i in zip(top.values.tolist(), top.indices.tolist())]
            distinct = int((counts > 0).sum()) if ids.numel() else 0
            rows.append({"expert": e, "share": share[e].item(), "slots": int(load[e]), "distinct_tokens": distinct,
                         "top_tokens": tops})
        layers.append({"layer": layer_id, "load_entropy": load_entropy, "token_routing_entropy": token_entropy,
                       "experts": rows})
    return {"layers": layers, "n_experts": n_experts, "tokens": int(windows.numel())}


def print_table(report: dict) -> None:
    for layer in report["layers"]:
        print(f"\nlayer {layer['layer']}: load entropy {layer['load_entropy']:.3f}, "
              f"mean token routing entropy {layer['token_routing_entropy']:.3f} (1 = uniform)")
        print("| expert | share | slots | distinct tokens | most frequent tokens (count) |")
        print("|---|---|---|---|---|")
        for row in layer["experts"]:
            tops = ", ".join(f"{t['token']!r} ({t['count']})" for t in row["top_tokens"])
            print(f"| {row['expert']} | {row['share']:.3f} | {row['slots']} | {row['distinct_tokens']} | {tops} |")


def write_heatmap(report: dict, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError(f"--png needs matplotlib (pip install 'hydra_titan[diagnostics]'): {e}") from e
    shares = [[row["share"] for row in layer["experts"]] for layer in report["layers"]]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * report["n_experts"], 1.2 + 0.45 * len(shares)))
    image = ax.imshow(shares, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(report["n_experts"]))
    ax.set_yticks(range(len(shares)), [str(layer["layer"]) for layer in report["layers"]])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(shares):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < max(max(r) for r in shares) * 0.6 else "black")
    fig.colorbar(image, ax=ax, label="share of token slots")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step-N folder, or a checkpoint folder (newest)")
    parser.add_argument("--data", help="txt/jsonl file, folder or glob (default: the built-in corpus)")
    parser.add_argument("--tokenizer", help="tokenizer name or .tiktoken path (default: the run's)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=8, help="batches of --batch-size windows to run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--top-tokens", type=int, default=8)
    parser.add_argument("--png", default="moe_specialization.png", help="heatmap path ('' for none)")
    parser.add_argument("--json", default="", help="write the numbers here too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if min(opts.seq_len, opts.batches, opts.batch_size, opts.top_tokens) < 1:
            raise UsageError("--seq-len, --batches, --batch-size and --top-tokens must be positive")
        model, name, args, folder = load_model_from_checkpoint(opts.checkpoint, opts.device)
        if not model.moe_layer_ids:
            raise UsageError(f"{folder} holds a dense {name} model (moe_num_experts = 0): no experts to analyse")
        if opts.seq_len > args.max_seq_len:
            raise UsageError(f"--seq-len {opts.seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
        tokenizer = build_tokenizer(run_tokenizer_name(folder, opts.tokenizer))
        if tokenizer.n_words > args.vocab_size:
            raise UsageError(f"tokenizer {tokenizer} has {tokenizer.n_words} ids, the model {args.vocab_size}")
        windows = token_windows(opts.data, tokenizer, opts.seq_len, opts.batches * opts.batch_size)
        report = analyse(model, windows, tokenizer, opts.batch_size, opts.top_tokens, opts.device)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.update(checkpoint=str(folder), model=name)
    print(f"{name} checkpoint {folder}: {len(report['layers'])} MoE layers x {report['n_experts']} experts, "
          f"{report['tokens']} tokens, top-{args.moe_top_k} routing")
    print_table(report)
    if opts.png:
        write_heatmap(report, Path(opts.png), f"{name}: expert shares per MoE layer ({folder.name})")
        print(f"\nheatmap: {opts.png}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2))
        print(f"numbers: {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Sample text from a checkpoint, printing it as it is produced, then the decode speed.

The model and the tokenizer are the ones the checkpoint records. PATH is a DCP checkpoint (a
``step-N`` folder, or a run's checkpoint folder: its newest complete step), or the output of
``scripts/convert_checkpoint.py`` (a dcp-to-safetensors folder or its model.safetensors, or a
dcp-to-torch file). Generation stops at the tokenizer's end-of-text id or after --max-new-tokens.

    python scripts/generate.py --checkpoint outputs/debug/checkpoint --prompt "In the beginning"
    python scripts/generate.py --checkpoint export/ --prompt "And God said" --temperature 0   # greedy

On CUDA the cached decode step is replayed as a CUDA graph; --compile compiles its blocks with
torch.compile first (fewer, fused kernels per token; the first call compiles, seconds to minutes).

Exit status 2 for bad arguments: a missing path, a folder that is not a checkpoint, a prompt longer
than the model's max_seq_len, --top-p outside (0, 1], a negative --temperature, --compile without
the CUDA graph (a CPU device, --no-cache or --no-cuda-graph).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_titan.components.checkpoint_files import DTYPES, CheckpointError, load_inference_model  # noqa: E402
from hydra_titan.components.generation import generate  # noqa: E402
from hydra_titan.components.tokenizer import build_tokenizer  # noqa: E402


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is CUDA where there is one."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load(parser: argparse.ArgumentParser, opts) -> tuple[torch.nn.Module, object, torch.device]:
    """The checkpoint's model (eval mode, on the device, in the dtype) and tokenizer; usage errors exit 2."""
    device = resolve_device(opts.device)
    try:
        model, meta = load_inference_model(opts.checkpoint, device)
    except (FileNotFoundError, CheckpointError) as e:
        parser.error(str(e))
    name = opts.tokenizer or meta.get("tokenizer")
    if not name:
        parser.error(f"{opts.checkpoint} records no tokenizer (an older checkpoint): pass --tokenizer NAME")
    tokenizer = build_tokenizer(name)
    if tokenizer.n_words > model.args.vocab_size:
        parser.error(f"tokenizer {name!r} has {tokenizer.n_words} ids but the model only {model.args.vocab_size}")
    model.to(DTYPES[opts.dtype])
    model.init_buffers(device)  # the RoPE table stays fp32: .to(bfloat16) would round its angles
    return model, tokenizer, device


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="DCP folder, safetensors export or dcp-to-torch file")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--tokenizer", default="", help="override the tokenizer the checkpoint records")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, dispatch each cached decode step eagerly instead of replaying a CUDA graph")
    parser.add_argument("--compile", action="store_true",
                        help="compile the blocks of the CUDA-graph decode step with torch.compile (CUDA only)")
    parser.add_argument("--json", default="", help="also write prompt ids, new ids, text and tokens/s here")
    opts = parser.parse_args(argv)
    if not opts.temperature >= 0:
        parser.error(f"--temperature must be >= 0, got {opts.temperature}")
    if not 0 < opts.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {opts.top_p}")
    if opts.top_k < 0 or opts.max_new_tokens < 0:
        parser.error("--top-k and --max-new-tokens must be >= 0")
    if opts.compile and (resolve_device(opts.device).type != "cuda" or opts.no_cache or opts.no_cuda_graph):
        parser.error("--compile compiles the CUDA-graph decode step: it needs a CUDA device, "
                     "and neither --no-cache nor --no-cuda-graph")
    model, tokenizer, device = load(parser, opts)
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(opts.prompt)]
    if len(prompt_ids) > model.args.max_seq_len:
        parser.error(f"the prompt is {len(prompt_ids)} tokens; the model's max_seq_len is {model.args.max_seq_len}")

    new: list[int] = []
    shown = ""

    def stream(step_tokens):
        nonlocal shown
        if step_tokens[0] is not None:
            new.append(step_tokens[0])
            text = tokenizer.decode(new)
            print(text[len(shown):], end="", flush=True)
            shown = text

    graph = device.type == "cuda" and not opts.no_cache and not opts.no_cuda_graph
    print(opts.prompt, end="", flush=True)
    start = time.perf_counter()
    generate(model, [prompt_ids], opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k,
             top_p=opts.top_p, seed=opts.seed, stop_ids=[tokenizer.eos_id], use_cache=not opts.no_cache,
             cuda_graph=graph, compile_step=opts.compile, on_tokens=stream)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    speed = len(new) / seconds if seconds > 0 else float("nan")
    print(f"\n[{len(new)} tokens in {seconds:.2f} s: {speed:.1f} tokens/s, "
          f"{'recompute' if opts.no_cache else 'cached'} decode{' (CUDA graph)' if graph else ''}"
          f"{' compiled' if opts.compile else ''}, "
          f"{device.type} {opts.dtype}]", file=sys.stderr)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"prompt_ids": prompt_ids, "new_ids": new, "text": shown,
                                               "tokens_per_s": speed}) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

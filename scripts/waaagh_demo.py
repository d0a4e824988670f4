#!/usr/bin/env python
"""The seed's four demonstrations (seed 003, "DEMONSTRATIONS"), each printing measured figures.

Why: the seed lists a basic demo, a component comparison, a speed benchmark over sequence lengths
and a memory demonstration, and shows no numbers for any of them. Here each runs on the registry's
`waaagh` model and prints what it measures:

* basic: the seed's example unchanged (`hydra_titan.OrkyHydraWaaaghModel`): shapes, parameters;
* ablation: the component comparison as an ablation. One small model trained with the same seed
  and data (the trainer's built-in KJV corpus and 4k BPE) in full and with each component removed
  in turn (`WaaaghModelArgs.ablate`, semantics in `WaaaghBlock`): validation loss, parameters;
* speed: forward + backward tokens/s and peak memory of waaagh and of llama of the same width and
  depth over sequence lengths, at a constant number of tokens per step (bf16 on GPU);
* memory: a patterned-sequence recall task (a random pattern repeated with period P, P beyond the
  local window, so recall needs a longer reach) trained with and without the memory head.

Without a GPU the defaults are CPU-sized (minutes in all): the figures are real, but from short
runs of small models, so read differences between arms against that, not as conclusions.

    python scripts/waaagh_demo.py                                  # all four, on cuda if available
    python scripts/waaagh_demo.py --demos speed --flavor 100M --seq-lens 1024 4096 --json speed.json
    python scripts/waaagh_demo.py --demos ablation --ablation-steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra_titan  # noqa: E402
from hydra_titan.components.dataloader import load_windows, split_loader  # noqa: E402
from hydra_titan.components.loss import IGNORE_INDEX, chunked_cross_entropy_sum  # noqa: E402
from hydra_titan.components.tokenizer import build_tokenizer  # noqa: E402
from hydra_titan.models import get_model_spec  # noqa: E402
from hydra_titan.models.common.moe import moe_layers, update_expert_biases  # noqa: E402
from hydra_titan.models.waaagh.args import ABLATABLE  # noqa: E402
from hydra_titan.train import VOCAB_MULTIPLE  # noqa: E402

DEMOS = ("basic", "ablation", "speed", "memory")
TOKENIZER = "kjv_bpe_4k"  # the tokenizer of train_configs/waaagh_debug.toml and its `demo` corpus
Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels) [B, T]


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Sizes:
    """Every size the demos use; the GPU and CPU defaults below, each overridable by a flag."""

    train_dim: int            # width of the models the ablation and memory demos train
    train_layers: int
    ablation_steps: int
    ablation_batch: int
    ablation_seq_len: int
    ablation_eval_batches: int
    flavor: str               # the speed demo's waaagh flavor (llama is built at its width and depth)
    seq_lens: tuple[int, ...]
    tokens_per_step: int
    warmup_steps: int
    timed_steps: int
    memory_steps: int
    memory_batch: int
    memory_period: int
    memory_repeats: int
    memory_vocab: int
    memory_window: int
    seeds: int                # the ablation and memory demos train every arm once per seed
    lr: float = 2e-3          # train_configs/waaagh_debug.toml's


GPU_SIZES = Sizes(train_dim=256, train_layers=4, ablation_steps=400, ablation_batch=16, ablation_seq_len=256,
                  ablation_eval_batches=16, flavor="100M", seq_lens=(256, 512, 1024, 2048, 4096, 8192),
                  tokens_per_step=16384, warmup_steps=3, timed_steps=10, memory_steps=600, memory_batch=32,
                  memory_period=48, memory_repeats=4, memory_vocab=256, memory_window=16, seeds=3)
CPU_SIZES = Sizes(train_dim=128, train_layers=2, ablation_steps=100, ablation_batch=8, ablation_seq_len=128,
                  ablation_eval_batches=8, flavor="debug", seq_lens=(256, 512), tokens_per_step=2048,
                  warmup_steps=1, timed_steps=3, memory_steps=150, memory_batch=16, memory_period=32,
                  memory_repeats=4, memory_vocab=64, memory_window=16, seeds=1)


@dataclass(frozen=True)
class TrainSettings:
    """The in-process loop of the ablation and memory demos: AdamW, warm-up then cosine to 10%."""

    steps: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    max_norm: float = 1.0


# ----------------------------------------------------------------------------- shared pieces


def small_waaagh_args(sizes: Sizes, **overrides):
    """The debug flavor at the demos' training width and depth (4 experts, top-1, as every flavor)."""
    n_heads = 2 if sizes.train_dim % 16 == 0 else 1
    return get_model_spec("waaagh").args("debug", dim=sizes.train_dim, n_layers=sizes.train_layers,
                                          n_heads=n_heads, **overrides)


def build_model(spec_name: str, args, device: torch.device, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):
        model = get_model_spec(spec_name).model_cls(args)
    model.init_weights(buffer_device=device)
    return model


def build_arm(base, ablate: tuple[str, ...], device: torch.device, seed: int) -> torch.nn.Module:
    """The waaagh model `base` with `ablate` removed, starting from the full model's initial weights
    for every tensor the two share (same name and shape): arms differ by the removed parts only."""
    full = build_model("waaagh", base, device, seed)
    if not ablate:
        return full
    model = build_model("waaagh", base.replace(ablate=ablate), device, seed)
    own = model.state_dict()
    shared = {k: v for k, v in full.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return model


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def fmt_summary(stats: dict[str, float], spec: str) -> str:
    """The mean, and the range over seeds when there are several."""
    if stats["min"] == stats["max"]:
        return format(stats["mean"], spec)
    return f"{stats['mean']:{spec}} ({stats['min']:{spec}}..{stats['max']:{spec}})"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_loss(out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (IGNORE_INDEX skipped)."""
    return F.cross_entropy(out["logits"].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: torch.nn.Module, batches: Iterator[Batch], settings: TrainSettings,
          device: torch.device) -> tuple[float, float]:
    """Train for settings.steps; (mean loss of the last tenth of the steps, seconds). The loss is
    read back once at the end, and the MoE biases move after each step as in the trainer."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, settings))
    experts = moe_layers(model)
    losses = []
    start = time.perf_counter()
    for _ in range(settings.steps):
        inputs, labels = (t.to(device) for t in next(batches))
        out = model(inputs)
        ce = lm_loss(out, labels)
        (ce + out["aux_loss"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if "moe_load" in out:
            update_expert_biases(experts, out["moe_load"])
        losses.append(ce.detach())
    tail = torch.stack(losses[-max(1, len(losses) // 10):]).mean().item()
    return tail, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch], device: torch.device,
             score: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]) -> float:
    """Mean of `score(outputs, labels)` over the batches, in eval mode."""
    model.eval()
    values = [score(model(inputs.to(device)), labels.to(device)) for inputs, labels in batches]
    return torch.stack(values).mean().item()


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ----------------------------------------------------------------------------- 1. basic


def demo_basic(sizes: Sizes, device: torch.device, seed: int) -> dict:
    """The seed's code example, unchanged."""
    torch.manual_seed(seed)
    model = hydra_titan.OrkyHydraWaaaghModel(vocab_size=1000, d_model=256, num_layers=4, num_heads=4,
                                             num_experts=4, max_seq_len=512).to(device)
    input_ids = torch.randint(0, 1000, (2, 64), device=device)
    with torch.no_grad():
        logits = model(input_ids)
    start = time.perf_counter()
    generated = model.generate(input_ids, max_new_tokens=50, temperature=0.8)
    seconds = time.perf_counter() - start
    result = {"logits_shape": list(logits.shape), "generated_shape": list(generated.shape),
              "prompt_kept": bool(torch.equal(generated[:, :64], input_ids)), "parameters": n_params(model),
              "generate_seconds": seconds}
    print(f"forward: input (2, 64) -> logits {tuple(logits.shape)}")
    print(f"generate(max_new_tokens=50, temperature=0.8) -> {tuple(generated.shape)} "
          f"(prompt kept: {result['prompt_kept']}; {seconds:.2f} s with the decode cache)")
    print(f"parameters: {result['parameters']:,}")
    return result


# ----------------------------------------------------------------------------- 2. ablation


def kjv_batches(sizes: Sizes) -> tuple[Callable[[int], Iterator[Batch]], list[Batch], int]:
    """(train iterator for a seed, the fixed validation batches, vocabulary size) on the built-in corpus
    (the trainer's `demo` source): every arm of a seed gets the same batches in the same order."""
    tokenizer = build_tokenizer(TOKENIZER)
    try:
        windows = load_windows(source="demo", path="", tokenizer=tokenizer, seq_len=sizes.ablation_seq_len)
    except FileNotFoundError as e:
        raise SystemExit(f"the ablation demo trains on the built-in KJV corpus: {e}") from None

    def loader(split: str, seed: int):
        return split_loader(windows, split=split, val_fraction=0.02, local_batch_size=sizes.ablation_batch,
                            dp_rank=0, dp_world_size=1, seed=seed)

    val = [batch for _, batch in zip(range(sizes.ablation_eval_batches), loader("val", 0))]
    vocab = VOCAB_MULTIPLE * math.ceil(tokenizer.n_words / VOCAB_MULTIPLE)  # sized as the trainer sizes it
    return lambda seed: iter(loader("train", seed)), val, vocab


def demo_ablation(sizes: Sizes, device: torch.device, seed: int) -> dict:
    train_batches, val, vocab = kjv_batches(sizes)
    settings = TrainSettings(steps=sizes.ablation_steps, lr=sizes.lr, warmup=max(1, sizes.ablation_steps // 10))
    base = small_waaagh_args(sizes, vocab_size=vocab, max_seq_len=sizes.ablation_seq_len)
    seeds = [seed + i for i in range(sizes.seeds)]
    results = []
    for ablate in [()] + [(component,) for component in ABLATABLE]:
        runs = []
        for run_seed in seeds:
            model = build_arm(base, ablate, device, run_seed)
            train_loss, seconds = train(model, train_batches(run_seed), settings, device)
            runs.append({"seed": run_seed, "train_loss": train_loss, "val_loss": evaluate(model, val, device, lm_loss),
                         "seconds": seconds})
        results.append({"arm": "full" if not ablate else f"-{ablate[0]}", "ablate": list(ablate),
                        "parameters": n_params(model), "runs": runs,
                        "train_loss": summary([r["train_loss"] for r in runs]),
                        "val_loss": summary([r["val_loss"] for r in runs]),
                        "seconds": sum(r["seconds"] for r in runs)})
    full = results[0]["val_loss"]["mean"]
    tokens = sizes.ablation_steps * sizes.ablation_batch * sizes.ablation_seq_len
    print(f"waaagh dim {base.dim}, {base.n_layers} layers, window {base.window}, top-{base.sparse_k}, "
          f"{base.memory_slots} memory slots; KJV ({TOKENIZER}); {sizes.ablation_steps} steps x "
          f"{sizes.ablation_batch} x {sizes.ablation_seq_len} = {tokens:,} tokens per arm and seed; seeds {seeds} "
          f"(every arm starts from the full model's initial weights); val = {len(val)} batches")
    print_table(["arm", "parameters", "train loss (last 10%)", "val loss", "val - full", "s"],
                [[r["arm"], f"{r['parameters']:,}", fmt_summary(r["train_loss"], ".4f"),
                  fmt_summary(r["val_loss"], ".4f"), f"{r['val_loss']['mean'] - full:+.4f}", f"{r['seconds']:.1f}"]
                 for r in results])
    return {"model": {"dim": base.dim, "n_layers": base.n_layers, "vocab_size": vocab}, "steps": sizes.ablation_steps,
            "tokens_per_arm_and_seed": tokens, "seeds": seeds, "val_batches": len(val), "arms": results}


# ----------------------------------------------------------------------------- 3. speed


def speed_models(sizes: Sizes, max_len: int) -> dict:
    """waaagh's flavor and llama of its width, depth, vocabulary and FFN (64-wide heads, 4:1 GQA)."""
    waaagh = get_model_spec("waaagh").args(sizes.flavor, max_seq_len=max_len)
    n_heads = max(1, waaagh.dim // 64)
    llama = get_model_spec("llama").args("debug", vocab_size=waaagh.vocab_size, dim=waaagh.dim,
                                         n_layers=waaagh.n_layers, n_heads=n_heads, n_kv_heads=max(1, n_heads // 4),
                                         head_dim=waaagh.dim // n_heads, ffn_dim_multiplier=waaagh.ffn_dim_multiplier,
                                         multiple_of=waaagh.multiple_of, max_seq_len=max_len)
    return {"waaagh": waaagh, "llama": llama}


def time_point(model: torch.nn.Module, batch: int, seq_len: int, sizes: Sizes, device: torch.device) -> dict:
    """Forward + backward (loss incl. aux) tokens/s after warm-up, and peak memory on CUDA."""
    vocab = model.args.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        out = model(inputs)
        ce = chunked_cross_entropy_sum(out["logits"], labels, chunk_size=4096) / labels.numel()
        (ce + out["aux_loss"]).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(sizes.warmup_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(sizes.timed_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"tokens_per_s": batch * seq_len * sizes.timed_steps / seconds, "peak_gib": peak}


def measure(name: str, args, batch: int, seq_len: int, sizes: Sizes, device: torch.device, seed: int) -> dict:
    """One point, or {"error": "OOM"} when it does not fit (the next point still runs)."""
    model = None
    try:
        model = build_model(name, args, device, seed)
        if device.type == "cuda":
            model = model.to(torch.bfloat16)
            model.init_buffers(device)  # the RoPE table stays fp32, as under FSDP's bf16 parameters
        return time_point(model.train(), batch, seq_len, sizes, device)
    except torch.OutOfMemoryError:
        return {"error": "OOM", "tokens_per_s": None, "peak_gib": None}
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def demo_speed(sizes: Sizes, device: torch.device, seed: int) -> dict:
    models = speed_models(sizes, max(sizes.seq_lens))
    points = []
    for seq_len in sizes.seq_lens:
        batch = max(1, sizes.tokens_per_step // seq_len)
        row = {"seq_len": seq_len, "batch": batch, "tokens_per_step": batch * seq_len}
        for name, args in models.items():
            row[name] = measure(name, args, batch, seq_len, sizes, device, seed)
        points.append(row)
    w, llama = models["waaagh"], models["llama"]
    dtype = "bf16" if device.type == "cuda" else "fp32"
    print(f"waaagh {sizes.flavor} (dim {w.dim}, {w.n_layers} layers, 4 experts top-1) vs llama (dim {llama.dim}, "
          f"{llama.n_layers} layers, {llama.n_heads}q/{llama.n_kv_heads}kv x {llama.head_dim}, dense FFN); "
          f"vocab {w.vocab_size}; {dtype}, eager; {sizes.tokens_per_step} tokens per step; "
          f"{sizes.warmup_steps} warm-up + {sizes.timed_steps} timed forward+backward steps on {device.type}")
    if device.type != "cuda":
        print("memory not measured on CPU (peak GiB columns: n/a)")

    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    rows = []
    for p in points:
        a, b = p["waaagh"], p["llama"]
        ratio = a["tokens_per_s"] / b["tokens_per_s"] if a["tokens_per_s"] and b["tokens_per_s"] else None
        rows.append([str(p["seq_len"]), a.get("error") or fmt(a["tokens_per_s"], ",.0f"),
                     b.get("error") or fmt(b["tokens_per_s"], ",.0f"), fmt(ratio, ".2f"),
                     a.get("error") or fmt(a["peak_gib"], ".2f"), b.get("error") or fmt(b["peak_gib"], ".2f")])
    print_table(["seq len", "waaagh tok/s", "llama tok/s", "waaagh/llama", "waaagh peak GiB", "llama peak GiB"], rows)
    return {"flavor": sizes.flavor, "dtype": dtype, "memory_measured": device.type == "cuda",
            "waaagh_args": {"dim": w.dim, "n_layers": w.n_layers}, "llama_args": asdict(llama), "points": points}


# ----------------------------------------------------------------------------- 4. memory


def pattern_batch(batch: int, sizes: Sizes, generator: torch.Generator) -> Batch:
    """Sequences of one random pattern of `memory_period` tokens repeated `memory_repeats` times.

    Labels cover the repeats only (the first period is unpredictable): position t predicts token
    t + 1, which equals token t + 1 - P."""
    period, repeats = sizes.memory_period, sizes.memory_repeats
    pattern = torch.randint(0, sizes.memory_vocab, (batch, period), generator=generator)
    seq = pattern.repeat(1, repeats)
    inputs, labels = seq[:, :-1], seq[:, 1:].clone()
    labels[:, :period - 1] = IGNORE_INDEX
    return inputs, labels


def recall_accuracy(out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Share of the repeat positions whose argmax is the pattern's next token."""
    scored = labels != IGNORE_INDEX
    hits = (out["logits"].argmax(dim=-1) == labels) & scored
    return hits.sum().float() / scored.sum()


def pattern_stream(sizes: Sizes, seed: int) -> Iterator[Batch]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield pattern_batch(sizes.memory_batch, sizes, generator)


def demo_memory(sizes: Sizes, device: torch.device, seed: int) -> dict:
    seq_len = sizes.memory_period * sizes.memory_repeats
    base = small_waaagh_args(sizes, vocab_size=sizes.memory_vocab, max_seq_len=seq_len,
                             window=sizes.memory_window)
    held_out = [pattern_batch(sizes.memory_batch, sizes, torch.Generator().manual_seed(seed + 1_000_000 + i))
                for i in range(4)]
    settings = TrainSettings(steps=sizes.memory_steps, lr=sizes.lr, warmup=max(1, sizes.memory_steps // 10))
    seeds = [seed + i for i in range(sizes.seeds)]
    arms = []
    for label, ablate in (("with memory head", ()), ("without (ablate memory)", ("memory",))):
        runs = []
        for run_seed in seeds:
            model = build_arm(base, ablate, device, run_seed)
            train_loss, seconds = train(model, pattern_stream(sizes, run_seed), settings, device)
            runs.append({"seed": run_seed, "train_loss": train_loss,
                         "recall_accuracy": evaluate(model, held_out, device, recall_accuracy), "seconds": seconds})
        arms.append({"arm": label, "ablate": list(ablate), "parameters": n_params(model), "runs": runs,
                     "train_loss": summary([r["train_loss"] for r in runs]),
                     "recall_accuracy": summary([r["recall_accuracy"] for r in runs]),
                     "seconds": sum(r["seconds"] for r in runs)})
    chance = 1 / sizes.memory_vocab
    reach = "beyond" if sizes.memory_period > base.window else "within"
    print(f"task: a random pattern of {sizes.memory_period} tokens (vocab {sizes.memory_vocab}) repeated "
          f"{sizes.memory_repeats} times ({seq_len} tokens); loss and accuracy cover the repeats, whose next token "
          f"lies {sizes.memory_period} back, {reach} the local window ({base.window}). waaagh dim {base.dim}, "
          f"{base.n_layers} layers, {sizes.memory_steps} steps x {sizes.memory_batch} sequences, seeds {seeds} "
          f"(both arms start from the same weights); accuracy on {len(held_out) * sizes.memory_batch} held-out "
          f"sequences; chance {chance:.3f}")
    print_table(["arm", "parameters", "train loss (last 10%)", "recall accuracy", "s"],
                [[a["arm"], f"{a['parameters']:,}", fmt_summary(a["train_loss"], ".4f"),
                  fmt_summary(a["recall_accuracy"], ".3f"), f"{a['seconds']:.1f}"] for a in arms])
    print("note: the memory head attends over a learned bank shared by every sequence (persistent memory), not "
          "over this sequence, so it cannot store the pattern; the copying itself is done by the SSM and the "
          "sparse head, and a gap between the arms is a difference in how the model trains, to be read against "
          "the spread over seeds")
    return {"period": sizes.memory_period, "repeats": sizes.memory_repeats, "vocab": sizes.memory_vocab,
            "window": base.window, "steps": sizes.memory_steps, "seeds": seeds, "chance": chance, "arms": arms}


# ----------------------------------------------------------------------------- command line


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


SIZE_FLAGS = {  # flag -> (Sizes field, type, help)
    "--train-dim": ("train_dim", positive_int, "width of the models the ablation and memory demos train"),
    "--train-layers": ("train_layers", positive_int, "depth of those models"),
    "--ablation-steps": ("ablation_steps", positive_int, "training steps per ablation arm"),
    "--ablation-batch": ("ablation_batch", positive_int, "sequences per ablation step"),
    "--ablation-seq-len": ("ablation_seq_len", positive_int, "tokens per ablation sequence"),
    "--ablation-eval-batches": ("ablation_eval_batches", positive_int, "validation batches per arm"),
    "--seq-lens": ("seq_lens", positive_int, "sequence lengths of the speed demo"),
    "--tokens-per-step": ("tokens_per_step", positive_int, "speed demo: batch = this // seq len (at least 1)"),
    "--warmup-steps": ("warmup_steps", positive_int, "speed demo: untimed steps per point"),
    "--timed-steps": ("timed_steps", positive_int, "speed demo: timed steps per point"),
    "--memory-steps": ("memory_steps", positive_int, "training steps per memory arm"),
    "--memory-batch": ("memory_batch", positive_int, "sequences per memory step"),
    "--memory-period": ("memory_period", positive_int, "length of the repeated pattern"),
    "--memory-repeats": ("memory_repeats", positive_int, "times the pattern occurs in a sequence (>= 2)"),
    "--memory-vocab": ("memory_vocab", positive_int, "token ids of the memory task"),
    "--memory-window": ("memory_window", positive_int, "the local head's window in the memory demo"),
    "--seeds": ("seeds", positive_int, "ablation and memory demos: runs per arm (seeds --seed, --seed + 1, ...)"),
    "--lr": ("lr", positive_float, "peak learning rate of the ablation and memory runs"),
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Sizes]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", nargs="+", choices=DEMOS, default=list(DEMOS), help="which demos to run, in order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flavor", choices=sorted(get_model_spec("waaagh").flavors),
                        help="speed demo's waaagh flavor (default 100M on GPU, debug on CPU)")
    for flag, (field, kind, text) in SIZE_FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, nargs="+" if field == "seq_lens" else None, help=text)
    opts = parser.parse_args(argv)
    try:
        device = torch.device(opts.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    defaults = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    given = {field: getattr(opts, field) for field, _, _ in SIZE_FLAGS.values() if getattr(opts, field) is not None}
    if "seq_lens" in given:
        given["seq_lens"] = tuple(given["seq_lens"])
    if opts.flavor:
        given["flavor"] = opts.flavor
    sizes = replace(defaults, **given)
    if sizes.memory_repeats < 2:
        parser.error("--memory-repeats must be >= 2 (the pattern has to come back to be recalled)")
    try:
        small_waaagh_args(sizes)
    except ValueError as e:
        parser.error(f"--train-dim {sizes.train_dim} / --train-layers {sizes.train_layers}: {e}")
    return opts, sizes


def main(argv: list[str] | None = None) -> int:
    opts, sizes = parse_args(argv)
    device = torch.device(opts.device)
    runners = {"basic": demo_basic, "ablation": demo_ablation, "speed": demo_speed, "memory": demo_memory}
    report = {"device": str(device), "torch": torch.__version__, "seed": opts.seed, "sizes": asdict(sizes)}
    for number, name in enumerate(opts.demos, 1):
        print(f"\n## {number}. {name}\n")
        start = time.perf_counter()
        report[name] = runners[name](sizes, device, opts.seed)
        report[name]["demo_seconds"] = time.perf_counter() - start
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nfigures written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Job configuration schema: one dataclass per TOML section.

The schema is the single source of truth for every knob of a run. Each field
carries its default, a one-line help text and (where it matters) its allowed
values or numeric range right next to it:

* allowed string values are ``Literal[...]`` annotations;
* numeric ranges are a :class:`Range` in the field metadata.

:func:`validate_config` checks a fully built :class:`JobConfig` against those
annotations, so a config built in Python is held to the same rules as one
loaded from TOML (the loading and CLI parsing live in ``manager.py``).
"""

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config value, key or file is invalid; the message names the key."""


@dataclass(frozen=True)
class Range:
    """Numeric bounds of a field; values listed in ``also`` are allowed too.

    ``also`` exists for sentinels such as ``-1`` ("whatever is left" or
    "latest") that sit outside an otherwise positive range.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[int, ...] = ()

    def contains(self, value: float) -> bool:
        """True if ``value`` satisfies every bound or is a listed sentinel."""
        if value in self.also:
            return True
        if isinstance(value, float) and math.isnan(value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        """Human-readable form used in error messages and --help."""
        parts = [
            f"{op} {bound:g}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        text = " and ".join(parts)
        if self.also:
            text += " or " + " or ".join(str(v) for v in self.also)
        return text


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
FRACTION = Range(ge=0, le=1)


def opt(default: Any, doc: str, *, bounds: Range | None = None) -> Any:
    """Declare a config field with its default, help line and optional range.

    Mutable defaults (lists, dicts) get a factory so instances never share them.
    """
    metadata = {"help": doc, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Job:
    """Run identity: where outputs go and how randomness is seeded."""

    dump_folder: str = opt("./outputs", "root folder for checkpoints, TensorBoard logs and the resolved config")
    description: str = opt("", "free-text description of the run")
    seed: int = opt(42, "global random seed")
    deterministic: bool = opt(False, "use deterministic algorithms (slower; for debugging)")


@dataclass
class Model:
    """Which registered model spec and size flavor to build."""

    name: str = opt("hydra", "model spec name in the registry (e.g. hydra, llama)")
    flavor: str = opt("debug", "size flavor of the model spec (e.g. debug, 100M, 1B)")
    overrides: dict[str, Any] = opt({}, "per-argument overrides of the flavor's model args; checked by the model")


@dataclass
class Training:
    """Step loop, batch shape, precision and loss weighting."""

    steps: int = opt(1000, "number of optimizer steps", bounds=POSITIVE)
    local_batch_size: int = opt(8, "sequences per micro-batch per data-parallel rank", bounds=POSITIVE)
    seq_len: int = opt(2048, "tokens per sequence", bounds=POSITIVE)
    gradient_accumulation_steps: int = opt(1, "micro-batches accumulated per optimizer step", bounds=POSITIVE)
    max_norm: float = opt(1.0, "gradient clipping max global norm", bounds=POSITIVE)
    mixed_precision_param: Literal["bfloat16", "float32"] = opt("bfloat16", "FSDP parameter dtype for compute")
    mixed_precision_reduce: Literal["float32", "bfloat16"] = opt("float32", "FSDP gradient reduce-scatter dtype")
    device: Literal["auto", "cuda", "cpu"] = opt("auto", "device type; auto = cuda if available else cpu")
    aux_loss_weight: float = opt(1.0, "multiplier of the model's router auxiliary loss", bounds=NON_NEGATIVE)
    ponder_loss_weight: float = opt(0.0, "multiplier of the MoR ponder loss", bounds=NON_NEGATIVE)
    z_loss_weight: float = opt(0.0, "multiplier of the logit z-loss", bounds=NON_NEGATIVE)
    chunked_ce: bool = opt(False, "compute cross-entropy in sequence chunks to save memory")
    ce_chunk_size: int = opt(4096, "tokens per chunk when chunked_ce is on", bounds=POSITIVE)
    cuda_graph: bool = opt(False, "record a micro-batch's forward + loss + backward as one CUDA graph after two "
                           "eager micro-batches and replay it for every later one (CUDA only; the optimizer, "
                           "clipping and validation stay outside); removes the host's launch cost, which bounds "
                           "routed steps at small batches")
    gc_freq: int = opt(50, "run Python garbage collection every this many steps", bounds=POSITIVE)
    max_skipped_steps: int = opt(5, "a step whose loss or gradient norm is not finite is skipped (no update; the "
                                 "lr schedule and data move on); this many in a row stop the run", bounds=POSITIVE)


@dataclass
class Optimizer:
    """Optimizer hyper-parameters (AdamW's; Muon reuses lr and weight_decay)."""

    name: Literal["adamw", "adamw8bit", "muon"] = opt("adamw", "optimizer implementation; muon = torch.optim.Muon on "
                                                      "the hidden matrices (nn.Linear weights but the output "
                                                      "head) with AdamW's lr and weight decay, AdamW on the rest")
    lr: float = opt(3e-4, "peak learning rate", bounds=POSITIVE)
    beta1: float = opt(0.9, "Adam beta1", bounds=Range(ge=0, lt=1))
    beta2: float = opt(0.95, "Adam beta2", bounds=Range(ge=0, lt=1))
    eps: float = opt(1e-8, "Adam epsilon", bounds=POSITIVE)
    weight_decay: float = opt(0.1, "decoupled weight decay", bounds=NON_NEGATIVE)
    fused: Literal["auto", "true", "false"] = opt("auto", "use the fused AdamW kernel; auto = on CUDA and CPU "
                                                  "(with it the non-finite guard skips a step on the device)")


@dataclass
class LRScheduler:
    """Warmup followed by a decay schedule."""

    warmup_steps: int = opt(200, "linear warmup steps", bounds=NON_NEGATIVE)
    decay_type: Literal["cosine", "linear", "wsd", "constant"] = opt("cosine", "shape of the decay after warmup")
    decay_ratio: float = opt(0.2, "wsd: fraction of the steps spent decaying", bounds=FRACTION)
    min_lr_factor: float = opt(0.1, "final lr as a fraction of the peak lr", bounds=FRACTION)


@dataclass
class Data:
    """Where training text comes from."""

    source: Literal["demo", "text", "shards", "hf"] = opt("demo", "kind of data source")
    path: str = opt("", "file, folder or glob of the data (text/shards)")
    text_field: str = opt("text", "field holding the document text (jsonl/hf)")
    hf_name: str = opt("", "Hugging Face dataset name (source = hf)")
    hf_split: str = opt("train", "Hugging Face dataset split (source = hf)")
    val_fraction: float = opt(0.01, "fraction of documents held out for validation", bounds=Range(ge=0, lt=1))
    val_path: str = opt("", "held-out data of the same source kind (file, folder or glob); when set, validation "
                        "reads all of it, training all of data.path, and val_fraction is not used")
    num_workers: int = opt(0, "must stay 0: the loader slices memory-mapped token windows in the training "
                           "process, so there is nothing for workers to do (kept so saved config.toml files "
                           "load)", bounds=Range(ge=0, le=0))


@dataclass
class Tokenizer:
    """Which BPE ranks to load (never downloaded at run time)."""

    name: str = opt("kjv_bpe_4k", "built-in name (kjv_bpe_4k | cl100k_base | o200k_base) or a .tiktoken path")


@dataclass
class Parallelism:
    """Data-parallel mesh shape (FSDP2 / HSDP)."""

    dp_replicate: int = opt(1, "replicate degree (HSDP when > 1)", bounds=POSITIVE)
    dp_shard: int = opt(
        -1, "shard degree; -1 = whatever is left of the world size", bounds=Range(ge=1, also=(-1,))
    )
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = opt(
        "default", "free gathered parameters after forward; default: after every block but the last, "
        "and never when the shard group is one rank (nothing to save there but a second copy in backward)"
    )
    init_mode: Literal["full", "sharded"] = opt(
        "full", "full: initialise an unsharded copy then shard it (identical weights in every layout, "
        "transient full-model memory); sharded: initialise shards in place (no extra memory)"
    )


@dataclass
class Checkpoint:
    """Distributed checkpoint save/load policy."""

    enable: bool = opt(False, "save and resume checkpoints")
    folder: str = opt("checkpoint", "checkpoint folder, relative to job.dump_folder")
    interval: int = opt(500, "save every this many steps", bounds=POSITIVE)
    async_mode: Literal["disabled", "async"] = opt("disabled", "save in the background")
    keep_latest_k: int = opt(0, "keep only the newest k checkpoints; 0 = keep all", bounds=NON_NEGATIVE)
    load_step: int = opt(-1, "step to resume from; -1 = latest", bounds=Range(ge=0, also=(-1,)))
    exclude_from_loading: list[str] = opt([], "state keys not restored on load (e.g. optimizer,lr_scheduler)")
    export_dtype: Literal["float32", "bfloat16"] = opt("float32", "dtype of model-only exports")
    initial_load_path: str = opt("", "checkpoint to initialise from when the folder has none")
    last_save_model_only: bool = opt(False, "the final save holds only model weights (in export_dtype)")
    on_save_error: Literal["stop", "continue"] = opt(
        "stop", "a save that fails (e.g. a full disk): stop the run, or log it and train on to the next save; "
        "the newest complete checkpoint is kept either way, and a failed final save always stops")


@dataclass
class ActivationCheckpoint:
    """Recompute activations in backward to save memory."""

    mode: Literal["none", "full", "selective"] = opt("none", "per-block activation checkpointing")


@dataclass
class Compile:
    """Per-block torch.compile."""

    enable: bool = opt(False, "compile each block with torch.compile")
    fullgraph: bool = opt(True, "require a single graph per block")
    loss: bool = opt(True, "also compile the cross-entropy (fused: no fp32 copy of the logits); "
                     "not with training.chunked_ce")
    inductor_options: dict[str, Any] = opt({}, "torch._inductor config passed to the block compiles, "
                                           "e.g. {coordinate_descent_tuning = true}")


@dataclass
class Float8:
    """torchao float8 training of eligible linears."""

    enable: bool = opt(False, "convert eligible linears to float8 training")
    recipe: Literal["tensorwise", "rowwise"] = opt("tensorwise", "float8 scaling recipe")
    enable_fsdp_float8_all_gather: bool = opt(False, "all-gather FSDP parameters in float8 (tensorwise)")
    emulate: bool = opt(False, "emulate float8 math (for testing without float8 hardware)")
    filter_fqns: list[str] = opt([], "name fragments of further linears to keep in bf16 (the model's own "
                                 "skips, e.g. the LM head and routers, always apply)")
    min_dim: int = opt(16, "keep linears whose smaller dimension is below this in bf16 (small GEMMs "
                       "lose more to the casts than float8 gains)", bounds=POSITIVE)


@dataclass
class Metrics:
    """Logging and TensorBoard."""

    log_freq: int = opt(10, "log metrics every this many steps", bounds=POSITIVE)
    enable_tensorboard: bool = opt(True, "write TensorBoard event files")
    save_tb_folder: str = opt("tb", "TensorBoard folder, relative to job.dump_folder")
    routing_stats_freq: int = opt(50, "log routing statistics every this many steps", bounds=POSITIVE)
    rank_0_only: bool = opt(True, "only rank 0 logs and writes TensorBoard")
    enable_db: bool = opt(True, "record the run in the dump folder's SQLite run database (components/tracking.py)")
    db_file: str = opt("training.db", "the run database, relative to job.dump_folder")
    spike_factor: float = opt(1.5, "a logged loss above this many times its short EMA (0.99) is a spike",
                              bounds=Range(gt=1))
    spike_warmup: int = opt(10, "log steps that set the EMAs before spikes are detected", bounds=NON_NEGATIVE)


@dataclass
class Validation:
    """Periodic evaluation on held-out data."""

    enable: bool = opt(True, "run validation periodically")
    freq: int = opt(100, "validate every this many steps", bounds=POSITIVE)
    steps: int = opt(10, "batches per validation run", bounds=POSITIVE)


@dataclass
class Debug:
    """Test harness knobs; off by default."""

    faults: list[str] = opt([], "faults to inject, POINT@STEP[xCOUNT][:rankR] (components/faults.py): "
                            "kill_mid_step, kill_mid_save, kill_after_publish, nan_loss, enospc_save")


@dataclass
class JobConfig:
    """The whole resolved configuration of a run: one attribute per section."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    data: Data = field(default_factory=Data)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    metrics: Metrics = field(default_factory=Metrics)
    validation: Validation = field(default_factory=Validation)
    debug: Debug = field(default_factory=Debug)


# ---------------------------------------------------------------------------
# Schema introspection (shared by the manager, --help and validation)
# ---------------------------------------------------------------------------


def section_types() -> dict[str, type]:
    """Section name -> section dataclass, in declaration order."""
    hints = typing.get_type_hints(JobConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(JobConfig)}


def field_types(section_cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of one section dataclass."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def allowed_values(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation, else None."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def type_name(tp: Any) -> str:
    """Short readable name of a field type for messages and --help."""
    if allowed_values(tp) is not None:
        return "str"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "table"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------------------
# Validation of a built JobConfig
# ---------------------------------------------------------------------------


def check_type(key: str, value: Any, tp: Any) -> None:
    """Raise ConfigError unless ``value`` has the field type ``tp``.

    bool is not accepted where an int or float is expected (it is an int
    subclass, but ``steps = true`` is always a mistake); an int is accepted
    for a float field.
    """
    choices = allowed_values(tp)
    origin = typing.get_origin(tp)
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, choices))}")
    elif origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        for item in value:
            check_type(key, item, typing.get_args(tp)[0])
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table (dict), got {value!r}")
    elif tp is Any:
        return
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
    elif isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")


def validate_config(cfg: JobConfig) -> None:
    """Check every field's type, allowed values and range; raise ConfigError.

    Called by the manager after loading, and usable on configs built in code.
    """
    for section_name, section_cls in section_types().items():
        section = getattr(cfg, section_name)
        if not isinstance(section, section_cls):
            raise ConfigError(f"{section_name}: expected a {section_cls.__name__} section, got {section!r}")
        types = field_types(section_cls)
        for f in dataclasses.fields(section_cls):
            key = f"{section_name}.{f.name}"
            value = getattr(section, f.name)
            check_type(key, value, types[f.name])
            bounds: Range | None = f.metadata.get("bounds")
            if bounds is not None and not bounds.contains(value):
                raise ConfigError(f"{key}: must be {bounds.describe()}, got {value!r} ({f.metadata['help']})")

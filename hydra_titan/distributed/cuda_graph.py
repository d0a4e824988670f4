"""Whole-step capture: a micro-batch's forward + loss + backward as one CUDA graph (DESIGN §10).

Why: a routed HYDRA step launches ~11k kernels (96 block applications per forward at 1B), so at
small batches the GPU waits on the host. Training shapes are static (top-k routing) and forward
does no host sync, so the micro-step can be recorded once and replayed: one launch per micro-batch.

What makes the replay correct:
* inputs (tokens, labels, the step's global target count, the loss scale) are copied into static
  buffers that the graph reads;
* parameters keep their addresses (the optimizer updates them in place), and gradients accumulate
  into persistent ``.grad`` tensors: the trainer zeroes them with ``set_to_none=False``, and FSDP2
  adds each micro-batch's reduce-scattered gradient into them;
* the optimizer, clipping, the non-finite guard and the MoE bias update run outside the graph;
  the biases are updated in place, so the graph reads the new values;
* outputs live in the graph's memory and are overwritten by the next replay, so callers get clones.

The first ``warmup_steps`` calls run eagerly on a side stream (torch.compile compiles there and
lazily created state settles, as CUDA graph capture requires); the next call records the graph,
then replays it; every later call only replays. A capture runs the same kernels as eager execution
would, so a replayed step gives bitwise the losses of an uncaptured one
(tests/gpu/test_cuda_graph_step.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MicroStep = Callable[..., tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


class CaptureError(RuntimeError):
    """The micro-step could not be recorded (a host sync or data-dependent shape inside it)."""


def run_on_side_stream(stream: torch.cuda.Stream, fn: Callable, *args):
    """`fn(*args)` on `stream`, ordered after the current stream's work and before its next.

    The eager warm-up a CUDA-graph capture needs: torch.compile compiles there and the caching
    allocator settles its blocks away from the capturing stream (shared by the training and the
    decode captures)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    return out


class CapturedMicroStep:
    """`fn(*tensors) -> (parts, stats)` recorded as a CUDA graph after `warmup_steps` eager calls.

    Every call must pass tensors of the shapes, dtypes and devices of the first call; the results
    are clones, safe to keep after the next call.
    """

    def __init__(self, fn: MicroStep, warmup_steps: int = 2):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (a capture needs one eager run first), got {warmup_steps}")
        self.fn = fn
        self.warmup_left = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self.stream: torch.cuda.Stream | None = None
        self.replays = 0

    def _check(self, args: tuple[torch.Tensor, ...]) -> None:
        for i, arg in enumerate(args):
            if arg.device.type != "cuda":
                raise CaptureError(f"training.cuda_graph: input {i} is on {arg.device}, not a CUDA device")
        if self.static_inputs:
            for i, (arg, static) in enumerate(zip(args, self.static_inputs)):
                if (arg.shape, arg.dtype) != (static.shape, static.dtype):
                    raise CaptureError(f"training.cuda_graph: input {i} changed from {tuple(static.shape)} "
                                       f"{static.dtype} to {tuple(arg.shape)} {arg.dtype}; a captured step needs "
                                       "the same shapes at every micro-batch")

    def __call__(self, *args: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        self._check(args)
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=args[0].device)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return run_on_side_stream(self.stream, self.fn, *args)
        if self.graph is None:
            self._capture(args)
        else:
            for static, arg in zip(self.static_inputs, args):
                static.copy_(arg, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        parts, stats = self.outputs
        return {k: v.clone() for k, v in parts.items()}, {k: v.clone() for k, v in stats.items()}

    def _capture(self, args: tuple[torch.Tensor, ...]) -> None:
        """Record one call (it executes nothing: the replay that follows runs it)."""
        self.static_inputs = tuple(arg.clone() for arg in args)
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            # thread_local: the async checkpoint writer and loader threads may use CUDA meanwhile
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self.outputs = self.fn(*self.static_inputs)
        except RuntimeError as e:
            raise CaptureError(f"training.cuda_graph: the micro-step could not be captured ({e}); a host sync or a "
                               "data-dependent shape in forward or backward breaks a capture. Set "
                               "training.cuda_graph = false for this model") from e
        torch.cuda.current_stream().wait_stream(self.stream)
        self.graph = graph

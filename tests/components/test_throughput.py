"""Throughput: tokens per second over the log interval, with validation time left out (CPU, fake clock)."""

from __future__ import annotations

import pytest

from hydra_titan.components import metrics
from hydra_titan.components.metrics import Throughput


def test_time_inside_paused_is_not_part_of_the_interval(monkeypatch):
    clock = iter([0.0, 3.0, 13.0, 15.0, 16.0])  # start, pause in, pause out, read, read
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = Throughput(flops_per_token=6.0, peak=100.0)
    meter.add_tokens(500)
    with meter.paused():  # 10 s of validation
        pass
    speed = meter.read()
    assert speed["tokens_per_sec"] == pytest.approx(500 / 5)  # 15 s wall, 5 s of training
    assert speed["mfu"] == pytest.approx(100.0 * 100 * 6 / 100)
    meter.add_tokens(30)
    assert meter.read()["tokens_per_sec"] == pytest.approx(30 / 1)  # the next interval starts at the read


def test_paused_still_excludes_the_time_when_the_body_raises(monkeypatch):
    clock = iter([0.0, 1.0, 9.0, 10.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = Throughput(flops_per_token=1.0, peak=None)
    meter.add_tokens(20)
    with pytest.raises(RuntimeError), meter.paused():
        raise RuntimeError("validation failed")
    assert meter.read() == {"tokens_per_sec": pytest.approx(10.0), "tflops": pytest.approx(10.0 / 1e12)}

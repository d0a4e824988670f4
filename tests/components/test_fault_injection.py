"""The fault-injection harness (components/faults.py): its spec grammar, which steps and ranks a fault
covers, and that it fires once per dump folder (what lets a restarted run go past it)."""

from __future__ import annotations

import pytest

from hydra_titan.components.faults import Fault, FaultInjector, parse_fault


def test_specs_parse_into_point_step_count_and_rank():
    assert parse_fault("kill_mid_step@5:rank1") == Fault("kill_mid_step", 5, 1, 1)
    assert parse_fault(" nan_loss@3x2 ") == Fault("nan_loss", 3, 2, None)
    assert parse_fault("enospc_save@4x1:rank0").name == "enospc_save@4:rank0"


@pytest.mark.parametrize("spec,needle", [
    ("explode@3", "unknown point 'explode'"),
    ("kill_mid_step", "is not POINT@STEP"),
    ("kill_mid_step@0", "STEP >= 1"),
    ("nan_loss@2x0", "COUNT >= 1"),
    ("nan_loss@2:node1", "is not POINT@STEP"),
])
def test_bad_specs_are_errors_naming_them(spec, needle):
    with pytest.raises(ValueError, match="debug.faults") as err:
        parse_fault(spec)
    assert needle in str(err.value)


def test_a_fault_covers_its_steps_and_rank_and_fires_once_per_folder(tmp_path):
    faults = FaultInjector(["nan_loss@3x2:rank1"], rank=1, folder=tmp_path)
    assert [faults.poison_loss(step) for step in range(1, 7)] == [False, False, True, True, False, False]
    assert (tmp_path / "faults" / "nan_loss@3x2.rank1.fired").is_file()
    again = FaultInjector(["nan_loss@3x2:rank1"], rank=1, folder=tmp_path)  # the restarted process
    assert not any(again.poison_loss(step) for step in range(1, 7))
    other_rank = FaultInjector(["nan_loss@3x2:rank1"], rank=0, folder=tmp_path / "other")
    assert not any(other_rank.poison_loss(step) for step in range(1, 7))
    assert not FaultInjector([], rank=0, folder=tmp_path)  # off: falsy, so callers skip it


def test_a_kill_fault_is_spent_before_the_process_dies(tmp_path, monkeypatch):
    killed = []
    monkeypatch.setattr("hydra_titan.components.faults.os.kill", lambda pid, sig: killed.append(sig))
    faults = FaultInjector(["kill_mid_step@2"], rank=0, folder=tmp_path)
    faults.kill("kill_mid_step", 1)
    faults.kill("kill_mid_save", 2)
    assert killed == []
    faults.kill("kill_mid_step", 2)
    assert len(killed) == 1 and (tmp_path / "faults" / "kill_mid_step@2.rank0.fired").is_file()
    FaultInjector(["kill_mid_step@2"], rank=0, folder=tmp_path).kill("kill_mid_step", 2)
    assert len(killed) == 1

"""GPU slots: concurrent trainings on one machine never share a GPU; nothing changes without GPUs."""

from __future__ import annotations

import pytest

from prefixflow.launch.gpu_slots import gpu_slots, visible_gpus
from prefixflow.services.errors import TrainingError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXFLOW_HOME", str(tmp_path))
    return tmp_path


def test_no_gpu_means_no_lock_and_no_env(home, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    with gpu_slots(4) as env:
        assert env == {}
    assert not (home / "locks").exists()  # no GPU: no lock files


def test_concurrent_trainings_get_disjoint_gpus(home, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    with gpu_slots(2) as a, gpu_slots(1) as b:
        held = a["CUDA_VISIBLE_DEVICES"].split(",") + b["CUDA_VISIBLE_DEVICES"].split(",")
        assert sorted(held) == ["3", "5", "7"]
        with pytest.raises(TimeoutError), gpu_slots(1, poll_s=0.05, timeout_s=0.3):
            pass  # every GPU is taken: a third training waits
    with gpu_slots(3) as c:  # released: all three free again
        assert c["CUDA_VISIBLE_DEVICES"] == "3,5,7"


def test_more_gpus_than_visible_is_a_clear_error(home, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(TrainingError, match=r"needs 2 GPUs .* only 1 are visible"), gpu_slots(2):
        pass

"""Weights handed to a command: a corrupt, truncated or misshapen file is named, never a traceback."""

from __future__ import annotations

import pytest
from torch import nn

from medsight.model.weights import WeightsError, load_weights, save_weights


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "modules" / "perceiver.safetensors"
    save_weights(nn.Linear(4, 3), path)
    return path


def test_round_trip(saved):
    module = nn.Linear(4, 3)
    load_weights(module, saved)
    assert module.weight.shape == (3, 4)


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "empty"])
def test_a_damaged_file_is_named(saved, damage):
    data = saved.read_bytes()
    saved.write_bytes({"random bytes": bytes(range(256)) * 4, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(WeightsError, match=rf"^{saved}: not a readable safetensors file .*rerun the stage that wrote it"):
        load_weights(nn.Linear(4, 3), saved)


def test_shapes_that_disagree_with_the_config_are_named(saved):
    with pytest.raises(WeightsError, match=rf"^{saved}: weights do not fit the configured model \(2 shape mismatch\(es\), "
                                           r"e\.g\. bias \(3,\) vs model \(5,\)"):
        load_weights(nn.Linear(4, 5), saved)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/nope.safetensors: checkpoint file does not exist"):
        load_weights(nn.Linear(4, 3), tmp_path / "nope.safetensors")

"""Learning evidence: the whole tiny chain trains on CPU and clears the issue's bars on held-out
(test-split, disjoint-seed) synthetic data. Figures are recorded in BENCHMARKS.md."""

from __future__ import annotations

import json

import pytest

from medsight.config import get_preset
from medsight.stages.chain import run_chain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("learning")
    result = run_chain(get_preset("tiny"), workdir)
    print(json.dumps(result.metrics(), indent=1))
    return result


def test_stage1_perceiver_dice(chain):
    assert chain.stages["perceiver-pretrain"].metrics["test_dice"] >= 0.70


def test_stage2_quantized_dice_retention_and_code_usage(chain):
    metrics = chain.stages["codebook-pretrain"].metrics
    assert metrics["test_dice_retention"] >= 0.90
    assert metrics["min_codes_used_per_modality"] > 1


def test_stage5_generated_region_tokens_and_closed_accuracy(chain):
    metrics = chain.stages["evaluate"].metrics
    # Dice of masks decoded from the region tokens the model generated itself (DiagSeg, test split).
    assert metrics["seg_dice"] >= 0.50
    # Yes/no lesion questions are balanced, so chance is 0.5.
    assert metrics["closed_accuracy"] >= 0.75


def test_every_stage_ran_fresh(chain):
    assert not any(record.reused for record in chain.stages.values())
    assert (chain.stages["evaluate"].output / "report.html").is_file()

"""Cache keys that cannot drift: every config read is in the stage's view, and a change recomputes
exactly the stages that read it (and what depends on them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medsight.config import apply_overrides, get_preset
from medsight.config.access import outside, recorded_reads
from medsight.stages.registry import STAGES

SMALL = [
    "data.train_images=12", "data.val_images=4", "data.test_images=4",
    *(f"{section}.{key}" for section in ("perceiver_pretrain", "codebook_pretrain", "v2t_align", "t2v_align",
                                         "instruct_tune") for key in ("max_steps=1", "batch_size=2")),
    "evaluate.max_new_tokens=8", "evaluate.report_samples=2",
]
LANGUAGE_SIDE = {"v2t-align", "t2v-align", "instruct-tune", "evaluate", "register-model"}


def test_recorder_sees_leaf_reads_through_nested_objects_and_properties() -> None:
    config = get_preset("tiny")
    perceiver = config.model.perceiver
    with recorded_reads(config) as reads:
        _ = perceiver.dim  # through a section object handed to a module, as models do
        _ = config.model.num_patch_tokens  # a property reads its fields
        _ = config.model  # a section alone is not a read
    assert reads == {"model.perceiver.dim", "model.encoder.image_size", "model.encoder.patch_size", "model.patch_merge"}
    assert outside(reads, ("model.perceiver", "model.encoder")) == ["model.patch_merge"]
    # The hooks are gone afterwards.
    assert "__getattribute__" not in type(config.model).__dict__


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory: pytest.TempPathFactory):
    from medsight.stages.chain import run_chain

    workdir = tmp_path_factory.mktemp("views")
    config = apply_overrides(get_preset("tiny"), SMALL)
    first = run_chain(config, workdir)
    changed = run_chain(apply_overrides(config, ["model.patch_merge=2"]), workdir)
    return first, changed


@pytest.mark.slow
def test_every_config_field_a_stage_reads_is_in_its_view(chain_runs) -> None:
    first, changed = chain_runs
    for run in (first, changed):
        for name, record in run.stages.items():
            if record.reused:
                continue
            stage = json.loads((record.output / "stage.json").read_text())
            assert stage["config_reads"], name  # the recorder saw the stage read its config
            assert stage["config_reads_outside_view"] == [], name
            assert stage["cacheable"] is True, name


@pytest.mark.slow
def test_patch_merge_recomputes_the_language_side_and_nothing_upstream(chain_runs) -> None:
    first, changed = chain_runs
    assert {name for name, r in first.stages.items() if not r.reused} == {s.name for s in STAGES}
    recomputed = {name for name, r in changed.stages.items() if not r.reused}
    assert recomputed == LANGUAGE_SIDE
    for name in set(first.stages) - LANGUAGE_SIDE:
        assert changed.stages[name].output == first.stages[name].output
    assert changed.stages["v2t-align"].key != first.stages["v2t-align"].key


def test_code_hash_follows_the_files_a_stage_imports(tmp_path: Path) -> None:
    """Editing a module changes the code hash of exactly the stages whose code imports it."""
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "medsight", tmp_path / "medsight", ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import json; from medsight.stages.registry import STAGES; from medsight.stages.cache_key import code_hash;"
              "print(json.dumps({s.name: code_hash(s) for s in STAGES}))")

    def hashes() -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)

    before = hashes()
    with open(tmp_path / "medsight" / "model" / "llm.py", "a") as handle:
        handle.write("\n# an edit\n")
    after = hashes()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"base-models", *LANGUAGE_SIDE}

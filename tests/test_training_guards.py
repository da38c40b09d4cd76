"""Issue 9, item 5: nothing trained silently wrong.

Unknown region tokens in the answers are refused (naming the file and conversation id) instead
of turning the segmentation loss into a silent 0.0; a loss term that stays exactly zero is
reported in the log and in MLflow; the loop never sees an impossible schedule.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.data.conversation_dataset import ConversationDataset
from medsight.data.errors import DataError
from medsight.data.llava import read_conversations
from medsight.data.taxonomy import Taxonomy
from medsight.train.engine import TorchEngine
from medsight.train.loop import run_training
from medsight.train.loss_watch import ZeroLossWatch
from medsight.train.tracker import NullTracker


def _files(root: Path) -> tuple[str, str]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8)).save(root / "img" / "a.png")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:5, 2:5] = 255
    Image.fromarray(mask).save(root / "img" / "a_mask.png")
    return "img/a.png", "img/a_mask.png"


def _conversations(root: Path, answers: list[str], masks_per_answer: int = 1) -> Path:
    image, mask = _files(root)
    entries = [{"id": f"conv{i}", "image": image, "mask_files": [mask] * masks_per_answer,
                "conversations": [{"from": "human", "value": "<image>\nPlease segment the liver."},
                                  {"from": "gpt", "value": answer}]} for i, answer in enumerate(answers)]
    path = root / "grounding_train.json"
    path.write_text(json.dumps(entries))
    return path


def _dataset(path: Path, root: Path, tokenizer, vocabulary, visual_tokens: int = 4, size: int = 16) -> ConversationDataset:
    return ConversationDataset(read_conversations(path, root), tokenizer, num_visual_tokens=visual_tokens,
                               image_size=size, max_length=256, taxonomy=Taxonomy.synthetic(),
                               region_tokens=vocabulary)


def test_every_region_token_unknown_is_an_error_naming_file_and_conversation(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    path = _conversations(tmp_path, ["Here is the liver [C77_3].", "Here is the liver [C88_1]."])
    with pytest.raises(DataError, match=rf"{path}: conversation conv0: region token\(s\) \[C77_3\] are not in the "
                                        r"model's vocabulary \(\d+ tokens"):
        _dataset(path, tmp_path, tokenizer, model.vocabulary.names)


def test_a_stray_bad_entry_is_dropped_with_a_warning(tiny_model, tmp_path, caplog):
    model, tokenizer = tiny_model
    known = model.vocabulary.names[0]
    path = _conversations(tmp_path, [f"Here is the liver {known}.", "Here is the liver [C77_3].",
                                     f"Here is the liver {known}."])
    with caplog.at_level(logging.WARNING):
        data = _dataset(path, tmp_path, tokenizer, model.vocabulary.names)
    assert [c.id for c in data.conversations] == ["conv0", "conv2"]
    assert "dropped 1 conversation(s)" in caplog.text and "conv1" in caplog.text


def test_region_tokens_and_masks_must_pair(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    known = model.vocabulary.names[0]
    path = _conversations(tmp_path, [f"Here is the liver {known}."], masks_per_answer=2)
    with pytest.raises(DataError, match=r"conversation conv0: 1 region token\(s\) in the answers but 2 mask_files"):
        _dataset(path, tmp_path, tokenizer, model.vocabulary.names)


def test_no_vocabulary_checks_nothing(tiny_model, tmp_path):
    """Stage 3 has no region tokens by design; its captions are plain text."""
    _, tokenizer = tiny_model
    path = _conversations(tmp_path, ["A caption mentioning [C1_2]."], masks_per_answer=0)
    assert len(_dataset(path, tmp_path, tokenizer, [])) == 1


def test_unknown_tokens_past_the_check_are_refused_by_the_model(tiny_model, tmp_path):
    """What the check prevents used to train a silent seg loss of exactly 0; with the check off,
    the model now refuses such a batch itself (its answer holds no region token for its mask)."""
    from medsight.data.conversation_dataset import collate_conversations

    model, tokenizer = tiny_model
    path = _conversations(tmp_path, ["Here is the liver [C77_3].", "Here is the liver [C88_1]."])
    unchecked = _dataset(path, tmp_path, tokenizer, None, model.num_visual_tokens, model.config.encoder.image_size)
    batch = collate_conversations([unchecked[0], unchecked[1]], unchecked.format.pad_id)
    with pytest.raises(ValueError, match="0 region tokens in the answer but 1 masks"):
        model(images=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              labels=batch["labels"], masks=batch["masks"])


class _Recorder(NullTracker):
    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int | None]] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((metrics, step))

    def set_tags(self, tags) -> None:
        self.tags.update(tags)


def test_zero_loss_watch_reports_after_patience_only_expected_terms():
    tracker = _Recorder()
    watch = ZeroLossWatch("t2v-align", tracker, expected=("loss", "lm", "seg"), patience=3)
    for step in range(1, 3):
        watch.update(step, {"loss": 1.0, "lm": 1.0, "seg": 0.0, "other": 0.0})
    assert watch.warnings == []
    watch.update(3, {"loss": 1.0, "lm": 1.0, "seg": 0.0, "other": 0.0})
    assert watch.warnings == ["seg"]  # "other" is not expected to be non-zero
    assert "medsight.warning.zero_loss.seg" in tracker.tags
    # A term that comes back resets; a short run zero on every step is reported at the end.
    short = ZeroLossWatch("v2t-align", _Recorder(), expected=("loss", "lm"), patience=50)
    short.update(1, {"loss": 1.0, "lm": 0.0, "seg": 0.0})
    short.update(2, {"loss": 1.0, "lm": 0.0, "seg": 0.0})
    short.finish(2)
    assert short.warnings == ["lm"]


@pytest.mark.slow
def test_a_loss_term_stuck_at_zero_is_warned_in_the_log_and_in_mlflow(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from medsight.config.schema import TrainConfig
    from medsight.platform.tracking import MLflowTracker

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    config = TrainConfig(epochs=1, lr=1e-2, batch_size=1, checkpoint_every=100, log_every=5)
    batches = [torch.randn(2, 4) for _ in range(30)]

    def step(batch):
        prediction = module(batch)
        fit = (prediction ** 2).mean()
        seg = prediction.sum() * 0.0  # a loss whose supervision never arrives
        return {"loss": fit + seg, "fit": fit, "seg": seg}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with caplog.at_level(logging.WARNING), MLflowTracker(uri, run_name="zero") as tracker:
        run_training(name="t2v-align", engine=TorchEngine(module, config),
                     make_batches=lambda epoch, skip: iter(batches[skip:]), steps_per_epoch=len(batches), step_fn=step,
                     config=config, workdir=tmp_path, tracker=tracker)
    assert "loss term 'seg' has been exactly 0 for 20 step(s)" in caplog.text
    assert "'fit'" not in caplog.text
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert "exactly 0" in run.data.tags["medsight.warning.zero_loss.seg"]
    assert run.data.metrics["t2v-align/zero_loss_steps/seg"] == 20

"""Issue 9, item 6: predict in bounded memory. The image's pixels and the question's tokens are
capped before anything large is decoded or generated; masks stay at the model's resolution and
are resized one at a time as they are written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eval_fakes import FakeModel
from medsight.eval import examples
from medsight.eval.predict import check_question_fits, load_input_image, predict_image, write_prediction
from medsight.model.input_limits import InputLimitError, InputLimits, question_token_limit


def test_limits_are_pure_and_name_the_input():
    limits = InputLimits(max_image_pixels=25_000_000)
    limits.check_image(5000, 5000, "scan.png")
    with pytest.raises(InputLimitError, match=r"scan\.png: 8000 x 8000 image = 64,000,000 pixels exceeds the limit of 25,000,000"):
        limits.check_image(8000, 8000, "scan.png")
    assert question_token_limit(512, 36, 2, 48) == 426
    assert limits.check_question("q", lambda _: 426, "--question", room=426) == 426
    with pytest.raises(InputLimitError, match=r"--question: 32,000 tokens exceeds the limit of 426"):
        limits.check_question("q", lambda _: 32_000, "--question", room=426)
    with pytest.raises(InputLimitError, match="no room for a question"):
        limits.check_question("q", lambda _: 1, room=question_token_limit(512, 500, 2, 48))


def test_a_huge_image_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (8000, 8000)).save(path)  # ~60 KB on disk, 768 MB as a float image
    decoded = []
    monkeypatch.setattr("medsight.eval.predict.load_image", lambda *a, **k: decoded.append(a) or None)
    with pytest.raises(InputLimitError, match=rf"{path}: 8000 x 8000 image"):
        load_input_image(path)
    assert decoded == []  # refused before decoding
    load_input_image(path, max_pixels=64_000_000)
    assert decoded  # the cap can be raised


def test_masks_stay_at_model_resolution_and_are_resized_one_at_a_time(tmp_path, monkeypatch):
    source = tmp_path / "wide.png"
    array = np.zeros((300, 500), dtype=np.uint8)
    array[100:200, 250:400] = 255
    Image.fromarray(array).save(source)
    image = load_input_image(source)
    prediction = predict_image(FakeModel(), image, "Please segment the tumor.")
    assert prediction.masks.shape == (1, 32, 32)  # the model's resolution, whatever the image's
    resized = []
    real = examples.resize_probabilities

    def spy(masks, size):
        resized.append(tuple(masks.shape))
        return real(masks, size)

    monkeypatch.setattr(examples, "resize_probabilities", spy)
    many = type(prediction)(prediction.text, ["[C0_1]"] * 5, prediction.masks.repeat(5, 1, 1),
                            prediction.boxes * 5, [], prediction.image_size)
    summary = write_prediction(tmp_path / "out", image, "q", many, source)
    assert resized == [(1, 32, 32)] * 5  # never all K masks at full size at once
    with Image.open(tmp_path / "out" / summary["regions"][0]["mask"]) as mask:
        assert mask.size == (500, 300)


def test_a_huge_question_is_refused_with_its_token_count(tiny_tokenizer_dir):
    from medsight.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    check_question_fits(tokenizer, "Is there a lesion?", 512, 36, 48)
    with pytest.raises(InputLimitError, match=r"--question: [\d,]{5,} tokens exceeds the limit of 425"):
        check_question_fits(tokenizer, "lesion " * 20_000, 512, 36, 48)

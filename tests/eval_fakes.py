"""A stand-in for MedSightInference in evaluation tests: same interface, fixed behaviour.

It answers from the pixels so scores are not trivially constant: masks are the brighter-than-
average pixels; segmentation questions get two region tokens, one of them not in the
vocabulary (the runner must ignore it with a warning, not crash).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FakeAnswer:
    text: str
    region_tokens: list[str]
    masks: torch.Tensor  # [K, S, S]


class FakeModel:
    def __init__(self, image_size: int = 32):
        self.image_size = image_size
        self.calls: list[int] = []  # batch sizes seen

    def region_token_names(self) -> list[str]:
        return [f"[C{m}_{k}]" for m in range(6) for k in range(4)]

    def answer(self, images, questions, modality=None, max_new_tokens=48, temperature=0.0, repetition_penalty=1.2):
        assert images.shape[1:] == (3, self.image_size, self.image_size)
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        self.calls.append(len(questions))
        answers = []
        for image, question in zip(images, questions):
            mask = (image.mean(0) > image.mean()).float()
            lowered = question.lower()
            if any(word in lowered for word in ("segment", "locate", "diagnosis")):
                answers.append(FakeAnswer("There is a tumor in the liver [C0_1] near [C9_9].", ["[C0_1]", "[C9_9]"], torch.stack([mask, mask])))
            elif "\nA. " in question:
                answers.append(FakeAnswer("B", [], torch.zeros(0, self.image_size, self.image_size)))
            else:
                answers.append(FakeAnswer("yes, a tumor", [], torch.zeros(0, self.image_size, self.image_size)))
        return answers

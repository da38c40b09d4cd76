"""LLaVA conversations -> token ids, labels and masks for the LLM stages (3-5).

The prompt is built from id segments rather than one formatted string, so the ``<image>``
placeholder count is exact by construction and answers are the only supervised tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from medsight.config.schema import LLMConfig
from medsight.data import image_io
from medsight.data.chat_template import chat_prompt_ids
from medsight.data.errors import DataError
from medsight.data.llava import GPT, Conversation
from medsight.data.region_tokens import find_region_tokens
from medsight.data.taxonomy import Taxonomy
from medsight.data.tokenizer import ASSISTANT_TOKEN, IMAGE_TOKEN, USER_TOKEN

logger = logging.getLogger(__name__)

# Label of prompt and padding positions: the LM loss skips them (torch's cross-entropy default).
IGNORE_INDEX = -100


def region_token_problem(conversation: Conversation, vocabulary: set[str]) -> str | None:
    """Why the conversation's answers cannot supervise its masks, or None when they can.

    A region token the model does not have is tokenised as plain text, so its mask would have no
    token to decode from; with every token of a batch unknown the segmentation loss used to be
    a silent 0.0. Each answer token must be known and pair with one of ``mask_files``.
    """
    tokens = [t for role, text in conversation.turns if role == GPT for t in find_region_tokens(text)]
    unknown = sorted({t for t in tokens if t not in vocabulary})
    where = f"{conversation.source or 'conversations'}: conversation {conversation.id}"
    if unknown:
        example = next(iter(sorted(vocabulary)), "none")
        return (f"{where}: region token(s) {', '.join(unknown[:5])} are not in the model's vocabulary "
                f"({len(vocabulary)} tokens, e.g. {example}); was the grounding data built for another codebook?")
    if len(tokens) != len(conversation.mask_paths):
        return (f"{where}: {len(tokens)} region token(s) in the answers but {len(conversation.mask_paths)} "
                "mask_files; list one mask per region token, in order")
    return None


def check_region_tokens(conversations: list[Conversation], vocabulary: Iterable[str]) -> list[Conversation]:
    """The conversations whose region tokens the model knows and whose masks pair with them.

    A few bad entries are dropped with one warning; when no conversation with masks is left (a
    vocabulary mismatch, not a stray typo) it is an error naming the file and conversation id.
    An empty vocabulary (stage 3: no region tokens by design) checks nothing.
    """
    vocabulary = set(vocabulary)
    if not vocabulary:
        return conversations
    kept, problems = [], []
    for conversation in conversations:
        problem = region_token_problem(conversation, vocabulary)
        (problems if problem else kept).append(problem or conversation)
    if problems and not any(c.mask_paths for c in kept):
        raise DataError(problems[0] + (f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""))
    if problems:
        logger.warning("dropped %d conversation(s) whose region tokens do not fit the model; first: %s",
                       len(problems), problems[0])
    return kept
PROMPT_STYLES = ("medsight", "chat_template")


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are built, and the token ids that matter, read once from the tokenizer.

    ``style`` "medsight": ``<|user|> <image>xN \n question <|assistant|>`` with this project's
    marker tokens; "chat_template": the tokenizer's own chat template (Qwen's ChatML), with the
    configured image placeholder token repeated N times where the image goes.
    """

    user_id: int
    assistant_id: int
    image_id: int
    eos_id: int
    pad_id: int
    style: str = "medsight"
    image_token: str = IMAGE_TOKEN
    system_prompt: str = ""

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, llm: LLMConfig | None = None) -> PromptFormat:
        style = llm.prompt_format if llm is not None else "medsight"
        image_token = llm.image_token if llm is not None else IMAGE_TOKEN
        image_id = _single_token_id(tokenizer, image_token)
        if style == "medsight":
            ids = tokenizer.convert_tokens_to_ids([USER_TOKEN, ASSISTANT_TOKEN])
            if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
                raise ValueError(f"tokenizer lacks one of {USER_TOKEN}, {ASSISTANT_TOKEN} (model.llm.prompt_format=medsight)")
            return cls(ids[0], ids[1], image_id, tokenizer.eos_token_id, tokenizer.pad_token_id, style, image_token)
        if style == "chat_template":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("model.llm.prompt_format=chat_template but the tokenizer has no chat template")
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            return cls(-1, -1, image_id, tokenizer.eos_token_id, pad, style, image_token, llm.system_prompt)
        raise ValueError(f"model.llm.prompt_format: {style!r} is not one of {', '.join(PROMPT_STYLES)}")


def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id):
        raise ValueError(f"tokenizer lacks the image placeholder token {token!r} (model.llm.image_token)")
    return int(token_id)


def _strip_image_marker(text: str, marker: str = IMAGE_TOKEN) -> str:
    return text.replace(IMAGE_TOKEN, "").replace(marker, "").strip()


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, question: str, num_visual_tokens: int
) -> list[int]:
    """The ids a model sees before it answers the first question."""
    if fmt.style == "chat_template":
        return chat_prompt_ids(tokenizer, fmt, _strip_image_marker(question, fmt.image_token), num_visual_tokens)
    text_ids = tokenizer.encode("\n" + _strip_image_marker(question), add_special_tokens=False)
    return [fmt.user_id] + [fmt.image_id] * num_visual_tokens + text_ids + [fmt.assistant_id]


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    turns: list[tuple[str, str]],
    num_visual_tokens: int,
    max_length: int,
    where: str = "",
) -> tuple[list[int], list[int]]:
    """Returns (input_ids, labels) for alternating human/gpt turns; only gpt text is supervised."""
    input_ids: list[int] = []
    labels: list[int] = []
    for index in range(0, len(turns), 2):
        pair = turns[index : index + 2]
        if len(pair) != 2 or pair[0][0] != "human" or pair[1][0] != "gpt":
            raise ValueError(f"{where}: turns must alternate human/gpt, got {[role for role, _ in turns]}")
        question, answer = pair[0][1], pair[1][1]
        if index == 0:
            prompt = encode_prompt(tokenizer, fmt, question, num_visual_tokens)
        elif fmt.style == "chat_template":
            prompt = chat_prompt_ids(tokenizer, fmt, question, 0)
        else:
            prompt = [fmt.user_id] + tokenizer.encode("\n" + question, add_special_tokens=False) + [fmt.assistant_id]
        reply = tokenizer.encode(answer, add_special_tokens=False) + [fmt.eos_id]
        input_ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
    if len(input_ids) > max_length:
        # Truncating would cut placeholders or region tokens and misalign masks: refuse instead.
        raise ValueError(f"{where}: conversation is {len(input_ids)} tokens, over max length {max_length}")
    return input_ids, labels


class DecodedFiles:
    """Decoded image and mask tensors by path, bounded in bytes and filled first-come.

    An LLM stage revisits each image every epoch and once per conversation about it; with its
    visual features cached (``VisualContextCache``) PNG decoding was ~10% of a tiny step. Callers
    must not modify returned tensors in place (collation stacks them into new ones).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"decoded-file cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._tensors: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, path: Path, size: int, load: Callable[[Path, int], torch.Tensor]) -> torch.Tensor:
        key = (str(path), size)
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = load(path, size)
            nbytes = tensor.numel() * tensor.element_size()
            if self.used_bytes + nbytes <= self.max_bytes:
                self._tensors[key] = tensor
                self.used_bytes += nbytes
        return tensor


class ConversationDataset(Dataset):
    def __init__(
        self,
        conversations: list[Conversation],
        tokenizer: PreTrainedTokenizerBase,
        num_visual_tokens: int,
        image_size: int,
        max_length: int,
        taxonomy: Taxonomy,
        decoded_cache_bytes: int = 0,
        region_tokens: Iterable[str] | None = None,
        llm: LLMConfig | None = None,
    ):
        """``region_tokens``: the model's region-token names; given, every conversation is checked
        against them (``check_region_tokens``) before any training step. ``llm``: the prompt
        style (``llm.prompt_style``: medsight's own turn tokens, or the model's chat template)."""
        if region_tokens is not None:
            conversations = check_region_tokens(conversations, region_tokens)
        self.conversations = conversations
        self.taxonomy = taxonomy
        self.tokenizer = tokenizer
        self.format = PromptFormat.from_tokenizer(tokenizer, llm)
        self.num_visual_tokens = num_visual_tokens
        self.image_size = image_size
        self.max_length = max_length
        self.decoded = DecodedFiles(decoded_cache_bytes)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        conversation = self.conversations[index]
        where = f"conversation {conversation.id}"
        input_ids, labels = encode_conversation(
            self.tokenizer, self.format, conversation.turns, self.num_visual_tokens, self.max_length, where
        )
        paths = conversation.image_paths
        if len(paths) == 1:
            image = self.decoded.get(paths[0], self.image_size, image_io.load_image)
        else:  # multi-image rows (PubMedVision) keep every image, tiled into one picture
            image = image_io.tile_images([self.decoded.get(p, self.image_size, image_io.load_image) for p in paths],
                                         self.image_size)
        masks = [self.decoded.get(path, self.image_size, image_io.load_mask) for path in conversation.mask_paths]
        mask_tensor = torch.stack(masks) if masks else torch.zeros(0, self.image_size, self.image_size)
        # Grounding conversations carry a taxonomy modality; PubMedVision's is free text
        # ("Computed Tomography"): metadata, not a label, so it maps to "unknown" (-1).
        known = self.taxonomy.find_modality(conversation.modality) if conversation.modality else None
        modality = self.taxonomy.modalities.index(known) if known is not None else -1
        return {
            "image": image,
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "masks": mask_tensor.float(),
            "modality": modality,
            "id": conversation.id,
            "image_key": "|".join(str(path) for path in paths),
        }


def collate_conversations(batch: list[dict], pad_id: int) -> dict:
    """Right-pads ids; masks stay a per-sample list (their count varies)."""
    length = max(item["input_ids"].numel() for item in batch)
    keys = [item.get("image_key") for item in batch]  # absent for in-memory samples: no caching
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        n = item["input_ids"].numel()
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention[row, :n] = 1
    return {
        "images": torch.stack([item["image"] for item in batch]),
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention,
        "masks": [item["masks"] for item in batch],
        "modality": torch.tensor([item["modality"] for item in batch]),
        "ids": [item["id"] for item in batch],
        "image_keys": keys if all(keys) else None,
    }

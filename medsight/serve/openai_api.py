"""OpenAI-compatible ``POST /v1/chat/completions`` with an image, answered with masks.

KServe's own OpenAI endpoints are built on vLLM's protocol classes (its ``llm`` extra), which
neither install here nor expose the hidden states masks are decoded from, so this route is
mounted on the same KServe app and sends requests through the same model and batcher as the
v2 endpoint. A standard client works unchanged::

    {"model": "medsight",
     "messages": [{"role": "user", "content": [
         {"type": "text", "text": "Segment all visible structures."},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
     "max_tokens": 48, "temperature": 0,
     "mask_format": "png", "return_image": false}        <- MedSIGHT extensions (extra_body)

The reply is a ``chat.completion`` whose message also carries ``regions``: per region token its
token, class, modality, confidence, box and mask (see ``medsight.serve.regions``). The model is
single-turn: the last user message (its text parts and its one image) is what is answered.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from medsight.data.errors import DataError
from medsight.model.input_limits import InputLimitError
from medsight.serve.image_input import decode_base64
from medsight.serve.middleware import error_body

KNOWN_FIELDS = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stream", "n", "user",
     "mask_format", "return_image", "top_p", "seed"}
)


def _fail(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body("/v1/chat/completions", status, message), status_code=status)


def parse_messages(messages: Any) -> tuple[str, str]:
    """-> (question text, image data URL or base64) from the last user message."""
    if not isinstance(messages, list) or not messages:
        raise DataError("messages: must be a non-empty list of {role, content} objects")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise DataError("messages: no message with role 'user'")
    content = users[-1].get("content")
    if isinstance(content, str):
        raise DataError("messages[-1].content: no image; send content as a list with a 'text' part and an 'image_url' part")
    if not isinstance(content, list):
        raise DataError("messages[-1].content: must be a string or a list of content parts")
    texts, images = [], []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise DataError(f"messages[-1].content[{index}].image_url.url: must be a data URL string")
            images.append(url)
        else:
            raise DataError(f"messages[-1].content[{index}]: unsupported part {kind!r}; use 'text' and 'image_url'")
    if len(images) != 1:
        raise DataError(f"messages[-1].content: needs exactly one image_url part, got {len(images)}")
    return "\n".join(texts), images[0]


def chat_completions_route(models: dict):
    """The route handler bound to the served models (name -> MedSightModel)."""

    async def chat_completions(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _fail(400, f"request body is not valid JSON ({error})")
        if not isinstance(body, dict):
            return _fail(400, "request body must be a JSON object")
        name = body.get("model")
        if name not in models:
            return _fail(404, f"model {name!r} does not exist; available: {', '.join(sorted(models))}")
        model = models[name]
        try:
            unknown = sorted(set(body) - KNOWN_FIELDS)
            if unknown:
                raise DataError(f"unknown field(s) {', '.join(map(repr, unknown))}")
            if body.get("stream"):
                raise DataError("stream: streaming is not supported; masks are decoded once the answer is complete")
            if body.get("n", 1) != 1:
                raise DataError("n: only one choice per request is supported")
            question, image_url = parse_messages(body.get("messages"))
            image, mime = decode_base64(image_url, "messages[-1].content.image_url")
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            settings = model.engine.settings(max_tokens, body.get("temperature"))
            result = await model.answer(
                (image, question),
                {"mime": mime, "mask_format": body.get("mask_format", "png"), "settings": settings,
                 "return_image": bool(body.get("return_image", False)),
                 "field_names": ("messages[-1].content.image_url", "messages[-1].content.text")},
            )
        except InputLimitError as error:
            return _fail(413, str(error))
        except DataError as error:
            return _fail(400, str(error))
        message: dict[str, Any] = {"role": "assistant", "content": result.text, "regions": result.regions}
        reply: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop" if result.finished else "length"}],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }
        if result.image_png is not None:
            reply["image"] = {"height": result.image_hw[0], "width": result.image_hw[1], "png": result.image_png}
        if result.extra:
            reply["medsight"] = result.extra
        return JSONResponse(reply)

    return chat_completions

"""MedSIGHT as a KServe ``Model``: the Open Inference Protocol (v2) request and response.

Request (``POST /v2/models/<name>/infer``)::

    {"inputs": [{"name": "image",    "datatype": "BYTES", "shape": [1], "data": ["<base64 or data URL>"]},
                {"name": "question", "datatype": "BYTES", "shape": [1], "data": ["Segment all visible structures."]}],
     "parameters": {"mask_format": "png" | "rle", "max_new_tokens": 48, "temperature": 0.0, "return_image": false}}

The image travels as base64 text (KServe 0.21's REST decoder cannot pass non-UTF-8 bytes through
the binary tensor extension). One image per request; concurrent requests are batched by the
server. Response outputs, K = number of region tokens:

    answer [1] BYTES            the answer text, region tokens kept in it
    region_tokens [K] BYTES     e.g. "[C0_3]", in answer order
    classes [K] BYTES           class name per region token
    modalities [K] BYTES        modality name per region token ("" for [SEG])
    confidences [K] FP32        class probability x mean mask probability
    boxes [K, 4] FP32           normalised x1, y1, x2, y2 (-1 for an empty mask)
    masks [K] BYTES             base64 PNG, or RLE JSON ({"size", "counts"}) per parameters.mask_format
    image [1] BYTES             base64 PNG of the decoded image (only with return_image; DICOM is windowed)
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput

from medsight.data.errors import DataError
from medsight.serve.batching import MicroBatcher
from medsight.serve.engine import GroundingEngine, GroundingResult
from medsight.serve.image_input import decode_base64
from medsight.serve.metrics import ServeMetrics

PARAMETERS = ("mask_format", "max_new_tokens", "temperature", "return_image")


def _plain(value: Any) -> Any:
    """gRPC InferParameter -> its Python value; REST values are already plain."""
    for attribute in ("bool_param", "int64_param", "string_param", "double_param"):
        if hasattr(value, "HasField") and value.HasField(attribute):
            return getattr(value, attribute)
    return value


def _single(infer_input, name: str) -> Any:
    data = infer_input.data
    if hasattr(data, "tolist"):
        data = data.tolist()
    if not isinstance(data, list) or len(data) != 1 or list(infer_input.shape) not in ([1], [1, 1]):
        raise DataError(f"input {name!r}: send exactly one value (shape [1]); for several images send several requests, the server batches them")
    value = data[0]
    if infer_input.datatype != "BYTES":
        raise DataError(f"input {name!r}: datatype must be BYTES, got {infer_input.datatype}")
    return value


class MedSightModel(Model):
    """Answers through a shared ``MicroBatcher``; the model itself is loaded before start."""

    def __init__(self, name: str, engine: GroundingEngine, batcher: MicroBatcher, metrics: ServeMetrics):
        super().__init__(name)
        self.engine, self.batcher, self.metrics = engine, batcher, metrics
        self.ready = True

    def load(self) -> bool:  # the engine holds an already-loaded model
        self.ready = True
        return self.ready

    async def answer(self, prepare_args: tuple, prepare_kwargs: dict) -> GroundingResult:
        """Decode/validate off the event loop, then wait for a batch slot."""
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(None, lambda: self.engine.prepare(*prepare_args, **prepare_kwargs))
        result = await self.batcher.submit(request, key=request.settings)
        self.metrics.observe_answer(result.prompt_tokens, result.completion_tokens, len(result.regions))
        return result

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("use the Open Inference Protocol: POST /v2/models/<name>/infer with an 'inputs' list")
        try:
            inputs = {i.name: i for i in payload.inputs}
            for required in ("image", "question"):
                if required not in inputs:
                    raise DataError(f"input {required!r} is missing; send inputs 'image' (base64) and 'question' (text)")
            unknown = sorted(set(inputs) - {"image", "question"})
            if unknown:
                raise DataError(f"unknown input(s) {', '.join(map(repr, unknown))}; expected 'image' and 'question'")
            parameters = {k: _plain(v) for k, v in (payload.parameters or {}).items()}
            stray = sorted(set(parameters) - set(PARAMETERS))
            if stray:
                raise DataError(f"unknown parameter(s) {', '.join(map(repr, stray))}; known: {', '.join(PARAMETERS)}")
            image, mime = _single(inputs["image"], "image"), None
            if isinstance(image, str):
                image, mime = decode_base64(image, "image")
            elif not isinstance(image, bytes):
                raise DataError("input 'image': expected base64 text or binary bytes")
            question = _single(inputs["question"], "question")
            if isinstance(question, bytes):
                question = question.decode("utf-8", errors="strict")
            settings = self.engine.settings(parameters.get("max_new_tokens"), parameters.get("temperature"))
        except (DataError, UnicodeDecodeError) as error:
            raise InvalidInput(str(error)) from error
        result = await self.answer(
            (image, question),
            {"mime": mime, "mask_format": parameters.get("mask_format", "png"), "settings": settings,
             "return_image": bool(parameters.get("return_image", False))},
        )
        return self.to_response(payload, result)

    def to_response(self, payload: InferRequest, result: GroundingResult) -> InferResponse:
        regions = result.regions
        count = len(regions)
        boxes = [r["box"]["xyxy_normalized"] if r["box"] else [-1.0] * 4 for r in regions]
        masks = [r["mask"]["data"] if r["mask"]["format"] == "png" else json.dumps({k: r["mask"][k] for k in ("size", "counts")}) for r in regions]
        mask_format = regions[0]["mask"]["format"] if regions else None
        outputs = [
            InferOutput("answer", [1], "BYTES", [result.text]),
            InferOutput("region_tokens", [count], "BYTES", [r["token"] for r in regions]),
            InferOutput("classes", [count], "BYTES", [r["class"] or "" for r in regions]),
            InferOutput("modalities", [count], "BYTES", [r["modality"] or "" for r in regions]),
            InferOutput("confidences", [count], "FP32", [r["confidence"] for r in regions]),
            InferOutput("boxes", [count, 4], "FP32", [v for box in boxes for v in box]),
            InferOutput("masks", [count], "BYTES", masks, parameters={"mask_format": mask_format} if mask_format else None),
        ]
        if result.image_png is not None:
            outputs.append(InferOutput("image", [1], "BYTES", [result.image_png], parameters={"height": result.image_hw[0], "width": result.image_hw[1]}))
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            parameters={"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                        "finish_reason": "stop" if result.finished else "length"},
        )

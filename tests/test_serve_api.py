"""The model server against a tiny trained model, over real HTTP on 127.0.0.1.

The server runs ``medsight serve --model models:/medsight@production`` (see trained_model.py):
the registered version in a real MLflow sqlite registry with its files in a real S3 server.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trained_model import MULTI_REGION_QUESTION, NO_REGION_QUESTION, run_predict

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow
REGION_TOKEN = re.compile(r"\[C\d+_\d+\]|\[SEG\]")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def infer(url: str, image: bytes | str, question: str, model: str = "medsight", **parameters) -> httpx.Response:
    body = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [image if isinstance(image, str) else b64(image)]},
            {"name": "question", "datatype": "BYTES", "shape": [1], "data": [question]},
        ],
        "parameters": parameters,
    }
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=120)


def chat(url: str, image: bytes, question: str, model: str = "medsight", mime: str = "image/png", **extra) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(image)}"}},
        ]}],
        **extra,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def outputs(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def png_mask(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))) > 127


def assert_same_as_predict(result: dict, predicted: dict, predict_dir: Path) -> None:
    """OIP outputs == ``medsight predict``'s answer, tokens, mask PNGs and boxes."""
    assert result["answer"]["data"] == [predicted["answer"]]
    assert result["region_tokens"]["data"] == predicted["region_tokens"]
    masks = result["masks"]["data"]
    assert len(masks) == len(predicted["regions"])
    boxes = np.asarray(result["boxes"]["data"], dtype=np.float32).reshape(-1, 4)
    for mask, box, region in zip(masks, boxes, predicted["regions"]):
        expected = np.asarray(Image.open(predict_dir / region["mask"])) > 127
        assert np.array_equal(png_mask(mask), expected), f"mask of {region['token']} differs from medsight predict"
        if region["box_xyxy_normalized"] is None:
            assert box.tolist() == [-1.0] * 4
        else:
            assert box == pytest.approx(region["box_xyxy_normalized"], abs=1e-6)


def wait_ok(url: str) -> None:
    """The server still serves: health and a real answer."""
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200


# ------------------------------------------------------------------------------- answers


def test_request_gives_same_text_and_masks_as_medsight_predict(model_server, multi_region_image):
    image, predicted, predict_dir = multi_region_image
    result = outputs(infer(model_server.url, image.read_bytes(), MULTI_REGION_QUESTION, max_new_tokens=48, temperature=0.0))
    assert_same_as_predict(result, predicted, predict_dir)
    # The OpenAI route answers through the same model and batcher.
    reply = chat(model_server.url, image.read_bytes(), MULTI_REGION_QUESTION, max_tokens=48, temperature=0)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert message["content"] == predicted["answer"]
    assert [r["token"] for r in message["regions"]] == predicted["region_tokens"]


def test_several_region_tokens_give_several_masks(model_server, multi_region_image, trained_chain):
    from medsight.serve.regions import rle_decode

    image, _, _ = multi_region_image
    height, width = Image.open(image).size[::-1]
    png = outputs(infer(model_server.url, image.read_bytes(), MULTI_REGION_QUESTION, mask_format="png"))
    tokens_in_text = REGION_TOKEN.findall(png["answer"]["data"][0])
    assert len(tokens_in_text) >= 2
    assert png["region_tokens"]["data"] == tokens_in_text
    for name in ("masks", "classes", "modalities", "confidences"):
        assert png[name]["shape"] == [len(tokens_in_text)]
    assert png["boxes"]["shape"] == [len(tokens_in_text), 4]
    taxonomy = json.loads((trained_chain.model / "modules" / "taxonomy.json").read_text())
    for token, cls, modality, confidence in zip(tokens_in_text, png["classes"]["data"], png["modalities"]["data"], png["confidences"]["data"]):
        assert cls in taxonomy["region_classes"]
        assert modality == taxonomy["modalities"][int(re.match(r"\[C(\d+)_", token).group(1))]
        assert 0.0 <= confidence <= 1.0
    # RLE carries the same masks as PNG.
    rle = outputs(infer(model_server.url, image.read_bytes(), MULTI_REGION_QUESTION, mask_format="rle"))
    assert rle["masks"]["parameters"]["mask_format"] == "rle"
    for png_data, rle_data in zip(png["masks"]["data"], rle["masks"]["data"]):
        decoded = rle_decode(json.loads(rle_data))
        assert decoded.shape == (height, width)
        assert np.array_equal(decoded, png_mask(png_data))
    # In the chat reply too: one region entry (with its own mask) per token.
    message = chat(model_server.url, image.read_bytes(), MULTI_REGION_QUESTION).json()["choices"][0]["message"]
    assert [r["token"] for r in message["regions"]] == tokens_in_text
    assert all(r["mask"]["format"] == "png" and r["color"].startswith("#") for r in message["regions"])


def test_request_without_region_token_gives_no_masks(model_server, trained_chain):
    image = trained_chain.test_images[0].read_bytes()
    result = outputs(infer(model_server.url, image, NO_REGION_QUESTION))
    assert not REGION_TOKEN.findall(result["answer"]["data"][0])
    assert result["masks"]["shape"] == [0] and result["masks"]["data"] == []
    assert result["boxes"]["shape"] == [0, 4]
    message = chat(model_server.url, image, NO_REGION_QUESTION).json()["choices"][0]["message"]
    assert message["regions"] == []


def test_dicom_is_windowed_and_matches_predict(model_server, multi_region_image, trained_chain, tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from medsight.eval.dicom_io import read_dicom

    image, _, _ = multi_region_image
    gray = np.asarray(Image.open(image).convert("L"), dtype=np.int32)
    # Stored values hold HU + 1024; the window [-160, 240] HU maps them back onto [0, 1].
    hu = gray * 400 // 255 - 160
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CT", "MONOCHROME2", 1
    ds.Rows, ds.Columns = gray.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 40, 400
    ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
    path = tmp_path / "scan.dcm"
    ds.save_as(path, enforce_file_format=True)

    predicted = run_predict(trained_chain, path, MULTI_REGION_QUESTION, tmp_path / "predict")
    result = outputs(infer(model_server.url, path.read_bytes(), MULTI_REGION_QUESTION, return_image=True))
    assert_same_as_predict(result, predicted, tmp_path / "predict")
    # The image the model saw is the windowed one.
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["image"]["data"][0]))), dtype=np.float32) / 255
    expected = read_dicom(path).permute(1, 2, 0).numpy()
    assert np.abs(shown - expected).max() <= 1 / 255 + 1e-6
    assert np.abs(expected[..., 0] - gray / 255).max() < 0.01  # windowing undid the HU mapping


# ------------------------------------------------------------------------------- bad requests


def _bad_requests(trained_chain, tmp_path) -> list[tuple[str, str, dict | bytes, int, str]]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    good = trained_chain.test_images[0].read_bytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta, report.Modality = meta, "SR"
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    big = io.BytesIO()
    Image.new("L", (1200, 1000)).save(big, format="PNG")  # 1.2 MP > the server's 1 MP cap; a small file
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)).save(noise, format="PNG")

    def oip(image: bytes, question: str = MULTI_REGION_QUESTION, model: str = "medsight") -> tuple[str, dict]:
        return f"/v2/models/{model}/infer", {"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(image)]},
            {"name": "question", "datatype": "BYTES", "shape": [1], "data": [question]}]}

    def openai(image: bytes, question: str = MULTI_REGION_QUESTION, model: str = "medsight") -> tuple[str, dict]:
        return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": [
            {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(image)}}]}]}

    cases = []
    for route in (oip, openai):
        kind = route.__name__
        cases += [
            (f"{kind}: truncated image", *route(good[: len(good) // 2]), 400, "truncated"),
            (f"{kind}: DICOM without pixels", *route((tmp_path / "report.dcm").read_bytes()), 400, "no pixel data"),
            (f"{kind}: oversized image", *route(big.getvalue()), 413, "1,200,000 pixels exceeds the limit"),
            (f"{kind}: oversized body", *route(noise.getvalue()), 413, "exceeds the limit of 4.0 MiB"),
            (f"{kind}: 100k-character question", *route(good, "x" * 100_000), 413, "100,000 characters exceeds the limit"),
            (f"{kind}: unknown model", *route(good, model="nope"), 404, "nope"),
        ]
    cases += [
        ("oip: malformed JSON", "/v2/models/medsight/infer", b'{"inputs": [{"name": "image"', 400, "not valid JSON"),
        ("openai: malformed JSON", "/v1/chat/completions", b'{"model": "medsight", ', 400, "not valid JSON"),
    ]
    return cases


def test_bad_requests_get_clear_4xx_and_server_keeps_serving(model_server, trained_chain, tmp_path):
    good = trained_chain.test_images[0].read_bytes()
    for name, path, body, status, fragment in _bad_requests(trained_chain, tmp_path):
        if isinstance(body, bytes):
            response = httpx.post(model_server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
        else:
            response = httpx.post(model_server.url + path, json=body, timeout=60)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
        error = response.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert fragment in message, f"{name}: unclear message {message!r}"
        assert "\n" not in message and "Traceback" not in message, name
        if path.startswith("/v1/"):
            assert error["code"] == status
        wait_ok(model_server.url)
    # ... and it still answers.
    assert outputs(infer(model_server.url, good, NO_REGION_QUESTION))["answer"]["data"][0]


# ------------------------------------------------------------------------------- batching and metrics


def test_concurrent_requests_are_batched_and_each_answered_once(model_server, trained_chain):
    images = trained_chain.test_images[:8]
    alone = {p: outputs(infer(model_server.url, p.read_bytes(), MULTI_REGION_QUESTION))["answer"]["data"][0] for p in images}
    before = _metric(model_server.url, "medsight_batch_size_sum"), _metric(model_server.url, "medsight_batch_size_count")
    results: dict[int, list] = {}
    barrier = threading.Barrier(len(images) * 2)

    def ask(index: int, path: Path) -> None:
        barrier.wait()
        response = infer(model_server.url, path.read_bytes(), MULTI_REGION_QUESTION)
        results.setdefault(index, []).append((path, response))

    threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(list(images) * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(results) == list(range(len(threads))) and all(len(v) == 1 for v in results.values())
    ids = set()
    for (path, response), in results.values():
        body = response.json()
        ids.add(body["id"])
        # Batched with others, each request still gets the answer to its own image.
        assert outputs(response)["answer"]["data"][0] == alone[path]
    assert len(ids) == len(threads)
    answered = _metric(model_server.url, "medsight_batch_size_sum") - before[0]
    calls = _metric(model_server.url, "medsight_batch_size_count") - before[1]
    assert answered == len(threads)
    assert calls < len(threads), "16 simultaneous requests were answered one model call each: no batching"


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line):
            if line.split("{")[0].split(" ")[0] == name:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_metrics(model_server, trained_chain):
    infer(model_server.url, trained_chain.test_images[1].read_bytes(), MULTI_REGION_QUESTION)
    text = httpx.get(f"{model_server.url}/metrics", timeout=10).text
    for name in ("medsight_requests_total", "medsight_request_latency_seconds_bucket", "medsight_queue_depth",
                 "medsight_generated_tokens_total", "medsight_region_tokens_total", "medsight_prompt_tokens_total",
                 "medsight_batch_size_bucket"):
        assert name in text, name
    assert _metric(model_server.url, "medsight_requests_total", 'endpoint="infer"') >= 1
    assert _metric(model_server.url, "medsight_generated_tokens_total") > 0
    assert _metric(model_server.url, "medsight_region_tokens_total") >= 1


def test_health_endpoints_and_page_served(model_server):
    assert httpx.get(f"{model_server.url}/v2/health/live", timeout=10).status_code == 200
    assert httpx.get(f"{model_server.url}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert httpx.get(f"{model_server.url}/v2/models/medsight/ready", timeout=10).status_code == 200
    page = httpx.get(f"{model_server.url}/", timeout=10)
    assert page.status_code == 200 and "MedSIGHT" in page.text
    assert "http" not in re.sub(r'xmlns="[^"]*"', "", page.text.split("<body>")[0]).replace("http-equiv", ""), "the page must not load anything remote"
    assert httpx.post(f"{model_server.url}/v2/repository/models/medsight/unload", timeout=10).status_code == 404

"""Serving parts without a trained model (seconds): input caps, image decoding, region results,
mask encodings, micro-batching, the HTTP guards and the request parsers."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.data.errors import DataError
from medsight.model.input_limits import InputLimitError, InputLimits


# ------------------------------------------------------------------------------- input caps


def test_input_limits_name_the_field_and_the_cap():
    limits = InputLimits(max_body_bytes=1000, max_image_pixels=100, max_question_chars=50, max_question_tokens=5)
    with pytest.raises(InputLimitError, match=r"request body: 2,000 bytes exceeds the limit of 1,000 bytes"):
        limits.check_body(2000)
    with pytest.raises(InputLimitError, match=r"scan: 10 x 20 image = 200 pixels exceeds the limit of 100"):
        limits.check_image(20, 10, "scan")  # height 20, width 10: named width x height
    with pytest.raises(InputLimitError, match=r"question: 51 characters exceeds the limit of 50"):
        limits.check_question("x" * 51)
    with pytest.raises(InputLimitError, match=r"question: 6 tokens exceeds the limit of 5 "):
        limits.check_question("one two three four five six", lambda q: len(q.split()))
    with pytest.raises(InputLimitError, match="is empty"):
        limits.check_question("   ")
    assert limits.check_question("one two", lambda q: len(q.split())) == 2
    limits.check_image(10, 10)
    with pytest.raises(ValueError, match="max_body_bytes must be positive"):
        InputLimits(max_body_bytes=0)
    assert issubclass(InputLimitError, DataError)  # callers that catch DataError catch caps too


# ------------------------------------------------------------------------------- decoding


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_decode_exactly_like_files(tmp_path):
    from medsight.data.image_io import load_image
    from medsight.eval.dicom_io import read_dicom
    from medsight.serve.image_input import decode_upload
    from test_eval_predict import ct_pixels, write_dicom

    rng = np.random.default_rng(0)
    for array in (rng.integers(0, 255, (12, 9, 3), dtype=np.uint8), rng.integers(0, 255, (7, 5), dtype=np.uint8)):
        data = _png(array)
        (tmp_path / "x.png").write_bytes(data)
        assert torch.equal(decode_upload(data, "image", InputLimits()), load_image(tmp_path / "x.png"))
    dicom = write_dicom(tmp_path / "ct.dcm", ct_pixels(), RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    decoded = decode_upload(dicom.read_bytes(), "image", InputLimits())
    assert torch.equal(decoded, read_dicom(dicom))
    assert decoded[0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])  # windowing applied


def test_bad_uploads_raise_clear_errors(tmp_path):
    from medsight.serve.image_input import decode_base64, decode_upload
    from test_eval_predict import write_dicom

    limits = InputLimits(max_image_pixels=100)
    good = _png(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="image: cannot decode image"):
        decode_upload(_png(np.zeros((64, 64, 3), dtype=np.uint8))[:60], "image", InputLimits())
    with pytest.raises(InputLimitError, match="400 pixels exceeds the limit of 100"):
        decode_upload(_png(np.zeros((20, 20), dtype=np.uint8)), "image", limits)
    with pytest.raises(DataError, match="empty image"):
        decode_upload(b"", "image", limits)
    report = write_dicom(tmp_path / "sr.dcm", np.zeros((2, 2), dtype=np.uint16), pixel_data=False)
    with pytest.raises(DataError, match="upload.dcm: DICOM has no pixel data"):
        decode_upload(report.read_bytes(), "upload.dcm", limits)
    big = write_dicom(tmp_path / "big.dcm", np.zeros((20, 20), dtype=np.uint16))
    with pytest.raises(InputLimitError, match="400 pixels"):
        decode_upload(big.read_bytes(), "image", limits)
    assert decode_base64("data:image/png;base64," + base64.b64encode(good).decode(), "x") == (good, "image/png")
    assert decode_base64(base64.b64encode(good).decode(), "x") == (good, None)
    with pytest.raises(DataError, match="x: not valid base64"):
        decode_base64("not base64!", "x")
    with pytest.raises(DataError, match="URLs are not fetched"):
        decode_base64("https://example.org/a.png", "x")
    with pytest.raises(DataError, match="must be base64-encoded"):
        decode_base64("data:image/png,abc", "x")


# ------------------------------------------------------------------------------- region results


def test_rle_is_column_major_and_round_trips():
    from medsight.serve.regions import rle_decode, rle_encode

    assert rle_encode(np.array([[0, 1], [1, 1]], dtype=bool)) == {"size": [2, 2], "counts": [1, 3]}
    assert rle_encode(np.array([[1, 0], [1, 0]], dtype=bool)) == {"size": [2, 2], "counts": [0, 2, 2]}
    assert rle_encode(np.zeros((3, 4), dtype=bool)) == {"size": [3, 4], "counts": [12]}
    rng = np.random.default_rng(1)
    for _ in range(5):
        bits = rng.random((13, 7)) > 0.6
        assert np.array_equal(rle_decode(rle_encode(bits)), bits)


def test_region_results_class_modality_confidence_box_and_masks():
    from medsight.data.taxonomy import Taxonomy
    from medsight.eval.metrics import box_from_mask
    from medsight.eval.predict import Prediction
    from medsight.serve.regions import region_results, rle_decode

    taxonomy = Taxonomy(("CT", "MRI"), ("liver", "kidney", "tumor"), frozenset({"tumor"}))
    masks = torch.zeros(2, 10, 20)
    masks[0, 2:5, 4:10] = 0.8  # 3 x 6 pixels at probability 0.8
    masks[1] = 0.3  # nothing above 0.5: empty
    class_probs = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.5, 0.1, 0.1, 0.3]])  # last = no-object
    prediction = Prediction("a [C1_2] b [C0_0]", ["[C1_2]", "[C0_0]"], masks, [box_from_mask(m) for m in masks], [],
                            (10, 20), class_probs)
    first, second = region_results(prediction, taxonomy, "rle")
    assert (first["token"], first["class"], first["modality"]) == ("[C1_2]", "kidney", "MRI")
    assert first["class_probability"] == pytest.approx(0.7)
    assert first["confidence"] == pytest.approx(0.7 * 0.8, abs=1e-4)
    assert first["box"] == {"xyxy_normalized": [0.2, 0.2, 0.5, 0.5], "xyxy_pixels": [4, 2, 10, 5]}
    assert rle_decode(first["mask"]).sum() == 18 and first["mask"]["format"] == "rle"
    assert (second["class"], second["modality"], second["box"], second["confidence"]) == ("liver", "CT", None, 0.0)
    assert second["color"] != first["color"]
    png = region_results(prediction, taxonomy, "png")[0]["mask"]
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["data"]))))
    assert decoded.shape == (10, 20) and (decoded > 127).sum() == 18
    with pytest.raises(ValueError, match="mask_format"):
        region_results(prediction, taxonomy, "jpeg")


# ------------------------------------------------------------------------------- batching


def test_micro_batcher_answers_each_request_once_in_shared_calls():
    from medsight.serve.batching import MicroBatcher

    calls: list[list[tuple[str, int]]] = []
    gate = threading.Event()

    def run(items):
        gate.wait(5)  # the first call blocks until the others have queued up
        calls.append(list(items))
        return [f"{key}:{value * 10}" for key, value in items]

    async def main():
        batcher = MicroBatcher(run, max_batch_size=4, max_wait_ms=1)
        first = asyncio.ensure_future(batcher.submit(("a", 0), key="a"))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit((key, i), key=key)) for i, key in enumerate("aabbaabba", start=1)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, *rest)
        batcher.close()
        return results

    results = asyncio.run(main())
    assert results == ["a:0"] + [f"{k}:{i * 10}" for i, k in enumerate("aabbaabba", start=1)]
    assert calls[0] == [("a", 0)]
    assert sorted(item for call in calls for item in call) == sorted([("a", 0)] + [(k, i) for i, k in enumerate("aabbaabba", 1)])
    assert all(len(call) <= 4 and len({k for k, _ in call}) == 1 for call in calls)  # cap, and one key per call
    assert len(calls) < 10  # the waiting requests were answered together


def test_micro_batcher_reports_a_failed_batch_to_its_requests_only():
    from medsight.serve.batching import MicroBatcher

    def run(items):
        if any(item == "bad" for item in items):
            raise RuntimeError("model failed")
        return [item.upper() for item in items]

    async def main():
        batcher = MicroBatcher(run, max_batch_size=8, max_wait_ms=20)
        bad = await asyncio.gather(batcher.submit("ok", key=1), batcher.submit("bad", key=1), return_exceptions=True)
        good = await asyncio.gather(batcher.submit("x", key=2), batcher.submit("y", key=2))
        batcher.close()
        return bad, good

    bad, good = asyncio.run(main())
    assert all(isinstance(result, RuntimeError) for result in bad)
    assert good == ["X", "Y"]


# ------------------------------------------------------------------------------- HTTP guards


def _guarded_app(token: str | None, limits: InputLimits):
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from medsight.serve.metrics import ServeMetrics
    from medsight.serve.middleware import BearerAuthMiddleware, BodyLimitMiddleware, RequestMetricsMiddleware

    async def echo(request: Request):
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(routes=[Route("/v2/health/live", echo), Route("/v2/models/m/infer", echo, methods=["POST"]),
                            Route("/v1/chat/completions", echo, methods=["POST"]), Route("/", echo)])
    app.add_middleware(BodyLimitMiddleware, limits=limits)
    if token:
        app.add_middleware(BearerAuthMiddleware, token=token)
    metrics = ServeMetrics(CollectorRegistry())
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app, metrics


def test_bearer_auth_exempts_only_health():
    import httpx

    token = "s3cret-token-0123456789"
    app, _ = _guarded_app(token, InputLimits())

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/v2/health/live")).status_code == 200
            denied = await client.post("/v2/models/m/infer", content=b"{}")
            assert denied.status_code == 401 and "bearer token" in denied.json()["error"]
            assert (await client.post("/v1/chat/completions", content=b"{}")).json()["error"]["type"] == "authentication_error"
            assert (await client.post("/v2/models/m/infer", headers={"authorization": "Bearer nope"})).status_code == 401
            assert (await client.post("/v2/models/m/infer", headers={"authorization": f"Bearer {token}"})).status_code == 200
            assert (await client.get("/", headers={"cookie": f"medsight_token={token}"})).status_code == 200
            login = await client.get("/", headers={"accept": "text/html"})
            assert login.status_code == 401 and "access token" in login.text

    asyncio.run(main())
    from medsight.serve.middleware import BearerAuthMiddleware

    with pytest.raises(ValueError, match="at least 16"):
        BearerAuthMiddleware(app, "short")


def test_body_limit_counts_bytes_received_and_metrics_count_refusals():
    import httpx

    app, metrics = _guarded_app(None, InputLimits(max_body_bytes=100))

    async def chunks(size: int):
        for _ in range(size // 50):
            yield b"x" * 50

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.post("/v2/models/m/infer", content=b"x" * 100)).json() == {"bytes": 100}
            declared = await client.post("/v2/models/m/infer", content=b"x" * 101)
            assert declared.status_code == 413 and "101 bytes exceeds the limit of 100 bytes" in declared.json()["error"]
            streamed = await client.post("/v1/chat/completions", content=chunks(200))  # no Content-Length
            assert streamed.status_code == 413 and streamed.json()["error"]["code"] == 413

    asyncio.run(main())
    assert metrics.requests.labels(endpoint="infer", code="413")._value.get() == 1
    assert metrics.requests.labels(endpoint="infer", code="200")._value.get() == 1
    assert metrics.requests.labels(endpoint="chat_completions", code="413")._value.get() == 1


def test_endpoint_labels_are_bounded():
    from medsight.serve.metrics import endpoint_label

    assert endpoint_label("/v2/models/medsight/infer") == "infer"
    assert endpoint_label("/v2/models/x/versions/3/infer") == "infer"
    assert endpoint_label("/v1/chat/completions") == "chat_completions"
    assert endpoint_label("/static/app.js") == "page"
    assert endpoint_label("/v2/health/ready") == "health"
    assert endpoint_label("/v2/models") == endpoint_label("/v2/models/medsight") == "metadata"
    assert endpoint_label("/random/" + "x" * 50) == "other"


# ------------------------------------------------------------------------------- request parsing


def test_openai_messages_parsing():
    from medsight.serve.openai_api import parse_messages

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert parse_messages([{"role": "system", "content": "be brief"},
                           {"role": "user", "content": [{"type": "text", "text": "Segment it."}, image]}]) == ("Segment it.", "data:image/png;base64,AAAA")
    for messages, fragment in (
        ([], "non-empty list"),
        ([{"role": "assistant", "content": "hi"}], "no message with role 'user'"),
        ([{"role": "user", "content": "no image here"}], "no image"),
        ([{"role": "user", "content": [{"type": "text", "text": "q"}]}], "exactly one image_url part, got 0"),
        ([{"role": "user", "content": [image, image]}], "exactly one image_url part, got 2"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported part 'audio'"),
    ):
        with pytest.raises(DataError, match=fragment):
            parse_messages(messages)


def test_registry_thresholds_uris_and_aliases():
    from medsight.platform.deploy import kserve_storage_uri
    from medsight.platform.model_registry import (
        RegistryError,
        check_alias,
        check_thresholds,
        lineage_tags,
        parse_model_uri,
        parse_thresholds,
    )

    assert parse_thresholds(["seg_dice=0.5", "closed_accuracy = 0.75"]) == {"seg_dice": 0.5, "closed_accuracy": 0.75}
    with pytest.raises(RegistryError, match="METRIC=NUMBER"):
        parse_thresholds(["seg_dice"])
    gate = check_thresholds({"seg_dice": 0.6, "closed_accuracy": 0.7}, {"seg_dice": 0.5, "closed_accuracy": 0.75})
    assert not gate.passed and gate.failures == ["closed_accuracy = 0.7000 is below the threshold 0.7500"]
    assert check_thresholds({"seg_dice": 0.5}, {"seg_dice": 0.5}).passed  # the bar itself passes
    with pytest.raises(RegistryError, match="segdice not in the evaluation metrics"):
        check_thresholds({"seg_dice": 0.6}, {"segdice": 0.5})
    assert parse_model_uri("models:/medsight/3") == ("medsight", "3")
    assert parse_model_uri("models:/medsight@production") == ("medsight", "production")
    with pytest.raises(RegistryError):
        parse_model_uri("models:/medsight")
    tags = lineage_tags({"kfp_run_id": "r1", "git_commit": "abc", "dvc": {"model": "f00.dir"}}, {"seg_dice": 0.51234567}, gate)
    assert tags["kfp.run_id"] == "r1" and tags["dvc.model"] == "f00.dir" and tags["eval.seg_dice"] == "0.512346"
    assert tags["gate.closed_accuracy"] == ">= 0.75"
    for bad in ("Prod", "1st", "latest", "", "a b"):
        with pytest.raises(RegistryError):
            check_alias(bad)
    check_alias("production")
    assert kserve_storage_uri("s3://b/a/models/m-1/artifacts") == "s3://b/a/models/m-1/artifacts"
    assert kserve_storage_uri("mlflow-artifacts:/1/models/m-1/artifacts", "s3://medsight-mlflow/artifacts/") == "s3://medsight-mlflow/artifacts/1/models/m-1/artifacts"
    with pytest.raises(RegistryError, match="--artifacts-destination"):
        kserve_storage_uri("mlflow-artifacts:/1/models/m-1/artifacts")
    with pytest.raises(RegistryError, match="KServe cannot download"):
        kserve_storage_uri("file:///tmp/x")


def test_serve_command_refuses_bad_input_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from medsight.cli import _mount_optional_apps, app

    _mount_optional_apps()
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "missing: no such directory" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "not a model package" in result.output
    monkeypatch.setenv("MEDSIGHT_SERVE_TOKEN", "short")
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "at least 16 characters" in result.output
    assert "Traceback" not in result.output

"""``medsight data prepare grounding`` (the grounding-data stage): stage 4's set and stage 5's
codebook conversations are separate seeded draws with their own sizes (random-init modules:
this checks the data recipe, not learning)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medsight.config import apply_overrides, get_preset
from medsight.data.cli import data_app
from medsight.data.taxonomy import Taxonomy
from medsight.model.bundle import save_modules
from medsight.model.vision_modules import new_codebook, new_perceiver
from medsight.stages.runner import run_stage

SMALL = ["data.train_images=24", "data.val_images=6", "data.test_images=6"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding")
    config = apply_overrides(get_preset("tiny"), SMALL)
    run_stage("synth-data", config, {}, root / "data")
    run_stage("base-models", config, {"data": root / "data"}, root / "base")
    taxonomy = Taxonomy.synthetic()
    save_modules(root / "codebook", {"perceiver": new_perceiver(config, taxonomy), "codebook": new_codebook(config, taxonomy)},
                 taxonomy)
    return root


def _build(root, out, *extra: str):
    args = ["prepare", "grounding", "--data", str(root / "data"), "--base", str(root / "base"),
            "--codebook", str(root / "codebook"), "--out", str(out), "--preset", "tiny",
            *sum((["--set", s] for s in SMALL), []), *extra]
    return CliRunner().invoke(data_app, args)


def test_two_sets_with_their_own_sizes(trained, tmp_path):
    result = _build(trained, tmp_path / "g", "--t2v-samples", "10", "--instruct-images", "5")
    assert result.exit_code == 0, result.output
    out = tmp_path / "g"
    t2v = json.loads((out / "conversations" / "train.json").read_text())
    instruct = json.loads((out / "instruct_conversations" / "train.json").read_text())
    assert len(t2v) == 10
    assert len({c["image"] for c in instruct}) == 5
    assert all(c["mask_files"] or c.get("task") == "diagseg" for c in t2v + instruct)
    assert all((trained / "data" / m).is_file() for c in t2v + instruct for m in c["mask_files"])
    t2v_images = {c["image"] for c in t2v}
    assert {c["image"] for c in instruct} != t2v_images  # independent draws
    codes = json.loads((out / "region_codes" / "instruct.json").read_text())
    assert len(codes) == 5 and all(r["token"].startswith("[C") for e in codes for r in e["regions"])
    assert json.loads((out / "conversations" / "val.json").read_text())
    again = _build(trained, tmp_path / "h", "--t2v-samples", "10", "--instruct-images", "5")
    assert again.exit_code == 0
    assert (tmp_path / "h" / "instruct_conversations" / "train.json").read_text() == \
        (out / "instruct_conversations" / "train.json").read_text()


def test_bad_sizes_and_inputs_are_usage_errors(trained, tmp_path):
    bad = _build(trained, tmp_path / "g", "--t2v-samples", "0")
    assert bad.exit_code == 2 and "t2v_samples=0 is out of range: must be >= 1" in bad.output
    missing = CliRunner().invoke(data_app, ["prepare", "grounding", "--data", str(tmp_path / "none"), "--base", str(trained / "base"),
                                            "--codebook", str(trained / "codebook"), "--out", str(tmp_path / "x"), "--preset", "tiny"])
    assert missing.exit_code in (1, 2) and "Traceback" not in missing.output


def test_llm_generator_writes_into_both_sets(trained, tmp_path, monkeypatch):
    """Both sets go through the LLM generator (an OpenAI-compatible stub on 127.0.0.1 that never
    answers usefully, so the template fallback keeps every item valid)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": "no idea"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MEDSIGHT_LLM_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
        monkeypatch.setenv("MEDSIGHT_LLM_MODEL", "stub")
        monkeypatch.setenv("MEDSIGHT_LLM_RPM", "0")
        result = _build(trained, tmp_path / "g", "--t2v-samples", "6", "--instruct-images", "3", "--generator", "llm")
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.output
    t2v = json.loads((tmp_path / "g" / "conversations" / "train.json").read_text())
    instruct = json.loads((tmp_path / "g" / "instruct_conversations" / "train.json").read_text())
    generated = lambda items: [c for c in items if "task" not in c]  # noqa: E731  (template items carry a task)
    assert requests and len(generated(instruct)) == 3 and generated(t2v)
    assert all(len(c["conversations"]) >= 2 for c in generated(t2v + instruct))
    assert all((trained / "data" / m).is_file() for c in t2v + instruct for m in c["mask_files"])

"""Session fixtures for serving tests: a tiny model trained once, registered, and served.

- ``trained_chain``: the README's tiny chain (``medsight chain --preset tiny``), run once per
  session in a fresh process (in-process runs would inherit what earlier tests left behind); the
  learning tests read its metrics, the serving and registry tests use its model. Set
  MEDSIGHT_TEST_CHAIN_DIR to keep the outputs between sessions (unchanged stages are reused;
  any change under medsight/ retrains), or MEDSIGHT_TEST_EVALUATE_DIR to an evaluate output of
  such a chain to use that model as it is while iterating on serving code.
- ``registry``: a real MLflow sqlite registry whose artifacts live in a real S3 server
  (SeaweedFS on loopback), with the trained model registered through the gate and promoted.
- ``model_server``: ``medsight serve --model models:/medsight@production`` on 127.0.0.1,
  started from another working directory while the chain's outputs are moved away, so what it
  serves comes from the registry alone.

"Segment all visible structures." gets one region token per structure named. Tests that need
several region tokens pick a held-out image for which ``medsight predict`` itself gives at least
two (``multi_region_image``), so they check the server, not the luck of training.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
MULTI_REGION_QUESTION = "Segment all visible structures."
NO_REGION_QUESTION = "Is there a lesion in this image?"
SERVER_TOKEN_ENV = "MEDSIGHT_SERVE_TOKEN"


def python_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop(SERVER_TOKEN_ENV, None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def trained_chain(tmp_path_factory) -> SimpleNamespace:
    if os.environ.get("MEDSIGHT_TEST_EVALUATE_DIR"):
        return _chain_of(Path(os.environ["MEDSIGHT_TEST_EVALUATE_DIR"]))
    workdir = Path(os.environ.get("MEDSIGHT_TEST_CHAIN_DIR") or tmp_path_factory.mktemp("chain"))
    command = [sys.executable, "-m", "medsight.cli", "chain", "--preset", "tiny", "--workdir", str(workdir)]
    log = workdir.parent / f"{workdir.name}.log"
    with log.open("w") as handle:
        done = subprocess.run(command, env=python_env(), stdout=handle, stderr=subprocess.STDOUT, timeout=3600)
    assert done.returncode == 0, f"tiny chain failed; see {log}"
    # The chain prints its last output (register-model or evaluate); stage.json files name the rest.
    lines = [line for line in log.read_text().splitlines() if line.startswith("Done. Last output: ")]
    return _chain_of(Path(lines[-1].removeprefix("Done. Last output: ").strip()))


def _input(record: dict, name: str) -> Path:
    """stage.json records each input as {md5, stage, path}."""
    return Path(record["inputs"][name]["path"])


def _chain_of(last_dir: Path) -> SimpleNamespace:
    record = json.loads((last_dir / "stage.json").read_text())
    # The chain ends in register-model when the registry gates on the evaluation; follow it back.
    evaluate_dir = _input(record, "evaluation") if "evaluation" in record["inputs"] else last_dir
    record = json.loads((evaluate_dir / "stage.json").read_text())
    workdir = evaluate_dir.parent.parent
    from medsight.data.prepared_index import read_split
    from medsight.data.taxonomy import resolve_taxonomy

    data = _input(record, "data")
    test_images = sorted(r.image_path for r in read_split(data, "test", resolve_taxonomy(data, "")))
    return SimpleNamespace(
        workdir=workdir,
        evaluate=evaluate_dir,
        model=_input(record, "model"),
        base=_input(record, "base"),
        metrics=json.loads((evaluate_dir / "metrics.json").read_text()),
        test_images=test_images,
    )


def run_predict(chain: SimpleNamespace, image: Path, question: str, out: Path) -> dict:
    """``medsight predict`` as a user runs it (its own process); returns its prediction.json."""
    command = [sys.executable, "-m", "medsight.cli", "predict", "--checkpoint", str(chain.model), "--base", str(chain.base),
               "--image", str(image), "--question", question, "--out", str(out)]
    done = subprocess.run(command, env=python_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "prediction.json").read_text())


@pytest.fixture(scope="session")
def multi_region_image(trained_chain, tmp_path_factory) -> tuple[Path, dict, Path]:
    """A held-out image for which ``medsight predict`` gives >= 2 region tokens for
    MULTI_REGION_QUESTION: (image, its prediction.json, predict's output folder)."""
    from medsight.data.image_io import load_image
    from medsight.eval.predict import predict_image
    from medsight.model.inference import MedSightInference

    model = MedSightInference.load(trained_chain.model, trained_chain.base)
    candidates = trained_chain.test_images[:16]
    chosen = next((p for p in candidates if len(predict_image(model, load_image(p), MULTI_REGION_QUESTION).region_tokens) >= 2), None)
    assert chosen is not None, f"the trained model named < 2 regions on all of {len(candidates)} test images: training failed"
    out = tmp_path_factory.mktemp("predict-multi")
    return chosen, run_predict(trained_chain, chosen, MULTI_REGION_QUESTION, out), out


@pytest.fixture(scope="session")
def registry(trained_chain, tmp_path_factory) -> SimpleNamespace:
    """Sqlite registry + S3 (SeaweedFS) artifacts, the trained model registered and promoted."""
    from mlflow import MlflowClient

    from medsight.platform.model_registry import promote, register_from_evaluation
    from medsight.platform.local_run import patched_env
    from medsight.platform.s3_server import S3Credentials, SeaweedS3Server
    from medsight.platform.storage import S3Settings, S3Storage

    root = tmp_path_factory.mktemp("registry")
    server = SeaweedS3Server(root / "s3", credentials=S3Credentials("t" + secrets.token_hex(6), secrets.token_urlsafe(24)))
    server.start()
    try:
        S3Storage(S3Settings.from_env(server.env())).ensure_bucket("medsight-mlflow")
        env = {
            **server.env(),
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "MLFLOW_S3_ENDPOINT_URL": server.endpoint,
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        with patched_env(env):
            MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment("medsight", artifact_location="s3://medsight-mlflow/artifacts")
            metrics = trained_chain.metrics
            # Thresholds just below what this training run reached: the gate must let it through.
            thresholds = {"mecovqa_dice": round(metrics["mecovqa_dice"] - 0.05, 3), "open_recall": round(metrics["open_recall"] - 0.05, 3)}
            registration = register_from_evaluation(
                trained_chain.evaluate, trained_chain.model, trained_chain.base, thresholds,
                {"kfp_run_id": "test-run-123"}, name="medsight", workdir=root,
            )
            assert registration.registered, registration.gate.failures
            promote("medsight", registration.version, "production")
        yield SimpleNamespace(env=env, registration=registration, thresholds=thresholds, root=root, s3=server)
    finally:
        server.stop()


class ServerProcess:
    """``medsight serve`` in its own process on loopback; always stopped."""

    def __init__(self, source: str, workdir: Path, env: dict[str, str], *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"serve-{self.port}.log"
        command = [sys.executable, "-m", "medsight.cli", "serve", "--model", source, "--host", "127.0.0.1",
                   "--port", str(self.port), "--cache", str(workdir / "models"), *extra]
        self.handle = self.log.open("w")
        self.process = subprocess.Popen(command, cwd=workdir, env=env, stdout=self.handle, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.handle.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def model_server(trained_chain, registry, tmp_path_factory) -> ServerProcess:
    """Serves the registered version from the registry, with no stage output on disk."""
    workdir = tmp_path_factory.mktemp("serve")
    hidden = trained_chain.workdir.with_name(trained_chain.workdir.name + ".hidden")
    trained_chain.workdir.rename(hidden)  # nothing may read the training outputs
    try:
        server = ServerProcess("models:/medsight@production", workdir, python_env(**registry.env), "--max-image-pixels", "1000000",
                               "--max-body-mb", "4")
        server.wait_ready()
    finally:
        hidden.rename(trained_chain.workdir)
    yield server
    server.stop()

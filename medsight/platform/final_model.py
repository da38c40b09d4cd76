"""The final model of a pipeline run, logged as an MLflow model of the evaluation's stage run.

HOOK: ``log_final_model`` is the one call the pipeline makes (``component_runtime``, after the
evaluation stage computed). It logs the evaluated model folder (instruct-tune output) and the
base models it needs as an artifact-based pyfunc model (``loader_module``: no pickle), owned by
the evaluation's MLflow run (``source_run_id``) and listed as that run's output. The serving
work replaces the body with its self-contained model package; the signature stays.

``mlflow.pyfunc.load_model("models:/<model_id>").predict([{"image": PATH, "question": TEXT}])``
answers with ``{"answer", "region_tokens"}`` per row.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FINAL_MODEL_NAME = "medsight"
MODEL_DIR, BASE_DIR = "model", "base"


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "transformers", "tokenizers", "safetensors", "open_clip_torch", "pillow", "mlflow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def log_final_model(
    model_dir: Path,
    base_dir: Path,
    *,
    tracking_uri: str,
    run_id: str,
    lineage: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    name: str = FINAL_MODEL_NAME,
) -> str:
    """Log ``model_dir`` + ``base_dir`` as an MLflow model owned by run ``run_id``; returns its model id."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    tags = {f"dvc.{key}": str(entry.get("md5", "")) for key, entry in (lineage or {}).get("inputs", {}).items()}
    tags.update({f"medsight.{key}": str(value) for key, value in (lineage or {}).get("run", {}).items() if value})
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags,
                                       model_type="medsight-grounded-vlm")
    try:
        with tempfile.TemporaryDirectory(prefix="medsight-mlflow-model-") as tmp:
            data = Path(tmp) / "data"
            shutil.copytree(model_dir, data / MODEL_DIR, ignore=shutil.ignore_patterns("checkpoints"))
            shutil.copytree(base_dir, data / BASE_DIR)
            package = Path(tmp) / "package"
            mlflow.pyfunc.save_model(str(package), loader_module=__name__, data_path=str(data),
                                     pip_requirements=_pip_requirements())
            client.log_model_artifacts(model.model_id, str(package))
        finite = {k: float(v) for k, v in (metrics or {}).items() if math.isfinite(float(v))}
        if finite:
            from mlflow.entities import Metric

            from medsight.platform.tracking import _metric_key

            # The same numbers the evaluation run holds, attached to the model for the Models tab.
            client.log_batch(run_id, metrics=[Metric(_metric_key(k), v, model.creation_timestamp, 0,
                                                     model_id=model.model_id) for k, v in finite.items()])
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return model.model_id


class _GroundedModel:
    """What ``mlflow.pyfunc`` loads: the MedSIGHT inference model over the logged folders."""

    def __init__(self, data_path: Path) -> None:
        from medsight.model.inference import MedSightInference

        self.model = MedSightInference.load(data_path / MODEL_DIR, data_path / BASE_DIR, device="cpu")

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        from medsight.eval.predict import load_input_image, predict_image

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        answers = []
        for row in rows:
            prediction = predict_image(self.model, load_input_image(Path(row["image"])), str(row["question"]),
                                       taxonomy=getattr(self.model, "taxonomy", None))
            answers.append({"answer": prediction.text, "region_tokens": prediction.region_tokens})
        return answers


def _load_pyfunc(data_path: str) -> _GroundedModel:
    """MLflow's ``loader_module`` entry point."""
    return _GroundedModel(Path(data_path))

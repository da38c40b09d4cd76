"""The final model of a pipeline run as an MLflow model: the self-contained serving package.

``log_final_model`` is the one call the pipeline makes (``component_runtime``, once the evaluation
is pushed) and the registry's (``model_registry.register_from_evaluation``). It builds the package
(``medsight.serve.package``: safetensors + text, checksummed, with its lineage) from the evaluated
model and its base models, and logs it as a pyfunc model "from code" (no pickle), owned by the
evaluation's MLflow run when one is given (listed among that run's outputs), else by a new run.

``mlflow.pyfunc.load_model("models:/<model_id>").predict([{"image": PATH_OR_BASE64, "question": TEXT}])``
answers with ``{"answer", "region_tokens", "regions"}`` per row.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FINAL_MODEL_NAME = "medsight"


def log_final_model(
    model_dir: Path,
    base_dir: Path,
    *,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    experiment: str = "medsight",
    lineage: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    name: str = FINAL_MODEL_NAME,
    workdir: Path | None = None,
):
    """Package ``model_dir`` (instruct-tune output) with ``base_dir`` and log it; returns the
    ``LoggedModel`` (run id, ``models:/`` URI, artifact URI)."""
    from medsight.platform.model_registry import lineage_tags, log_model_package
    from medsight.serve.package import build_package

    with tempfile.TemporaryDirectory(dir=workdir, prefix="medsight-package-") as tmp:
        package = build_package(model_dir, base_dir, Path(tmp) / "package", name=name, lineage=dict(lineage or {}))
        return log_model_package(package, tracking_uri=tracking_uri, experiment=experiment, run_name=f"{name}-model",
                                 tags=lineage_tags(lineage or {}, metrics or {}), metrics=metrics, run_id=run_id)

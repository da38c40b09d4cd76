"""The model package as an MLflow pyfunc model, for MLflow-native consumers.

The package (safetensors + text, see ``medsight.serve.package``) is logged as the model's
artifact ``package``; the model itself is logged "from code" (``mlflow_model_code.py``), so
MLflow stores no pickle. ``mlflow.pyfunc.load_model(uri).predict(df)`` answers a DataFrame (or a
list of dicts) with ``image`` (a file path, base64 or a data URL; PNG/JPEG/DICOM) and ``question``;
params ``mask_format``,
``max_new_tokens`` and ``temperature``. The model server does not go through pyfunc: it
downloads the same package and loads it directly.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

PACKAGE_ARTIFACT = "package"


class MedSightPyfunc(mlflow.pyfunc.PythonModel):
    # No type hints on predict() on purpose: MLflow would convert and validate inputs itself
    # (it says so once per process, a UserWarning), while the engine checks every field.
    def load_context(self, context) -> None:
        from medsight.model.input_limits import InputLimits
        from medsight.serve.engine import GroundingEngine
        from medsight.serve.package import load_package

        self.engine = GroundingEngine(load_package(context.artifacts[PACKAGE_ARTIFACT]), InputLimits())

    def predict(self, context, model_input, params=None):  # -> list[dict[str, Any]], one per row
        from medsight.serve.image_input import decode_base64

        params = params or {}
        settings = self.engine.settings(params.get("max_new_tokens"), params.get("temperature"))
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        requests = []
        for index, row in enumerate(rows):
            image = str(row["image"])
            if len(image) < 4096 and Path(image).is_file():  # a path on this machine
                data, mime = Path(image).read_bytes(), None
            else:
                data, mime = decode_base64(image, f"row {index} image")
            requests.append(
                self.engine.prepare(data, row["question"], mime=mime, mask_format=params.get("mask_format", "rle"), settings=settings)
            )
        return [
            {"answer": r.text, "region_tokens": [region["token"] for region in r.regions], "regions": r.regions,
             "completion_tokens": r.completion_tokens}
            for r in self.engine.run_batch(requests)
        ]

"""Executed by MLflow when it loads a logged MedSIGHT model ("models from code"): no pickle."""

from mlflow.models import set_model

from medsight.serve.mlflow_pyfunc import MedSightPyfunc

set_model(MedSightPyfunc())

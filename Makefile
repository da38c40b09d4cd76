# The two set-up commands (see README): `make pipeline` (main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv pipeline test test-fast chain bench clean

venv:
	@bash scripts/bootstrap.sh

## Main job: the whole DAG on the tiny preset through kfp.local, with SeaweedFS (S3) + DVC + MLflow.
pipeline: venv
	$(PY) -m medsight.cli platform run-local --preset tiny

## Every test (creates .venv from requirements.lock first).
test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

## The same stages in-process, without the orchestrator.
chain: venv
	$(PY) -m medsight.cli chain --preset tiny --workdir runs/chain

bench: venv
	$(PY) bench/bench_chain.py
	$(PY) bench/bench_perceiver.py

clean:
	rm -rf runs .pytest_cache

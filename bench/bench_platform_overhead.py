"""What lineage, the MLflow run structure and live progress add to each pipeline component.

Measured in this process, on the outputs of a finished local run (``--workdir``, default
``runs/platform``: its run repo is pulled for real stage outputs), against a fresh sqlite MLflow
store:

- a stage's MLflow run as before (create + finish) vs now (parent found by pipeline run id,
  source tags, model-training experiment, inputs logged as DVC datasets, finish);
- ``lineage.json`` for instruct-tune's inputs (read each input's record, curves and lineage);
- the final model logged as an MLflow model (evaluation component only);
- the system-metrics sampler started and stopped (the parent run only, locally);
- one progress event (at most one a second per training loop).

Writes the "## Platform: per-component cost of lineage, MLflow structure, progress" section of
BENCHMARKS.md (other sections untouched). Usage: python bench/bench_platform_overhead.py
[--workdir runs/platform] [--repeat 5] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## Platform: per-component cost of lineage, MLflow structure, progress"


NOTES = """
- Per computed stage the MLflow structure adds about 0.1 s (one search for the parent run, the
  source tags, one `log_inputs` call); a stage restored from the run-cache adds nothing to its
  component: the local runner records its child run in-process after the pipeline.
- `lineage.json` costs about a millisecond per stage; progress events at most one small append a
  second per training loop.
- Only the evaluation component logs the final model (about 1 s for the tiny model; importing
  `mlflow.pyfunc` once `mlflow.tracking` is loaded takes under 0.1 s).
- System metrics: one sampler thread in the runner's process for the whole local pipeline, none
  per component (on a cluster each stage samples its own pod).
- Not re-measured here: the whole tiny DAG (`make pipeline`). The machine ran other agents' chains
  at a load average of 11-13 on 2 CPUs, where one perceiver step took 10 s instead of 0.17 s;
  the figures above add under 2 s to the 9-component pipeline.
"""


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, max) seconds of ``repeat`` calls."""
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "platform")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from medsight.platform.resolve import open_store
    from medsight.platform.run_repo import RunRepo
    from medsight.stages.content_hash import input_hashes
    from medsight.stages.lineage import RunInfo, build_lineage

    repo = RunRepo(args.workdir / "repo")
    with open_store(args.workdir):
        outputs = {name: repo.checkout_dir(name, repo.locked_md5(name) or "") or repo.pull(name)
                   for name in ("synth-data", "base-models", "codebook-pretrain", "grounding-data", "v2t-align",
                                "t2v-align", "instruct-tune")}
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "KFP_RUN_ID": "bench-run",
                           "MEDSIGHT_GIT_COMMIT": "bench", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
                           "MEDSIGHT_MLFLOW_PARENT_OWNED": "1", "MEDSIGHT_HASH_INDEX": f"{tmp}/index.sqlite"})
        from mlflow.tracking import MlflowClient

        from medsight.platform.tracking import MLflowTracker

        MLflowTracker.from_env("warm-up", log_config=False).close()  # database schema + imports
        client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("medsight").experiment_id
        inputs = {"data": outputs["synth-data"], "base": outputs["base-models"], "codebook": outputs["codebook-pretrain"],
                  "grounding": outputs["grounding-data"], "v2t": outputs["v2t-align"], "t2v": outputs["t2v-align"]}
        hashes = input_hashes(inputs)
        lineage = build_lineage("instruct-tune", inputs, hashes, RunInfo.from_env())

        def bare_run() -> None:
            run = client.create_run(experiment, run_name="bare", tags={"medsight.stage": "x"})
            client.set_terminated(run.info.run_id)

        def structured_run() -> None:
            tracker = MLflowTracker.from_env("instruct-tune", log_config=False)
            tracker.log_lineage(lineage)
            tracker.close()

        rows.append(("stage MLflow run, before: create + finish", *timed(bare_run, args.repeat)))
        rows.append(("stage MLflow run, now: + parent lookup, source tags, DVC datasets", *timed(structured_run, args.repeat)))
        rows.append(("lineage.json for instruct-tune's 6 inputs", *timed(
            lambda: build_lineage("instruct-tune", inputs, hashes, RunInfo.from_env()), args.repeat)))

        from medsight.platform.final_model import log_final_model

        run_id = client.create_run(experiment, run_name="evaluate").info.run_id
        size = sum(p.stat().st_size for d in (outputs["instruct-tune"], outputs["base-models"]) for p in d.rglob("*") if p.is_file())
        rows.append((f"final model as an MLflow model ({size / 2**20:.1f} MiB copied; evaluate only)", *timed(
            lambda: log_final_model(outputs["instruct-tune"], outputs["base-models"],
                                    tracking_uri=os.environ["MLFLOW_TRACKING_URI"], run_id=run_id, lineage=lineage),
            max(1, args.repeat // 2))))

        from medsight.platform.tracking import _start_system_metrics

        def sampler() -> None:
            monitor = _start_system_metrics(run_id, os.environ["MLFLOW_TRACKING_URI"])
            monitor.finish()

        rows.append(("system-metrics sampler start + stop (parent run only, locally)", *timed(sampler, args.repeat)))

        from medsight.train.progress_events import StepEvents

        os.environ["MEDSIGHT_EVENTS_FILE"] = f"{tmp}/events.jsonl"
        events = StepEvents("bench", 10**9, min_interval=0.0)
        step = iter(range(1, 10**9))
        median, worst = timed(lambda: events.update(next(step), {"loss": 1.0, "lm": 0.5}), 200)
        rows.append(("one progress event (rate-limited to 1/s)", median, worst))

    load = os.getloadavg()[0]
    table = "\n".join(f"| {name} | {median * 1000:.1f} | {worst * 1000:.1f} |" for name, median, worst in rows)
    section = (
        f"{SECTION}\n\n`python bench/bench_platform_overhead.py`: {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load:.1f} (a shared machine: figures are indicative). Median and worst of {args.repeat} calls, on the "
        f"stage outputs of the local run in {args.workdir.name}/ (tiny preset).\n\n| what | median (ms) | worst (ms) |\n|---|---:|---:|\n" + table + "\n"
        + NOTES
    )
    print(section)
    if not args.no_write:
        bench = ROOT / "BENCHMARKS.md"
        text = bench.read_text()
        if SECTION in text:
            start = text.index(SECTION)
            end = text.find("\n## ", start + len(SECTION))
            text = text[:start] + section + ("" if end < 0 else text[end:])
        else:
            text = text.rstrip("\n") + "\n\n" + section
        bench.write_text(text)


if __name__ == "__main__":
    main()

"""Run many ``medsight`` command lines through the real entry point in one interpreter.

    python tests/cli_batch.py JOBS.json RESULTS.json

JOBS.json: [{"argv": [...], "cwd": DIR, "env": {...}}, ...]. Each job gets its own working
folder, environment, ``sys.argv`` and captured stdout/stderr; ``medsight.cli.main`` runs as the
installed ``medsight`` script does, and its exit code is recorded (``SystemExit``). Why: the
bad-input corpus is ~70 runs, and a fresh interpreter per run spent most of its time importing
torch. A job that escapes ``main`` with an exception (a bug: ``main`` turns every error into one
line) is recorded with exit code -1 and its traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def run_job(job: dict) -> dict:
    from medsight.cli import main

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    try:
        os.environ.clear()
        os.environ.update(job["env"])
        os.chdir(job["cwd"])
        sys.argv = ["medsight", *job["argv"]]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - recorded for the test to report
        code = -1
        stderr.write(traceback.format_exc())
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
    return {"exit": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def main_batch(jobs_file: str, results_file: str) -> None:
    with open(jobs_file) as handle:
        jobs = json.load(handle)
    results = []
    for job in jobs:
        results.append(run_job(job))
        # Written after every job: a crash of the interpreter still leaves the earlier results.
        with open(results_file, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main_batch(sys.argv[1], sys.argv[2])

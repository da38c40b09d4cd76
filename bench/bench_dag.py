"""Whole tiny DAG through kfp.local vs the same stages called in one process.

Measures, each in a fresh child process (wall time, peak RSS from wait4):
  1. in-process chain (`medsight.stages.chain.run_chain`): the no-orchestrator baseline;
  2. first `medsight platform run-local` (SeaweedFS + DVC + MLflow + kfp.local, empty store);
  3. the same command again with nothing changed (every stage restored from the run-cache).
  4. the import floor: per stage, a fresh process that only imports what its component imports
     (KFP executor, platform runtime, MLflow, DVC, the stage module) and exits: what a component
     that starts its stage from scratch adds to the in-process chain. The local runner's stage
     server (medsight/platform/stage_server.py) forks stage processes with these imported.
Targets: (2)/(1) <= 1.15, (3)/(2) <= 5%. Writes the "## Platform (KFP DAG)" section of
BENCHMARKS.md (other sections untouched).

Usage: python bench/bench_dag.py [--workdir DIR] [--full-tiny] [--set key=value ...] [--no-write] [--floor-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Platform (KFP DAG)"


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB over the process tree) of one command; output goes to ``log``."""
    started = time.perf_counter()
    with open(log, "ab") as handle:
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}; see {log}")
    return wall, usage.ru_maxrss / 2**20


def in_process(workdir: Path, overrides: list[str], log: Path) -> tuple[float, float]:
    code = (
        "import sys; from pathlib import Path\n"
        "from medsight.config import apply_overrides, get_preset\n"
        "from medsight.stages.chain import run_chain\n"
        "def show(r): print(f'BENCH-STAGE {r.name} {r.seconds:.1f}', flush=True)\n"
        "run_chain(apply_overrides(get_preset('tiny'), sys.argv[2:]), Path(sys.argv[1]), on_stage=show)\n"
    )
    return timed([sys.executable, "-c", code, str(workdir), *overrides], log)


def in_process_stages(log: Path) -> dict[str, float]:
    found = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("BENCH-STAGE "):
            _, name, seconds = line.split()
            found[name] = float(seconds)
    return found


def local_run(workdir: Path, overrides: list[str], log: Path) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "medsight.cli", "platform", "run-local", "--workdir", str(workdir)]
    for override in overrides:
        cmd += ["--set", override]
    wall, rss = timed(cmd, log)
    runs = sorted((workdir / "repo" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return wall, rss, json.loads(runs[-1].read_text())


def import_floor(log: Path) -> dict[str, float]:
    """Wall seconds of a fresh interpreter importing what each stage's component imports."""
    from medsight.stages.registry import STAGES

    floor = {}
    for spec in STAGES:
        module = spec.entrypoint.split(":")[0]
        code = ("import kfp.dsl.executor_main, medsight.platform.component_runtime, mlflow.tracking, dvc.repo; "
                f"import {module}")
        floor[spec.name], _ = timed([sys.executable, "-c", code], log)
    return floor


def stage_table(run: dict, chain: dict[str, float]) -> list[str]:
    lines = ["| stage | in-process chain (s) | kfp: stage compute (s) | kfp: component process (s) |",
             "|---|---:|---:|---:|"]
    for record in run["stages"]:
        inside = f"{chain[record['stage']]:.1f}" if record["stage"] in chain else "-"
        lines.append(f"| {record['stage']} | {inside} | {record['seconds']:.1f} | {record['wall_seconds']:.1f} |")
    return lines


def write_section(text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    current = path.read_text() if path.is_file() else "# Benchmarks\n"
    if SECTION in current:
        head, _, rest = current.partition(SECTION)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else "\n"
        current = head.rstrip() + "\n\n" + text.rstrip() + "\n" + tail
    else:
        current = current.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--full-tiny", action="store_true", help="the tiny preset as is (long), not the fast cut")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra override")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--floor-only", action="store_true", help="measure only the import floor (4) and print it")
    args = parser.parse_args()
    from medsight.platform.local_run import FAST_OVERRIDES

    overrides = ([] if args.full_tiny else list(FAST_OVERRIDES)) + args.overrides
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="bench-dag-"))
    scratch.mkdir(parents=True, exist_ok=True)
    log = scratch / "bench.log"
    load_before = os.getloadavg()
    if args.floor_only:
        floor = import_floor(log)
        print(" ".join(f"{name}={seconds:.1f}s" for name, seconds in floor.items()), f"total={sum(floor.values()):.1f}s")
        return
    print(f"in-process chain ... (log {log})", flush=True)
    chain_wall, chain_rss = in_process(scratch / "chain", overrides, log)
    print(f"  {chain_wall:.1f}s; kfp.local first run ...", flush=True)
    first_wall, first_rss, first = local_run(scratch / "platform", overrides, log)
    print(f"  {first_wall:.1f}s; kfp.local unchanged rerun ...", flush=True)
    again_wall, again_rss, again = local_run(scratch / "platform", overrides, log)
    print(f"  {again_wall:.1f}s; import floor ...", flush=True)
    floors = import_floor(log)
    floor = sum(floors.values())
    load_after = os.getloadavg()
    ran_again = [r["stage"] for r in again["stages"] if not r["cached"]]
    overhead = first_wall / chain_wall
    fraction = again_wall / first_wall
    text = "\n".join([
        SECTION,
        "",
        "`python bench/bench_dag.py" + (" --full-tiny" if args.full_tiny else "") + "`: tiny preset"
        + ("" if args.full_tiny else " cut to a few steps per stage (`run-local --fast`)") + f"; {os.cpu_count()} CPUs, "
        f"{platform.machine()}, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
        "(the machine was shared with other jobs).",
        "",
        "| measurement | wall (s) | peak RSS (GiB) |",
        "|---|---:|---:|",
        f"| in-process chain (no orchestrator, one process) | {chain_wall:.1f} | {chain_rss:.2f} |",
        f"| kfp.local first run (S3 server, DVC push, MLflow, a process per component) | {first_wall:.1f} | {first_rss:.2f} |",
        f"| kfp.local rerun, nothing changed ({len(again['stages']) - len(ran_again)}/{len(again['stages'])} restored) | {again_wall:.1f} | {again_rss:.2f} |",
        "",
        f"- Orchestration overhead: {overhead:.2f}x the in-process chain (target <= 1.15x).",
        f"- Unchanged rerun: {100 * fraction:.1f}% of the first run (target <= 5%).",
        f"- Import floor: {len(floors)} fresh processes that only import what their components import take {floor:.1f} s,"
        f" {100 * floor / chain_wall:.0f}% of the in-process chain: what stage processes started from scratch would"
        " add; the local runner forks them from its stage server, which imports once.",
        "",
        "Per stage (component process = interpreter + imports + DVC pull/push + MLflow + the stage):",
        "",
        *stage_table(first, in_process_stages(log)),
    ])
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"\nwrote {SECTION!r} in BENCHMARKS.md")
    if args.workdir is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

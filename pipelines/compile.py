"""Compile the MedSIGHT pipelines to KFP IR YAML (what the Kubeflow Pipelines UI uploads).

    python -m pipelines.compile [--out pipelines/compiled] [--settings cluster.yaml] [--check]
    python -m pipelines.compile --variant codebook-8   # medsight-pipeline-codebook-8.yaml only

Output is deterministic (same code + settings -> same bytes), so ``pipelines/compiled/`` is
checked in as golden files and ``--check`` (used by the tests) fails when they are stale.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from pathlib import Path

from pipelines.deployment import DeploymentSettings

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "compiled"


def _sorted_literal(value: object) -> object:
    if isinstance(value, dict):
        return {k: _sorted_literal(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_literal(v) for v in value]
    return value


def normalize_header(text: str) -> str:
    """Sort dict keys in KFP's comment header, which prints protobuf maps in arbitrary order."""
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if not line.startswith("#"):
            break
        head, marker, rest = line.partition("[Default: ")
        if marker and rest.endswith("]"):
            try:
                value = ast.literal_eval(rest[:-1])
            except (ValueError, SyntaxError):
                continue
            lines[index] = f"{head}{marker}{_sorted_literal(value)!r}]"
    return "\n".join(lines)


def compile_all(out_dir: Path, settings: DeploymentSettings | None = None, variant: str | None = None) -> list[Path]:
    """All pipelines (the main one for variant full), or with ``variant`` only that variant's main pipeline."""
    from kfp import compiler

    from pipelines.medsight_pipeline import PIPELINE_NAME, build_pipelines

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = (PIPELINE_NAME,) if variant else None
    # Compile beside the targets, then rename: a failed compile never leaves a half file.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".compile-") as tmp:
        for name, pipeline in build_pipelines(settings, names, variant or "full").items():
            if variant and variant != "full":
                name = f"{name}-{variant}"
            staged = Path(tmp) / f"{name}.yaml"
            compiler.Compiler().compile(pipeline, str(staged))
            staged.write_text(normalize_header(staged.read_text()))
            target = out_dir / staged.name
            os.replace(staged, target)
            written.append(target)
    return written


def stale_files(golden_dir: Path = DEFAULT_OUT, settings: DeploymentSettings | None = None) -> list[str]:
    """Names of golden files that differ from a fresh compile (empty = up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_all(Path(tmp), settings)
        return [
            path.name
            for path in fresh
            if not (golden_dir / path.name).is_file() or (golden_dir / path.name).read_bytes() != path.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the YAML files")
    parser.add_argument("--settings", type=Path, help="deployment settings YAML (node labels, GPUs, images)")
    parser.add_argument("--check", action="store_true", help="only compare with the golden files; exit 1 if stale")
    parser.add_argument("--variant", help="compile only the main pipeline, for this registry variant")
    args = parser.parse_args(argv)
    settings = DeploymentSettings.from_file(args.settings) if args.settings else None
    if args.variant:
        from medsight.stages.registry import get_variant

        try:
            get_variant(args.variant)
        except KeyError as error:
            raise ValueError(error.args[0]) from error
    if args.check:
        stale = stale_files(args.out, settings)
        if stale:
            print(f"stale compiled pipelines: {', '.join(stale)}; run: medsight platform compile", file=sys.stderr)
            return 1
        print("compiled pipelines are up to date")
        return 0
    for path in compile_all(args.out, settings, args.variant):
        print(f"wrote {path}")
    print("Upload one in the KFP UI (Pipelines > Upload pipeline) or: "
          "medsight platform submit pipelines/compiled/medsight-pipeline.yaml --host <KFP URL>")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A benchmark manifest: which benchmarks to run, with which reader, from which files.

``benchmarks.json``::

    {"benchmarks": [
      {"name": "vqa_rad", "reader": "vqa", "path": "vqa_rad/VQA_RAD Dataset Public.json",
       "image_root": "vqa_rad/VQA_RAD Image Folder"},
      {"name": "pathvqa", "reader": "vqa", "path": "path-vqa"},
      {"name": "slake", "reader": "vqa", "path": "Slake1.0/test.json", "image_root": "Slake1.0/imgs"},
      {"name": "mmmu_med", "reader": "mmmu", "path": "mmmu"},
      {"name": "omnimedvqa", "reader": "omnimedvqa", "path": "OmniMedVQA"},
      {"name": "diagseg", "reader": "diagseg", "path": "DiagSeg/SegVQA_Diagnostic_test_vqa.json",
       "data_root": "BiomedParse", "strip_prefix": "/where/the/authors/kept/BiomedParse"},
      {"name": "mecovqa_g", "reader": "mecovqa_grounding", "path": "MeCoVQA_G.json", "image_root": "SAMed2D"},
      {"name": "schain", "reader": "schain", "path": "schain/English"},
      {"name": "medtrinity", "reader": "box_json", "path": "medtrinity.json", "image_root": "."}
    ]}

Relative paths are relative to the manifest's folder. The synthetic writer emits one, and a
user points the same code at real releases by writing one by hand.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsight.eval.benchmarks.box_grounding import read_box_json, read_schain
from medsight.eval.benchmarks.common import BenchmarkData, BenchmarkFormatError
from medsight.eval.benchmarks.diagseg import read_diagseg
from medsight.eval.benchmarks.mecovqa_grounding import read_mecovqa_grounding
from medsight.eval.benchmarks.multiple_choice import read_mmmu, read_omnimedvqa
from medsight.eval.benchmarks.vqa_llava_med import read_vqa
from medsight.io_utils import read_json

# The paper's benchmark order (Tables 2-4, then App. F.5).
BENCHMARK_ORDER = ("vqa_rad", "slake", "pathvqa", "mmmu_med", "omnimedvqa", "diagseg", "mecovqa_g", "schain", "medtrinity")
_PATH_KEYS = ("path", "image_root", "data_root", "mask_root")


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    reader: str
    options: dict[str, Any]  # reader keyword arguments; path-like ones already resolved


def _readers() -> dict[str, Callable[..., BenchmarkData]]:
    return {
        "vqa": read_vqa,
        "mmmu": read_mmmu,
        "omnimedvqa": read_omnimedvqa,
        "diagseg": read_diagseg,
        "mecovqa_grounding": read_mecovqa_grounding,
        "schain": read_schain,
        "box_json": read_box_json,
    }


# Manifest key -> reader argument, where the reader calls it something else.
_ARGUMENT_NAMES = {"omnimedvqa": {"path": "root"}}


def read_manifest(path: Path) -> list[BenchmarkSpec]:
    path = Path(path)
    data = read_json(path, BenchmarkFormatError, "benchmark manifest not found")
    entries = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise BenchmarkFormatError(f"{path}: expected {{\"benchmarks\": [...]}}")
    readers = _readers()
    specs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "reader" not in entry or "path" not in entry:
            raise BenchmarkFormatError(f"{path}: benchmarks[{index}] needs 'name', 'reader' and 'path'")
        if entry["reader"] not in readers:
            raise BenchmarkFormatError(
                f"{path}: benchmarks[{index}] ({entry['name']}): unknown reader {entry['reader']!r}; "
                f"choose one of {', '.join(sorted(readers))}"
            )
        options = {k: v for k, v in entry.items() if k not in ("name", "reader")}
        for key in _PATH_KEYS:
            if key in options and options[key] is not None:
                options[key] = path.parent / options[key]
        specs.append(BenchmarkSpec(name=str(entry["name"]), reader=str(entry["reader"]), options=options))
    return specs


def load_benchmark(spec: BenchmarkSpec) -> BenchmarkData:
    reader = _readers()[spec.reader]
    renames = _ARGUMENT_NAMES.get(spec.reader, {})
    options = {renames.get(key, key): value for key, value in spec.options.items()}
    parameters = inspect.signature(reader).parameters
    if "benchmark" in parameters:
        options["benchmark"] = spec.name
    # Check the keys here so a typo in the manifest is reported by benchmark and key name.
    unknown = sorted(set(options) - set(parameters))
    missing = sorted(n for n, p in parameters.items() if p.default is inspect.Parameter.empty and n not in options)
    if unknown or missing:
        raise BenchmarkFormatError(
            f"benchmark {spec.name} ({spec.reader}): "
            + (f"unknown manifest key(s) {', '.join(unknown)}; " if unknown else "")
            + (f"missing key(s) {', '.join(missing)}; " if missing else "")
            + f"this reader takes {', '.join(renames.get(n, n) for n in parameters if n != 'benchmark')}"
        )
    data = reader(**options)
    if data.name != spec.name:  # readers of single-release benchmarks name themselves; the manifest wins
        data.name = spec.name
        for sample in data.samples:
            sample.benchmark = spec.name
    return data


def load_manifest(path: Path, only: list[str] | None = None) -> list[BenchmarkData]:
    specs = read_manifest(path)
    if only:
        unknown = sorted(set(only) - {spec.name for spec in specs})
        if unknown:
            raise BenchmarkFormatError(f"{path}: no benchmark named {', '.join(unknown)}; the manifest has {', '.join(s.name for s in specs)}")
        specs = [spec for spec in specs if spec.name in only]
    order = {name: i for i, name in enumerate(BENCHMARK_ORDER)}
    specs.sort(key=lambda spec: order.get(spec.name, len(order)))
    return [load_benchmark(spec) for spec in specs]

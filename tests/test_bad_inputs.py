"""The bad-input corpus (``tests/bad_inputs/*.yaml``): the real CLI entry point on each case, all
cases in one child interpreter (``tests/cli_batch.py``).

Each case names the prepared inputs it starts from (copies of real tiny stage outputs), the damage
done to them, the command, the exit code and a text its one error line must contain. For every
case the test asserts:

- the exit code (1 runtime/data error, 2 usage error);
- exactly one ``error:`` line, containing the expected text (the file, key or field), and no
  traceback anywhere in the output;
- nothing created, changed or deleted in the case folder except under a fresh ``--out``.

Case format (all paths relative to the case folder, ``{placeholders}`` filled in by ``fill``)::

    item: 1                      # the issue-9 item it covers ("existing": checks kept from before)
    kind: data loss              # the kind of bad input, as the issue lists them
    inputs: [data, base]         # prepared outputs copied to <case>/data, <case>/base
    setup: [{truncate: "data/{train_image}", keep: 60}]
    command: [stage, run, perceiver-pretrain, --out, "{out}", --input, "data={case}/data", ...]
    exit: 1
    error: "{train_image}"
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

CASES_DIR = Path(__file__).parent / "bad_inputs"
CASES = sorted(CASES_DIR.glob("*.yaml"))
SMALL = ["data.train_images=6", "data.val_images=3", "data.test_images=3",
         "perceiver_pretrain.max_steps=1", "codebook_pretrain.max_steps=1"]
# About 100,000 characters: far more tokens than the tiny model's 512 positions.
HUGE_QUESTION = "Is there a lesion in the liver? " * 3125

pytestmark = pytest.mark.slow  # ~50 CLI runs plus building the tiny inputs: minutes on 2 cores


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real tiny stage outputs the cases start from (built once, copied into each case)."""
    from medsight.config import apply_overrides, get_preset
    from medsight.stages.runner import run_stage

    root = tmp_path_factory.mktemp("prepared")
    config = apply_overrides(get_preset("tiny"), SMALL)
    run_stage("synth-data", config, {}, root / "data")
    run_stage("base-models", config, {"data": root / "data"}, root / "base")
    run_stage("perceiver-pretrain", config, {"data": root / "data", "base": root / "base"}, root / "perceiver")
    run_stage("codebook-pretrain", config, {"data": root / "data", "base": root / "base",
                                            "perceiver": root / "perceiver"}, root / "codebook")
    return {name: root / name for name in ("data", "base", "perceiver", "codebook")}


def unwritable_folder(case: Path) -> Path:
    """A folder no write can succeed in: a read-only one, or /sys when running as root
    (root ignores permission bits; sysfs refuses new entries to everyone)."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = case / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def placeholders(case: Path) -> dict[str, str]:
    """``{train_image}``/``{train_mask}``: the first training image of the prepared index and its
    first mask, as the index names them (relative to the data root, inside the release folder)."""
    values = {"case": str(case), "out": str(case / "out"), "huge_question": HUGE_QUESTION}
    index = case / "data" / "biomedparse" / "train.jsonl"
    if index.is_file():
        first = json.loads(index.read_text().splitlines()[0])
        values["train_image"] = first["image"]
        values["train_mask"] = first["regions"][0]["mask"]
    return values


def fill(value, values: dict[str, str]):
    if isinstance(value, str):
        for key, text in values.items():
            value = value.replace("{" + key + "}", text)
        return value
    if isinstance(value, list):
        return [fill(v, values) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, values) for k, v in value.items()}
    return value


def _png_16bit_gray_alpha(path: Path, size: tuple[int, int]) -> None:
    """A 16-bit grayscale+alpha PNG (colour type 4, depth 16), which PIL reads but cannot write."""
    width, height = size
    rows = b"".join(b"\x00" + b"\x80\x00\xff\xff" * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _dicom(path: Path, with_pixels: bool) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CT", 4, 4, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if with_pixels:
        ds.PixelData = np.zeros((4, 4), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _json_set(path: Path, pointer: str, value) -> None:
    """Set one value by a ``/``-separated pointer; a ``.jsonl`` file is a list of its lines."""
    lines = path.suffix == ".jsonl"
    data = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if lines \
        else json.loads(path.read_text())
    node = data
    *parents, last = pointer.split("/")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    path.write_text("".join(json.dumps(line) + "\n" for line in data) if lines else json.dumps(data))


def apply(step: dict, case: Path) -> None:
    """One setup step; the vocabulary is small on purpose (see the module docstring)."""
    (op, target), = ((k, v) for k, v in step.items() if k in OPS)
    path = case / target if isinstance(target, str) else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if op == "truncate":
        path.write_bytes(path.read_bytes()[: step["keep"]])
    elif op == "write":
        path.write_text(step["text"])
    elif op == "write_json":
        path.write_text(json.dumps(step["value"]))
    elif op == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(step["size"]))
    elif op == "png":
        mode, (width, height) = step.get("mode", "L"), step["size"]
        if mode == "LA16":
            _png_16bit_gray_alpha(path, (width, height))
        else:
            value = step.get("value", 0)
            Image.new(mode, (width, height), tuple(value) if isinstance(value, list) else value).save(path)
    elif op == "json":
        for pointer, value in step["set"].items():
            _json_set(path, pointer, value)
    elif op == "delete":
        path.unlink()
    elif op == "symlink":
        if path.exists() or path.is_symlink():
            path.unlink()
        path.symlink_to(step["to"])
    elif op == "mkdir":
        path.mkdir(parents=True, exist_ok=True)
    elif op == "dicom":
        _dicom(path, step.get("pixels", True))
    elif op == "copy":
        source = case / step["from"]
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path)


OPS = ("truncate", "write", "write_json", "random_bytes", "png", "json", "delete", "symlink", "mkdir", "dicom", "copy")


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` without following links: file bytes, link targets, folders."""
    entries: dict[str, object] = {}
    for directory, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(directory) / name
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries[key] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[key] = ("dir",)
            else:
                entries[key] = path.read_bytes()
    return entries


def load_case(path: Path) -> dict:
    case = yaml.safe_load(path.read_text())
    missing = {"item", "kind", "command", "exit", "error"} - set(case)
    assert not missing, f"{path.name}: missing {sorted(missing)}"
    return case


def test_the_corpus_is_large_and_covers_every_kind_the_issue_lists():
    cases = [load_case(path) for path in CASES]
    assert len(cases) >= 40
    kinds = {case["kind"] for case in cases}
    assert {"truncated PNG", "RGBA PNG", "16-bit PNG", "wrong-size mask", "empty mask", "unknown modality",
            "missing file", "malformed JSON", "wrong-shape JSON", "bad config key", "bad config type",
            "bad config range", "too many masks", "DICOM without pixels", "corrupt safetensors",
            "tampered config.yaml", "tampered stage.json", "unwritable --out", "traversal name", "huge image",
            "huge question", "unknown region tokens", "data loss", "symlink loop"} <= kinds
    assert {case["item"] for case in cases} >= {1, 2, 3, 5, 6, 7, 8, 9, "existing"}


@pytest.fixture(scope="module")
def corpus_runs(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case set up in its own folder, then all their commands run through the real
    ``medsight`` entry point in one child interpreter (tests/cli_batch.py: a fresh interpreter
    per case spent most of the corpus's minutes importing torch)."""
    root = tmp_path_factory.mktemp("corpus")
    runs, jobs = {}, []
    for case_file in CASES:
        spec = load_case(case_file)
        case = root / case_file.stem / "case"
        case.mkdir(parents=True)
        for name in spec.get("inputs", []):
            shutil.copytree(prepared[name], case / name, symlinks=True)
        values = placeholders(case)
        values["unwritable"] = str(unwritable_folder(case)) if "{unwritable}" in json.dumps(spec) else ""
        for step in spec.get("setup", []):
            apply(fill(step, values), case)
        out = case / "out"
        env = {**os.environ, "MEDSIGHT_HASH_INDEX": str(case.parent / "hash-index.sqlite"), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("MEDSIGHT_DEBUG", None)
        runs[case_file.stem] = {"spec": spec, "case": case, "values": values, "out_was_fresh": not out.exists(),
                                "before": snapshot(case)}
        jobs.append({"argv": fill(spec["command"], values), "cwd": str(case), "env": env})
    jobs_file, results_file = root / "jobs.json", root / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(Path(__file__).parent / "cli_batch.py"), str(jobs_file), str(results_file)],
                   timeout=1800, check=False)
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    for (name, run), result in zip(runs.items(), results):
        run["result"] = result
    return runs


@pytest.mark.parametrize("case_file", CASES, ids=[path.stem for path in CASES])
def test_bad_input(case_file: Path, corpus_runs: dict[str, dict]) -> None:
    run = corpus_runs[case_file.stem]
    assert "result" in run, "the batch interpreter died before this case ran"
    spec, case, values, result = run["spec"], run["case"], run["values"], run["result"]
    output = result["stdout"] + result["stderr"]
    shown = f"exit {result['exit']}\n--- stderr ---\n{result['stderr'][-3000:]}"
    assert result["exit"] == spec["exit"], shown
    assert "Traceback" not in output, shown
    # A progress bar is redrawn with "\r": what a terminal shows is the text after the last one.
    lines = [line.rsplit("\r", 1)[-1] for line in result["stderr"].split("\n")]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, shown
    assert fill(spec["error"], values) in errors[0], shown
    after = snapshot(case)
    if run["out_was_fresh"]:
        after = {k: v for k, v in after.items() if k != "out" and not k.startswith("out/")}
    before = run["before"]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], f"changed outside a fresh --out: {changed[:8]}"


def test_the_too_many_masks_advice_works_from_the_cli(prepared: dict[str, Path], tmp_path: Path) -> None:
    """With ``data.too_many_masks=error`` an image over ``max_masks_per_image`` stops the stage, and
    the error's advice (a ``--set`` that switches to skipping) exists and works as written."""
    limit = 2
    over = {split: [entry["id"] for entry in map(json.loads, (prepared["data"] / "biomedparse" / f"{split}.jsonl")
                                                 .read_text().splitlines()) if len(entry["regions"]) > limit]
            for split in ("train", "val", "test")}
    assert over["train"], "the tiny data needs an image over the limit for this test to mean anything"
    command = [sys.executable, "-m", "medsight.cli", "stage", "run", "perceiver-pretrain", "--out", str(tmp_path / "out"),
               "--input", f"data={prepared['data']}", "--input", f"base={prepared['base']}",
               *sum((["--set", s] for s in [*SMALL, f"perceiver_pretrain.max_masks_per_image={limit}",
                                            "data.too_many_masks=error"]), [])]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 1 and len(errors) == 1, refused.stderr[-2000:]
    assert f"more than the stage's max_masks_per_image={limit}" in errors[0]
    advice = re.search(r"--set (\S+)", errors[0])
    assert advice and advice.group(1) == "data.too_many_masks=skip", errors[0]
    skipped = subprocess.run([*command, "--set", advice.group(1)], capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    for ids in over.values():
        if ids:
            assert f"skipped {len(ids)} image(s) with more than {limit} masks: {', '.join(ids[:5])}" in skipped.stderr
    assert json.loads((tmp_path / "out" / "stage.json").read_text())["stage"] == "perceiver-pretrain"

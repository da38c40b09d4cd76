"""The model package: one directory that holds everything a trained MedSIGHT needs to answer.

A trained model is spread over two stage outputs today (the instruct-tune bundle and the
base-models output with the encoder, tokenizer and base LLM). A package copies what inference
reads from both into one tree that loads with no checkout, no pipeline and no other stage output:

    package.json        format marker, name, creation time, sha256 of every file below
    config.yaml         the resolved training config
    lineage.json        where it came from (run ids, git commit, DVC hashes, evaluation summary)
    metrics.json        the model stage's own metrics
    modules/            perceiver, codebook, projectors, region-token rows (+ taxonomy.json)
    encoder/ llm/ tokenizer/

Only safetensors weights and JSON/YAML/text files are copied or accepted, so loading a package
handed in by someone else never unpickles anything. The layout makes a package both the
``model`` and the ``base`` input of ``build_medsight``: the loader needs no special case.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from medsight.io_utils import atomic_directory, atomic_write_json, read_json

PACKAGE_FILE = "package.json"
PACKAGE_FORMAT = "medsight-model-package"
PACKAGE_VERSION = 1
LINEAGE_FILE = "lineage.json"
# What a package may hold: weights only as safetensors, everything else as plain text.
ALLOWED_SUFFIXES = frozenset({".safetensors", ".json", ".yaml", ".txt", ".model", ".jinja"})


class PackageError(ValueError):
    """A package is missing, incomplete, altered or holds a file type it must not; names the path."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_dir():
            continue
        if path.suffix not in ALLOWED_SUFFIXES:
            raise PackageError(f"{path}: a model package takes only safetensors weights and text files, not {path.suffix or 'extension-less'} files")
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)


def build_package(
    model_dir: Path,
    base_dir: Path,
    output: Path,
    *,
    name: str = "medsight",
    lineage: dict[str, Any] | None = None,
) -> Path:
    """Copy an instruct-tune (or t2v-align) output and its base-models output into ``output``.

    Written atomically: ``output`` either holds a complete package or is left as it was.
    """
    from medsight.data.taxonomy import Taxonomy
    from medsight.model.bundle import MODULES_DIR, bundle_taxonomy, find_dir, find_modules, taxonomy_file

    model_dir, base_dir = Path(model_dir), Path(base_dir)
    if not (model_dir / "config.yaml").is_file():
        raise PackageError(f"{model_dir}: not a MedSIGHT stage output (config.yaml missing); pass an instruct-tune output")
    if not (base_dir / "encoder").is_dir():
        raise PackageError(f"{base_dir}: not a base-models output (encoder/ missing)")
    inputs = {"base": base_dir, "model": model_dir}
    modules = find_modules(inputs)
    missing = [m for m in ("perceiver", "codebook", "v2t", "t2v", "region_tokens") if m not in modules]
    if missing:
        raise PackageError(f"{model_dir}: no {', '.join(missing)} weights; package an instruct-tune or t2v-align output")
    directories = {"encoder": base_dir / "encoder", "llm": find_dir(inputs, "llm"), "tokenizer": find_dir(inputs, "tokenizer")}
    for label, directory in directories.items():
        if directory is None:
            raise PackageError(f"{model_dir} / {base_dir}: no {label}/ directory in either output")
    taxonomy = bundle_taxonomy({"model": model_dir}) or Taxonomy.synthetic()

    with atomic_directory(Path(output)) as tmp:
        shutil.copyfile(model_dir / "config.yaml", tmp / "config.yaml")
        if (model_dir / "metrics.json").is_file():
            shutil.copyfile(model_dir / "metrics.json", tmp / "metrics.json")
        (tmp / MODULES_DIR).mkdir()
        for path in modules.values():
            shutil.copyfile(path, tmp / MODULES_DIR / path.name)
        taxonomy.save(taxonomy_file(tmp))
        for label, directory in directories.items():
            _copy_tree(directory, tmp / label)
        atomic_write_json(tmp / LINEAGE_FILE, lineage or {})
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(
            tmp / PACKAGE_FILE,
            {
                "format": PACKAGE_FORMAT,
                "format_version": PACKAGE_VERSION,
                "name": name,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
            },
        )
    return Path(output)


def locate_package(directory: Path) -> Path:
    """The package root inside ``directory``: itself, or where an MLflow model or a KServe
    storage initializer put it (``artifacts/package/`` below the model root)."""
    directory = Path(directory)
    if (directory / PACKAGE_FILE).is_file():
        return directory
    found = sorted(p.parent for p in directory.rglob(PACKAGE_FILE)) if directory.is_dir() else []
    if not found:
        raise PackageError(f"{directory}: no MedSIGHT model package here ({PACKAGE_FILE} not found); build one with `medsight registry package`")
    if len(found) > 1:
        raise PackageError(f"{directory}: holds {len(found)} model packages; point at one of {', '.join(map(str, found))}")
    return found[0]


def read_manifest(root: Path) -> dict[str, Any]:
    manifest = read_json(root / PACKAGE_FILE, PackageError, "not a model package")
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{root / PACKAGE_FILE}: not a {PACKAGE_FORMAT} manifest")
    if manifest.get("format_version") != PACKAGE_VERSION:
        raise PackageError(f"{root / PACKAGE_FILE}: format_version {manifest.get('format_version')} is not {PACKAGE_VERSION}; rebuild the package")
    return manifest


def verify_package(root: Path) -> dict[str, Any]:
    """Manifest of an intact package: every listed file present with its checksum, nothing else
    that could be executed or unpickled."""
    root = Path(root)
    manifest = read_manifest(root)
    for relative, digest in manifest.get("files", {}).items():
        path = root / relative
        if not path.is_file():
            raise PackageError(f"{path}: listed in {PACKAGE_FILE} but missing; the package is incomplete")
        if _sha256(path) != digest:
            raise PackageError(f"{path}: checksum differs from {PACKAGE_FILE}; the package was altered or damaged")
    for path in root.rglob("*"):
        if path.is_file() and path.suffix not in ALLOWED_SUFFIXES:
            raise PackageError(f"{path}: unexpected {path.suffix or 'extension-less'} file in a model package; refusing to load it")
    return manifest


def read_lineage(root: Path) -> dict[str, Any]:
    path = Path(root) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_package(directory: Path, device: str = "cpu"):
    """A ``MedSightInference`` from a package (checked first); ``directory`` may be its parent."""
    from medsight.model.inference import MedSightInference

    root = locate_package(directory)
    verify_package(root)
    return MedSightInference.load(root, root, device=device)

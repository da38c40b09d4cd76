"""Issue 9, items 2 and 3: data is read from the data root alone, outputs go under --out alone.

Names and paths inside dataset files (benchmark names, image and mask paths) are untrusted: a
``../`` or an absolute path must never make a reader leave the data folder or a writer leave the
output folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from eval_fakes import FakeModel
from medsight.config.presets import get_preset
from medsight.config.schema import DataConfig
from medsight.data.biomedparse import read_biomedparse
from medsight.data.errors import DataError
from medsight.data.llava import read_conversations
from medsight.data.safe_paths import resolve_under
from medsight.data.synthetic import generate_dataset
from medsight.data.taxonomy import Taxonomy
from medsight.eval.benchmarks.common import BenchmarkFormatError
from medsight.eval.benchmarks.manifest import load_manifest
from medsight.eval.synthetic_benchmarks import write_synthetic_benchmarks
from medsight.io_utils import safe_name


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paths") / "data"
    generate_dataset(root, DataConfig(train_images=4, val_images=2, test_images=6, seed=3))
    return root


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("bad", ["../../secret.png", "/etc/passwd", "sub/../../x.png", "C:\\\\Windows\\\\x.png", "~/x.png"])
def test_resolve_under_refuses_paths_that_leave_the_root(tmp_path, bad):
    with pytest.raises(DataError, match=r"^train\.json: images\[0\]\.file_name: "):
        resolve_under(tmp_path, bad, "train.json: images[0].file_name")


def test_resolve_under_follows_links_only_inside_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "images" / "real.png").write_bytes(b"x")
    (root / "images" / "inside.png").symlink_to(root / "images" / "real.png")
    (root / "images" / "escape.png").symlink_to(outside / "secret.png")
    assert resolve_under(root, "images/inside.png", "f") == root / "images" / "inside.png"
    with pytest.raises(DataError, match=r"f: 'images/escape.png' is a symlink to .*outside the data folder"):
        resolve_under(root, "images/escape.png", "f")
    # A root the user names (a shared DVC cache, say) is allowed.
    assert resolve_under(root, "images/escape.png", "f", allowed=[outside]).name == "escape.png"


def _rewrite(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field", ["file_name", "mask_file"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_biomedparse_reader_never_reads_outside_its_root(dataset, tmp_path, field, how):
    data = tmp_path / "data"
    shutil.copytree(dataset / "biomedparse", data / "biomedparse")
    secret = tmp_path / "secret.png"
    secret.write_bytes((data / "biomedparse" / "train" / next(iter(sorted(
        p.name for p in (data / "biomedparse" / "train").glob("*.png"))))).read_bytes())
    index = data / "biomedparse" / "train.json"
    entries = "images" if field == "file_name" else "annotations"
    folder = data / "biomedparse" / ("train" if field == "file_name" else "train_mask")
    original = json.loads(index.read_text())[entries][0][field]
    if how == "symlink":
        (folder / original).unlink()
        (folder / original).symlink_to(secret)
        value = original
    else:
        value = "../../../secret.png" if how == "dotdot" else str(secret)
    _rewrite(index, lambda d: d[entries][0].__setitem__(field, value))
    with pytest.raises(DataError, match=rf"train\.json: {entries}\[0\]\.{field}: .*"):
        read_biomedparse(data / "biomedparse", "train", Taxonomy.synthetic())


@pytest.mark.parametrize("key", ["image", "mask_files"])
@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_conversation_reader_never_reads_outside_its_root(dataset, tmp_path, key, how):
    secret = tmp_path / "secret.png"  # exists: the pre-fix reader read it silently
    shutil.copy(next((dataset / "biomedparse" / "train").glob("*.png")), secret)
    conversations = tmp_path / "conv.json"
    image = next((dataset / "biomedparse" / "train").glob("*.png")).relative_to(dataset).as_posix()
    entry = {"id": "c1", "image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                           {"from": "gpt", "value": "a"}]}
    outside = os.path.relpath(secret, dataset) if how == "dotdot" else str(secret)
    entry[key] = outside if key == "image" else [outside]
    conversations.write_text(json.dumps([entry]))
    reason = "leaves the data folder" if how == "dotdot" else "absolute path"
    with pytest.raises(DataError, match=rf"conv\.json: entry 0\.{key}: .*{reason}"):
        read_conversations(conversations, dataset)


def test_benchmark_image_paths_stay_under_their_root(dataset, tmp_path):
    manifest = write_synthetic_benchmarks(dataset, tmp_path / "bench", Taxonomy.synthetic())
    vqa = tmp_path / "bench" / "vqa_rad" / "test.json"
    _rewrite(vqa, lambda entries: entries[0].__setitem__("image", "../../../../etc/hostname"))
    with pytest.raises(BenchmarkFormatError, match=r"test\.json: entry .*leaves the data folder"):
        load_manifest(manifest, only=["vqa_rad"])


@pytest.mark.parametrize("name,expected", [("../../x", "x"), ("..", "item"), (".hidden/a b", "hidden_a_b"),
                                           ("vqa_rad", "vqa_rad"), ("a/../../b", "a_.._.._b")])
def test_safe_name_is_one_harmless_path_component(name, expected):
    assert safe_name(name) == expected
    assert "/" not in safe_name(name) and safe_name(name) not in (".", "..")


def test_benchmark_names_from_a_manifest_never_write_outside_out(dataset, tmp_path):
    from medsight.eval.stage import evaluate_model

    work = tmp_path / "work"
    manifest = write_synthetic_benchmarks(dataset, work / "bench", Taxonomy.synthetic())
    _rewrite(manifest, lambda d: [spec.__setitem__("name", "../../escaped") for spec in d["benchmarks"]
                                  if spec["name"] == "diagseg"])
    before = files_under(tmp_path)
    out = work / "out"
    config = get_preset("tiny")
    config.evaluate.report_samples = 2
    evaluate_model(FakeModel(), manifest, out, config, {"model": "fake"}, progress=False)
    created = files_under(tmp_path) - before
    assert created and all(path.startswith("work/out/") for path in created), sorted(created)[:5]
    assert any(path.startswith("work/out/overlays/escaped/") for path in created)
    results = json.loads((out / "results.json").read_text())
    assert "../../escaped" in results["benchmarks"]  # the name itself is kept as data, only paths are safe

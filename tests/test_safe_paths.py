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
from medsight.data.errors import DataError
from medsight.data.llava import read_conversations
from medsight.data.prepared_index import read_split
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


@pytest.mark.parametrize("field", ["image", "mask"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_prepared_index_never_reads_outside_its_root(dataset, tmp_path, field, how):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    secret = tmp_path / "secret.png"
    index = data / "biomedparse" / "train.jsonl"
    lines = index.read_text().splitlines()
    entry = json.loads(lines[0])
    original = entry["image"] if field == "image" else entry["regions"][0]["mask"]
    secret.write_bytes((data / original).read_bytes())
    if how == "symlink":
        (data / original).unlink()
        (data / original).symlink_to(secret)
        value = original
    else:
        value = os.path.relpath(secret, data) if how == "dotdot" else str(secret)
    if field == "image":
        entry["image"] = value
    else:
        entry["regions"][0]["mask"] = value
    index.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=rf"train\.jsonl:1: {'image' if field == 'image' else 'regions.mask'}: .*"):
        read_split(data, "train", Taxonomy.load(data / "taxonomy.json"))


def test_prepared_index_may_point_into_the_release_it_indexed(dataset, tmp_path):
    """`data prepare` indexes a release in place: ../ into that release (declared in the prepare
    report) is fine, ../ anywhere else is not."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    shutil.move(str(data / "raw"), str(tmp_path / "release"))
    index = data / "biomedparse" / "train.jsonl"
    index.write_text(index.read_text().replace('"raw/', '"../release/'))
    report = data / "reports" / "biomedparse.json"
    original = report.read_text()
    report.write_text(json.dumps({**json.loads(original), "source": "../release/biomedparse"}))
    taxonomy = Taxonomy.load(data / "taxonomy.json")
    records = read_split(data, "train", taxonomy)
    assert records and all((tmp_path / "release") in r.image_path.resolve().parents for r in records)
    report.write_text(json.dumps({**json.loads(original), "source": "../elsewhere"}))
    with pytest.raises(DataError, match="leaves the data folder"):
        read_split(data, "train", taxonomy)


@pytest.mark.parametrize("key", ["image", "mask_files"])
@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_conversation_reader_never_reads_outside_its_root(dataset, tmp_path, key, how):
    secret = tmp_path / "secret.png"  # exists: the pre-fix reader read it silently
    some_image = next((dataset / "raw" / "biomedparse").rglob("train/*.png"))
    shutil.copy(some_image, secret)
    conversations = tmp_path / "conv.json"
    image = some_image.relative_to(dataset).as_posix()
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
    vqa = next((tmp_path / "bench" / "vqa_rad").glob("*.json"))  # VQA-RAD's original release file
    _rewrite(vqa, lambda entries: [entry.__setitem__("image_name", "../../../../etc/hostname") for entry in entries])
    with pytest.raises(BenchmarkFormatError, match=r"Public\.json: entry .*leaves the data folder"):
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

"""The label space: synthetic default, taxonomy.json files, resolution, and the config check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.config.presets import get_preset
from medsight.config.schema import DataConfig
from medsight.data.image_io import DataError
from medsight.data.prepare.biomedparse import BiomedParseOptions, prepare_biomedparse
from medsight.data.prepare.report import PrepareError
from medsight.data.prepared_index import read_split
from medsight.data.synthetic import generate_dataset
from medsight.data.taxonomy import (
    FROM_DATA,
    TAXONOMY_FILE,
    Taxonomy,
    TaxonomyError,
    check_model_matches,
    resolve_taxonomy,
)
from medsight.data.taxonomy_template import TaxonomyTemplate, shipped_templates
from medsight.eval.benchmarks.common import EvalSample
from medsight.eval.runner import _modality_tensor
from medsight.model.bundle import save_modules, stage_taxonomy
from medsight.model.vision_modules import new_codebook, new_perceiver
from medsight.stages.segmentation_data import load_split

# The module constants this replaced; tiny checkpoints index into exactly these.
OLD_MODALITIES = ("CT", "MRI", "X-Ray", "Ultrasound", "Dermoscopy", "Pathology")
OLD_REGION_CLASSES = (
    "liver", "kidney", "tumor", "cyst", "brain", "ventricle", "edema", "left lung", "right lung",
    "nodule", "effusion", "gland", "skin", "melanoma", "nevus", "inflammation",
)
OLD_LESIONS = {"tumor", "cyst", "edema", "nodule", "effusion", "melanoma", "nevus", "inflammation"}

FUNDUS = {"modalities": ["CT", "Fundus"], "region_classes": ["liver", "optic disc", "optic cup"],
          "lesion_classes": []}


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_synthetic_equals_the_old_constants() -> None:
    taxonomy = Taxonomy.synthetic()
    assert taxonomy.modalities == OLD_MODALITIES
    assert taxonomy.region_classes == OLD_REGION_CLASSES
    assert taxonomy.lesion_classes == OLD_LESIONS
    assert taxonomy.modality_index("X-Ray") == 2 and taxonomy.class_index("left lung") == 7
    tiny = get_preset("tiny")
    assert tiny.model.perceiver.num_classes == len(OLD_REGION_CLASSES) == 16
    assert tiny.model.codebook.num_modalities == len(OLD_MODALITIES) == 6
    full = get_preset("full")
    assert full.model.codebook.num_modalities == full.model.perceiver.num_classes == FROM_DATA


def test_save_load_round_trip(tmp_path: Path) -> None:
    original = Taxonomy.from_dict(FUNDUS | {"lesion_classes": ["optic cup"]}, "test")
    original.save(tmp_path / "t.json")
    loaded = Taxonomy.load(tmp_path / "t.json")
    assert loaded == original and loaded.source == str(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["lesion_classes"] == ["optic cup"]
    synthetic = Taxonomy.synthetic()
    synthetic.save(tmp_path / "s.json")
    assert Taxonomy.load(tmp_path / "s.json") == synthetic


@pytest.mark.parametrize(
    "content, key",
    [
        ({"region_classes": ["a"], "lesion_classes": []}, "modalities"),
        ({"modalities": ["CT"], "lesion_classes": []}, "region_classes"),
        ({"modalities": ["CT"], "region_classes": ["a"]}, "lesion_classes"),
        ({"modalities": [], "region_classes": ["a"], "lesion_classes": []}, "modalities"),
        ({"modalities": ["CT", "CT"], "region_classes": ["a"], "lesion_classes": []}, "modalities"),
        ({"modalities": ["CT"], "region_classes": ["a", "b", "a"], "lesion_classes": []}, "region_classes"),
        ({"modalities": ["CT"], "region_classes": ["a"], "lesion_classes": ["tumor"]}, "lesion_classes"),
        ({"modalities": "CT", "region_classes": ["a"], "lesion_classes": []}, "modalities"),
        ({"modalities": ["CT"], "region_classes": ["a", ""], "lesion_classes": []}, "region_classes"),
        ({"modalities": ["CT"], "region_classes": ["a"], "lesion_classes": [], "extra": 1}, "extra"),
    ],
)
def test_bad_taxonomy_names_file_and_key(tmp_path: Path, content, key: str) -> None:
    path = _write_json(tmp_path / "taxonomy.json", content)
    with pytest.raises(TaxonomyError) as error:
        Taxonomy.load(path)
    assert str(path) in str(error.value) and repr(key) in str(error.value)


def test_missing_file_and_bad_json_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match=r"nope\.json: taxonomy file does not exist"):
        Taxonomy.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TaxonomyError, match=r"bad\.json: invalid JSON"):
        Taxonomy.load(bad)
    with pytest.raises(TaxonomyError, match=r"list\.json: expected a JSON object"):
        Taxonomy.load(_write_json(tmp_path / "list.json", ["CT"]))


def test_resolve_prefers_setting_then_dataset_file_then_synthetic(tmp_path: Path) -> None:
    assert resolve_taxonomy(tmp_path) == Taxonomy.synthetic()
    _write_json(tmp_path / TAXONOMY_FILE, FUNDUS)
    assert resolve_taxonomy(tmp_path).modalities == ("CT", "Fundus")
    _write_json(tmp_path / "fine.json", FUNDUS | {"modalities": ["CT", "Fundus", "OCT"]})
    assert resolve_taxonomy(tmp_path, "fine.json").modalities == ("CT", "Fundus", "OCT")
    assert resolve_taxonomy(tmp_path, str(tmp_path / "fine.json")).modalities[-1] == "OCT"
    with pytest.raises(TaxonomyError, match=r"missing\.json: taxonomy file does not exist.*data\.taxonomy"):
        resolve_taxonomy(tmp_path, "missing.json")


def test_synthetic_dataset_ships_its_taxonomy(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "data", DataConfig(image_size=32, train_images=2, val_images=1, test_images=1))
    assert Taxonomy.load(tmp_path / "data" / TAXONOMY_FILE) == Taxonomy.synthetic()
    assert resolve_taxonomy(tmp_path / "data") == Taxonomy.synthetic()


def _fundus_release(root: Path) -> Path:
    """A one-image BiomedParse sub-dataset (published layout) outside the synthetic modalities."""
    bmp = root / "Eye"
    (bmp / "train").mkdir(parents=True)
    (bmp / "train_mask").mkdir()
    stem = "eye7_Fundus_retina"
    Image.new("RGB", (32, 32), (120, 40, 20)).save(bmp / "train" / f"{stem}.png")
    annotations = []
    for index, (target, radius) in enumerate((("optic disc", 8), ("optic cup", 4))):
        yy, xx = np.mgrid[0:32, 0:32]
        pixels = (((yy - 16) ** 2 + (xx - 16) ** 2) < radius**2).astype(np.uint8) * 255
        mask_name = f"{stem}_{target.replace(' ', '+')}.png"
        Image.fromarray(pixels).save(bmp / "train_mask" / mask_name)
        annotations.append({"id": index, "image_id": 0, "file_name": f"{stem}.png", "mask_file": mask_name,
                            "category_id": index + 1, "sentences": [{"sent": f"{target} in retina fundus"}]})
    categories = [{"id": 1, "name": "optic disc"}, {"id": 2, "name": "optic cup"}]
    _write_json(bmp / "train.json", {"images": [{"id": 0, "file_name": f"{stem}.png"}],
                                     "annotations": annotations, "categories": categories})
    return root


def _prepare(release: Path, dest: Path, template: TaxonomyTemplate, **options) -> None:
    prepare_biomedparse(release, dest, BiomedParseOptions(val_fraction=0, workers=1, **options), template=template,
                        progress=False)


def test_real_modality_reads_when_the_taxonomy_lists_it(tmp_path: Path) -> None:
    release = _fundus_release(tmp_path / "release")
    _prepare(release, tmp_path / "data", TaxonomyTemplate.from_dict(FUNDUS, "fundus.json"))
    root = tmp_path / "data"
    taxonomy = resolve_taxonomy(root)
    (record,) = read_split(root, "train", taxonomy)
    assert (record.modality, record.modality_id) == ("Fundus", 1)
    assert [(r.class_name, r.class_id) for r in record.regions] == [("optic disc", 1), ("optic cup", 2)]
    split = load_split(root, "train", 16, 16, taxonomy)  # the stages' path to the same data
    sample = split[0]
    assert int(sample["modality"]) == 1 and sample["labels"].tolist() == [1, 2]


def test_real_modality_outside_the_taxonomy_fails_clearly(tmp_path: Path) -> None:
    release = _fundus_release(tmp_path / "release")
    with pytest.raises(PrepareError, match="1 of 1 entries are bad"):
        _prepare(release, tmp_path / "data", TaxonomyTemplate.from_taxonomy(Taxonomy.synthetic()))
    report = json.loads((tmp_path / "data" / "reports" / "biomedparse.json").read_text())
    assert "unknown modality 'Fundus'" in report["problems"][0]["reason"]
    _prepare(release, tmp_path / "ok", TaxonomyTemplate.from_dict(FUNDUS, "fundus.json"))
    _write_json(tmp_path / "ok" / "other.json", FUNDUS | {"modalities": ["CT"]})
    with pytest.raises(DataError, match=rf"train\.jsonl:1: unknown modality 'Fundus'; known modalities: CT \(label space: .*other\.json"):
        read_split(tmp_path / "ok", "train", resolve_taxonomy(tmp_path / "ok", "other.json"))


def test_aliases_map_file_name_spellings(tmp_path: Path) -> None:
    template = TaxonomyTemplate.load("biomedparse-18")
    assert len(template.modalities) == 18 and template.region_classes is None
    assert template.find_modality("CT", "abdomen") == "CT-Abdomen"
    assert template.find_modality("CT", "lung") == "CT-Chest"
    assert template.find_modality("pathology", "colon") == "Pathology"
    assert template.find_modality("MRI-FLAIR", "brain") == "MRI-FLAIR-Brain"
    assert template.find_modality("ULTRASOUND", "Breast") == "Ultrasound-Breast"
    assert template.find_modality("CT", "toe") is None
    assert {"biomedparse-18", "biomedparse-9"} <= set(shipped_templates())
    assert TaxonomyTemplate.load("biomedparse-9").find_modality("mri-t1-gd", "brain") == "MRI"
    with pytest.raises(TaxonomyError, match="'aliases' maps to 'PET'"):
        Taxonomy.from_dict(FUNDUS | {"aliases": {"pet": "PET"}}, "x.json")
    with pytest.raises(TaxonomyError, match="taxonomy template"):
        Taxonomy.load(_write_json(tmp_path / "t.json", {"modalities": ["CT"]}))


def test_counts_come_from_the_data_unless_set(tmp_path: Path) -> None:
    eighteen = TaxonomyTemplate.load("biomedparse-18").complete(["liver", "liver tumor"], "prepared")
    config = get_preset("full")
    check_model_matches(config, eighteen)  # 0 = from the data
    assert (config.model.codebook.num_modalities, config.model.perceiver.num_classes) == (18, 2)
    assert eighteen.lesion_classes == {"liver tumor"}
    explicit = get_preset("full")
    explicit.model.codebook.num_modalities = 9
    with pytest.raises(ValueError, match=r"num_modalities=9 but the taxonomy \(prepared\) lists 18 modalities"):
        check_model_matches(explicit, eighteen)


def test_config_mismatch_names_key_file_and_numbers(tmp_path: Path) -> None:
    taxonomy = Taxonomy.from_dict(FUNDUS, str(tmp_path / TAXONOMY_FILE))
    config = get_preset("tiny")
    with pytest.raises(ValueError, match=r"model\.perceiver\.num_classes=16 .*taxonomy\.json.* lists 3 region_classes; set model\.perceiver\.num_classes=3"):
        new_perceiver(config, taxonomy)
    config.model.perceiver.num_classes = 3
    with pytest.raises(ValueError, match=r"model\.codebook\.num_modalities=6 .*taxonomy\.json.* lists 2 modalities; set model\.codebook\.num_modalities=2"):
        new_codebook(config, taxonomy)
    config.model.codebook.num_modalities = 2
    check_model_matches(config, taxonomy)
    assert new_codebook(config, taxonomy).num_modalities == 2
    full = get_preset("full")
    full.model.codebook.num_modalities = 18
    with pytest.raises(ValueError, match=r"num_modalities=18 .*lists 6 modalities"):
        check_model_matches(full, Taxonomy.synthetic())


def test_stage_refuses_modules_trained_on_another_taxonomy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_json(data / TAXONOMY_FILE, FUNDUS)
    save_modules(tmp_path / "perceiver", {}, Taxonomy.synthetic())
    config = get_preset("tiny")
    with pytest.raises(ValueError, match="differs from the one the input modules were trained with"):
        stage_taxonomy(config, {"data": data, "perceiver": tmp_path / "perceiver"})
    save_modules(tmp_path / "perceiver", {}, resolve_taxonomy(data))
    assert stage_taxonomy(config, {"data": data, "perceiver": tmp_path / "perceiver"}).modalities == ("CT", "Fundus")


def test_eval_maps_benchmark_modalities_onto_the_model_taxonomy() -> None:
    taxonomy = Taxonomy.from_dict(FUNDUS, "test")

    def sample(name: str | None) -> EvalSample:
        return EvalSample("b", "1", "closed", "q", "x", image_path=Path("a.png"), source_modality=name)

    assert _modality_tensor([sample("Fundus"), sample("CT(Computed Tomography)")], taxonomy).tolist() == [1, 0]
    assert _modality_tensor([sample("Fundus"), sample("MRI")], taxonomy) is None  # unknown: the model predicts
    assert _modality_tensor([sample("Fundus")], None) is None
    assert torch.equal(_modality_tensor([sample("MRI")], Taxonomy.synthetic()), torch.tensor([1]))

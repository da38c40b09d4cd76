"""`medsight predict`: PNG/JPEG and DICOM input (windowing), outputs, and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from eval_fakes import FakeModel
from medsight.data.image_io import DataError
from medsight.eval import cli
from medsight.eval.dicom_io import is_dicom, read_dicom
from medsight.eval.predict import load_input_image, predict_image, write_prediction


def write_dicom(path: Path, pixels: np.ndarray, samples: int = 1, pixel_data: bool = True, **tags) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_pixels() -> np.ndarray:
    """Stored values for HU -160, 40, 240 (intercept -1024) in three columns."""
    hu = np.array([[-160, 40, 240]] * 4, dtype=np.int32)
    return (hu + 1024).astype(np.uint16)


def test_dicom_windowing_applied(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", ct_pixels(), RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    image = read_dicom(path)
    assert image.shape == (3, 4, 3)
    # Window [-160, 240]: -160 HU -> 0, 40 HU -> 0.5, 240 HU -> 1.
    assert image[0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert torch.equal(image[0], image[2])
    # Multi-valued window (several presets): the first one is used.
    multi = write_dicom(tmp_path / "multi.dcm", ct_pixels(), RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=[40, 500], WindowWidth=[400, 2000])
    assert read_dicom(multi)[0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_dicom_without_window_and_monochrome1(tmp_path):
    plain = write_dicom(tmp_path / "plain.dcm", np.array([[0, 50, 100]], dtype=np.uint16))
    assert read_dicom(plain)[0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])  # full range
    inverted = write_dicom(tmp_path / "m1", np.array([[0, 50, 100]], dtype=np.uint16), PhotometricInterpretation="MONOCHROME1")
    assert is_dicom(inverted)  # no extension: recognised by the DICM magic
    assert read_dicom(inverted)[0, 0].tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_dicom_rgb(tmp_path):
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    image = read_dicom(write_dicom(tmp_path / "rgb.dcm", pixels, samples=3))
    assert image.shape == (3, 2, 2) and image[0].min() == 1.0 and image[1].max() == 0.0


def test_bad_files_get_clear_errors(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not a dicom file at all")
    with pytest.raises(DataError, match="junk.dcm: not a readable DICOM"):
        read_dicom(junk)
    no_pixels = write_dicom(tmp_path / "sr.dcm", ct_pixels(), pixel_data=False)
    with pytest.raises(DataError, match="no pixel data"):
        read_dicom(no_pixels)
    two_channels = write_dicom(tmp_path / "two.dcm", np.zeros((2, 2, 2), dtype=np.uint8), samples=2)
    with pytest.raises(DataError, match="2 samples per pixel"):
        read_dicom(two_channels)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), "RGBA").save(rgba)
    with pytest.raises(DataError, match="4 channel"):
        load_input_image(rgba)
    with pytest.raises(DataError, match="does not exist"):
        load_input_image(tmp_path / "nope.png")


def test_predict_writes_answer_masks_overlays_boxes(tmp_path):
    source = tmp_path / "scan.png"
    array = np.zeros((40, 60), dtype=np.uint8)
    array[10:20, 30:50] = 255
    Image.fromarray(array).save(source)
    image = load_input_image(source)
    prediction = predict_image(FakeModel(), image, "Please segment the tumor.")
    assert prediction.region_tokens == ["[C0_1]"] and prediction.ignored_tokens == ["[C9_9]"]
    # Kept at the model's resolution (bounded memory); written at the image's own resolution below.
    assert prediction.masks.shape == (1, 32, 32)
    summary = write_prediction(tmp_path / "out", image, "Please segment the tumor.", prediction, source)
    out = tmp_path / "out"
    assert (out / "answer.txt").read_text().startswith("There is a tumor")
    region = summary["regions"][0]
    with Image.open(out / region["mask"]) as mask:
        assert mask.size == (60, 40)
    assert (out / region["overlay"]).is_file()
    boxes = json.loads((out / "boxes.json").read_text())
    x1, y1, x2, y2 = boxes[0]["box_xyxy_normalized"]
    assert (x1, y1, x2, y2) == pytest.approx((0.5, 0.25, 50 / 60, 0.5), abs=0.05)
    assert boxes[0]["box_xyxy_pixels"] == pytest.approx([30, 10, 50, 20], abs=2)


def test_predict_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_load_model", lambda checkpoint, base, device: FakeModel())
    dicom = write_dicom(tmp_path / "ct.dcm", ct_pixels(), RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    runner = CliRunner()
    result = runner.invoke(cli.eval_app, ["predict", "--checkpoint", str(tmp_path), "--image", str(dicom),
                                          "--question", "Please segment the lesion.", "--out", str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "pred" / "prediction.json").read_text())["region_tokens"] == ["[C0_1]"]
    junk = tmp_path / "bad.dcm"
    junk.write_bytes(b"nope")
    result = runner.invoke(cli.eval_app, ["predict", "--checkpoint", str(tmp_path), "--image", str(junk), "--question", "q"])
    assert result.exit_code == 1 and isinstance(result.exception, DataError)  # bad data: exit 1 via main()
    assert "not a readable DICOM" in str(result.exception)

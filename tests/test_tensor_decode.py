"""The device-decoding path (nvJPEG on CUDA), exercised on the CPU through torchvision's libjpeg."""

import io

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image, ImageOps

from featurekit.backbones.trunks import load_backbone
from featurekit.extraction.engine import extract
from featurekit.extraction.settings import ExtractSettings
from featurekit.images.decode import DecodePolicy
from featurekit.store.format import read_store
from featurekit.views.gpu_decode import apply_orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil_exif_transpose(orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif.tobytes())
    upright = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))

    ours = apply_orientation(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()

    assert np.array_equal(ours, upright)


def _mixed_folder(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 3, "b": 2}}, size=(50, 70))
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8), "L").save(root / "train" / "a" / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "train" / "b" / "plain.png")
    rotated = Image.fromarray(rng.integers(0, 256, (30, 80, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(root / "train" / "b" / "rotated.jpg", exif=exif.tobytes())
    good = (root / "train" / "a" / "img_00.jpg").read_bytes()
    (root / "train" / "a" / "cut.jpg").write_bytes(good[: len(good) // 3])  # valid header, truncated data
    return root


def test_tensor_decoder_matches_pil_decoder_and_reports_bad_files(tmp_path):
    root = _mixed_folder(tmp_path)
    backbone = load_backbone("resnet18", weights="random")
    common = dict(device="cpu", precision="fp32", dtype="float32", batch_size=4, num_workers=0, progress=False,
                  on_error="skip")

    pil_settings = ExtractSettings(decode=DecodePolicy(backend="pil"), **common)
    tensor_settings = ExtractSettings(decode=DecodePolicy(backend="torchvision"), **common)
    (pil,) = extract(root, ["train"], [backbone], tmp_path / "pil", pil_settings)
    (tensor,) = extract(root, ["train"], [backbone], tmp_path / "tensor", tensor_settings)

    a, b = read_store(pil.path), read_store(tensor.path)
    assert b.header.decode["backend"] == "torchvision" and a.header.decode["backend"] == "pil"
    assert a.paths == b.paths and "b/rotated.jpg" in b.paths and "b/plain.png" in b.paths
    assert [p for p, _ in b.skipped] == ["a/cut.jpg"] == [p for p, _ in a.skipped]
    # same decoder library underneath; only tensor vs PIL resizing rounds differently
    relative = np.linalg.norm(a.features - b.features, axis=1) / np.linalg.norm(a.features, axis=1)
    assert relative.max() < 0.05, relative


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_extraction_matches_cpu_features(tmp_path):
    root = _mixed_folder(tmp_path)
    backbone = load_backbone("resnet18", weights="random")
    common = dict(dtype="float32", batch_size=4, num_workers=2, progress=False, on_error="skip")

    def run(name: str, **settings):
        return extract(root, ["train"], [backbone], tmp_path / name, ExtractSettings(**settings, **common))[0]

    cpu = run("cpu", device="cpu", precision="fp32")
    fp32 = run("fp32", device="cuda", precision="fp32")
    bf16 = run("bf16", device="cuda")

    reference = read_store(cpu.path)
    for result, tolerance in ((fp32, 0.05), (bf16, 0.06)):
        store = read_store(result.path)
        assert store.paths == reference.paths and store.header.decode["backend"] == "torchvision"
        difference = np.linalg.norm(store.features - reference.features, axis=1)
        relative = difference / np.linalg.norm(reference.features, axis=1)
        assert relative.max() < tolerance, (result.path, relative)
    assert read_store(bf16.path).header.precision == "bf16"

"""Extraction end to end on a tiny real folder: store layout, alignment, determinism, atomicity."""

import dataclasses
import json

import h5py
import numpy as np
import pytest
import torch

from featurekit import cli, devices
from featurekit.backbones import runner
from featurekit.backbones.trunks import load_backbone
from featurekit.errors import StoreError, WriteError
from featurekit.extraction.engine import extract, shard
from featurekit.extraction.settings import ExtractSettings
from featurekit.store.format import read_store
from tests.conftest import committed_chunks

# float16 as pretrained weights get it (random weights would get float32 under the default dtype "auto")
SETTINGS = ExtractSettings(device="cpu", precision="fp32", dtype="float16", batch_size=2, chunk_size=2, num_workers=0,
                          progress=False)


@pytest.fixture(scope="module")
def resnet18():
    return load_backbone("resnet18", weights="random")


def test_store_round_trip_with_plain_h5py(tiny_folder, tmp_path, resnet18):
    results = extract(tiny_folder, ["train", "valid"], [resnet18], tmp_path / "features", SETTINGS)

    relative = [r.path.relative_to(tmp_path / "features").as_posix() for r in results]
    assert relative == ["train/resnet18.h5", "valid/resnet18.h5"]
    with h5py.File(tmp_path / "features" / "train" / "resnet18.h5", "r") as h5:
        features, labels = h5["features"][()], h5["labels"][()]
        paths = [p.decode("utf-8") for p in h5["paths"][()]]
        classes = [c.decode("utf-8") for c in h5["classes"][()]]
        attrs = dict(h5.attrs)
    expected = sorted(p.relative_to(tiny_folder / "train").as_posix() for p in (tiny_folder / "train").rglob("*.jpg"))
    assert paths == expected
    assert classes == ["cat", "dog"]
    assert [classes[label] for label in labels] == [p.split("/")[0] for p in paths]
    assert features.dtype == np.float16 and features.shape == (6, 512)
    assert np.isfinite(features).all() and features.std() > 0
    assert attrs["complete"] and attrs["format"] == "featurekit.store" and attrs["backbone"] == "resnet18"
    assert attrs["weights"] == "random" and len(attrs["weights_sha256"]) == 64
    assert json.loads(attrs["preprocessing"])["crop_size"] == 224
    assert attrs["split"] == "train" and attrs["n_listed"] == 6


def test_rows_are_identical_across_runs_and_settings(tiny_folder, tmp_path, resnet18):
    first = extract(tiny_folder, ["train"], [resnet18], tmp_path / "a", SETTINGS)[0]
    second = extract(tiny_folder, ["train"], [resnet18], tmp_path / "b",
                     dataclasses.replace(SETTINGS, batch_size=3, chunk_size=5, num_workers=1))[0]
    a, b = read_store(first.path), read_store(second.path)
    assert a.paths == b.paths and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32), rtol=2e-3, atol=1e-3)


def test_several_backbones_share_one_decode_and_line_up(tiny_folder, tmp_path, resnet18):
    lite = load_backbone("efficientnet_lite0", weights="random")
    results = extract(tiny_folder, ["valid"], [resnet18, lite], tmp_path / "features", SETTINGS)
    stores = [read_store(r.path) for r in results]
    assert stores[0].paths == stores[1].paths
    assert [s.features.shape[1] for s in stores] == [512, 1280]


def test_bf16_on_cpu_is_recorded_close_to_fp32_and_leaves_the_backbone_as_built(tiny_folder, tmp_path):
    lite = load_backbone("efficientnet_lite0", weights="random")  # BatchNorm to fold, ReLU6, depthwise convs
    before = {name: tensor.clone() for name, tensor in lite.trunk.state_dict().items()}
    settings = dataclasses.replace(SETTINGS, dtype="float32")
    fp32 = read_store(extract(tiny_folder, ["valid"], [lite], tmp_path / "fp32", settings)[0].path)
    bf16_settings = dataclasses.replace(settings, precision="bf16")
    bf16 = read_store(extract(tiny_folder, ["valid"], [lite], tmp_path / "bf16", bf16_settings)[0].path)

    assert (fp32.header.precision, bf16.header.precision) == ("fp32", "bf16")
    relative = np.linalg.norm(bf16.features - fp32.features, axis=1) / np.linalg.norm(fp32.features, axis=1)
    assert 0 < relative.max() < 0.05, relative
    after = lite.trunk.state_dict()  # the run cast and fused its own copy, not the caller's trunk
    assert after.keys() == before.keys()
    assert all(after[name].dtype == tensor.dtype and torch.equal(after[name], tensor)
               for name, tensor in before.items())


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    monkeypatch.setattr(devices, "native_bf16_cpu", lambda: False)
    assert ExtractSettings(device="cpu").resolved().precision == "fp32"
    assert devices.auto_precision("cuda:1") == "bf16"
    monkeypatch.setattr(devices, "native_bf16_cpu", lambda: True)
    assert ExtractSettings(device="cpu").resolved().precision == "bf16"
    assert ExtractSettings(device="cpu", precision="fp32").resolved().precision == "fp32"


def test_failure_mid_extraction_leaves_no_final_file(tiny_folder, tmp_path, resnet18, monkeypatch):
    calls = {"n": 0}
    real_forward = runner.TrunkRunner.forward

    def failing_forward(self, batch, *views):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_forward(self, batch, *views)

    monkeypatch.setattr(runner.TrunkRunner, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(tiny_folder, ["train"], [resnet18], tmp_path / "features", SETTINGS)

    final = tmp_path / "features" / "train" / "resnet18.h5"
    assert not final.exists()
    assert committed_chunks(final) == 2  # the work before the crash is kept
    with pytest.raises(StoreError, match="no such store"):
        read_store(final)


def test_failure_while_writing_the_hdf5_file_leaves_no_final_file(tiny_folder, tmp_path, resnet18, monkeypatch):
    import errno

    real = h5py.Group.create_dataset

    def disk_full(self, name, *args, **kwargs):
        if name == "classes":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", disk_full)
    with pytest.raises(WriteError, match="resnet18.h5: cannot write store .no space left on device"):
        extract(tiny_folder, ["valid"], [resnet18], tmp_path / "features", SETTINGS)
    folder = tmp_path / "features" / "valid"
    assert sorted(p.name for p in folder.iterdir()) == [".resnet18.partial"]  # no lock file left either


def test_shards_are_contiguous_and_cover_every_chunk_once():
    chunks = [(i, i + 1) for i in range(10)]
    parts = [shard(chunks, rank, 3) for rank in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sum(parts, []) == chunks


def test_cli_extract_info_and_list(tiny_folder, tmp_path, capsys):
    out = tmp_path / "features"
    assert cli.main(["extract", str(tiny_folder), "--backbone", "resnet18", "--weights", "random",
                     "--out", str(out), "--quiet", "--workers", "0", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "train/resnet18.h5  6 rows  written" in printed and "valid/resnet18.h5  4 rows  written" in printed
    assert cli.main(["info", str(out / "train" / "resnet18.h5")]) == 0
    info = capsys.readouterr().out
    assert "features float32[6, 512]" in info and "weights random" in info and "cat 3, dog 3" in info
    assert cli.main(["list-backbones"]) == 0
    assert "inception_v3" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["extract", str(tmp_path / "nowhere"), "--backbone", "resnet18", "--weights", "random",
                     "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "nowhere/train: split folder not found" in error

"""Pairings checked wherever features meet a head, names that needed escaping end to end, and
non-finite features never reaching a head."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import TUNE_ARGS, error_lines, run_cli, write_jpeg
from PIL import Image

from featurekit.backbones.runner import TrunkRunner
from featurekit.backbones.settings import RunSettings
from featurekit.backbones.trunks import load_backbone
from featurekit.views.augment import ViewPlan

RUN = ["--device", "cpu", "--workers", "0", "--quiet"]
EXTRACT = ["--backbone", "resnet18", "--precision", "fp32", "--batch-size", "4", *RUN]


def test_neighbors_refuses_stores_made_with_other_weights_than_the_heads(tiny, tmp_path, capsys):
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pt")
    other = tmp_path / "features"
    assert run_cli(capsys, "extract", tiny.data, "--split", "train", "valid", "--out", other, "--weights-path",
                   tmp_path / "other.pt", "--dtype", "float32", *EXTRACT).code == 0
    for extra in ([], ["--image", tiny.data / "valid"]):
        refused = run_cli(capsys, "neighbors", "--head", tiny.logreg, "--features", other, "--device", "cpu", *extra)
        [line] = error_lines(refused.err)
        assert refused.code == 1 and line.startswith(f"featurekit: error: {tiny.logreg}: resnet18 was trained on "
                                                     "weights random (sha256 ")
        assert line.endswith(f"but {other / 'train' / 'resnet18.h5'} (weights file:other.pt) has sha256 "
                             f"{line.rsplit('has sha256 ', 1)[1].split(';')[0]}; refusing to search it")
    assert run_cli(capsys, "neighbors", "--head", tiny.logreg, "--device", "cpu").code == 0  # its own stores


def test_predict_takes_escaped_and_non_utf8_class_and_file_names_as_extract_does(tmp_path, capsys):
    odd = {"c\\x": "c\\\\x", os.fsdecode(b"d\xff"): "d\\xff"}  # class folder -> the name stores and heads record
    data = tmp_path / "data"
    for split, count in (("train", 3), ("valid", 2)):
        for offset, folder in enumerate(odd):
            for i in range(count):
                write_jpeg(data / split / folder / os.fsdecode(b"img\xfe%d.jpg" % i), 100 * offset + 10 * i + count)
    features, head = tmp_path / "features", tmp_path / "head"
    assert run_cli(capsys, "extract", data, "--split", "train", "valid", "--out", features, "--weights", "random",
                   "--dtype", "float32", *EXTRACT).code == 0
    assert run_cli(capsys, "train-head", features, "--backbone", "resnet18", "--head", "logreg", "--out", head,
                   "--no-plots").code == 0
    out = tmp_path / "p.csv"
    result = run_cli(capsys, "predict", "--head", head, data / "valid", "--out", out, *RUN)
    assert result.code == 0, result.err
    assert "labelled images: accuracy" in result.out + result.err  # recognised as labelled by the escaped names
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert [row["path"].split("/valid/")[1] for row in rows] == [f"{shown}/img\\xfe{i}.jpg" for shown in
                                                                  sorted(odd.values()) for i in range(2)]
    assert list(rows[0])[2:] == [f"prob_{name}" for name in ("c\\\\x", "d\\xff")]
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["evaluation"]["n"] == 4


# --------------------------------------------------------------------------- non-finite features


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """(data root, weights file, query image): resnet18 weights scaled so that the data's features stay
    within float16 while the query's mirrored view passes 65504 and its plain view does not. With
    BatchNorm at its initial statistics the trunk is positively homogeneous, so scaling conv1 scales
    every feature."""
    from conftest import write_image_folder

    base = tmp_path_factory.mktemp("overflow")
    data = write_image_folder(base / "data", {"train": {"cat": 3, "dog": 3}, "valid": {"cat": 2, "dog": 2}})
    pixels = (np.random.default_rng(3).random((64, 64, 3)) > 0.5).astype(np.uint8) * 255
    pixels[:, :32] = 128  # noise on one side only: the mirrored view differs
    query = base / "query" / "q.png"
    query.parent.mkdir()
    Image.fromarray(pixels).save(query)
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, base / "unscaled.pt")
    images = [*sorted(data.rglob("*.jpg")), query]
    unscaled = _features(base / "unscaled.pt", images)
    plain, mirrored = unscaled[:, 0].max(), unscaled[-1, 1].max()
    assert mirrored > 1.02 * plain, "the query no longer tells the views apart"
    state["conv1.weight"] *= 65504 / float(np.sqrt(plain * mirrored))
    torch.save(state, base / "scaled.pt")
    with np.errstate(over="ignore"):  # the overflow is the point
        stored = _features(base / "scaled.pt", images).astype(np.float16)
    assert np.isfinite(stored[:, 0]).all() and np.isfinite(stored[:-1, 1]).all() and not np.isfinite(stored[-1]).all()
    return data, base / "scaled.pt", query


def _features(weights: Path, images) -> np.ndarray:
    backbone = load_backbone("resnet18", "DEFAULT", str(weights))
    runner = TrunkRunner([backbone], RunSettings(device="cpu", precision="fp32", dtype="float32", num_workers=0,
                                                 progress=False, on_error="skip").resolved())
    return runner.embed([(str(p), str(p)) for p in images], plan=ViewPlan(tta="flip")).features["resnet18"]


def test_a_test_time_view_that_overflows_is_skipped_by_predict_and_refused_by_extract(overflowing, tmp_path, capsys):
    data, weights, query = overflowing
    features, head = tmp_path / "features", tmp_path / "head"
    assert run_cli(capsys, "extract", data, "--split", "train", "valid", "--out", features, "--weights-path", weights,
                   "--dtype", "float16", *EXTRACT).code == 0
    assert run_cli(capsys, "train-head", features, "--backbone", "resnet18", "--head", "logreg", "--out", head,
                   "--no-plots").code == 0
    assert run_cli(capsys, "finetune", data, "--head", head, "--out", tmp_path / "model", "--unfreeze", "none",
                   *TUNE_ARGS).code == 0
    folder = tmp_path / "photos"
    shutil.copytree(data / "valid" / "cat", folder)
    shutil.copy(query, folder / "q.png")
    reason = "non-finite features in view 1 (0 is the plain one) (overflow of float16, the stores' dtype)"
    for classifier in (head, tmp_path / "model"):
        out = tmp_path / f"{classifier.name}.csv"
        result = run_cli(capsys, "predict", "--head", classifier, folder, "--out", out, "--tta", "flip", *RUN)
        assert result.code == 0, result.err
        assert f"skipped {folder / 'q.png'}: {reason}" in result.err
        text = out.read_text()
        assert "nan" not in text and "q.png" not in text and len(text.splitlines()) == 3  # header, two images
        assert json.loads(Path(f"{out}.json").read_text())["skipped"] == [{"path": str(folder / "q.png"),
                                                                           "reason": reason}]
    shutil.copy(query, data / "valid" / "cat" / "q.png")
    refused = run_cli(capsys, "extract", data, "--split", "valid", "--out", tmp_path / "tta", "--weights-path",
                      weights, "--dtype", "float16", "--tta", "flip", *EXTRACT)
    [line] = error_lines(refused.err)
    assert refused.code == 1 and "non-finite features_tta features for row" in line
    assert line.endswith("(overflow of float16: use --dtype float32)")
    followed = run_cli(capsys, "extract", data, "--split", "valid", "--out", tmp_path / "tta", "--weights-path",
                       weights, "--dtype", "float32", "--tta", "flip", *EXTRACT)
    assert followed.code == 0 and (tmp_path / "tta" / "valid" / "resnet18.h5").is_file()


def test_stores_with_other_augmented_views_join_on_their_plain_rows(tiny, tmp_path, capsys):
    features, head = tmp_path / "features", tmp_path / "head"
    shutil.copytree(tiny.features, features)
    common = [tiny.data, "--out", features, "--weights", "random", "--dtype", "float32", *EXTRACT]
    assert run_cli(capsys, "extract", *common, "--split", "train", "--augment", "2", "--overwrite").code == 0
    assert run_cli(capsys, "extract", *common, "--split", "train", "valid", "--node", "layer4",
                   "--augment", "3").code == 0
    train = ["train-head", features, "--backbone", "resnet18", "resnet18@layer4", "--head", "logreg", "--out", head,
             "--no-plots"]
    refused = run_cli(capsys, *train)
    assert refused.code == 1 and "extracted with other augment views (3 != 2)" in error_lines(refused.err)[0]
    assert run_cli(capsys, *train, "--no-augmented").code == 0  # the plain rows line up
    out = tmp_path / "p.csv"
    assert run_cli(capsys, "predict", "--head", head, tiny.data / "valid", "--out", out, *RUN).code == 0

"""predict end to end: real extraction (resnet18, random weights) -> stores -> head -> predict."""

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torchvision
from conftest import error_lines, write_image_folder

from featurekit import cli, devices
from featurekit.backbones.trunks import load_backbone
from featurekit.errors import HeadMismatchError
from featurekit.extraction.engine import extract
from featurekit.extraction.settings import ExtractSettings
from featurekit.heads.head_file import load_head, save_head
from featurekit.heads.train import train_head
from featurekit.predict.classify import head_features, predict_files
from featurekit.predict.outputs import write_predictions
from featurekit.store.format import read_store, store_path

SETTINGS = ExtractSettings(device="cpu", precision="fp32", batch_size=4, num_workers=0, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, features dir, head file) for a logreg head on resnet18 (random weights) features."""
    tmp = tmp_path_factory.mktemp("predict")
    root = write_image_folder(tmp / "data", {"train": {"cat": 3, "dog": 3}, "valid": {"cat": 2, "dog": 2}})
    extract(root, ["train", "valid"], [load_backbone("resnet18", weights="random")], tmp / "features", SETTINGS)
    train_head(tmp / "features", ["resnet18"], "logreg", tmp / "head", plots=False)
    return root, tmp / "features", tmp / "head" / "head.h5"


def test_predictions_match_the_head_on_the_stored_features(trained):
    root, features_dir, head_file = trained
    predictions = predict_files(head_file, [root / "valid"], SETTINGS)
    store = read_store(store_path(features_dir, "valid", "resnet18"))
    assert [p.split("/valid/")[1] for p in predictions.paths] == store.paths and predictions.errors == []
    head, metadata = load_head(head_file)
    assert predictions.classes == metadata["classes"] == ["cat", "dog"]
    np.testing.assert_allclose(predictions.proba, head.predict_proba(store.features), atol=1e-5)


def test_cli_csv_and_kaggle_forms_and_undecodable_files(trained, tmp_path, capsys):
    root, _, head_file = trained
    folder = tmp_path / "test"
    folder.mkdir()
    for stem, source in zip(("10", "2", "1"), sorted((root / "valid").rglob("*.jpg"))):
        shutil.copy(source, folder / f"{stem}.jpg")
    (folder / "3.jpg").write_bytes(b"")
    common = ["predict", "--head", str(head_file), "--device", "cpu", "--workers", "0", str(folder)]
    assert cli.main([*common, "--out", str(tmp_path / "p.csv")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "k.csv"), "--format", "kaggle-proba"]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "n.csv"), "--format", "kaggle"]) == 0
    assert "skipped " + str(folder / "3.jpg") + ": empty file" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["path", "predicted", "prob_cat", "prob_dog"] and len(rows) == 3
    for row in rows:
        assert row["predicted"] == ("dog" if float(row["prob_dog"]) > float(row["prob_cat"]) else "cat")
    kaggle = list(csv.reader(open(tmp_path / "k.csv")))
    by_stem = {r["path"].rsplit("/", 1)[1][:-4]: r for r in rows}
    assert kaggle == [["id", "label"], *([stem, by_stem[stem]["prob_dog"]] for stem in ("1", "2", "10"))]
    names = list(csv.reader(open(tmp_path / "n.csv")))  # any number of classes: the predicted class names
    assert names == [["id", "label"], *([stem, by_stem[stem]["predicted"]] for stem in ("1", "2", "10"))]


def test_refuses_a_head_trained_on_other_weights(trained, tmp_path, capsys):
    root, _, head_file = trained
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pt")
    code = cli.main(["predict", "--head", str(head_file), "--weights-path", f"resnet18={tmp_path / 'other.pt'}",
                     "--out", str(tmp_path / "p.csv"), str(root / "valid")])
    [error] = error_lines(capsys.readouterr().err)  # besides the warning about random weights
    assert code == 1 and not (tmp_path / "p.csv").exists()
    assert error.startswith(f"featurekit: error: {head_file}: resnet18 was trained on weights random (sha256 ")
    assert "file:other.pt" in error and error.endswith("refusing to predict")


def test_refuses_a_head_trained_with_other_preprocessing(trained, tmp_path):
    root, _, head_file = trained
    head, metadata = load_head(head_file)
    metadata["backbones"][0]["preprocessing"]["resize_size"] = 232
    save_head(tmp_path / "other.h5", head, metadata)
    with pytest.raises(HeadMismatchError,
                       match=r"resnet18 was trained with preprocessing \{.*\"resize_size\": 232.*refusing"):
        predict_files(tmp_path / "other.h5", [root / "valid"], SETTINGS)


def test_train_head_cli_writes_the_artifact(trained, tmp_path, capsys):
    _, features_dir, _ = trained
    assert cli.main(["train-head", str(features_dir), "--backbones", "resnet18", "--head", "knn",
                     "--out", str(tmp_path / "knn"), "--no-plots"]) == 0
    assert "knn head: valid accuracy" in capsys.readouterr().out
    assert load_head(tmp_path / "knn" / "head.h5")[1]["backbones"][0]["weights"] == "random"
    assert cli.main(["train-head", str(features_dir), "--backbones", "resnet18", "nope"]) == 1
    assert "nope.h5: no such store" in capsys.readouterr().err


@pytest.fixture(scope="module")
def float16_head(tmp_path_factory):
    """A logreg head on float16 stores extracted at fp32 (what a GPU-less default run could differ from)."""
    tmp = tmp_path_factory.mktemp("float16")
    root = write_image_folder(tmp / "data", {"train": {"cat": 3, "dog": 3}, "valid": {"cat": 2, "dog": 2}})
    settings = dataclasses.replace(SETTINGS, dtype="float16")
    extract(root, ["train", "valid"], [load_backbone("resnet18", weights="random")], tmp / "features", settings)
    train_head(tmp / "features", ["resnet18"], "logreg", tmp / "head", plots=False)
    return root, tmp / "features", tmp / "head" / "head.h5"


def test_predict_features_equal_the_store_rows_within_its_dtype(float16_head):
    root, features_dir, head_file = float16_head
    store = read_store(store_path(features_dir, "valid", "resnet18"))
    made = head_features(head_file, [root / "valid"], dataclasses.replace(SETTINGS, batch_size=3))
    assert [str(made.files[i]).split("/valid/")[1] for i in made.extracted.kept] == store.paths
    assert (made.settings.precision, made.settings.dtype) == ("fp32", "float16")
    rows = made.extracted.features["resnet18"]
    assert rows.dtype == np.float32 and np.array_equal(rows.astype(np.float16).astype(np.float32), rows)
    np.testing.assert_allclose(rows, store.features.astype(np.float32), rtol=1e-3, atol=1e-3)  # float16 rounding


def test_a_head_of_fp32_stores_runs_at_fp32_unless_asked(float16_head, tmp_path, capsys, monkeypatch):
    root, _, head_file = float16_head
    monkeypatch.setattr(devices, "native_bf16_cpu", lambda: True)  # where `auto` would pick bf16
    assert predict_files(head_file, [root / "valid"], SETTINGS).settings.precision == "fp32"
    common = ["predict", "--head", head_file, "--device", "cpu", "--workers", "0", root / "valid"]
    assert cli.main([str(a) for a in [*common, "--out", tmp_path / "p.csv"]]) == 0
    assert json.loads((tmp_path / "p.csv.json").read_text())["precision"] == "fp32"
    assert cli.main([str(a) for a in [*common, "--out", tmp_path / "b.csv", "--precision", "bf16"]]) == 0
    assert "(cpu, bf16)" in capsys.readouterr().out
    about = json.loads((tmp_path / "b.csv.json").read_text())
    assert about["precision"] == "bf16" and about["dtype"] == "float16" and about["rows"] == 4


def test_csv_cells_never_start_a_formula(trained, tmp_path, monkeypatch):
    root, _, head_file = trained
    monkeypatch.chdir(tmp_path)
    shutil.copy(next((root / "valid" / "cat").glob("*.jpg")), tmp_path / "=HYPERLINK(1).jpg")
    predictions = predict_files(head_file, ["=HYPERLINK(1).jpg"], SETTINGS)
    write_predictions(predictions, tmp_path / "p.csv", head_file)
    [row] = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert row["path"] == "'=HYPERLINK(1).jpg" and row["predicted"] in ("cat", "dog")

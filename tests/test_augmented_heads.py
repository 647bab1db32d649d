"""train-head on stores with augmented views, train-head --tta and predict --tta, on real stores.

The stores: resnet18 (random weights, fp32) over 40x32 JPEGs; train with K = 2 augmented views,
valid with flip test-time views; the same splits plain in another folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from featurekit.backbones.settings import RunSettings
from featurekit.cli import main
from featurekit.errors import HeadMismatchError, SettingsError
from featurekit.heads import mlp
from featurekit.heads.head_file import HEAD_FILE, load_head
from featurekit.heads.mlp import MLPHead
from featurekit.heads.train import train_head
from featurekit.predict.classify import predict_files
from featurekit.store.dataset import load_features
from featurekit.views.augment import CACHE_AUGMENT_POLICY
from tests.conftest import TINY_RUN, error_lines, make_folder, run_cli

FP32 = ("--precision", "fp32")
QUIET = {"plots": False}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data root, features with views, the same features without views)."""
    base = tmp_path_factory.mktemp("stores")
    data = make_folder(base / "data", "train", {"ants": 6, "bees": 6})
    make_folder(data, "valid", {"ants": 3, "bees": 3}, seed=1)
    for out, train_views, valid_views in ((base / "views", ("--augment", "2"), ("--tta", "flip")),
                                          (base / "plain", (), ())):
        for split, views in (("train", train_views), ("valid", valid_views)):
            assert main(["extract", str(data), "--split", split, "--out", str(out), *TINY_RUN, *FP32, *views]) == 0
    return data, base / "views", base / "plain"


def test_the_mlp_trains_each_epoch_on_one_view_of_each_image_the_plain_one_among_them(stores, monkeypatch):
    _, views_dir, _ = stores
    train = load_features(views_dir, "train", ["resnet18"], views=["features_aug"])
    seen = []
    real_epoch = mlp.train_epoch

    def recording_epoch(model, optimizer, X, *args):
        seen.append(X.float().numpy().copy())  # rows come in the compute dtype (bf16 where the CPU has it)
        dtypes.add(X.dtype)
        return real_epoch(model, optimizer, X, *args)

    dtypes = set()

    monkeypatch.setattr(mlp, "train_epoch", recording_epoch)
    views = train.views["features_aug"]
    head = MLPHead(max_epochs=12, hidden_sizes=(16,)).fit(train.features, train.labels, views=views)
    scale = head.scaler_.transform
    choices = np.stack([scale(train.features), *(scale(views[:, v]) for v in range(2))], 1)
    [dtype] = dtypes
    assert dtype == (torch.float32 if head.precision_ == "fp32" else torch.bfloat16)
    choices = torch.from_numpy(choices).to(dtype).float().numpy()  # as the rows were given to the epochs
    drawn = np.array([[int(np.flatnonzero(np.isclose(choices[i], rows[i], atol=1e-5).all(axis=1))[0])
                       for i in range(len(rows))] for rows in seen])  # [epoch, image] -> which view
    assert drawn.shape == (12, len(train)) and set(np.unique(drawn)) == {0, 1, 2}
    assert len({tuple(epoch) for epoch in drawn}) > 1  # another draw every epoch
    assert head.scaler_.n_samples_seen_ == len(train)  # standardised on the plain rows
    assert not hasattr(head, "_views")  # the views are not kept in the fitted head


def test_without_views_the_mlp_is_what_it_was(stores):
    """views=None draws nothing from the generator: the same head as before views existed."""
    _, views_dir, plain_dir = stores
    train = load_features(plain_dir, "train", ["resnet18"])
    a, b = (MLPHead(max_epochs=4, hidden_sizes=(16,)).fit(train.features, train.labels, **extra)
            for extra in ({}, {"views": None}))
    np.testing.assert_array_equal(a.predict_proba(train.features), b.predict_proba(train.features))
    with pytest.raises(SettingsError, match=r"views must be \[N, K, D\] = \[12, K, 512\], not \[12, 512\]"):
        MLPHead().fit(train.features, train.labels, views=train.features)


@pytest.mark.parametrize("kind, rows", [("mlp", 12), ("logreg", 36), ("knn", 36), ("svm", 36)])
def test_train_head_uses_the_views_and_no_augmented_is_the_plain_store(kind, rows, stores, tmp_path):
    _, views_dir, plain_dir = stores
    report = train_head(views_dir, ["resnet18"], kind, tmp_path / "views", params={}, **QUIET)
    assert report["augmented"]["used"] and report["augmented"]["views"] == 2
    assert report["train"]["rows_fitted"] == rows
    head, metadata = load_head(tmp_path / "views" / HEAD_FILE)
    assert metadata["augmented"]["policy"] == CACHE_AUGMENT_POLICY
    if head.scaler_ is not None:
        assert head.scaler_.n_samples_seen_ == rows  # the linear heads and kNN fit on all plain + view rows
    if kind == "knn":
        assert len(head.model_.rows) == rows

    ignored = train_head(views_dir, ["resnet18"], kind, tmp_path / "ignored", augmented=False, **QUIET)
    plain = train_head(plain_dir, ["resnet18"], kind, tmp_path / "plain", **QUIET)
    assert not ignored["augmented"]["used"] and ignored["train"]["rows_fitted"] == 12 and plain["augmented"] is None
    valid = load_features(plain_dir, "valid", ["resnet18"]).features
    np.testing.assert_array_equal(load_head(tmp_path / "ignored" / HEAD_FILE)[0].predict_proba(valid),
                                  load_head(tmp_path / "plain" / HEAD_FILE)[0].predict_proba(valid))


def test_train_head_tta_scores_the_averaged_probabilities_and_selects_on_plain_rows(stores, tmp_path):
    _, views_dir, _ = stores
    report = train_head(views_dir, ["resnet18"], "logreg", tmp_path / "head", tta="flip", **QUIET)
    head, _ = load_head(tmp_path / "head" / HEAD_FILE)
    valid = load_features(views_dir, "valid", ["resnet18"], views=["features_tta"])
    proba = (head.predict_proba(valid.features) + head.predict_proba(valid.views["features_tta"][:, 0])) / 2
    assert report["valid_tta"]["accuracy"] == pytest.approx((proba.argmax(1) == valid.labels).mean())
    assert report["valid_tta"]["log_loss"] == pytest.approx(-np.log(proba[np.arange(6), valid.labels]).mean())
    names = np.array(valid.classes)[valid.labels]
    assert report["valid"]["accuracy"] == pytest.approx((head.predict(valid.features) == names).mean())
    assert report["choice"]["heads"][0]["val_accuracy"] == report["valid"]["accuracy"]  # selection saw the plain rows
    written = (tmp_path / "head" / "report.md").read_text()
    assert "valid with flip test-time augmentation (probabilities averaged over 2 views)" in written
    assert json.loads((tmp_path / "head" / "report.json").read_text())["valid_tta"]["mode"] == "flip"


def test_train_head_tta_needs_valid_stores_with_those_views(stores, capsys):
    _, views_dir, plain_dir = stores
    for features_dir, mode, held in ((plain_dir, "flip", "no test-time views"), (views_dir, "five-crop", "flip")):
        result = run_cli(capsys, "train-head", features_dir, "--backbone", "resnet18", "--head", "logreg",
                         "--tta", mode, "--no-plots")
        assert result.code == 1
        [line] = error_lines(result.err)
        assert f"valid/resnet18.h5: holds {held}" in line and f"--split valid --tta {mode}" in line


def test_predict_tta_averages_over_the_views_train_head_scored(stores, tmp_path, capsys):
    data, views_dir, _ = stores
    out = tmp_path / "head"
    result = run_cli(capsys, "train-head", views_dir, "--backbone", "resnet18", "--head", "logreg", "--tta", "flip",
                     "--out", out, "--no-plots")
    assert result.code == 0 and "with flip test-time augmentation" in result.out
    settings = RunSettings(device="cpu", batch_size=2, num_workers=0, progress=False)  # the store's batches
    predictions = predict_files(out, [data / "valid"], settings, tta="flip")
    head, _ = load_head(out / HEAD_FILE)
    valid = load_features(views_dir, "valid", ["resnet18"], views=["features_tta"])
    stored = (head.predict_proba(valid.features) + head.predict_proba(valid.views["features_tta"][:, 0])) / 2
    np.testing.assert_allclose(predictions.proba, stored, rtol=1e-6, atol=1e-9)
    plain = predict_files(out, [data / "valid"], settings)
    np.testing.assert_allclose(plain.proba, head.predict_proba(valid.features), rtol=1e-6, atol=1e-9)
    assert not np.allclose(plain.proba, predictions.proba)

    cli = run_cli(capsys, "predict", "--head", out, data / "valid", "--tta", "five-crop", "--out", tmp_path / "p.csv",
                  "--workers", "0", "--quiet", "--no-plots")
    assert cli.code == 0, cli.err
    assert json.loads((tmp_path / "p.csv.json").read_text())["tta"] == "five-crop"


def test_predict_tta_refuses_a_head_of_stores_decoded_on_the_gpu_path(stores, tmp_path, capsys):
    data, _, _ = stores
    features = tmp_path / "features"
    for split in ("train", "valid"):
        assert main(["extract", str(data), "--split", split, "--out", str(features), *TINY_RUN, *FP32,
                     "--decoder", "torchvision"]) == 0
    assert main(["train-head", str(features), "--backbone", "resnet18", "--head", "logreg", "--no-plots"]) == 0
    with pytest.raises(HeadMismatchError, match=r"decoded with torchvision .nvJPEG. and flip test-time views are "
                                                r"cut from PIL-decoded images; extract with --decoder pil"):
        predict_files(features / "heads" / "logreg-resnet18", [data / "valid"], tta="flip")
    shutil.rmtree(features)

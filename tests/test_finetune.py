"""finetune on real tiny runs: generated JPEGs, resnet18 / efficientnet_lite0 with random weights, CPU, fp32."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import signal
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from featurekit import files
from featurekit.backbones.settings import RunSettings
from featurekit.backbones.trunks import load_backbone
from featurekit.errors import FinetuneError, HeadFileError
from featurekit.extraction.engine import extract
from featurekit.extraction.settings import ExtractSettings
from featurekit.finetuning.run import CHECKPOINT_FILE, finetune, prepare
from featurekit.finetuning.settings import FinetuneSettings
from featurekit.heads.head_file import load_head, save_head
from featurekit.heads.train import train_head
from featurekit.predict.classify import predict_files
from featurekit.store.dataset import load_features
from featurekit.store.format import read_header, read_store, store_path
from tests.conftest import error_lines, run_cli, run_subprocess, write_image_folder

EXTRACT = ExtractSettings(device="cpu", precision="fp32", batch_size=4, num_workers=0, dtype="float32", progress=False)
TUNE = FinetuneSettings(device="cpu", precision="fp32", batch_size=4, num_workers=0, progress=False, plots=False,
                        epochs=1)
TUNE_ARGS = ["--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--workers", "0", "--quiet", "--no-plots"]
SMALL = "layer4.1.conv2"  # the last convolution of resnet18 and what follows it: 2.4M parameters to train


def tiny_run(tmp: Path, classes: list[str], heads: list[str], backbones: tuple[str, ...] = ("resnet18",),
             dtype: str = "float32") -> tuple[Path, Path, dict[str, Path]]:
    """(data root, features dir, {kind: head file}) of heads trained on a real extraction."""
    layout = {"train": dict.fromkeys(classes, 4), "valid": dict.fromkeys(classes, 2)}
    root = write_image_folder(tmp / "data", layout)
    settings = dataclasses.replace(EXTRACT, dtype=dtype)
    built = [load_backbone(name, weights="random") for name in backbones]
    extract(root, ["train", "valid"], built, tmp / "features", settings)
    made = {}
    for kind in heads:
        params = {"max_epochs": 3} if kind == "mlp" else {}
        train_head(tmp / "features", backbones, kind, tmp / kind, params=params, plots=False)
        made[kind] = tmp / kind / "head.h5"
    return root, tmp / "features", made


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("binary"), ["cat", "dog"], ["logreg", "mlp", "svm", "knn"])


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("three"), ["ant", "bee", "wasp"], ["logreg", "mlp", "svm"])


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("lite"), ["cat", "dog"], ["logreg"], ("efficientnet_lite0",), "float16")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A head over two backbones with different views (bilinear and bicubic resizing)."""
    return tiny_run(tmp_path_factory.mktemp("pair"), ["cat", "dog"], ["logreg"], ("efficientnet_lite0", "resnet18"))


def trainable(model) -> set[str]:
    return {name for name, p in model.trunks[0].body.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("run, kind, unfreeze, tolerance", [
    ("binary", "logreg", "none", 1e-5), ("binary", "svm", SMALL, 1e-5), ("binary", "mlp", "all", 1e-5),
    ("three", "logreg", "layer4", 1e-5), ("three", "svm", "none", 1e-5), ("three", "mlp", SMALL, 1e-5),
    ("lite", "logreg", "_blocks.15", 1e-3),  # float16 store: within its rounding
])
def test_before_the_first_step_the_model_is_the_head(request, run, kind, unfreeze, tolerance):
    root, features, heads = request.getfixturevalue(run)
    prepared = prepare(heads[kind], root, dataclasses.replace(TUNE, unfreeze=(unfreeze,)))
    evaluation = prepared.trainer.evaluate({})
    store = read_store(store_path(features, "valid", prepared.backbones[0].name))
    assert [prepared.trainer.valid.listing.records[i].path for i in evaluation.kept] == store.paths
    head_proba = prepared.head.predict_proba(store.features)
    np.testing.assert_allclose(evaluation.proba, head_proba, rtol=0, atol=tolerance)
    assert np.array_equal(evaluation.proba.argmax(axis=1), head_proba.argmax(axis=1))
    assert bool(trainable(prepared.trainer.model)) == (unfreeze != "none")


def test_a_head_over_two_backbones_is_their_trunks_in_its_column_order(pair):
    root, features, heads = pair
    settings = dataclasses.replace(TUNE, unfreeze=("none", f"resnet18={SMALL}"))
    prepared = prepare(heads["logreg"], root, settings)
    model = prepared.trainer.model
    assert model.store_names == ["efficientnet_lite0", "resnet18"] and len(model.preprocessings) == 2
    assert [bool(part.parameters) for part in model.parts] == [False, True]
    evaluation = prepared.trainer.evaluate({})
    stored = load_features(features, "valid", ["efficientnet_lite0", "resnet18"])
    np.testing.assert_allclose(evaluation.proba, prepared.head.predict_proba(stored.features), rtol=0, atol=1e-5)
    with pytest.raises(FinetuneError, match=r"--unfreeze vgg19=all: the head has no backbone 'vgg19' "
                                            r"\(efficientnet_lite0, resnet18\)"):
        prepare(heads["logreg"], root, dataclasses.replace(TUNE, unfreeze=("vgg19=all",)))


def test_only_the_part_from_the_node_on_trains_and_frozen_batchnorm_stays_in_eval_mode(binary):
    root, _, heads = binary
    model = prepare(heads["logreg"], root, dataclasses.replace(TUNE, unfreeze=("layer4",))).trainer.model
    expected = {name for name, _ in torchvision.models.resnet18().named_parameters() if name.startswith("layer4.")}
    assert trainable(model) == expected
    modules = dict(model.trunks[0].body.named_modules())
    assert "bn1" not in modules and "layer1.0.bn1" not in modules  # folded into the convolutions, as extract does
    norms = [m for name, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(name.startswith("layer4.") for name, m in modules.items() if isinstance(m, nn.BatchNorm2d))
    model.train()
    assert model.head.training and not any(m.training for m in norms)
    updated = prepare(heads["logreg"], root, dataclasses.replace(TUNE, unfreeze=("layer4",), batchnorm="train"))
    updated.trainer.model.train()
    assert all(m.training for m in updated.trainer.model.trunks[0].body.modules() if isinstance(m, nn.BatchNorm2d))


def test_a_functional_trunk_unfreezes_its_weights_from_the_block_on(lite):
    root, _, heads = lite
    names = trainable(prepare(heads["logreg"], root, dataclasses.replace(TUNE, unfreeze=("_blocks.15",))).trainer.model)
    assert "_blocks.15._expand_conv.weight" in names and "_conv_head.weight" in names and "_bn1.weight" in names
    assert not any(name.startswith(("_blocks.14.", "_conv_stem", "_bn0")) for name in names)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(binary, tmp_path, capsys):
    root, _, heads = binary
    args = ["finetune", "--head", heads["mlp"].parent, root, "--unfreeze", SMALL, "--epochs", "2", *TUNE_ARGS]
    assert run_cli(capsys, *args, "--out", tmp_path / "whole").code == 0
    killed = run_subprocess(*args, "--out", tmp_path / "resumed", env={files.CRASH_ENV: "finetune-checkpointed:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "resumed" / CHECKPOINT_FILE).is_file() and not (tmp_path / "resumed" / "model.json").exists()
    resumed = run_cli(capsys, *args, "--out", tmp_path / "resumed")
    assert resumed.code == 0 and "after epoch 1 of 2" in resumed.err
    for name in ("trunks/resnet18.pt", "model.pt"):
        whole, again = (torch.load(tmp_path / run / name, weights_only=True) for run in ("whole", "resumed"))
        assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    histories = [json.loads((tmp_path / run / "report.json").read_text())["history"] for run in ("whole", "resumed")]
    values = [[[r.get(k) for k in ("epoch", "train_loss", "val_log_loss")] for r in history] for history in histories]
    assert values[0] == values[1] and len(values[0]) == 3

    other = run_cli(capsys, *args, "--out", tmp_path / "resumed", "--lr", "0.001")
    assert other.code == 1 and error_lines(other.err) == [other.err.strip()]
    assert "a checkpoint of another run (lr 0.0001 != 0.001)" in other.err and "--overwrite" in other.err


@pytest.fixture(scope="module")
def tuned(binary, tmp_path_factory):
    """(data root, features dir, head file, model folder, report) of a one-epoch fine-tune of the logreg head."""
    root, features, heads = binary
    out = tmp_path_factory.mktemp("tuned") / "model"
    report = finetune(heads["logreg"], root, out, dataclasses.replace(TUNE, unfreeze=(SMALL,), plots=True))
    return root, features, heads["logreg"], out, report


def test_the_report_has_the_head_as_epoch_zero_and_the_plots(tuned):
    _, _, _, out, report = tuned
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "confusion_matrix.png", "learning_curves.png",
                                                     "model.json", "model.pt", "report.json", "report.md", "trunks"]
    history = json.loads((out / "report.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [0, 1] and "train_loss" not in history[0]
    assert report["warm_start"]["compared"] and report["warm_start"]["same_predictions"] == 4
    assert history[0]["val_accuracy"] == report["warm_start"]["head_accuracy"] == report["head_valid_accuracy"]
    assert report["valid"]["accuracy"] == max(r["val_accuracy"] for r in history)
    markdown = (out / "report.md").read_text()
    assert "## Epochs" in markdown and "the head on its stored features" in report["notes"][0]
    assert "## Selection" not in markdown and "![learning curves](learning_curves.png)" in markdown
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert report["report_version"] == 3 and sorted(report["files"]) == written and "trunks/resnet18.pt" in written


def test_predict_runs_the_model_folder_on_image_files(tuned, tmp_path, capsys):
    root, _, _, out, report = tuned
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # the trunk file is found beside model.json wherever the folder is
    settings = RunSettings(device="cpu", num_workers=0, progress=False)
    predictions = predict_files(moved / "model.json", [root / "valid"], settings)
    labels = np.array([predictions.classes.index(Path(p).parent.name) for p in predictions.paths])
    assert predictions.settings.precision == "fp32" and len(labels) == report["valid"]["n"]
    assert float((predictions.proba.argmax(axis=1) == labels).mean()) == report["valid"]["accuracy"]
    loss = -np.log(predictions.proba[np.arange(len(labels)), labels]).mean()
    assert loss == pytest.approx(report["valid"]["log_loss"], abs=1e-5)

    names = tmp_path / "cat_to_name.json"
    names.write_text(json.dumps({"cat": "house cat", "dog": "good dog"}))
    common = ["predict", "--head", moved, "--device", "cpu", "--workers", "0", root / "valid"]
    labelled = run_cli(capsys, *common, "--out", tmp_path / "all.csv")
    assert labelled.code == 0 and f"accuracy {report['valid']['accuracy']:.4f} over 4 images" in labelled.out
    assert next(csv.reader(open(tmp_path / "all.csv"))) == ["path", "predicted", "prob_cat", "prob_dog"]
    assert run_cli(capsys, *common, "--out", tmp_path / "top.csv", "--topk", "2", "--class-names", names).code == 0
    rows = list(csv.reader(open(tmp_path / "top.csv")))
    assert rows[0] == ["path", "predicted", "top1", "top1_prob", "top2", "top2_prob"] and len(rows) == 5
    assert all(row[1] == row[2] and {row[2], row[4]} == {"house cat", "good dog"} and float(row[3]) >= float(row[5])
               for row in rows[1:])

    (tmp_path / "eels.json").write_text(json.dumps({"eel": "moray"}))
    for extra, message in [(["--topk", "0"], "--topk 0: give 1 or more"),
                           (["--class-names", tmp_path / "eels.json"], "name none of the head's classes (cat, dog)"),
                           (["--format", "kaggle-proba", "--class-names", names],
                            "--format kaggle-proba writes probabilities")]:
        refused = run_cli(capsys, *common, "--out", tmp_path / "refused.csv", *extra)  # before any image is read
        assert refused.code == 1 and message in refused.err, refused.err
    assert not list(tmp_path.glob("refused*"))


def test_head_is_the_file_or_the_folder_holding_head_h5_or_model_json(tuned, tmp_path, capsys):
    root, _, head_file, out, _ = tuned
    image = next((root / "valid" / "cat").glob("*.jpg"))
    common = ["predict", "--device", "cpu", "--workers", "0", "--quiet", image]
    found = {}
    for name, head in [("head", head_file.parent), ("model", out), ("model_file", out / "model.json")]:
        assert run_cli(capsys, *common, "--head", head, "--out", tmp_path / f"{name}.csv").code == 0
        found[name] = json.loads((tmp_path / f"{name}.csv.json").read_text())["head"]
    assert found == {"head": str(head_file), "model": str(out / "model.json"), "model_file": str(out / "model.json")}
    both = tmp_path / "both"
    shutil.copytree(out, both)
    shutil.copy(head_file, both / "head.h5")
    refused = run_cli(capsys, *common, "--head", both, "--out", tmp_path / "x.csv")
    assert error_lines(refused.err) == [f"featurekit: error: {both}: holds both head.h5 (train-head) and "
                                        "model.json (finetune); give the file meant"]
    (tmp_path / "heads").mkdir()
    shutil.copytree(out, tmp_path / "heads" / "tuned")
    shutil.copytree(head_file.parent, tmp_path / "heads" / "plain")
    listed = run_cli(capsys, *common, "--head", tmp_path / "heads", "--out", tmp_path / "x.csv")
    assert listed.code == 1 and "its subfolders with one: plain, tuned" in listed.err


def test_the_trunk_file_extracts_new_stores_and_old_ones_read_as_stale(tuned, tmp_path, capsys):
    root, features, head_file, out, _ = tuned
    trunk = out / "trunks" / "resnet18.pt"
    record = json.loads((out / "model.json").read_text())["backbones"][0]
    old = read_header(store_path(features, "valid", "resnet18"))
    assert record["weights_sha256"] != old.weights_sha256
    extract_args = ["extract", root, "--split", "valid", "--backbone", "resnet18", "--weights-path", trunk,
                    "--device", "cpu", "--precision", "fp32", "--dtype", "float32", "--workers", "0", "--quiet"]
    stale = run_cli(capsys, *extract_args, "--out", features)
    assert stale.code == 1 and "weights sha256" in stale.err and "--overwrite" in stale.err
    assert run_cli(capsys, *extract_args, "--out", tmp_path / "new").code == 0
    assert read_header(store_path(tmp_path / "new", "valid", "resnet18")).weights_sha256 == record["weights_sha256"]
    refused = run_cli(capsys, "predict", root / "valid", "--head", head_file, "--weights-path", f"resnet18={trunk}",
                      "--out", tmp_path / "p.csv")
    assert refused.code == 1 and "refusing to predict" in refused.err


def test_a_changed_model_file_is_refused(tuned, tmp_path):
    root, _, _, out, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "model.pt").write_bytes((copy / "model.pt").read_bytes()[:-1] + b"x")
    with pytest.raises(HeadFileError, match=r"model.json: its file model.pt was changed"):
        predict_files(copy, [root / "valid"], RunSettings(device="cpu", num_workers=0, progress=False))
    record = json.loads((copy / "model.json").read_text())
    del record["classifier_sha256"], record["backbones"]
    (copy / "model.json").write_text(json.dumps(record))
    with pytest.raises(HeadFileError, match=r"model.json: a fine-tuned model without classifier_sha256, backbones "
                                             r"\(damaged or edited\)$"):
        predict_files(copy, [root / "valid"])


def test_bad_input_is_one_line_before_any_work(binary, tmp_path, capsys):
    root, _, heads = binary
    other = write_image_folder(tmp_path / "other", {"train": {"cat": 2, "eel": 2}, "valid": {"cat": 1}})
    (tmp_path / "junk.h5").write_bytes(b"not a pickle at all")
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "model.json").write_text("{}")
    head, metadata = load_head(heads["logreg"])
    metadata["backbones"][0]["preprocessing"]["resize_size"] = 232  # features this trunk does not make
    save_head(tmp_path / "other.h5", head, metadata)
    cases = [
        ([heads["knn"], root], "a knn head cannot be fine-tuned (no gradient to follow); "
                               "heads that can: mlp, logreg, svm"),
        ([heads["logreg"], other], f"{other / 'train'}: classes differ from those of the head {heads['logreg']} "
                                   "(missing here: dog; not in the head: eel)"),
        ([tmp_path / "junk.h5", root], "not a featurekit head file (not HDF5"),
        ([tmp_path / "tuned", root], f"{tmp_path / 'tuned' / 'model.json'}: a fine-tuned model; finetune starts "
                                     "from a head written by train-head (head.h5)"),
        ([heads["logreg"], root, "--unfreeze", "layer5"], "resnet18: no module 'layer5' before its feature node; "
                                                          "close: layer4"),
        ([heads["logreg"], root, "--epochs", "0"], "--epochs must be at least 1 (got 0)"),
        ([tmp_path / "other.h5", root], "resnet18 was trained with preprocessing {"),
    ]
    for (head, data, *extra), message in cases:
        result = run_cli(capsys, "finetune", "--head", head, data, *extra, *TUNE_ARGS, "--out", tmp_path / "out")
        assert result.code == 1 and error_lines(result.err) == [result.err.strip()], result.err
        assert message in result.err
    assert result.err.strip().endswith("refusing to fine-tune")
    assert not (tmp_path / "out").exists()


def test_weights_that_cannot_be_rebuilt_offline_say_where_to_put_them(binary, tmp_path, capsys, monkeypatch):
    root, _, heads = binary
    head, metadata = load_head(heads["logreg"])
    metadata["backbones"][0]["weights"] = "ResNet18_Weights.IMAGENET1K_V1"
    save_head(tmp_path / "pretrained.h5", head, metadata)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    result = run_cli(capsys, "finetune", "--head", tmp_path / "pretrained.h5", root, *TUNE_ARGS)
    assert result.code == 1 and error_lines(result.err) == [result.err.strip()]
    assert f"put that file at {tmp_path / 'torch-home' / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'}" in result.err


def test_bad_images_follow_on_error(binary, tmp_path, capsys):
    root, _, heads = binary
    data = tmp_path / "data"
    shutil.copytree(root, data)
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"")
    args = ["finetune", "--head", heads["logreg"], data, *TUNE_ARGS, "--epochs", "1", "--out", tmp_path / "out"]
    failed = run_cli(capsys, *args)
    assert failed.code == 1 and error_lines(failed.err) == [f"featurekit: error: {data}/train/cat/broken.jpg: "
                                                            "empty file (0 bytes)"]
    assert run_cli(capsys, *args, "--on-error", "skip").code == 0
    skipped = json.loads((tmp_path / "out" / "report.json").read_text())["skipped"]
    assert skipped == [{"path": str(data / "train" / "cat" / "broken.jpg"), "reason": "empty file (0 bytes)"}]

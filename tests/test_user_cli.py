"""The command line as a new user meets it: each command run as typed, on a tiny real image folder
(resnet18, random weights, CPU), checking what the user sees and what is left on disk."""

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import TINY_RUN, error_lines, run_cli, write_image_folder, write_jpeg

from featurekit import cli
from featurekit.backbones import runner
from featurekit.store.format import read_header

RUN = ["--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def head3(tmp_path_factory):
    """(data root, features dir, head folder): a knn head on 3 classes of resnet18 (random weights) features."""
    tmp = tmp_path_factory.mktemp("user")
    root = write_image_folder(tmp / "data", {"train": {"ant": 3, "bee": 3, "wasp": 3},
                                             "valid": {"ant": 2, "bee": 2, "wasp": 2}})
    assert cli.main([str(a) for a in ["extract", root, "--out", tmp / "features", *TINY_RUN]]) == 0
    assert cli.main([str(a) for a in ["train-head", tmp / "features", "--backbone", "resnet18", "--head", "knn",
                                      "--no-plots"]]) == 0
    return root, tmp / "features", tmp / "features" / "heads" / "knn-resnet18"


def test_predict_out_dash_writes_the_csv_to_stdout_with_progress_and_timing_on_stderr(head3, capsys, tmp_path,
                                                                                      monkeypatch):
    root, _, head = head3
    monkeypatch.chdir(tmp_path)
    run = run_cli(capsys, "predict", "--head", head, "--out", "-", *RUN, root / "valid" / "ant")
    assert run.code == 0
    rows = list(csv.reader(io.StringIO(run.out)))
    assert rows[0] == ["path", "predicted", "prob_ant", "prob_bee", "prob_wasp"] and len(rows) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file named "-", no .json
    assert "predict: 100%" in run.err  # the progress bar
    assert re.search(r"^2 predictions written to stdout \(cpu, \w+\) in \d+\.\d s, [\d.]+ images/s$", run.err, re.M)


@pytest.mark.parametrize("option, message", [
    (["--format", "kaggle-proba"], "--format kaggle-proba writes the probability of a two-class head's second class; "
                                   "this one has 3 classes (ant, bee, wasp): use --format kaggle (class names)"),
    (["--topk", "0"], "--topk 0: give 1 or more"),
])
def test_an_output_the_head_cannot_fill_fails_before_any_image_is_read(head3, capsys, tmp_path, monkeypatch,
                                                                        option, message):
    root, _, head = head3

    def extraction(*args, **kwargs):
        raise AssertionError("images were read")

    monkeypatch.setattr(runner.TrunkRunner, "__init__", extraction)
    run = run_cli(capsys, "predict", "--head", head, "--out", tmp_path / "k.csv", *option, *RUN, root / "valid")
    assert run.code == 1 and error_lines(run.err) == [f"featurekit: error: {message}"]
    assert list(tmp_path.iterdir()) == []


def test_a_plain_folder_gives_its_own_images_and_names_what_it_left_out(head3, capsys, tmp_path):
    root, _, head = head3
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, source in enumerate(sorted((root / "valid" / "bee").glob("*.jpg"))):
        shutil.copy(source, folder / f"{i}.jpg")
    write_jpeg(folder / "heads" / "confusion_matrix.jpg", seed=3)  # a stray picture in a subfolder
    (folder / "notes.txt").write_text("not an image")
    run = run_cli(capsys, "predict", "--head", head, "--out", tmp_path / "p.csv", "--quiet", *RUN, folder)
    assert run.code == 0
    paths = [row["path"] for row in csv.DictReader(open(tmp_path / "p.csv"))]
    assert len(paths) == 2 and not any("confusion_matrix" in p for p in paths)
    assert f"{folder}: 1 subfolder not searched: heads (not a labelled folder <class>/<image>: the head has no " \
           "class heads; give a subfolder as a PATH to classify its images)" in run.err
    assert f"{folder}: 1 file without an image extension ignored: notes.txt" in run.err
    assert "labelled" not in run.out and not (tmp_path / "p.csv.report.json").exists()


def test_a_labelled_folder_reports_accuracy_and_a_per_class_report(head3, capsys, tmp_path):
    root, features, head = head3
    out = tmp_path / "p.csv"
    run = run_cli(capsys, "predict", "--head", head, "--out", out, "--quiet", *RUN, root / "valid")
    assert run.code == 0
    rows = list(csv.DictReader(open(out)))
    right = sum(row["predicted"] == Path(row["path"]).parent.name for row in rows)
    trained = json.loads((head / "report.json").read_text())["valid"]["accuracy"]
    assert f"labelled images: accuracy {right / 6:.4f} over 6 images" in run.out and right / 6 == pytest.approx(trained)
    report = json.loads((tmp_path / "p.csv.report.json").read_text())
    assert report["kind"] == "predict" and report["report_version"] == 3 and report["classes"] == ["ant", "bee", "wasp"]
    assert report["evaluation"]["n"] == 6 and sum(map(sum, report["evaluation"]["confusion_matrix"])) == 6
    assert [c["support"] for c in report["evaluation"]["per_class"]] == [2, 2, 2]
    assert sorted(report["files"]) == sorted(p.name for p in tmp_path.iterdir() if ".report" in p.name
                                             or p.suffix == ".png")
    assert "| **wasp** |" in (tmp_path / "p.csv.report.md").read_text()


def test_head_may_be_the_folder_train_head_wrote(head3, capsys, tmp_path):
    root, features, head = head3
    image = next((root / "valid" / "ant").glob("*.jpg"))
    assert run_cli(capsys, "predict", "--head", head, "--out", tmp_path / "a.csv", "--quiet", *RUN, image).code == 0
    run = run_cli(capsys, "predict", "--head", features / "heads", "--out", tmp_path / "b.csv", *RUN, image)
    assert error_lines(run.err) == [f"featurekit: error: {features / 'heads'}: a folder without head.h5 "
                                    "(train-head writes it into its --out folder) or model.json (finetune's); its "
                                    "subfolders with one: knn-resnet18"]


def test_topk_gives_the_likeliest_class_names_first(head3, capsys, tmp_path):
    root, _, head = head3
    common = ["predict", "--head", head, "--quiet", *RUN, root / "valid"]
    assert run_cli(capsys, *common, "--out", tmp_path / "all.csv").code == 0
    assert run_cli(capsys, *common, "--out", tmp_path / "top.csv", "--topk", "2").code == 0
    full = list(csv.DictReader(open(tmp_path / "all.csv")))
    top = list(csv.DictReader(open(tmp_path / "top.csv")))
    assert list(top[0]) == ["path", "predicted", "top1", "top1_prob", "top2", "top2_prob"]
    assert json.loads((tmp_path / "top.csv.json").read_text())["topk"] == 2
    for every, best in zip(full, top):
        ranked = sorted(((float(every[f"prob_{c}"]), c) for c in ("ant", "bee", "wasp")), key=lambda pc: -pc[0])
        assert best["top1"] == best["predicted"] == every["predicted"]
        assert [float(best["top1_prob"]), float(best["top2_prob"])] == [p for p, _ in ranked[:2]]
        assert {best["top1"], best["top2"]} == {c for _, c in ranked[:2]}


def test_random_weights_are_warned_of_wherever_their_features_go(head3, capsys, tmp_path):
    root, features, head = head3
    warning = "random weights (--weights random); their features are for testing the pipeline"
    store = features / "train" / "resnet18.h5"
    assert warning in run_cli(capsys, "info", store).err
    assert warning in run_cli(capsys, "train-head", features, "--backbone", "resnet18", "--head", "knn", "--out",
                              tmp_path / "h", "--no-plots").err
    image = next((root / "valid" / "ant").glob("*.jpg"))
    assert warning in run_cli(capsys, "predict", "--head", head, "--out", tmp_path / "p.csv", *RUN, image).err
    run = run_cli(capsys, "extract", root, "--split", "valid", "--out", tmp_path / "f", *TINY_RUN)
    assert f"warning: resnet18: {warning}" in run.err


def test_random_weight_stores_are_float32_unless_asked(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}})
    auto = [a for a in TINY_RUN if a not in ("--dtype", "float32")]
    run = run_cli(capsys, "extract", root, "--split", "train", "--out", tmp_path / "auto", *auto)
    assert run.code == 0 and run.out.rstrip().endswith("stored as float32)")
    assert read_header(tmp_path / "auto" / "train" / "resnet18.h5").dtype == "float32"
    run = run_cli(capsys, "extract", root, "--split", "train", "--out", tmp_path / "half", *auto, "--dtype", "float16")
    assert run.code == 0 and read_header(tmp_path / "half" / "train" / "resnet18.h5").dtype == "float16"


# --------------------------------------------------------------------------- layout mistakes: the fix in the message


def _extract_error(capsys, root: Path, *splits: str) -> str:
    run = run_cli(capsys, "extract", root, "--split", *(splits or ("train",)), "--out", root.parent / "out", *TINY_RUN)
    [line] = error_lines(run.err)
    assert run.code == 1 and not list((root.parent / "out").glob("*/*.h5"))
    return line.removeprefix("featurekit: error: ")


def test_images_directly_in_the_root(tmp_path, capsys):
    root = tmp_path / "photos"
    for i in range(2):
        write_jpeg(root / f"{i}.jpg", seed=i)
    assert _extract_error(capsys, root) == (f"{root}/train: split folder not found (expected {root}/train/<class>/"
                                            f"<image>); {root} holds 2 images directly: move them to "
                                            f"{root}/<split>/<class>/<image>")


def test_class_folders_without_a_split_level(tmp_path, capsys):
    root = write_image_folder(tmp_path, {"hym": {"ants": 1, "bees": 1}}) / "hym"
    assert _extract_error(capsys, root).endswith(f"{root} has 2 folders holding images directly: ants, bees: class "
                                                 "folders without a split level; cut train and valid from them "
                                                 f"(featurekit extract {root} --valid-fraction 0.2) or move them to "
                                                 f"{root}/<split>/<class>/<image>")
    split_given = write_image_folder(tmp_path / "data", {"train": {"ants": 1}}) / "train"
    assert _extract_error(capsys, split_given).endswith(
        f"it is a split folder; give the folder above it (featurekit extract {tmp_path / 'data'} --split train)")


def test_a_split_that_does_not_exist_lists_those_that_do(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 1}, "valid": {"a": 1}})
    assert _extract_error(capsys, root, "train", "val") == (f"{root}/val: split folder not found (expected {root}/val/"
                                                            f"<class>/<image>); splits in {root}: train, valid "
                                                            "(choose with --split)")


def test_a_corrupt_image_names_the_option_that_skips_it(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 2}})
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    line = _extract_error(capsys, root)
    assert line.startswith(f"{root}/train/a/broken.jpg: ") and line.endswith(
        "(--on-error skip leaves such images out, each recorded with its reason)")


def test_train_head_on_stores_not_extracted_lists_those_that_are(head3, capsys):
    _, features, _ = head3
    run = run_cli(capsys, "train-head", features, "--backbone", "resnet18", "resnet50")
    assert error_lines(run.err) == [f"featurekit: error: {features}/train/resnet50.h5: no such store; run extract for "
                                    f"this backbone and split (resnet50, split 'train'; stores of split 'train' in "
                                    f"{features}: resnet18)"]
    run = run_cli(capsys, "train-head", features, "--backbone", "resnet18", "--valid-split", "val")
    assert error_lines(run.err)[0].endswith(f"(resnet18, split 'val'; {features} has no split 'val'; splits with "
                                            "stores: train, valid)")


# --------------------------------------------------------------------------- neighbors of query images


def test_an_image_of_the_store_is_its_own_nearest_neighbour(head3, capsys):
    root, features, head = head3
    image = sorted((root / "train" / "wasp").glob("*.jpg"))[1]
    run = run_cli(capsys, "neighbors", "--features", features, "--backbone", "resnet18", "--image", image, "-k", "3",
                  "--json", "--quiet", *RUN[:2])
    assert run.code == 0
    [query] = json.loads(run.out)["queries"]
    first, *others = query["neighbours"]
    assert first["name"] == f"train/wasp/{image.name}" and first["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len(others) == 2 and first["similarity"] >= others[0]["similarity"] >= others[1]["similarity"]
    with_head = run_cli(capsys, "neighbors", "--head", head, "--image", image, "--quiet", *RUN[:2])
    assert with_head.code == 0 and with_head.out.startswith(f"{image}: predicted ")
    assert f"1. 1.000 wasp  train/wasp/{image.name}" in with_head.out

"""Few-shot evaluation (``featurekit evaluate``) on real HDF5 stores of a few classes of noisy features."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import error_lines, make_image_folder, run_cli, write_jpeg, write_store

from featurekit.errors import (
    FeaturekitError,
    FeaturekitWarning,
    HeadError,
    LockError,
    SettingsError,
    StoreError,
    WriteError,
)
from featurekit.files import FileLock
from featurekit.heads.fewshot import draw_rows, draw_seed, evaluate_few_shot, score_draw, t_interval
from featurekit.heads.knn import KNNHead
from featurekit.heads.settings import EvaluateSettings
from featurekit.heads.train import ValidationRows
from featurekit.images.listing import list_split
from featurekit.store.dataset import load_features

TRAIN = {"ant": 10, "bee": 10, "empty": 0, "wasp": 6}  # wasp: fewer rows than 8 shots; empty: a folder, no images
VALID = {"ant": 10, "bee": 10, "hornet": 2, "wasp": 10}  # hornet: no training images
KEYS = {"head", "shots", "draws", "mean", "interval", "balanced_mean", "balanced_interval", "accuracies",
        "balanced_accuracies", "seeds", "rows", "short_classes", "seconds"}


def noisy_classes(names: list[str], seed: int) -> np.ndarray:
    """float32[N, 16]: a mean per class name plus noise 1.6 times their scale: one image per class
    guesses poorly, eight guess well (logreg at C = 1: about 0.45 and 0.8 valid accuracy)."""
    means = dict(zip(["ant", "bee", "wasp", "hornet"], np.random.default_rng(0).normal(size=(4, 16))))
    noise = 1.6 * np.random.default_rng(seed).normal(size=(len(names), 16))
    return (np.array([means[name] for name in names]) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """Stores of backbone ``a``: train 10/10/6 images of ant, bee, wasp (and a class folder without
    images), valid 10 of each and 2 of hornet."""
    base = tmp_path_factory.mktemp("fewshot")
    for split, counts, seed in (("train", TRAIN, 1), ("valid", VALID, 2)):
        listing = make_image_folder(base / "data", split, counts)
        names = [listing.classes[record.label] for record in listing.records]
        write_store(base / "features", listing, "a", noisy_classes(names, seed))
    return base / "features"


SETTINGS = EvaluateSettings(heads=("logreg", "knn"), shots=(1, 2, 4, 8), draws=4, plots=False)


@pytest.fixture(scope="module")
def evaluated(features) -> tuple[dict, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluation = evaluate_few_shot(features, ["a"], replace(SETTINGS, out=str(features.parent / "ev"), plots=True))
    return evaluation, caught


def rows_of(evaluation: dict) -> dict:
    return {(row["head"], row["shots"]): row for row in evaluation["rows"]}


def test_one_row_per_head_and_shots_and_the_files(evaluated, features):
    evaluation, _ = evaluated
    assert [(r["head"], r["shots"]) for r in evaluation["rows"]] == [
        (head, shots) for head in ("logreg", "knn") for shots in (1, 2, 4, 8, "all")]
    assert all(set(row) == KEYS for row in evaluation["rows"])
    out = features.parent / "ev"
    assert json.loads((out / "evaluation.json").read_text()) == json.loads(json.dumps(evaluation))
    assert evaluation["files"] == ["accuracy_vs_shots.png", "evaluation.md", "evaluation.json"]
    assert (out / "accuracy_vs_shots.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "evaluation.md").read_text()
    row = rows_of(evaluation)["logreg", 4]
    assert f"| logreg | 4 | 4 | {row['mean']:.4f} | {row['interval'][0]:.4f} - {row['interval'][1]:.4f} |" in table
    assert evaluation["defaults"] == {"logreg": {"C": 1.0}, "knn": {"n_neighbors": 10}}
    everything = rows_of(evaluation)["knn", "all"]
    assert everything["draws"] == 1 and everything["interval"] is None and everything["rows"] == [26]
    assert evaluation["train"] == {"split": "train", "n": 26, "classes": 3, "fewest_rows": 6}
    assert evaluation["valid"] == {"split": "valid", "n": 30, "excluded_classes": {"hornet": 2}}


def test_valid_classes_without_training_images_are_left_out_loudly(evaluated):
    left_out = [str(w.message) for w in evaluated[1] if "without training rows" in str(w.message)]
    assert left_out == ["split 'valid' has classes without training rows, left out of the scores: hornet (2 rows)"]
    assert "**left out** (valid classes without training rows): hornet (2 rows)" in \
        (Path(evaluated[0]["out_dir"]) / "evaluation.md").read_text()


def test_every_draw_has_k_rows_of_each_class_and_every_head_the_same_draws(evaluated, features):
    evaluation, _ = evaluated
    labels = load_features(features, "train", ["a"]).labels
    rows = rows_of(evaluation)
    for shots in (1, 2, 4, 8):
        seeds = rows["logreg", shots]["seeds"]
        assert seeds == rows["knn", shots]["seeds"] == [draw_seed(0, shots, d) for d in range(4)]
        assert len(set(seeds)) == 4
        for seed in seeds:
            picked = draw_rows(labels, shots, seed)
            assert np.bincount(labels[picked]).tolist() == [min(shots, n) for n in TRAIN.values()]
            assert len(np.unique(picked)) == len(picked)
        assert rows["logreg", shots]["rows"] == [sum(min(shots, n) for n in TRAIN.values())] * 4


def test_draws_repeat_with_the_seed_and_change_with_another(evaluated, features, tmp_path):
    evaluation, _ = evaluated
    labels = load_features(features, "train", ["a"]).labels
    again = evaluate_few_shot(features, ["a"], replace(SETTINGS, out=str(tmp_path / "again")))
    other = evaluate_few_shot(features, ["a"], replace(SETTINGS, out=str(tmp_path / "other"), seed=1))
    same, changed = rows_of(again), rows_of(other)
    for key, row in rows_of(evaluation).items():
        assert same[key]["accuracies"] == row["accuracies"] and same[key]["seeds"] == row["seeds"]
    assert all(not set(changed[k]["seeds"]) & set(row["seeds"]) for k, row in rows_of(evaluation).items()
               if k[1] != "all")
    assert not np.array_equal(draw_rows(labels, 2, changed["logreg", 2]["seeds"][0]),
                              draw_rows(labels, 2, rows_of(evaluation)["logreg", 2]["seeds"][0]))
    assert any(changed[k]["accuracies"] != row["accuracies"] for k, row in rows_of(evaluation).items())
    assert changed["logreg", "all"]["accuracies"] == rows_of(evaluation)["logreg", "all"]["accuracies"]


def test_the_interval_is_students_t_and_holds_the_mean(evaluated):
    assert t_interval([0.0, 1.0]) == pytest.approx([0.5 - 6.3531, 0.5 + 6.3531], abs=1e-4)  # t(0.975, 1) = 12.706
    assert t_interval([0.8] * 3) == pytest.approx([0.8, 0.8]) and t_interval([0.5]) is None
    for row in evaluated[0]["rows"]:
        if row["shots"] == "all":
            continue
        low, high = row["interval"]
        assert row["mean"] == pytest.approx(np.mean(row["accuracies"]))
        assert low <= row["mean"] <= high
        assert (high - low > 0) == (len(set(row["accuracies"])) > 1)
    assert any(len(set(row["accuracies"])) > 1 for row in evaluated[0]["rows"])


def test_accuracy_rises_with_shots(evaluated):
    rows = rows_of(evaluated[0])
    for head in ("logreg", "knn"):
        assert rows[head, 8]["mean"] > rows[head, 1]["mean"] + 0.15, (head, rows[head, 1], rows[head, 8])
        assert rows[head, 8]["balanced_mean"] > rows[head, 1]["balanced_mean"] + 0.15


def test_a_class_with_fewer_rows_than_k_gives_all_it_has_and_warns_once(evaluated):
    evaluation, caught = evaluated
    short = [w for w in caught if issubclass(w.category, FeaturekitWarning) and "fewer training rows" in str(w.message)]
    assert len(short) == 1 and "wasp (6 rows)" in str(short[0].message) and "than 8 shots" in str(short[0].message)
    rows = rows_of(evaluation)
    assert rows["logreg", 8]["short_classes"] == {"wasp": 6} and rows["logreg", 4]["short_classes"] == {}
    table = (Path(evaluation["out_dir"]) / "evaluation.md").read_text()
    assert "at 8 shots, all the training rows of: wasp (6)" in table


def test_one_shot_of_many_classes_is_not_taken_for_a_regression_target():
    labels = np.arange(25)  # scikit-learn warns above 20 rows when most labels are unique
    X = np.random.default_rng(0).normal(size=(25, 4)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scored = score_draw(KNNHead(), X, labels, ValidationRows(X, labels, {}), seed=1)
    assert scored["accuracy"] == 1.0 and scored["rows"] == 25 and scored["seed"] == 1


@pytest.mark.parametrize("change, error, reason", [
    ({"heads": ("forest",)}, SettingsError, "unknown head 'forest'"),
    ({"shots": (0, 2)}, SettingsError, "--shots must be at least 1 (got 0)"),
    ({"draws": 0}, SettingsError, "--draws must be at least 1 (got 0)"),
    ({"valid_split": "train"}, SettingsError, "is the split the images are drawn from"),
    ({"valid_split": "test"}, StoreError, "no such store; run extract"),
])
def test_bad_settings_are_one_line_errors_before_any_output(features, tmp_path, change, error, reason):
    with pytest.raises(error) as raised:
        evaluate_few_shot(features, ["a"], replace(SETTINGS, out=str(tmp_path / "ev"), **change))
    assert reason in str(raised.value) and "\n" not in str(raised.value) and isinstance(raised.value, FeaturekitError)
    assert not (tmp_path / "ev").exists()


def test_missing_and_unlabelled_stores_are_refused_as_train_head_refuses_them(features, tmp_path):
    with pytest.raises(StoreError, match=r"b\.h5: no such store; run extract for this backbone and split"):
        evaluate_few_shot(features, ["a", "b"], replace(SETTINGS, out=str(tmp_path / "ev")))
    for i in range(3):
        write_jpeg(features.parent / "data" / "test" / f"{i}.jpg", i)
    write_store(features, list_split(features.parent / "data", "test"), "a", np.zeros((3, 16), np.float32))
    with pytest.raises(HeadError, match=r"test/a\.h5: an unlabelled store \(images without classes\) cannot be"):
        evaluate_few_shot(features, ["a"], replace(SETTINGS, out=str(tmp_path / "ev"), valid_split="test"))
    assert not (tmp_path / "ev").exists()


def test_an_evaluation_is_replaced_only_with_overwrite(features, tmp_path):
    settings = replace(SETTINGS, heads=("logreg",), shots=(1,), draws=2, out=str(tmp_path / "ev"))
    first = (tmp_path / "ev" / "evaluation.json")
    evaluate_few_shot(features, ["a"], settings)
    written = first.read_text()
    with pytest.raises(WriteError, match=r"evaluation\.json: exists; pass --overwrite to replace it"):
        evaluate_few_shot(features, ["a"], replace(settings, seed=3))
    assert first.read_text() == written
    evaluate_few_shot(features, ["a"], replace(settings, seed=3, overwrite=True))
    assert json.loads(first.read_text())["seed"] == 3


def test_a_second_run_into_the_same_folder_is_refused_while_one_runs(features, tmp_path):
    with FileLock(tmp_path / ".ev.lock", "another run"):
        with pytest.raises(LockError, match=r"ev: another featurekit process \(pid \d+\) is writing it"):
            evaluate_few_shot(features, ["a"], replace(SETTINGS, out=str(tmp_path / "ev")))
    assert not (tmp_path / "ev").exists()


def test_the_command_writes_the_evaluation(features, tmp_path, capsys):
    out = tmp_path / "cli"
    run = run_cli(capsys, "evaluate", features, "--backbone", "a", "--shots", "1", "2", "--draws", "3", "--head",
                  "logreg", "svm", "--out", out, "--no-plots", "--seed", "7", "--device", "cpu")
    assert run.code == 0, run.err
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert [(r["head"], r["shots"]) for r in evaluation["rows"]] == [
        ("logreg", 1), ("logreg", 2), ("logreg", "all"), ("svm", 1), ("svm", 2), ("svm", "all")]
    assert evaluation["seed"] == 7 and evaluation["files"] == ["evaluation.md", "evaluation.json"]
    assert run.out.splitlines()[0].startswith("logreg, 1 shot: accuracy ")
    assert run.out.splitlines()[-1] == f"written to {out}/ (evaluation.md, evaluation.json)"
    assert "random weights" in run.err  # the test stores' weights, said as train-head says it
    refused = run_cli(capsys, "evaluate", features, "--backbone", "a", "--draws", "0", "--out", tmp_path / "none")
    assert refused.code == 1 and error_lines(refused.err) == ["featurekit: error: --draws must be at least 1 (got 0)"]
    taken = run_cli(capsys, "evaluate", features, "--backbone", "a", "--head", "logreg", "--epochs", "3")
    assert taken.code == 1 and "logreg head takes no parameter 'max_epochs'" in taken.err


def test_by_default_every_head_fits_the_features_as_extracted_and_standardize_is_the_heads_own(evaluated, features,
                                                                                                 tmp_path):
    scaled = evaluate_few_shot(features, ["a"], replace(SETTINGS, out=str(tmp_path / "ev"), standardize=True))
    assert {kind: params["standardize"] for kind, params in scaled["heads"].items()} == {"logreg": True, "knn": "auto"}
    plain = evaluated[0]
    assert {kind: params["standardize"] for kind, params in plain["heads"].items()} == {"logreg": False, "knn": False}
    assert plain["standardize"] is False and scaled["standardize"] is True
    assert [row["seeds"] for row in plain["rows"]] == [row["seeds"] for row in scaled["rows"]]
    assert [row["accuracies"] for row in plain["rows"]] != [row["accuracies"] for row in scaled["rows"]]
    assert "standardised as each head does, on the rows of each draw (--standardize)" in \
        (tmp_path / "ev" / "evaluation.md").read_text()

"""Head files are data: HDF5 arrays and JSON, read without running code; old pickles are refused."""

import json
import re
from pathlib import Path

import h5py
import joblib
import numpy as np
import pytest
from conftest import blobs, error_lines, make_image_folder, run_cli, write_store
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import featurekit
from featurekit.errors import HeadFileError
from featurekit.heads.head_file import load_head, save_head
from featurekit.heads.knn import KNNHead
from featurekit.heads.linear import LinearSVMHead, LogisticHead
from featurekit.heads.mlp import MLPHead
from featurekit.heads.train import train_head


@pytest.fixture(scope="module")
def rows():
    labels = np.repeat(np.arange(3), 20)
    X = blobs(np.concatenate([labels, labels]), dim=8, seed=3, spread=1.5)
    return X[:60], labels, X[60:], labels


class Planted:
    """Unpickling this calls open(marker, "w"): a file appears if anything ever unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def planted_head(path: Path, marker: Path) -> Path:
    """An old-style head file (format 1: a joblib pickle of a dict) whose head creates ``marker``."""
    joblib.dump({"format": "featurekit.head", "format_version": 1, "kind": "logreg", "head": Planted(marker),
                 "metadata": {"classes": ["ant", "bee"], "backbones": []}}, path)
    return path


def test_the_planted_payload_is_real(tmp_path):
    planted_head(tmp_path / "head.joblib", tmp_path / "proof")
    joblib.load(tmp_path / "head.joblib")  # what featurekit's head loading did before head format 2
    assert (tmp_path / "proof").exists()


def test_no_entry_point_unpickles_a_head(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "shared"
    folder.mkdir()
    old = planted_head(folder / "head.joblib", marker)
    renamed = tmp_path / "head.h5"  # the suffix changes nothing: the content is sniffed
    renamed.write_bytes(old.read_bytes())
    image = make_image_folder(tmp_path / "data", "valid", {"ant": 1}).root / "valid" / "ant"
    for head in (old, renamed):
        with pytest.raises(HeadFileError, match=re.escape(f"{head}: a pickle (a featurekit head before head format 2?)"
                                                          ", not loaded: unpickling runs any code")):
            featurekit.load_head(head)
    commands = [("predict", "--head", old, image, "--out", tmp_path / "p.csv"),
                ("predict", "--head", folder, image, "--out", tmp_path / "p.csv"),  # the folder holding it
                ("finetune", "--head", renamed, tmp_path / "data", "--out", tmp_path / "tuned"),
                ("neighbors", "--head", folder),
                ("convert-head", old, tmp_path / "new.h5")]  # without --trust
    for command in commands:
        result = run_cli(capsys, *command)
        assert result.code == 1 and len(error_lines(result.err)) == 1, (command, result.err)
        assert ("convert-head --trust" in result.err) != (command[0] == "convert-head"), result.err
    assert "give --trust only if you trust who made it" in result.err
    assert not marker.exists() and not (tmp_path / "p.csv").exists() and not (tmp_path / "tuned").exists()
    assert not (tmp_path / "new.h5").exists()


def test_files_that_are_not_heads_are_one_line(tmp_path, rows):
    X, y, _, _ = rows
    (tmp_path / "text.h5").write_text("not a head")
    with h5py.File(tmp_path / "store.h5", "w") as h5:
        h5.attrs["format"] = "featurekit.store"
    save_head(tmp_path / "head.h5", LogisticHead(C=1.0).fit(X, y), {})
    damaged = tmp_path / "damaged.h5"
    with h5py.File(tmp_path / "head.h5") as source, h5py.File(damaged, "w") as copy:
        for name in source:
            source.copy(name, copy)
        copy.attrs.update(source.attrs)
        del copy["model/coef"]
    cases = {"missing.h5": "no such head file", "text.h5": "not a featurekit head file (not HDF5; train-head writes "
             "head.h5)", "store.h5": "a feature store, not a featurekit head", "damaged.h5": "no field 'model/coef'"}
    for name, message in cases.items():
        with pytest.raises(HeadFileError, match=f"^{re.escape(str(tmp_path / name))}: {re.escape(message)}"):
            load_head(tmp_path / name)


@pytest.mark.parametrize("head", [LogisticHead(C=1.0), LinearSVMHead(C=1.0), KNNHead(n_neighbors=3),
                                  MLPHead(hidden_sizes=(8,), max_epochs=3)], ids=lambda h: h.kind)
def test_string_labels_and_every_kind_reload_exactly(head, rows, tmp_path):
    X, y, X_val, _ = rows
    names = np.array(["ant", "bee", "wasp"])[y]
    head.fit(X, names)
    save_head(tmp_path / "head.h5", head, {"note": "x"})
    loaded, metadata = load_head(tmp_path / "head.h5")
    assert metadata == {"note": "x"} and loaded.classes_.tolist() == ["ant", "bee", "wasp"]
    np.testing.assert_array_equal(loaded.predict_proba(X_val), head.predict_proba(X_val))
    assert list(loaded.predict(X_val)) == list(head.predict(X_val))


def docs_reader() -> str:
    """The python block of docs/heads.md's "Reading a head file without featurekit" section."""
    text = Path(__file__).parents[1].joinpath("docs", "heads.md").read_text()
    section = text.split("### Reading a head file without featurekit", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_a_linear_head_reads_with_h5py_alone_as_docs_heads_md_shows(kind, tmp_path):
    root, features = tmp_path / "data", tmp_path / "features"
    for split, count in (("train", 10), ("valid", 5)):
        listing = make_image_folder(root, split, {"ant": count, "bee": count, "wasp": count})
        labels = np.array([r.label for r in listing.records])
        write_store(features, listing, "a", blobs(labels, 6, seed=5, spread=1.5))
    train_head(features, ["a"], kind, tmp_path / "head", plots=False)
    head, _ = load_head(tmp_path / "head" / "head.h5")
    valid = featurekit.load(features, "valid", ["a"])
    namespace: dict = {}
    exec(compile(docs_reader(), "docs/heads.md", "exec"), namespace)  # imports json, h5py, numpy only
    proba, classes = namespace["linear_head_proba"](tmp_path / "head" / "head.h5", valid.features)
    assert classes == ["ant", "bee", "wasp"]
    np.testing.assert_allclose(proba, head.predict_proba(valid.features), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- convert-head --trust


def old_pickle(path: Path, head, metadata: dict) -> Path:
    joblib.dump({"format": "featurekit.head", "format_version": 1, "kind": head.kind, "head": head,
                 "metadata": metadata}, path)
    return path


def old_logistic_head(X: np.ndarray, y: np.ndarray) -> tuple[LogisticHead, np.ndarray]:
    """A logreg head as head format 1 pickled it (sklearn's LogisticRegression in model_, the former
    parameters), and its probabilities of X."""
    scaler = StandardScaler().fit(X)
    model = LogisticRegression(C=0.5, max_iter=2000).fit(scaler.transform(X).astype(np.float32), np.unique(y,
                                                                                               return_inverse=True)[1])
    head = LogisticHead.__new__(LogisticHead)
    head.__dict__.update(C=0.5, C_grid=(0.001, 0.01, 0.1, 1.0, 10.0), max_iter=2000, standardize=True,
                         classes_=np.unique(y), scaler_=scaler, model_=model, n_features_in_=X.shape[1],
                         selection_=[{"C": 0.5, "epochs": None}], best_params_={"C": 0.5}, history_=[],
                         fit_seconds_=0.1, n_iter_=int(np.max(model.n_iter_)))
    return head, model.predict_proba(scaler.transform(X).astype(np.float32))


@pytest.mark.parametrize("classes", [2, 3])
def test_convert_head_rewrites_a_trusted_old_logreg_head_exactly(classes, rows, tmp_path, capsys):
    X, y, _, _ = rows
    keep = y < classes
    old, expected = old_logistic_head(X[keep], y[keep])
    path = old_pickle(tmp_path / "head.joblib", old, {"classes": ["ant", "bee", "wasp"][:classes]})
    result = run_cli(capsys, "convert-head", "--trust", path, tmp_path / "head.h5")
    assert result.code == 0 and result.out.strip() == f"wrote {tmp_path / 'head.h5'}"
    head, metadata = load_head(tmp_path / "head.h5")
    assert metadata == {"classes": ["ant", "bee", "wasp"][:classes]} and head.get_params()["C"] == 0.5
    assert head.C_grid == (0.001, 0.01, 0.1, 1.0, 10.0) and head.max_iter == 2000  # the old values it had
    np.testing.assert_allclose(head.predict_proba(X[keep]), expected, rtol=0, atol=1e-6)
    refused = run_cli(capsys, "convert-head", "--trust", path, tmp_path / "head.h5")
    assert refused.code == 1 and "head.h5: exists; give a new file name" in refused.err


def test_convert_head_keeps_mlp_and_knn_and_refuses_the_calibrated_svm(rows, tmp_path, capsys):
    X, y, X_val, _ = rows
    for head in (MLPHead(hidden_sizes=(8,), max_epochs=3).fit(X, y), KNNHead(n_neighbors=3).fit(X, y)):
        old = old_pickle(tmp_path / f"{head.kind}.joblib", head, {})  # their model_ is what format 1 held
        assert run_cli(capsys, "convert-head", "--trust", old, tmp_path / f"{head.kind}.h5").code == 0
        np.testing.assert_array_equal(load_head(tmp_path / f"{head.kind}.h5")[0].predict_proba(X_val),
                                      head.predict_proba(X_val))
    svm = LinearSVMHead.__new__(LinearSVMHead)
    svm.__dict__.update(C=1.0, model_=object())
    result = run_cli(capsys, "convert-head", "--trust", old_pickle(tmp_path / "svm.joblib", svm, {}),
                     tmp_path / "svm.h5")
    assert result.code == 1 and "an svm head of format 1 gave sigmoid-calibrated probabilities" in result.err
    assert "retrain it: featurekit train-head FEATURES_DIR --head svm" in result.err
    assert not (tmp_path / "svm.h5").exists()


def test_the_head_file_records_what_outside_readers_need(rows, tmp_path):
    X, y, _, _ = rows
    head = MLPHead(hidden_sizes=(8,), max_epochs=2).fit(X, y)
    save_head(tmp_path / "head.h5", head, {})
    with h5py.File(tmp_path / "head.h5") as h5:
        assert (h5.attrs["format"], h5.attrs["format_version"], h5.attrs["kind"]) == ("featurekit.head", 2, "mlp")
        assert json.loads(h5.attrs["params"])["hidden_sizes"] == [8]
        assert sorted(h5["model"]) == ["1.bias", "1.weight", "4.bias", "4.weight"]
        assert h5["model/1.weight"].shape == (8, 8) and h5["model"].attrs["n_classes"] == 3
        np.testing.assert_array_equal(h5["scaler/mean"][()], head.scaler_.mean_)

import json
import zlib

import numpy as np
import pytest
from conftest import blobs, make_image_folder, run_cli, write_store

from featurekit.heads.head_file import load_head
from featurekit.heads.report import classification_metrics, scores_line
from featurekit.heads.train import train_head
from featurekit.store.dataset import load_features
from featurekit.store.format import StoreIdentity, read_header, store_path

FAST_MLP = {"hidden_sizes": (16,), "max_epochs": 15, "batch_size": 8, "lr": 1e-2}


def _named_blobs(listing, dim: int, seed: int) -> np.ndarray:
    """Features whose cluster depends on the class *name*, so splits with other class lists agree."""
    rng = np.random.default_rng(seed)
    names = [listing.classes[r.label] for r in listing.records]
    centre = {name: np.random.default_rng(zlib.crc32(name.encode()) + seed).normal(size=dim) * 3 for name in set(names)}
    return np.stack([centre[n] for n in names]) + 0.3 * rng.normal(size=(len(names), dim))


def test_mlp_report_artifact_and_plots(two_backbone_features, tmp_path):
    _, features_dir = two_backbone_features
    report = train_head(features_dir, ["a", "b"], "mlp", tmp_path / "out", params=FAST_MLP)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["confusion_matrix.png", "embedding.png", "head.h5", "learning_curves.png", "report.json",
                     "report.md"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["report_version"] == 3 and sorted(saved["files"]) == files == sorted(report["files"])
    assert saved["valid"]["accuracy"] == report["valid"]["accuracy"] == 1.0
    assert saved["valid"]["confusion_matrix"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    assert [c["class"] for c in saved["valid"]["per_class"]] == ["ant", "bee", "wasp"]
    assert saved["chosen"]["head"] == "mlp" and "weight_decay" in saved["chosen"]
    assert saved["timing"]["epochs"] == len(saved["history"]) and saved["timing"]["seconds_per_epoch"] > 0
    assert "| **wasp** | 0 | 0 | 4 |" in (tmp_path / "out" / "report.md").read_text()
    head, metadata = load_head(tmp_path / "out" / "head.h5")
    assert metadata["classes"] == ["ant", "bee", "wasp"]
    recorded = [(b["store_name"], b["columns"], b["weights_sha256"]) for b in metadata["backbones"]]
    assert recorded == [("a", [0, 6], "ab" * 32), ("b", [6, 10], "ab" * 32)]
    stores = {split: read_header(store_path(features_dir, split, "a")) for split in ("train", "valid")}
    assert metadata["backbones"][0]["fingerprints"] == {split: h.fingerprint for split, h in stores.items()}
    assert StoreIdentity.from_dict(metadata["backbones"][0]) == stores["train"].identity
    valid = load_features(features_dir, "valid", ["a", "b"])
    assert (head.predict(valid.features) == np.array(valid.classes)[valid.labels]).all()  # class names (issue 21)
    assert head.classes_.tolist() == metadata["classes"]


def test_valid_labels_are_mapped_by_name_and_unknown_classes_reported(tmp_path):
    from featurekit.errors import FeaturekitWarning

    root, features_dir = tmp_path / "data", tmp_path / "features"
    train = make_image_folder(root, "train", {"ant": 6, "bee": 6, "empty": 0, "wasp": 6})
    valid = make_image_folder(root, "valid", {"ant": 3, "bee": 3, "hornet": 2, "wasp": 3})
    for listing in (train, valid):
        write_store(features_dir, listing, "a", _named_blobs(listing, 5, seed=0))
    with pytest.warns(FeaturekitWarning) as warned:
        report = train_head(features_dir, ["a"], "logreg", tmp_path / "out")
    assert any("hornet (2 rows)" in str(w.message) for w in warned)
    assert report["valid"]["excluded_classes"] == {"hornet": 2}
    # wasp is index 3 in train, 3 in valid; bee 1, 1
    assert report["valid"]["n"] == 9 and report["valid"]["accuracy"] == 1.0
    assert report["classes"] == ["ant", "bee", "wasp"]  # "empty" has no rows: no probability column
    assert "**left out**" in (tmp_path / "out" / "report.md").read_text()


def test_all_keeps_the_best_head_on_validation(two_backbone_features, tmp_path):
    _, features_dir = two_backbone_features
    report = train_head(features_dir, ["a", "b"], "all", tmp_path / "out", params=FAST_MLP, plots=False)
    assert {entry["head"] for entry in report["selection"]} == {"mlp", "logreg", "svm", "knn"}
    best = max(report["selection"], key=lambda e: (e["val_accuracy"], -e["val_log_loss"]))
    assert report["head"] == best["head"]
    head, metadata = load_head(tmp_path / "out" / "head.h5")
    assert head.kind == metadata["head"] == report["head"]


def test_all_needs_a_validation_split(two_backbone_features):
    _, features_dir = two_backbone_features
    with pytest.raises(ValueError, match="--head all chooses on the validation split"):
        train_head(features_dir, ["a"], "all", valid_split=None)


def test_a_full_disk_while_saving_leaves_no_head_and_no_temporary(two_backbone_features, tmp_path, capsys, monkeypatch):
    import errno

    from featurekit import cli
    from featurekit.heads import head_file

    _, features_dir = two_backbone_features

    def disk_full(h5, classes):  # the file is open and its attributes written: half a head on disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(head_file, "_write_classes", disk_full)
    out = tmp_path / "out"
    code = cli.main(["train-head", str(features_dir), "--backbones", "a", "--head", "logreg", "--out", str(out),
                     "--no-plots"])
    assert code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"featurekit: error: {out / 'head.h5'}: cannot write "
                                                        "(no space left on device)")
    assert sorted(p.name for p in out.iterdir()) == []  # no head, no temporary, no report of a head that is not there


# --------------------------------------------------------------------------- report files


def test_without_validation_the_report_shows_no_selection_table_of_nan(two_backbone_features, tmp_path):
    _, features_dir = two_backbone_features
    report = train_head(features_dir, ["a"], "logreg", tmp_path / "out", valid_split=None, plots=False)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert report["valid"] is None and "nan" not in markdown.lower()
    assert "No validation split: nothing was selected; head logreg, C 1 as given" in markdown


def test_seconds_total_of_head_all_is_the_whole_sweep(two_backbone_features, tmp_path):
    import time

    _, features_dir = two_backbone_features
    started = time.perf_counter()
    report = train_head(features_dir, ["a", "b"], "all", tmp_path / "out", params=FAST_MLP, plots=False)
    timing = report["timing"]
    assert timing["seconds_chosen"] < timing["seconds_total"] < time.perf_counter() - started


def test_the_summary_line_names_every_file_written(two_backbone_features, tmp_path, capsys):
    _, features_dir = two_backbone_features
    run = run_cli(capsys, "train-head", features_dir, "--backbone", "a", "b", "--head", "mlp", "--epochs", "3",
                  "--hidden", "8", "--out", tmp_path / "out")
    assert run.code == 0
    named = run.out.strip().split("(", 1)[1].rstrip(")").split(", ")
    assert sorted(named) == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"confusion_matrix.png", "learning_curves.png", "embedding.png", "head.h5"} <= set(named)


def test_the_confusion_matrix_png_has_counts_a_colour_bar_and_a_title(two_backbone_features, tmp_path, monkeypatch):
    from featurekit.heads import report

    figures, save = {}, report.save_figure

    def capture(plt, figure, path):  # each figure's axes: (title, texts drawn in them)
        figures[path.name] = [(axis.get_title(), sorted(t.get_text() for t in axis.texts)) for axis in figure.axes]
        return save(plt, figure, path)

    monkeypatch.setattr(report, "save_figure", capture)
    _, features_dir = two_backbone_features
    train_head(features_dir, ["a", "b"], "logreg", tmp_path / "out")
    (title, counts), colour_bar = figures["confusion_matrix.png"]
    assert title == "logreg on a + b\nvalid: accuracy 1.0000 (12 images)"
    assert counts == sorted(["4", "0", "0", "0", "4", "0", "0", "0", "4"]) and colour_bar == ("", [])
    [(embedding_title, _)] = figures["embedding.png"]
    assert "t-SNE of 36 feature rows (train o, valid x), coloured by class" in embedding_title


def test_without_matplotlib_no_png_and_the_report_says_why(two_backbone_features, tmp_path, monkeypatch, caplog):
    from featurekit.heads import report

    monkeypatch.setattr(report, "pyplot", lambda: None)
    _, features_dir = two_backbone_features
    with caplog.at_level("INFO", logger="featurekit"):
        written = train_head(features_dir, ["a"], "mlp", tmp_path / "out", params=FAST_MLP)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["head.h5", "report.json", "report.md"]
    assert sorted(written["files"]) == ["head.h5", "report.json", "report.md"]
    assert f"note: {report.PLOTS_MISSING}" in caplog.messages
    assert "pip install 'featurekit[plots]'" in (tmp_path / "out" / "report.md").read_text()


def test_embedding_is_t_sne_for_small_stores_and_pca_above(monkeypatch):
    from featurekit.heads import report

    labels = np.repeat(np.arange(3), 10)
    features = blobs(labels, 6, seed=4)
    xy, method = report.project(features, 20)
    assert method == "t-SNE" and xy.shape == (30, 2) and np.isfinite(xy).all()
    monkeypatch.setattr(report, "TSNE_MAX_ROWS", 29)
    xy, method = report.project(features, 20)
    assert method == "PCA" and xy.shape == (30, 2)
    centres = np.stack([xy[labels == c].mean(axis=0) for c in range(3)])  # PCA keeps well separated blobs apart
    spread = max(np.linalg.norm(xy[labels == c] - centres[c], axis=1).max() for c in range(3))
    assert min(np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i)) > spread


def test_all_heads_tied_at_100_percent_do_not_hand_the_win_to_knn_and_the_report_says_why(two_backbone_features,
                                                                                          tmp_path):
    # issue 11's case: every head 100% on validation; a 1-NN's hard 0/1 votes had a log loss of exactly 0
    _, features_dir = two_backbone_features
    report = train_head(features_dir, ["a", "b"], "all", tmp_path / "out", params={**FAST_MLP, "select": "accuracy"},
                        plots=False)
    compared = {entry["head"]: entry for entry in report["choice"]["heads"]}
    assert list(compared) == ["mlp", "logreg", "svm", "knn"] and report["choice"]["rule"] == "accuracy"
    assert all(entry["val_accuracy"] == 1.0 for entry in compared.values())
    k, classes = compared["knn"]["n_neighbors"], 3
    assert compared["knn"]["val_log_loss"] >= -np.log((k + 1 / classes) / (k + 1)) > 0  # smoothed votes: never 0
    assert compared["svm"]["val_log_loss"] > 0.01  # its temperature stays finite on separable rows (fit_temperature)
    assert report["head"] != "knn"
    assert compared[report["head"]]["val_log_loss"] == min(e["val_log_loss"] for e in compared.values())
    others = [kind for kind in compared if kind != report["head"]]
    reason = report["choice"]["reason"]
    assert reason.startswith(f"{report['head']}: valid accuracy 1.0000, log loss "
                             f"{compared[report['head']]['val_log_loss']:.4g}; the highest valid accuracy 1.0000 of 4 "
                             f"candidates, tied with {', '.join(others)}; the lowest log loss of those (rule accuracy)")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"- why: {reason}" in markdown and "## Heads compared" in markdown


def test_the_reason_names_the_rule_and_what_it_weighed():
    from featurekit.heads.report import choice_reason

    compared = [{"head": "mlp", "val_accuracy": 0.9478, "val_log_loss": 0.2, "candidates": 3},
                {"head": "svm", "C": 1.0, "val_accuracy": 0.9568, "val_log_loss": 0.18, "candidates": 18},
                {"head": "knn", "val_accuracy": 0.926, "val_log_loss": 0.4, "candidates": 6},
                {"head": "logreg", "val_accuracy": 0.9558, "val_log_loss": 0.15, "candidates": 20}]
    assert choice_reason(compared[:3], "svm", "accuracy", 2893) == (
        "svm: valid accuracy 0.9568, log loss 0.18; the highest valid accuracy 0.9568 of 3 candidates (rule accuracy) "
        "(others, accuracy / log loss: mlp 0.9478 / 0.2; knn 0.9260 / 0.4)")
    assert choice_reason(compared, "logreg", "accuracy-1se", 2893).startswith(
        "logreg: valid accuracy 0.9558, log loss 0.15; the lowest log loss of the 2 of 4 candidates whose accuracy is "
        "within one standard error (0.0038 on 2893 rows) of the best, 0.9568 (rule accuracy-1se)")
    sweep = [{"C": 0.1, "val_accuracy": 0.95, "val_log_loss": 0.2}, {"C": 1.0, "val_accuracy": 0.9568,
                                                                      "val_log_loss": 0.18}]
    assert choice_reason(compared[1:2], "svm", "log-loss", 2893, sweep) == (
        "svm: the only head tried; C=1: valid accuracy 0.9568, log loss 0.18; the lowest log loss of 2 candidates "
        "(rule log-loss)")


def test_the_probe_protocol_figures_top_1_top_5_mean_per_class():
    # the linear-probe papers' figures, counted here by hand on 7 classes of unequal size
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(7), [30, 5, 5, 5, 5, 5, 5])
    proba = rng.dirichlet(np.ones(7), len(truth))
    found = classification_metrics(truth, proba, np.arange(7), [f"c{i}" for i in range(7)])
    ranks = (proba > proba[np.arange(len(truth)), truth][:, None]).sum(axis=1)  # 0: the true class is first
    assert found["accuracy"] == pytest.approx(np.mean(ranks == 0))
    assert found["top5_accuracy"] == pytest.approx(np.mean(ranks < 5)) and found["top5_accuracy"] > found["accuracy"]
    per_class = [np.mean(ranks[truth == c] == 0) for c in range(7)]
    assert found["balanced_accuracy"] == pytest.approx(np.mean(per_class))
    assert f"top-5 {found['top5_accuracy']:.4f}, mean per-class (balanced) accuracy" in scores_line(found)
    two = classification_metrics(truth % 2, proba[:, :2] / proba[:, :2].sum(axis=1, keepdims=True), np.arange(2),
                                 ["a", "b"])
    assert two["top5_accuracy"] is None and "top-5" not in scores_line(two)  # every row is in a top 5 of 2

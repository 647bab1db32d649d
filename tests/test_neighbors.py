"""featurekit neighbors on a head's mistakes: stores of chosen features over real image files, so
which validation images are misclassified, and their nearest training images, are known."""

import json

import numpy as np
import pytest
from conftest import blobs, make_image_folder, run_cli, write_store
from PIL import Image

from featurekit.heads.train import train_head
from featurekit.images.sheets import THUMB
from featurekit.predict.neighbors import CAPTION


def test_misclassified_images_worst_first_with_their_neighbours_and_a_contact_sheet(tmp_path, capsys):
    root, features = tmp_path / "data", tmp_path / "features"
    train = make_image_folder(root, "train", {"ant": 6, "bee": 6, "wasp": 6})
    valid = make_image_folder(root, "valid", {"ant": 3, "bee": 3, "wasp": 3})
    train_labels = np.array([r.label for r in train.records])
    train_rows = blobs(train_labels, 5, seed=1)
    write_store(features, train, "a", train_rows)
    centres = np.stack([train_rows[train_labels == c].mean(axis=0) for c in range(3)])
    valid_labels = np.array([r.label for r in valid.records])
    valid_rows = centres[valid_labels] + 0.05 * np.random.default_rng(2).normal(size=(9, 5))
    valid_rows[0] = centres[2] + 0.01  # an ant that looks like a wasp: the worst mistake
    valid_rows[4] = 0.4 * centres[1] + 0.6 * centres[0]  # a bee nearer the ants: a milder one
    write_store(features, valid, "a", valid_rows.astype(np.float32))
    train_head(features, ["a"], "logreg", tmp_path / "head", plots=False)

    sheet = tmp_path / "worst.png"
    run = run_cli(capsys, "neighbors", "--head", tmp_path / "head", "-k", "3", "--json", "--sheet", sheet)
    assert run.code == 0
    queries = json.loads(run.out)["queries"]
    assert [(q["name"], q["truth"], q["predicted"]) for q in queries] == [
        (f"valid/{valid.records[0].path}", "ant", "wasp"), (f"valid/{valid.records[4].path}", "bee", "ant")]
    assert queries[0]["truth_probability"] < queries[1]["truth_probability"]
    worst = queries[0]["neighbours"]
    assert [n["label"] for n in worst] == ["wasp"] * 3 and all(n["name"].startswith("train/wasp/") for n in worst)
    similarity = [n["similarity"] for n in worst]
    assert similarity == sorted(similarity, reverse=True) and similarity[0] > 0.9
    assert "2 of 9 valid images misclassified, worst first" in run.err
    with Image.open(sheet) as image:  # two rows of a query and 3 thumbnails
        assert image.size == (4 * (THUMB + 10) + 14, 26 + 2 * (THUMB + CAPTION + 10))
        red_frame = np.asarray(image.convert("RGB"))[26 + 2, 10]
    assert tuple(red_frame) == (255, 0, 0)  # the misclassified query is framed red

    text = run_cli(capsys, "neighbors", "--head", tmp_path / "head", "-k", "1", "--valid-split", "valid")
    assert text.out.splitlines()[:2] == [
        f"valid/{valid.records[0].path}: true ant, predicted wasp ({queries[0]['probability']:.3f}; ant "
        f"{queries[0]['truth_probability']:.3f})", f"  1. {worst[0]['similarity']:.3f} wasp  {worst[0]['name']}"]


def test_neighbors_says_what_to_give(tmp_path, capsys):
    run = run_cli(capsys, "neighbors", "--features", tmp_path)
    assert run.code == 1 and "give --head HEAD (its mistakes, or --image)" in run.err


def test_neighbours_are_the_knn_heads_neighbours_with_its_similarities(tmp_path, capsys):
    # issue 21: neighbors floored the std at 1e-6 where the heads use StandardScaler: a column constant on the
    # training rows (digits: 182 of lite0's) then blew up on any query and the similarities read 0.002
    root, features = tmp_path / "data", tmp_path / "features"
    train = make_image_folder(root, "train", {"ant": 6, "bee": 6, "wasp": 6})
    valid = make_image_folder(root, "valid", {"ant": 3, "bee": 3, "wasp": 3})
    labels = np.array([r.label for r in train.records])
    rows = np.concatenate([blobs(labels, 5, seed=1), np.full((18, 1), 0.25, np.float32)], axis=1)  # a dead column
    valid_rows = np.concatenate([blobs(np.array([r.label for r in valid.records]), 5, seed=1),
                                 np.linspace(0, 1, 9, dtype=np.float32)[:, None]], axis=1)  # ... not dead here
    write_store(features, train, "a", rows)
    write_store(features, valid, "a", valid_rows)
    train_head(features, ["a"], "knn", tmp_path / "knn", plots=False, params={"select": "accuracy"})
    from featurekit.heads.head_file import load_head
    from featurekit.heads.knn import _nearest, unit_rows
    from featurekit.predict.neighbors import Gallery, search
    from featurekit.store.dataset import load_features

    head, _ = load_head(tmp_path / "knn" / "head.h5")
    found = search(tmp_path / "knn", k=3)  # the head's mistakes: its gallery is standardised by the head's scaler
    np.testing.assert_array_equal(found.gallery.scaler.mean_, head.scaler_.mean_)
    closeness, nearest = _nearest(head.model_.rows, unit_rows(head._scale(valid_rows)), 3)
    for neighbours, similar, index in zip(found.gallery.nearest(valid_rows, 3), closeness, nearest):
        assert [n.similarity for n in neighbours] == similar.tolist()
        assert [n.name for n in neighbours] == [f"train/{train.records[i].path}" for i in index]
    assert closeness.min() > 0.5  # with the 1e-6 floor: ~0, the dead column's query values / 1e-6 dominating
    alone = Gallery(load_features(features, "train", ["a"]))  # no head: StandardScaler on the searched rows
    assert [n.similarity for n in alone.nearest(valid_rows, 3)[0]] == pytest.approx(closeness[0].tolist())

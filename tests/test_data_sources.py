"""Sources beyond root/<split>/<class>/<image>: a class folder cut into train and valid, unlabelled
splits, file lists; each through the real lister, extraction (resnet18, random weights) and verify."""

import hashlib
import io
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, TINY_RUN, error_lines, make_folder, run_cli, write_jpeg

from featurekit.errors import DataError, SettingsError
from featurekit.images.listing import list_split
from featurekit.images.lists import read_list
from featurekit.images.names import printable_path
from featurekit.images.sources import SourceSettings, list_sources
from featurekit.images.splits import cut_class_folder
from featurekit.store.format import content_sha256, read_store


def cut_args(data, out, *extra):
    return ["extract", data, "--out", out, *TINY_RUN, *extra]


def sides(listings):
    return {listing.split: {printable_path(r.path) for r in listing.records} for listing in listings}


# --------------------------------------------------------------------------- a class folder without splits


def test_the_cut_is_stratified_and_stable_when_images_come_and_go(tmp_path):
    classes = make_folder(tmp_path, "classes", per_class={"ants": 12, "bees": 9, "wasps": 2})
    before = sides(cut_class_folder(classes / "classes", ["train", "valid"], seed=3, valid_fraction=0.3))
    assert before["train"].isdisjoint(before["valid"]) and len(before["train"] | before["valid"]) == 23
    for name in ("ants", "bees", "wasps"):  # every class of two or more images is on both sides
        assert any(p.startswith(name) for p in before["valid"]) and any(p.startswith(name) for p in before["train"])
    write_jpeg(classes / "classes" / "ants" / "new.jpg", seed=99)
    (classes / "classes" / "bees" / "03.jpg").unlink()
    after = sides(cut_class_folder(classes / "classes", ["train", "valid"], seed=3, valid_fraction=0.3))
    for side in ("train", "valid"):  # nobody else moved
        assert after[side] - {"ants/new.jpg"} == before[side] - {"bees/03.jpg"}
    other_seed = sides(cut_class_folder(classes / "classes", ["valid"], seed=4, valid_fraction=0.3))
    assert other_seed["valid"] != after["valid"]


def test_folds_partition_the_images_and_a_lone_image_stays_in_train(tmp_path):
    root = make_folder(tmp_path, "c", per_class={"a": 10, "b": 7, "alone": 1}) / "c"
    valid = [sides(cut_class_folder(root, ["valid"], folds=3, fold=i))["valid"] for i in range(3)]
    assert sum(map(len, valid)) == 17 and set.union(*valid) == {f"a/{i:02d}.jpg" for i in range(10)} | {
        f"b/{i:02d}.jpg" for i in range(7)}
    [train] = cut_class_folder(root, ["train"], folds=3, fold=0)
    assert "alone/00.jpg" in {r.path for r in train.records}
    assert any("1 class of one image kept in train" in line and "alone" in line for line in train.notices())


@pytest.mark.parametrize(("extra", "message"), [
    (["--valid-fraction", "1.5"], "--valid-fraction 1.5: expected a fraction between 0 and 1"),
    (["--valid-fraction", "0"], "--valid-fraction 0: expected a fraction between 0 and 1"),
    (["--folds", "5"], "--folds K and --fold I go together"),
    (["--folds", "3", "--fold", "3"], "--folds 3 --fold 3: expected K >= 2 folds and 0 <= I < K"),
    (["--valid-fraction", "0.2", "--folds", "2", "--fold", "0"], "give one of them"),
    (["--valid-fraction", "0.2", "--split", "test"], "a cut class folder has the splits train and valid"),
])
def test_bad_cut_values_are_one_line_before_any_work(tmp_path, capsys, extra, message):
    data = make_folder(tmp_path, "c", per_class={"a": 3}) / "c"
    run = run_cli(capsys, *cut_args(data, tmp_path / "out", *extra))
    [line] = error_lines(run.err)
    assert run.code == 1 and message in line and not (tmp_path / "out").exists()


def test_a_folder_with_splits_is_not_cut(tmp_path):
    data = make_folder(tmp_path / "data", "train", per_class={"a": 3})
    with pytest.raises(DataError, match="its folders train look like splits"):
        list_sources(data, ["train", "valid"], SourceSettings(valid_fraction=0.2))
    classes = make_folder(tmp_path, "hym", per_class={"a": 1}) / "hym"
    with pytest.raises(DataError, match=r"extract .*hym --valid-fraction 0.2"):  # the layout hint points at the cut
        list_split(classes, "train")


def test_cut_stores_record_the_rule_and_stay_up_to_date(tmp_path, capsys):
    data = make_folder(tmp_path, "c", per_class={"ants": 4, "bees": 4, "one": 1}) / "c"
    out = tmp_path / "out"
    run = run_cli(capsys, *cut_args(data, out, "--valid-fraction", "0.5", "--split-seed", "7"))
    assert run.code == 0, run.err
    assert "1 class of one image kept in train (nothing to score it against): one" in run.err
    train, valid = (read_store(out / split / "resnet18.h5") for split in ("train", "valid"))
    assert train.header.listing_rule == {"kind": "class-folder", "part": "train", "seed": 7, "valid_fraction": 0.5}
    assert valid.header.listing_rule["part"] == "valid" and train.classes == valid.classes == ["ants", "bees", "one"]
    assert set(train.paths).isdisjoint(valid.paths) and len(train.paths) + len(valid.paths) == 9
    expected = sides(cut_class_folder(data, ["train", "valid"], seed=7, valid_fraction=0.5))
    assert set(valid.paths) == expected["valid"]
    assert "up to date" in run_cli(capsys, *cut_args(data, out, "--valid-fraction", "0.5", "--split-seed", "7")).out
    assert run_cli(capsys, "verify", out / "train" / "resnet18.h5", out / "valid" / "resnet18.h5").code == 0
    again = run_cli(capsys, *cut_args(data, out, "--valid-fraction", "0.5", "--split-seed", "8"))
    [line] = error_lines(again.err)
    assert again.code == 1 and "was listed by another rule" in line and '"seed": 8' in line


# --------------------------------------------------------------------------- unlabelled splits


def test_a_split_of_images_without_classes_is_an_unlabelled_store(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"ants": 2, "bees": 2})
    for i in range(3):
        write_jpeg(data / "test" / f"{i}.jpg", seed=50 + i)
    listing = list_split(data, "test")
    assert not listing.labelled and listing.classes == () and [r.label for r in listing.records] == [-1] * 3
    out = tmp_path / "out"
    run = run_cli(capsys, "extract", data, "--split", "train", "test", "--out", out, *TINY_RUN)
    assert run.code == 0, run.err
    assert "3 images without classes (an unlabelled split)" in run.err
    with h5py.File(out / "test" / "resnet18.h5", "r") as h5:
        assert "labels" not in h5 and len(h5["classes"]) == 0 and "listing_rule" not in h5.attrs
    store = read_store(out / "test" / "resnet18.h5")
    assert store.labels is None and store.paths == ["0.jpg", "1.jpg", "2.jpg"]
    assert run_cli(capsys, "verify", out / "test" / "resnet18.h5").code == 0
    assert "unlabelled: no classes" in run_cli(capsys, "info", out / "test" / "resnet18.h5").out
    refused = run_cli(capsys, "train-head", out, "--backbone", "resnet18", "--head", "logreg", "--train-split",
                      "test", "--valid-split", "train")
    [line] = error_lines(refused.err)
    assert refused.code == 1 and line == (f"featurekit: error: {out / 'test' / 'resnet18.h5'}: an unlabelled store "
                                          "(images without classes) cannot be the training split; score it with "
                                          "predict --features instead")


def test_an_empty_split_folder_is_still_refused(tmp_path):
    (tmp_path / "data" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders and no images"):
        list_split(tmp_path / "data", "test")


# --------------------------------------------------------------------------- file lists


def test_text_and_csv_lists_relative_to_their_folder(tmp_path):
    data = make_folder(tmp_path / "data", per_class={"ants": 2, "bees": 2})
    (tmp_path / "lists").mkdir()
    text = tmp_path / "lists" / "files.txt"
    text.write_text("# two files\n../data/train/bees/01.jpg\n\n../data/train/ants/00.jpg\n")
    listing = read_list(text, "mine")
    assert [r.path for r in listing.records] == ["../data/train/bees/01.jpg", "../data/train/ants/00.jpg"]
    assert not listing.labelled and listing.source["list_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert [name for _, name in listing.files()] == [str(data / "train" / "bees" / "01.jpg"),
                                                    str(data / "train" / "ants" / "00.jpg")]
    table = tmp_path / "lists" / "labelled.csv"
    table.write_text("label,path\nwasp,../data/train/ants/00.jpg\nant,../data/train/ants/01.jpg\n")
    listing = read_list(table, "mine")
    assert listing.classes == ("ant", "wasp") and [r.label for r in listing.records] == [1, 0]
    from_stdin = read_list("-", "mine", stdin=io.BytesIO(table.read_bytes().replace(b"../", b"")))
    assert from_stdin.name == "standard input" and from_stdin.source["list"] == "-"


@pytest.mark.parametrize(("content", "name", "message"), [
    ("file,label\na.jpg,x\n", "l.csv", "a CSV list without a path column (its header: file, label)"),
    ("path,label\na.jpg,x\nb.jpg,\n", "l.csv", "line 3: b.jpg has no label"),
    ("a.jpg\nb.jpg\na.jpg\n", "l.txt", "line 3: a.jpg listed twice (first on line 1)"),
    ("# nothing\n\n", "l.txt", "lists no image path"),
])
def test_bad_lists_are_one_line(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as caught:
        read_list(tmp_path / name, "x")
    assert str(caught.value).startswith(f"{tmp_path / name}: ") and message in str(caught.value)


def test_a_missing_listed_file_follows_on_error_with_its_line(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"ants": 2})
    (tmp_path / "l.txt").write_text("data/train/ants/00.jpg\ndata/train/ants/gone.jpg\ndata/train/ants/01.jpg\n")
    out = tmp_path / "out"
    failed = run_cli(capsys, "extract", "--list", tmp_path / "l.txt", "--split", "mine", "--out", out, *TINY_RUN)
    [line] = error_lines(failed.err)
    assert failed.code == 1 and not out.exists()
    assert line == (f"featurekit: error: {tmp_path / 'l.txt'}: 1 listed file cannot be read: line 2 "
                    "data/train/ants/gone.jpg (no such file) (--on-error skip extracts the rest)")
    run = run_cli(capsys, "extract", "--list", tmp_path / "l.txt", "--split", "mine", "--out", out, *TINY_RUN,
                  "--on-error", "skip")
    assert run.code == 0, run.err
    store = read_store(out / "mine" / "resnet18.h5")
    assert store.paths == ["data/train/ants/00.jpg", "data/train/ants/01.jpg"] and store.labels is None
    assert store.skipped == [("data/train/ants/gone.jpg", f"no such file ({tmp_path / 'l.txt'} line 2)")]
    assert [d.decode() for d in store.file_sha256] == [hashlib.sha256((tmp_path / p).read_bytes()).hexdigest()
                                                       for p in store.paths]  # hashed as a folder's files are
    assert store.skipped_file_sha256.tolist() == [b""]  # never read
    np.testing.assert_array_equal(store.features, _folder_features(tmp_path, capsys, data))
    assert run_cli(capsys, "verify", out / "mine" / "resnet18.h5").code == 0
    (tmp_path / "l.txt").write_text("data/train/ants/00.jpg\n")  # the list's sha256 is its identity
    stale = run_cli(capsys, "verify", out / "mine" / "resnet18.h5")
    assert stale.code == 1 and "removed since extraction" in stale.out


def _folder_features(tmp_path, capsys, data):
    """The rows extract stores for the same two images listed as a folder."""
    assert run_cli(capsys, "extract", data, "--split", "train", "--out", tmp_path / "folder", *TINY_RUN).code == 0
    return read_store(tmp_path / "folder" / "train" / "resnet18.h5").features


def test_a_list_on_standard_input(tmp_path):
    make_folder(tmp_path / "data", per_class={"ants": 2})
    done = subprocess.run([sys.executable, "-m", "featurekit", "extract", "--list", "-", "--split", "s", "--out",
                           str(tmp_path / "out"), *TINY_RUN], input=b"path,label\ndata/train/ants/00.jpg,ant\n",
                          cwd=tmp_path, capture_output=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.returncode == 0, done.stderr.decode()
    store = read_store(tmp_path / "out" / "s" / "resnet18.h5")
    assert store.paths == ["data/train/ants/00.jpg"] and store.classes == ["ant"]
    assert store.header.listing_rule["list"] == "-" and store.header.data_root == str(tmp_path)


# --------------------------------------------------------------------------- stores of split folders stay as they were


def test_a_split_folder_keeps_the_listing_digest_and_attributes_of_format_3(tmp_path, capsys):
    """The digest of featurekit before other sources, as it was written: stores made then read as up to date."""
    data = make_folder(tmp_path / "data", per_class={"ants": 2, "bees": 1})
    listing = list_split(data, "train")
    digest = hashlib.sha256(json.dumps([printable_path(c) for c in listing.classes]).encode())
    for r in listing.records:
        digest.update(f"{printable_path(r.path)}\0{r.label}\0{r.size}\0{r.mtime_ns}\n".encode())
    assert listing.sha256() == digest.hexdigest() and listing.source is None
    assert run_cli(capsys, "extract", data, "--split", "train", "--out", tmp_path / "out", *TINY_RUN).code == 0
    with h5py.File(tmp_path / "out" / "train" / "resnet18.h5", "r") as h5:
        assert "listing_rule" not in h5.attrs and "labels" in h5 and h5.attrs["listing_sha256"] == digest.hexdigest()


def test_a_store_made_before_file_digests_keeps_its_fingerprint_and_stays_up_to_date(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"ants": 2, "bees": 1})
    extract = ["extract", data, "--split", "train", "--out", tmp_path / "out", *TINY_RUN]
    assert run_cli(capsys, *extract).code == 0
    path = tmp_path / "out" / "train" / "resnet18.h5"
    fingerprint = read_store(path, features=False).header.fingerprint
    with h5py.File(path, "r+") as h5:  # as featurekit wrote it before it recorded the files' sha256
        del h5["file_sha256"], h5["skipped_file_sha256"]
        h5.attrs["content_sha256"] = content_sha256(h5)
    again = run_cli(capsys, *extract)
    assert again.code == 0 and "1 stores" in again.out and f"{path}  3 rows  up to date" in again.out
    old = read_store(path, features=False)
    assert old.file_sha256 is None and old.header.fingerprint == fingerprint
    assert run_cli(capsys, "verify", path).code == 0


def test_source_options_that_do_not_fit_are_one_line(tmp_path):
    with pytest.raises(SettingsError, match="give it one --split name and no DATA_ROOT"):
        list_sources(tmp_path, ["a", "b"], SourceSettings(list_file="x.txt"))
    with pytest.raises(SettingsError, match="--label-key reads the labels of WebDataset shards"):
        list_sources(tmp_path, ["a"], SourceSettings(label_key="cls"))

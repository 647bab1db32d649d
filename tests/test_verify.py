"""``featurekit verify`` on a real store, then on copies of it damaged one way each."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurekit.cli import main
from tests.conftest import TINY_RUN, make_folder, run_cli, write_jpeg


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, store) extracted once; tests damage copies of them."""
    base = tmp_path_factory.mktemp("verify")
    data = make_folder(base / "data")
    assert main(["extract", str(data), "--split", "train", "--out", str(base / "out"), *TINY_RUN]) == 0
    return data, base / "out" / "train" / "resnet18.h5"


@pytest.fixture
def copy(made, tmp_path) -> tuple[Path, Path]:
    """Private copies (mtimes kept) of the folder and the store."""
    data, store = made
    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "out").mkdir()
    return tmp_path / "data", Path(shutil.copy2(store, tmp_path / "out" / store.name))


def verify(capsys, store: Path, data: Path, *more: Path):
    return run_cli(capsys, "verify", store, *more, "--data-root", data)


def test_sound_store_passes(copy, capsys):
    data, store = copy
    result = verify(capsys, store, data)
    assert result.code == 0, result.out
    assert result.out == f"{store}: OK (10 rows, 0 skipped, matches its image folder)\n"


def test_recorded_folder_is_the_default_and_a_moved_one_is_reported(made, tmp_path, capsys):
    data, store = made
    assert run_cli(capsys, "verify", store).code == 0  # against the data_root it records
    moved = Path(shutil.copy2(store, tmp_path / store.name))
    shutil.move(data, tmp_path / "moved")
    try:
        result = run_cli(capsys, "verify", moved)
        assert result.code == 1
        expected = f"{moved}: cannot check the image folder: {data / 'train'}: split folder not found"
        assert result.out.startswith(expected)
        assert run_cli(capsys, "verify", moved, "--data-root", tmp_path / "moved").code == 0
    finally:
        shutil.move(tmp_path / "moved", data)


def test_truncated_store(copy, capsys):
    data, store = copy
    content = store.read_bytes()
    store.write_bytes(content[: len(content) // 2])
    result = verify(capsys, store, data)
    assert result.code == 1
    assert result.out.startswith(f"{store}: not a readable HDF5 file")


def edit(store: Path, change) -> None:
    with h5py.File(store, "r+") as h5:
        change(h5)


def nudge_a_value(h5):
    h5["features"][3, 7] += 0.5


def swap_two_labels(h5):
    h5["labels"][0], h5["labels"][9] = h5["labels"][9], h5["labels"][0]


def relabel_the_weights(h5):
    h5.attrs["weights"] = "IMAGENET1K_V1"  # random weights passed off as pretrained


def remove_the_completeness_mark(h5):
    h5.attrs["complete"] = False


def drop_a_feature_column(h5):
    features = h5["features"][:, :-1]
    del h5["features"]
    h5["features"] = features


EDITED = "content checksum mismatch: features, rows or attributes were changed after extraction"


@pytest.mark.parametrize("change, message", [
    pytest.param(change, message, id=change.__name__) for change, message in [
        (nudge_a_value, EDITED),
        (swap_two_labels, EDITED),
        (relabel_the_weights, EDITED),
        (remove_the_completeness_mark, "incomplete store (no completeness mark)"),
        (drop_a_feature_column, "features are float32[10, 511] but the store records float32[10, 512]"),
    ]
])
def test_one_damage_gives_one_line_naming_it(copy, capsys, change, message):
    data, store = copy
    edit(store, change)
    result = verify(capsys, store, data)
    assert result.code == 1
    assert result.out == f"{store}: {message}\n"


def test_nan_row_is_named(copy, capsys):
    data, store = copy

    def poison(h5):
        h5["features"][2] = np.nan

    edit(store, poison)
    result = verify(capsys, store, data)
    assert result.code == 1
    assert f"{store}: NaN or Inf features in 1 rows (first: row 2, ants/02.jpg)" in result.out.splitlines()


def test_wrong_label_dtype_and_missing_dataset(copy, capsys):
    data, store = copy

    def retype(h5):
        labels = h5["labels"][()].astype(np.int32)
        del h5["labels"]
        h5["labels"] = labels

    edit(store, retype)
    assert verify(capsys, store, data).out == f"{store}: labels is int32[10], expected int64[10]\n"
    edit(store, lambda h5: h5.__delitem__("file_size"))
    assert verify(capsys, store, data).out == f"{store}: missing file_size\n"


def test_missing_extra_and_modified_images_are_named(copy, capsys):
    data, store = copy
    (data / "train" / "bees" / "01.jpg").unlink()
    write_jpeg(data / "train" / "ants" / "zz-new.jpg", seed=77)
    write_jpeg(data / "train" / "bees" / "03.jpg", seed=78)  # same name, other picture
    result = verify(capsys, store, data)
    assert result.code == 1
    assert result.out.splitlines() == [
        f"{store}: 1 image added since extraction: ants/zz-new.jpg",
        f"{store}: 1 image removed since extraction: bees/01.jpg",
        f"{store}: 1 image modified since extraction (size or mtime): bees/03.jpg",
    ]
    assert "1 of 1 stores have problems" in result.err


def test_new_class_folder(copy, capsys):
    data, store = copy
    (data / "train" / "wasps").mkdir()
    assert verify(capsys, store, data).out == f"{store}: class folders changed (ants, bees -> ants, bees, wasps)\n"


def test_stores_of_one_split_must_align(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"ants": 2, "bees": 2})
    out = tmp_path / "out"
    run = ["extract", data, "--split", "train", "--out", out, *TINY_RUN]
    assert run_cli(capsys, *run).code == 0
    write_jpeg(data / "train" / "ants" / "late.jpg", seed=50)
    assert run_cli(capsys, *run, "--node", "avgpool").code == 0  # another store, made after the change
    first, second = out / "train" / "resnet18.h5", out / "train" / "resnet18@avgpool.h5"
    result = run_cli(capsys, "verify", first, second)
    assert result.code == 1
    assert result.out.splitlines() == [
        f"{first}: 1 image added since extraction: ants/late.jpg",
        f"{second}: rows not aligned with {first} (same split of the same folder, other images or order): "
        "their features cannot be joined",
    ]


def test_missing_store_and_unfinished_run(tmp_path, capsys):
    result = run_cli(capsys, "verify", tmp_path / "nothing.h5")
    assert result.code == 1 and result.out == f"{tmp_path / 'nothing.h5'}: no such store\n"

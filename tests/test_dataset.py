from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import blobs, make_image_folder, write_store
from torch.utils.data import DataLoader

from featurekit.errors import AlignmentError, SettingsError, StoreError
from featurekit.store import dataset as dataset_module
from featurekit.store.dataset import FeatureDataset, check_same_extraction, load_features
from featurekit.store.format import read_store, store_path


def test_in_memory_concatenates_columns_in_backbone_order(two_backbone_features):
    _, features_dir = two_backbone_features
    data = load_features(features_dir, "train", ["b", "a"])
    a = read_store(store_path(features_dir, "train", "a"))
    b = read_store(store_path(features_dir, "train", "b"))
    assert data.features.dtype == np.float32 and data.features.shape == (24, 10)
    np.testing.assert_array_equal(data.features[:, :4], b.features.astype(np.float32))
    np.testing.assert_array_equal(data.features[:, 4:], a.features.astype(np.float32))
    assert [s.store_name for s in data.stores] == ["b", "a"] and data.stores[1].columns == slice(4, 10)
    assert data.classes == ["ant", "bee", "wasp"] and data.paths == a.paths
    np.testing.assert_array_equal(data.labels, a.labels)


def test_dataloader_with_two_workers_returns_the_in_memory_rows(two_backbone_features):
    _, features_dir = two_backbone_features
    memory = load_features(features_dir, "valid", ["a", "b"])
    dataset = FeatureDataset(features_dir, "valid", ["a", "b"])
    dataset[0]  # opens the files in this process before the workers fork: they must not reuse them
    rows, labels = [], []
    for x, y in DataLoader(dataset, batch_size=5, num_workers=2, shuffle=False):
        rows.append(x)
        labels.append(y)
    np.testing.assert_array_equal(torch.cat(rows).numpy(), memory.features)
    np.testing.assert_array_equal(torch.cat(labels).numpy(), memory.labels)
    assert dataset.paths == memory.paths and dataset.classes == memory.classes
    np.testing.assert_array_equal(dataset[-1][0].numpy(), memory.features[-1])
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    dataset.close()


def test_load_reads_only_the_chosen_columns(two_backbone_features, monkeypatch):
    _, features_dir = two_backbone_features
    full = load_features(features_dir, "train", ["b", "a"])
    middle = load_features(features_dir, "train", ["b", "a"], columns=slice(2, 8))  # b's last 2, a's first 4
    np.testing.assert_array_equal(middle.features, full.features[:, 2:8])
    assert [s.columns for s in middle.stores] == [slice(0, 2), slice(2, 6)]
    assert middle.columns.tolist() == [2, 3, 4, 5, 6, 7]
    read, real_read = [], dataset_module._read_columns
    monkeypatch.setattr(dataset_module, "_read_columns",
                        lambda path, *args: read.append(path.name) or real_read(path, *args))
    picked = load_features(features_dir, "train", ["b", "a"], columns=[5, 7, 9])  # of a only
    np.testing.assert_array_equal(picked.features, full.features[:, [5, 7, 9]])
    assert [s.columns for s in picked.stores] == [slice(0, 0), slice(0, 3)] and read == ["a.h5"]
    for bad, message in (([3, 1], "increasing"), ([10], "outside 0-9")):
        with pytest.raises(SettingsError, match=message):
            load_features(features_dir, "train", ["b", "a"], columns=bad)


def test_batches_equal_rows_read_one_by_one(two_backbone_features, tmp_path):
    _, features_dir = two_backbone_features
    memory = load_features(features_dir, "valid", ["a", "b"])
    dataset = FeatureDataset(features_dir, "valid", ["a", "b"])
    indices = [5, -1, 0, 5, 2]  # unsorted, repeated, negative
    pairs = dataset.__getitems__(indices)
    assert [label for _, label in pairs] == memory.labels[indices].tolist()
    np.testing.assert_array_equal(torch.stack([row for row, _ in pairs]).numpy(), memory.features[indices])
    rows, labels = dataset[indices]
    np.testing.assert_array_equal(rows.numpy(), memory.features[indices])
    assert labels.dtype == torch.int64 and labels.tolist() == memory.labels[indices].tolist()
    batches = list(dataset.loader(batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(x) for x, _ in batches] == [5, 5, 2]
    assert [len(x) for x, _ in dataset.loader(batch_size=5, drop_last=True)] == [5, 5]
    in_order = torch.cat([x for x, _ in dataset.loader(batch_size=5, shuffle=False, num_workers=2)])
    np.testing.assert_array_equal(in_order.numpy(), memory.features)
    seen = torch.cat([x for x, _ in batches]).numpy()
    order = np.lexsort(seen.T[::-1])
    np.testing.assert_array_equal(seen[order], memory.features[np.lexsort(memory.features.T[::-1])])

    chunked = tmp_path / "chunked"  # a store rewritten with a chunked, compressed layout: read through h5py
    for name in ("a", "b"):
        source, target = store_path(features_dir, "valid", name), store_path(chunked, "valid", name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(source, "r") as old, h5py.File(target, "w") as new:
            for key in old:
                old.copy(key, new)
            del new["features"]
            new.create_dataset("features", data=old["features"][()], chunks=(2, 2), compression="gzip")
            new.attrs.update(old.attrs)
    again = FeatureDataset(chunked, "valid", ["a", "b"])  # the content checksum does not depend on the layout
    np.testing.assert_array_equal(again[indices][0].numpy(), memory.features[indices])
    dataset.close()
    again.close()


def _second_listing_store(tmp_path: Path, name: str, counts: dict[str, int], shuffle: bool = False) -> Path:
    """A store of backbone ``name`` over its own image folder, written into the fixture's features dir."""
    listing = make_image_folder(tmp_path / f"data-{name}", "train", counts)
    if shuffle:
        records = list(listing.records)
        records[0], records[1] = records[1], records[0]
        listing = type(listing)(listing.root, listing.split, listing.classes, tuple(records))
    labels = np.array([r.label for r in listing.records])
    return write_store(tmp_path / "features", listing, name, blobs(labels, 3, seed=3))


def test_shuffled_paths_name_backbone_counts_and_row(tmp_path, two_backbone_features):
    _second_listing_store(tmp_path, "c", {"ant": 8, "bee": 8, "wasp": 8}, shuffle=True)
    with pytest.raises(AlignmentError, match=r"^c \(.*c\.h5\) does not line up with a \(.*a\.h5\): 24 vs 24 rows, "
                                             r"first differing row 0: 'ant/img_01.jpg' vs 'ant/img_00.jpg'"):
        load_features(tmp_path / "features", "train", ["a", "c"])
    with pytest.raises(AlignmentError, match="first differing row 0"):
        FeatureDataset(tmp_path / "features", "train", ["a", "c"])


def test_missing_rows_are_reported_with_both_counts(tmp_path, two_backbone_features):
    _second_listing_store(tmp_path, "c", {"ant": 8, "bee": 7, "wasp": 8})
    with pytest.raises(AlignmentError,
                       match=r"23 vs 24 rows, first differing row 15: 'wasp/img_00.jpg' vs 'bee/img_07.jpg'"):
        load_features(tmp_path / "features", "train", ["a", "c"])


def test_different_class_lists(tmp_path, two_backbone_features):
    _second_listing_store(tmp_path, "c", {"ant": 8, "bee": 8, "hornet": 8})
    with pytest.raises(AlignmentError, match=r"^c .*: 3 vs 3 classes, first differing class #2: 'hornet' vs 'wasp'"):
        load_features(tmp_path / "features", "train", ["a", "c"])


def test_same_paths_but_different_labels(tmp_path, two_backbone_features):
    # Same file names under other class folders: paths differ, so it is caught as a path mismatch;
    # identical paths with other labels can only come from a damaged store, written here by hand.
    path = store_path(tmp_path / "features", "train", "b")
    with h5py.File(path, "r+") as h5:
        labels = h5["labels"][()]
        labels[5] = 2
        h5["labels"][...] = labels
    with pytest.raises(AlignmentError,
                       match=r"^b .*first differing label at row 5 \(ant/img_05.jpg\): 'wasp' vs 'ant'"):
        load_features(tmp_path / "features", "train", ["a", "b"])


def test_unfinished_store_is_refused(tmp_path, two_backbone_features):
    listing = make_image_folder(tmp_path / "data", "train", {"ant": 8, "bee": 8, "wasp": 8})
    labels = np.array([r.label for r in listing.records])
    write_store(tmp_path / "features", listing, "c", blobs(labels, 3, seed=3), rows=10)
    unfinished = r"c\.h5: extraction unfinished .*\(c, split 'train'; stores of split 'train' in .*: a, b\)"
    with pytest.raises(StoreError, match=unfinished):
        load_features(tmp_path / "features", "train", ["a", "c"])


def test_store_without_completeness_mark_is_refused(two_backbone_features):
    _, features_dir = two_backbone_features
    with h5py.File(store_path(features_dir, "valid", "b"), "r+") as h5:
        del h5.attrs["complete"]
    with pytest.raises(StoreError, match=r"b\.h5: incomplete store"):
        FeatureDataset(features_dir, "valid", ["a", "b"])


def test_store_of_another_split_is_refused(two_backbone_features):
    root, features_dir = two_backbone_features
    valid_b = store_path(features_dir, "valid", "b")
    valid_b.unlink()
    train_b = store_path(features_dir, "train", "b")
    valid_b.write_bytes(train_b.read_bytes())  # a train store copied under the valid name: whole, but wrong
    with pytest.raises(AlignmentError, match=r"^b .*store is of split 'train', expected 'valid'"):
        load_features(features_dir, "valid", ["a", "b"])


def test_edited_store_is_refused_by_its_checksum(two_backbone_features):
    _, features_dir = two_backbone_features
    path = store_path(features_dir, "valid", "b")
    with h5py.File(path, "r+") as h5:
        h5["features"][0, 0] += 1.0
    with pytest.raises(StoreError, match=r"b\.h5: content checksum mismatch"):
        load_features(features_dir, "valid", ["a", "b"])
    with pytest.raises(StoreError, match="content checksum mismatch"):
        FeatureDataset(features_dir, "valid", ["a", "b"])
    assert len(FeatureDataset(features_dir, "valid", ["a", "b"], verify=False)) == 12


def test_labels_outside_the_classes_are_refused(two_backbone_features):
    _, features_dir = two_backbone_features
    with h5py.File(store_path(features_dir, "valid", "a"), "r+") as h5:
        labels = h5["labels"][()]
        labels[0] = 7
        h5["labels"][...] = labels
    with pytest.raises(StoreError, match=r"a\.h5: labels outside 0-2"):
        load_features(features_dir, "valid", ["a"])


def _rewrite(features_dir: Path, root: Path, split: str, name: str, **header):
    """Store ``name`` of ``split`` written again over the same images, with other header fields."""
    from featurekit.images.listing import list_split

    listing = list_split(root, split)
    store_path(features_dir, split, name).unlink()
    labels = np.array([r.label for r in listing.records])
    write_store(features_dir, listing, name, blobs(labels, 4, seed=2), **header)


def test_train_and_valid_extracted_differently(two_backbone_features):
    root, features_dir = two_backbone_features
    _rewrite(features_dir, root, "valid", "b", weights_sha256="cd" * 32)
    train, valid = (load_features(features_dir, split, ["a", "b"]) for split in ("train", "valid"))
    with pytest.raises(AlignmentError, match=r"^b: split 'train' \(.*\) and split 'valid' \(.*\) were extracted "
                                             r"with other weights sha256 \(abab.* != cdcd.*\)"):
        check_same_extraction(train, valid)


@pytest.mark.parametrize("field, value", [("precision", "bf16"), ("dtype", "float16"), ("features_version", 1),
                                          ("decode", {"backend": "torchvision"})])
def test_backbones_extracted_unlike_are_not_joined(two_backbone_features, field, value):
    root, features_dir = two_backbone_features
    if field == "decode":
        from featurekit.images.decode import DecodePolicy

        value = DecodePolicy(backend="torchvision").to_dict()
    _rewrite(features_dir, root, "valid", "b", **{field: value})
    with pytest.raises(AlignmentError, match=rf"^b \(.*b\.h5\) does not line up with a \(.*a\.h5\): "
                                             rf"extracted with other {field.replace('_', ' ')} "):
        load_features(features_dir, "valid", ["a", "b"])


def test_same_names_from_another_folder_are_not_joined(tmp_path, two_backbone_features):
    _, features_dir = two_backbone_features
    other = make_image_folder(tmp_path / "elsewhere", "valid", {"ant": 4, "bee": 4, "wasp": 4})
    store_path(features_dir, "valid", "b").unlink()
    labels = np.array([r.label for r in other.records])
    write_store(features_dir, other, "b", blobs(labels, 4, seed=2))  # same relative names, other files
    with pytest.raises(AlignmentError, match=r"same file names, but other files .*elsewhere"):
        load_features(features_dir, "valid", ["a", "b"])


def test_unknown_backbone_names_the_missing_store(two_backbone_features):
    _, features_dir = two_backbone_features
    with pytest.raises(StoreError, match=r"zz\.h5: no such store; run extract"):
        load_features(features_dir, "train", ["a", "zz"])

"""WebDataset tar shards as a split: real tars written here, read by the real lister, decoded by the real
decoder and extracted (resnet18, random weights) as a folder of the same images is."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, committed_chunks, error_lines, make_folder, run_cli

from featurekit.errors import DataError
from featurekit.images.decode import decode_image
from featurekit.images.shards import is_shard_pattern, list_shards
from featurekit.store.format import read_store

ONE_BATCH = ["--batch-size", "1"]  # an image's row does not depend on the batch it rode in


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """A tar of ``samples``, each {member name: bytes}, members in the order given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return path


def shards_of(folder: Path, out: Path) -> str:
    """One shard per class folder of ``folder`` (its images in listing order, ``.cls`` the class name)."""
    for index, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        write_shard(out / f"train-{index:06d}.tar",
                    [{f"{class_dir.name}_{image.stem}.jpg": image.read_bytes(),
                      f"{class_dir.name}_{image.stem}.cls": class_dir.name.encode()}
                     for image in sorted(class_dir.glob("*.jpg"))])
    return str(out / "train-{000000..000001}.tar")


@pytest.fixture
def both(tmp_path):
    """(folder data root, shard pattern of the same images)."""
    data = make_folder(tmp_path / "data", per_class={"ants": 3, "bees": 2})
    return data, shards_of(data / "train", tmp_path / "shards")


def test_the_same_images_from_shards_and_from_a_folder_give_equal_rows(both, tmp_path, capsys):
    data, pattern = both
    wds = pytest.importorskip("webdataset")
    listing = list_shards(pattern, "train")
    keys = [record.path.split("/", 1)[1] for record in listing.records]
    assert keys == [sample["__key__"] for sample in wds.WebDataset(pattern, shardshuffle=False)]
    assert listing.units == (0, 3) and listing.chunk_bounds(2) == [0, 3, 5]  # a chunk is a shard
    for source, out in ((data, "folder"), (pattern, "shards")):
        run = run_cli(capsys, "extract", source, "--split", "train", "--out", tmp_path / out, *TINY_RUN, *ONE_BATCH)
        assert run.code == 0, run.err
    folder, shards = (read_store(tmp_path / out / "train" / "resnet18.h5") for out in ("folder", "shards"))
    np.testing.assert_array_equal(shards.features, folder.features)
    np.testing.assert_array_equal(shards.file_sha256, folder.file_sha256)  # a member's bytes are the file's
    assert shards.classes == folder.classes and np.array_equal(shards.labels, folder.labels)
    assert shards.paths[:2] == ["train-000000.tar/ants_00", "train-000000.tar/ants_01"]
    assert shards.header.listing_rule["kind"] == "webdataset" and shards.header.listing_rule["shards"] == 2
    assert run_cli(capsys, "verify", tmp_path / "shards" / "train" / "resnet18.h5").code == 0
    write_shard(Path(pattern.replace("{000000..000001}", "000001")), [{"bees_00.jpg": b"other", "bees_00.cls": b"b"}])
    changed = run_cli(capsys, "verify", tmp_path / "shards" / "train" / "resnet18.h5")
    assert changed.code == 1 and "train-000001.tar/bees_01" in changed.out


def test_a_shard_is_the_unit_of_shard_i_n_and_of_resume(both, tmp_path, capsys):
    _, pattern = both
    out = tmp_path / "out"
    first = run_cli(capsys, "extract", pattern, "--split", "train", "--out", out, *TINY_RUN, "--shard", "0/2")
    assert first.code == 0, first.err
    assert committed_chunks(out / "train" / "resnet18.h5") == 1  # shard 0 of the job: the first tar, whole
    assert "shard 0/2: 1 chunks (3 images) of train" in first.err
    second = run_cli(capsys, "extract", pattern, "--split", "train", "--out", out, *TINY_RUN, "--shard", "1/2")
    assert second.code == 0 and "5 rows  written" in second.out
    run_cli(capsys, "extract", pattern, "--split", "train", "--out", tmp_path / "one", *TINY_RUN)
    np.testing.assert_array_equal(read_store(out / "train" / "resnet18.h5").features,
                                  read_store(tmp_path / "one" / "train" / "resnet18.h5").features)


def test_labels_from_a_json_field_and_unlabelled_shards(tmp_path):
    image = make_folder(tmp_path / "d", per_class={"a": 1}).joinpath("train", "a", "00.jpg").read_bytes()
    write_shard(tmp_path / "j.tar", [{f"k{i}.jpg": image, f"k{i}.json": b'{"label": %d, "w": 1}' % (i % 2)}
                                     for i in range(3)])
    listing = list_shards(str(tmp_path / "j.tar"), "s", label_key="label")
    assert listing.classes == ("0", "1") and [r.label for r in listing.records] == [0, 1, 0]
    with pytest.raises(DataError, match=r"j.tar: sample k0: no field 'species' in its .json \(fields: label, w\)"):
        list_shards(str(tmp_path / "j.tar"), "s", label_key="species")
    unlabelled = list_shards(str(tmp_path / "j.tar"), "s")  # no .cls anywhere, no --label-key
    assert not unlabelled.labelled and unlabelled.classes == ()
    write_shard(tmp_path / "mixed.tar", [{"a.jpg": image, "a.cls": b"x"}, {"b.jpg": image}])
    with pytest.raises(DataError, match=r"mixed.tar/b: no .cls label \(other samples have one\)"):
        list_shards(str(tmp_path / "mixed.tar"), "s")


def test_bad_shards_are_one_line(tmp_path, capsys):
    (tmp_path / "text.tar").write_text("not a tar at all")
    with pytest.raises(DataError, match=r"text.tar: not a tar file"):
        list_shards(str(tmp_path / "text.tar"), "s")
    with pytest.raises(DataError, match=r"none-\{0..3\}.tar: matches no shard \(no file .*none-0.tar\)"):
        list_shards(str(tmp_path / "none-{0..3}.tar"), "s")
    write_shard(tmp_path / "s-0.tar", [{"a.cls": b"1"}])
    with pytest.raises(DataError, match=r"s-1.tar: no such shard \(1 of the 2 shards"):
        list_shards(str(tmp_path / "s-{0..1}.tar"), "s")
    (tmp_path / "z.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="a compressed tar; featurekit reads images by their offset"):
        list_shards(str(tmp_path / "z.tar.gz"), "s")
    write_shard(tmp_path / "dup.tar", [{"a.jpg": b"x"}, {"b.jpg": b"y"}, {"a.cls": b"1"}])
    with pytest.raises(DataError, match="dup.tar: sample key a appears twice"):
        list_shards(str(tmp_path / "dup.tar"), "s")
    run = run_cli(capsys, "extract", tmp_path / "none-{0..3}.tar", "--split", "a", "b", "--out", tmp_path / "o",
                  *TINY_RUN)
    assert run.code == 1 and "shards are one split; give one --split name" in error_lines(run.err)[0]
    assert is_shard_pattern("s3://bucket/train-{000..009}.tar") and not is_shard_pattern("data/hymenoptera")


def test_bad_samples_follow_on_error(tmp_path, capsys):
    data = make_folder(tmp_path / "d", per_class={"a": 2})
    images = [p.read_bytes() for p in sorted((data / "train" / "a").glob("*.jpg"))]
    write_shard(tmp_path / "s.tar", [{"x.jpg": images[0], "x.cls": b"a"}, {"y.txt": b"caption", "y.cls": b"a"},
                                     {"z.png": b"not a png", "z.cls": b"a"}, {"w.jpg": images[1], "w.cls": b"a"}])
    failed = run_cli(capsys, "extract", tmp_path / "s.tar", "--split", "t", "--out", tmp_path / "o", *TINY_RUN)
    assert failed.code == 1
    assert error_lines(failed.err)[0].startswith(f"featurekit: error: {tmp_path}/s.tar/y: no image member in sample y")
    run = run_cli(capsys, "extract", tmp_path / "s.tar", "--split", "t", "--out", tmp_path / "o", *TINY_RUN,
                  "--on-error", "skip")
    assert run.code == 0, run.err
    store = read_store(tmp_path / "o" / "t" / "resnet18.h5")
    assert store.paths == ["s.tar/x", "s.tar/w"]
    assert store.skipped == [("s.tar/y", "no image member in sample y of s.tar"),
                             ("s.tar/z", "not an image PIL can identify")]


def test_shards_that_fsspec_opens_read_alike(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    data = make_folder(tmp_path / "d", per_class={"a": 2})
    images = sorted((data / "train" / "a").glob("*.jpg"))
    for index, image in enumerate(images):
        local = write_shard(tmp_path / f"s-{index}.tar", [{f"k{index}.jpg": image.read_bytes(), f"k{index}.cls": b"a"}])
        fsspec.filesystem("memory").pipe(f"/featurekit-test/s-{index}.tar", local.read_bytes())
    remote = list_shards("memory://featurekit-test/s-{0..1}.tar", "s")
    local = list_shards(f"file://{tmp_path}/s-{{0..1}}.tar", "s")
    assert [r.path for r in remote.records] == [r.path for r in local.records] == ["s-0.tar/k0", "s-1.tar/k1"]
    assert remote.data_root == "memory://featurekit-test" and remote.source["location"] == remote.data_root
    for (member, _), image in zip(remote.files(), images):
        assert np.array_equal(np.asarray(decode_image(member)), np.asarray(decode_image(image)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decoder", ["torchvision", "pil"])  # torchvision: tar members through batched nvJPEG
def test_shards_and_a_folder_give_equal_rows_on_cuda(both, tmp_path, capsys, decoder):
    data, pattern = both
    on_cuda = ["--device", "cuda", "--decoder", decoder, "--precision", "fp32"]
    for source, out in ((data, "folder"), (pattern, "shards")):
        run = run_cli(capsys, "extract", source, "--split", "train", "--out", tmp_path / out, *TINY_RUN, *ONE_BATCH,
                      *on_cuda)
        assert run.code == 0, run.err
    folder, shards = (read_store(tmp_path / out / "train" / "resnet18.h5") for out in ("folder", "shards"))
    assert shards.header.decode["backend"] == folder.header.decode["backend"] == decoder
    np.testing.assert_array_equal(shards.features, folder.features)

"""Listing an image folder from the wild: links, special files, unreadable folders, odd names.

Every case is a real folder (real symlinks, FIFOs, permission bits, non-UTF-8 names) listed by
the real lister, and the cases that used to go wrong in a run are extracted through the CLI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

from featurekit.errors import DataError, ImageDecodeError
from featurekit.images.decode import decode_image
from featurekit.images.listing import list_split
from featurekit.images.names import fs_path, printable_path
from featurekit.store.format import read_store
from tests.conftest import acting_as_nobody, error_lines, extract_args, make_folder, run_cli, write_jpeg


@contextlib.contextmanager
def within_seconds(seconds: float):
    """Fail instead of hanging: a listing that loops or an open() that blocks is interrupted."""
    def interrupt(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def listed(listing) -> list[str]:
    return [record.path for record in listing.records]


# --------------------------------------------------------------------------- directory links


def test_link_back_up_is_not_followed_and_named(tmp_path):
    data = make_folder(tmp_path / "data", per_class={"ants": 3, "bees": 2})
    os.symlink(".", data / "train" / "ants" / "loop")
    os.symlink("..", data / "train" / "ants" / "up")  # two loops used to hang the listing
    with within_seconds(10):
        listing = list_split(data, "train")
    assert listed(listing) == ["ants/00.jpg", "ants/01.jpg", "ants/02.jpg", "bees/00.jpg", "bees/01.jpg"]
    assert [link for link, _ in listing.links_not_followed] == ["ants/loop", "ants/up"]
    assert dict(listing.links_not_followed)["ants/loop"] == "ants"
    assert any("ants/loop" in line and "not followed" in line for line in listing.notices())


def test_link_to_a_folder_elsewhere_is_followed_once(tmp_path):
    data = make_folder(tmp_path / "data", per_class={"ants": 1, "bees": 1})
    elsewhere = make_folder(tmp_path / "more", per_class={"queens": 2}) / "train" / "queens"
    os.symlink(elsewhere, data / "train" / "ants" / "queens")
    os.symlink(elsewhere, data / "train" / "ants" / "queens_again")  # the same folder: listed once
    listing = list_split(data, "train")
    assert listed(listing) == ["ants/00.jpg", "ants/queens/00.jpg", "ants/queens/01.jpg", "bees/00.jpg"]
    assert listing.links_not_followed == (("ants/queens_again", "ants/queens"),)


def test_loop_link_does_not_repeat_rows_in_the_store(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"ants": 2, "bees": 2})
    os.symlink(".", data / "train" / "ants" / "loop")
    with within_seconds(120):
        run = run_cli(capsys, *extract_args(data, tmp_path / "out"))
    assert run.code == 0, run.err
    store = read_store(tmp_path / "out" / "train" / "resnet18.h5")
    assert store.paths == ["ants/00.jpg", "ants/01.jpg", "bees/00.jpg", "bees/01.jpg"]
    assert "ants/loop" in run.err
    verify = run_cli(capsys, "verify", tmp_path / "out" / "train" / "resnet18.h5")
    assert verify.code == 0, verify.out


# --------------------------------------------------------------------------- special files


def test_fifo_is_listed_but_never_opened(tmp_path):
    data = make_folder(tmp_path / "data", per_class={"ants": 2})
    fifo = data / "train" / "ants" / "pipe.jpg"
    os.mkfifo(fifo)
    with within_seconds(10):
        listing = list_split(data, "train")
        assert "ants/pipe.jpg" in listed(listing)
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(fifo)
    assert str(caught.value) == f"{fifo}: not a regular file (FIFO)"


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_fifo_in_a_run_is_refused_not_waited_for(tmp_path, capsys, on_error, decoder):
    data = make_folder(tmp_path / "data", per_class={"ants": 2, "bees": 1})
    os.mkfifo(data / "train" / "ants" / "pipe.jpg")
    with within_seconds(120):
        run = run_cli(capsys, *extract_args(data, tmp_path / "out", "--on-error", on_error, "--decoder", decoder))
    if on_error == "fail":
        assert run.code == 1
        fifo = data / "train" / "ants" / "pipe.jpg"
        assert error_lines(run.err) == [f"featurekit: error: {fifo}: not a regular file (FIFO) (--on-error skip "
                                        "leaves such images out, each recorded with its reason)"]
    else:
        assert run.code == 0, run.err
        skipped = read_store(tmp_path / "out" / "train" / "resnet18.h5").skipped
        assert skipped == [("ants/pipe.jpg", "not a regular file (FIFO)")]


# --------------------------------------------------------------------------- unreadable folders


@contextlib.contextmanager
def folder_anyone_may_enter():
    """A folder outside pytest's root-only tmp folder, deleted afterwards."""
    folder = Path(tempfile.mkdtemp())
    os.chmod(folder, 0o777)
    try:
        yield folder
    finally:
        for path in folder.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder)


@contextlib.contextmanager
def unreadable_as_nobody(*folders: Path):
    """``folders`` chmod 000, and this process unable to read them (as root: acting as nobody)."""
    for folder in folders:
        folder.chmod(0o000)
    with acting_as_nobody() if os.geteuid() == 0 else contextlib.nullcontext():
        if any(os.access(folder, os.R_OK, effective_ids=True) for folder in folders):
            pytest.skip("permission bits are not enforced here")
        yield


def test_unreadable_subfolder_and_class_folder_are_named_not_dropped_or_empty():
    with folder_anyone_may_enter() as base:
        data = make_folder(base / "data", per_class={"ants": 2, "bees": 2, "wasps": 1})
        write_jpeg(data / "train" / "ants" / "sub" / "hidden_from_us.jpg", seed=3)
        with unreadable_as_nobody(data / "train" / "ants" / "sub", data / "train" / "bees"):
            listing = list_split(data, "train")
        assert listing.classes == ("ants", "bees", "wasps")
        assert listed(listing) == ["ants/00.jpg", "ants/01.jpg", "wasps/00.jpg"]
        assert [folder for folder, _ in listing.unreadable] == ["ants/sub", "bees"]
        assert all(reason == "permission denied" for _, reason in listing.unreadable)
        assert listing.empty_classes == ()
        [line] = [line for line in listing.notices() if "cannot be read" in line]
        assert "ants/sub" in line and "bees" in line


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_unreadable_folder_in_a_run(capsys, on_error):
    with folder_anyone_may_enter() as base:
        data = make_folder(base / "data", per_class={"ants": 2, "bees": 2})
        locked = data / "train" / "bees"
        with unreadable_as_nobody(locked):
            run = run_cli(capsys, *extract_args(data, base / "out", "--on-error", on_error))
        if on_error == "fail":
            assert run.code == 1
            [line] = error_lines(run.err)
            assert line == (f"featurekit: error: {data / 'train'}: 1 folder cannot be read: bees (permission denied) "
                            "(--on-error skip extracts the rest)")
            assert not (base / "out" / "train" / "resnet18.h5").exists()
        else:
            assert run.code == 0, run.err
            assert "1 folder cannot be read: bees (permission denied)" in run.err
            assert read_store(base / "out" / "train" / "resnet18.h5").paths == ["ants/00.jpg", "ants/01.jpg"]


def test_split_whose_only_class_folder_is_unreadable_says_so():
    with folder_anyone_may_enter() as base:
        data = make_folder(base / "data", per_class={"ants": 1})
        with unreadable_as_nobody(data / "train" / "ants"), pytest.raises(DataError) as caught:
            list_split(data, "train")
        assert "cannot be read: ants (permission denied)" in str(caught.value)


# --------------------------------------------------------------------------- files outside the layout


def test_images_directly_in_the_split_and_hidden_images_are_reported(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"ants": 2})
    write_jpeg(data / "train" / "stray.jpg", seed=1)
    (data / "train" / "notes.txt").write_text("not an image")
    write_jpeg(data / "train" / "ants" / ".hidden.jpg", seed=2)
    write_jpeg(data / "train" / "ants" / ".thumbs" / "t.jpg", seed=3)
    (data / "train" / "ants" / ".DS_Store").write_bytes(b"\0")  # hidden, not an image: not worth a word
    listing = list_split(data, "train")
    assert listed(listing) == ["ants/00.jpg", "ants/01.jpg"]
    assert listing.outside_classes == ("stray.jpg",)
    assert listing.hidden == ("ants/.hidden.jpg", "ants/.thumbs")
    assert listing.ignored == ("notes.txt",)
    run = run_cli(capsys, *extract_args(data, tmp_path / "out"))
    assert run.code == 0, run.err
    split = data / "train"
    assert f"{split}: 1 image outside the class folders ignored: stray.jpg" in run.err
    assert f"{split}: 2 hidden entries ignored (names starting with '.'): ants/.hidden.jpg, ants/.thumbs" in run.err
    assert f"{split}: 1 file without an image extension ignored: notes.txt" in run.err


# --------------------------------------------------------------------------- names


NON_UTF8_CLASS = os.fsdecode(b"caf\xe9")


def test_non_utf8_class_folder_works_end_to_end(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={NON_UTF8_CLASS: 2, "tea": 2})
    out = tmp_path / "out"
    run = run_cli(capsys, *extract_args(data, out))
    assert run.code == 0, run.err
    store = read_store(out / "train" / "resnet18.h5")
    assert store.classes == ["caf\\xe9", "tea"]
    assert store.paths[:2] == ["caf\\xe9/00.jpg", "caf\\xe9/01.jpg"]
    assert (data / "train" / fs_path(store.paths[0])).is_file()
    assert run_cli(capsys, "verify", out / "train" / "resnet18.h5").code == 0
    assert "resnet18.h5  4 rows  up to date" in run_cli(capsys, *extract_args(data, out)).out


def test_non_utf8_data_root_works_end_to_end(tmp_path, capsys):
    data = make_folder(tmp_path / os.fsdecode(b"d\xfcnn"), per_class={"ants": 2})
    out = tmp_path / "out"
    assert run_cli(capsys, *extract_args(data, out)).code == 0
    verify = run_cli(capsys, "verify", out / "train" / "resnet18.h5")
    assert verify.code == 0, verify.out


TRICKY = [os.fsdecode(b"x_\xff.jpg"), "x_\\xff.jpg", "x_\\\\.jpg", "line\nbreak.jpg", "tab\t.jpg", "bell\x07.jpg",
          "nel\x85.jpg", "sep\u2028.jpg", "caf\u00e9.jpg", "\\x0a.jpg", "plain.jpg"]


def test_printable_path_is_one_line_injective_and_reversible():
    printed = [printable_path(name) for name in TRICKY]
    assert len(set(printed)) == len(TRICKY)
    assert all(p.isprintable() and p.encode("utf-8") for p in printed)
    assert [fs_path(p) for p in printed] == TRICKY
    assert printable_path("caf\u00e9/plain.jpg") == "caf\u00e9/plain.jpg"  # readable names stay as they are
    assert printable_path(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"  # as stores always wrote them


def test_tricky_names_are_distinct_rows_and_open_from_the_store(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"a": 1})
    for seed, name in enumerate(TRICKY):
        write_jpeg(data / "train" / "a" / name, seed=seed + 10)
    run = run_cli(capsys, *extract_args(data, tmp_path / "out"))
    assert run.code == 0, run.err
    store = read_store(tmp_path / "out" / "train" / "resnet18.h5")
    assert len(store.paths) == len(set(store.paths)) == len(TRICKY) + 1
    for path, row in zip(store.paths, store.features):  # the stored name leads back to the very file
        image = decode_image(data / "train" / fs_path(path))
        assert image.size == (40, 32) and np.isfinite(row).all()


def test_newline_in_a_bad_file_name_keeps_the_error_on_one_line(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"a": 2})
    (data / "train" / "a" / "bad\nname.jpg").write_bytes(b"not a jpeg at all")
    run = run_cli(capsys, *extract_args(data, tmp_path / "out"))
    assert run.code == 1
    assert run.err.strip().splitlines()[-1] == (f"featurekit: error: {data / 'train'}/a/bad\\x0aname.jpg: "
                                                "not an image PIL can identify (--on-error skip leaves such "
                                                "images out, each recorded with its reason)")
    skip = run_cli(capsys, *extract_args(data, tmp_path / "out", "--on-error", "skip"))
    assert "  skipped a/bad\\x0aname.jpg: not an image PIL can identify" in skip.out.splitlines()

"""Resume after SIGKILL, stale inputs, disk full, and concurrent writers, on real runs and files."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from featurekit import files
from featurekit.backbones import rebuild
from featurekit.store import format as store
from featurekit.store.chunks import PartialStore, store_lock
from featurekit.store.format import open_h5, read_store
from tests.conftest import (
    REPO,
    TINY_RUN,
    assert_same_store,
    committed_chunks,
    error_lines,
    extract_args,
    leftovers,
    make_folder,
    run_cli,
    run_subprocess,
    write_jpeg,
)

N_IMAGES = 10  # five chunks of two rows



def killed_at(data: Path, out: Path, point: str) -> bool:
    """Whether a real extraction subprocess was SIGKILLed at crash ``point`` (see files.crash_point)."""
    return run_subprocess(*extract_args(data, out), env={files.CRASH_ENV: point}).returncode == -signal.SIGKILL


# (crash point, what must be on disk after the kill besides committed chunks)
KILL_POINTS = [
    ("manifest-written", "no chunk yet"),
    ("chunk-committed:1", "one chunk"),
    ("chunk-tmp-written:3", "a half-committed chunk (.chunk-*.tmp-PID)"),
    ("chunk-committed:4", "all but the last chunk"),
    ("finalize-tmp-written", "a whole but unrenamed store (.resnet18.h5.tmp-PID)"),
    ("finalize-renamed", "the final store and the partial directory"),
]


@pytest.mark.parametrize("point", [p for p, _ in KILL_POINTS], ids=[p for p, _ in KILL_POINTS])
def test_sigkill_then_same_command_resumes_to_identical_store(point, reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    final = out / "train" / "resnet18.h5"
    killed = run_subprocess(*extract_args(data, out), env={files.CRASH_ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    names = leftovers(out / "train")
    if point.startswith("chunk-tmp"):
        assert any(n.startswith(".chunk-") for n in os.listdir(PartialStore(final).dir)), "kill did not land mid-chunk"
    if point == "finalize-tmp-written":
        assert any(n.startswith(".resnet18.h5.tmp-") for n in names), names
    if point == "finalize-renamed":
        assert_same_store(final, expected)  # already complete; only the cleanup was lost
    else:
        assert not final.exists(), "a file under the final name before finalize completed"
    chunks = committed_chunks(final)
    assert chunks == {"manifest-written": 0, "chunk-committed:1": 1, "chunk-tmp-written:3": 2,
                      "chunk-committed:4": 4}.get(point, 5)

    resumed = run_cli(capsys, *extract_args(data, out))
    assert resumed.code == 0, resumed.err
    if chunks and point != "finalize-renamed":
        assert f"resumed ({chunks} chunks committed)" in resumed.err  # reused, not recomputed
    if "tmp-written" in point:
        assert "1 temporary file(s) of a killed run deleted" in resumed.err
    assert_same_store(final, expected)
    assert leftovers(out / "train") == [], "temporary files or partial chunks left behind"
    assert run_cli(capsys, "verify", final).code == 0


def test_external_sigkill_at_a_random_moment_resumes(tmp_path, capsys):
    """A SIGKILL from outside, timed on the first committed chunk file, not on a hook."""
    data = make_folder(tmp_path / "data", per_class={"ants": 12, "bees": 12})
    out = tmp_path / "out"
    final = out / "train" / "resnet18.h5"
    child = subprocess.Popen([sys.executable, "-m", "featurekit", *extract_args(data, out)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        while child.poll() is None and not (PartialStore(final).dir.is_dir() and committed_chunks(final)):
            time.sleep(0.005)
        child.kill()
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run ended before the kill: make the folder bigger"
    assert not final.exists()

    assert run_cli(capsys, *extract_args(data, out)).code == 0
    assert run_cli(capsys, *extract_args(data, tmp_path / "reference")).code == 0
    assert_same_store(final, tmp_path / "reference" / "train" / "resnet18.h5")
    assert leftovers(out / "train") == []


def test_kill_between_backbones_of_one_chunk_resumes_both(reference, tmp_path, capsys):
    """Chunk 1 committed for resnet18 only: the stores are at different rows when killed."""
    data, expected = reference
    out, two = tmp_path / "out", ["--backbone", "resnet18", "mobilenet_v3_small"]
    killed = run_subprocess(*extract_args(data, out, *two), env={files.CRASH_ENV: "chunk-committed:3"})
    assert killed.returncode == -signal.SIGKILL
    assert committed_chunks(out / "train" / "resnet18.h5") == 2
    assert committed_chunks(out / "train" / "mobilenet_v3_small.h5") == 1

    assert run_cli(capsys, *extract_args(data, out, *two)).code == 0
    assert run_cli(capsys, *extract_args(data, tmp_path / "ref", "--backbone", "mobilenet_v3_small")).code == 0
    assert_same_store(out / "train" / "resnet18.h5", expected)
    assert_same_store(out / "train" / "mobilenet_v3_small.h5", tmp_path / "ref" / "train" / "mobilenet_v3_small.h5")


def test_resume_with_another_chunk_size_keeps_committed_rows(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    assert killed_at(data, out, "chunk-committed:2")
    resumed = run_cli(capsys, *extract_args(data, out), "--chunk-size", "4")
    assert resumed.code == 0, resumed.err
    assert "resumed (2 chunks committed)" in resumed.err
    assert_same_store(out / "train" / "resnet18.h5", expected)


# --------------------------------------------------------------------------- stale inputs


def test_changed_folder_is_refused_then_overwritten(reference, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(reference[0], data)
    out = tmp_path / "out"
    final = out / "train" / "resnet18.h5"
    assert run_cli(capsys, *extract_args(data, out)).code == 0
    before = final.read_bytes()
    write_jpeg(data / "train" / "bees" / "03.jpg", seed=999)  # same name, other picture
    write_jpeg(data / "train" / "ants" / "new.jpg", seed=998)

    refused = run_cli(capsys, *extract_args(data, out))
    assert refused.code == 1
    [line] = error_lines(refused.err)
    assert str(final) in line and "ants/new.jpg" in line and "bees/03.jpg" in line and "--overwrite" in line
    assert final.read_bytes() == before

    explicit_resume = run_cli(capsys, *extract_args(data, out, "--resume"))
    assert explicit_resume.code == 1 and final.read_bytes() == before

    assert run_cli(capsys, *extract_args(data, out, "--overwrite")).code == 0
    assert len(read_store(final).paths) == N_IMAGES + 1
    assert run_cli(capsys, "verify", final).code == 0


@pytest.mark.parametrize("option, what", [(["--dtype", "float16"], "dtype"), (["--full-decode"], "decode")])
def test_other_settings_are_refused_not_reused(option, what, reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    shutil.copytree(expected.parent, out / "train")
    refused = run_cli(capsys, *extract_args(data, out), *option)
    assert refused.code == 1
    assert f"other {what}" in error_lines(refused.err)[0]
    assert_same_store(out / "train" / "resnet18.h5", expected)


def test_store_of_an_older_feature_computation_is_refused_not_reused(reference, tmp_path, capsys, monkeypatch):
    data, expected = reference
    out = tmp_path / "out"
    shutil.copytree(expected.parent, out / "train")
    monkeypatch.setattr(rebuild, "FEATURES_VERSION", rebuild.FEATURES_VERSION + 1)  # a newer build
    refused = run_cli(capsys, *extract_args(data, out))
    assert refused.code == 1
    assert "other features version" in error_lines(refused.err)[0]
    assert_same_store(out / "train" / "resnet18.h5", expected)


def test_stale_committed_chunks_are_refused_then_discarded_with_overwrite(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    assert killed_at(data, out, "chunk-committed:2")
    refused = run_cli(capsys, *extract_args(data, out), "--dtype", "float16")
    assert refused.code == 1
    assert "2 committed chunks" in refused.err and "other dtype" in refused.err and "--overwrite" in refused.err
    assert committed_chunks(out / "train" / "resnet18.h5") == 2  # nothing discarded without asking

    assert run_cli(capsys, *extract_args(data, out)).code == 0  # the original command still resumes
    assert_same_store(out / "train" / "resnet18.h5", expected)


def test_overwrite_run_that_is_killed_resumes_and_keeps_old_store_readable(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    shutil.copytree(expected.parent, out / "train")
    killed = run_subprocess(*extract_args(data, out, "--overwrite", "--dtype", "float16"),
                            env={files.CRASH_ENV: "chunk-committed:2"})
    assert killed.returncode == -signal.SIGKILL
    assert_same_store(out / "train" / "resnet18.h5", expected)  # the old store until the new one is whole
    resumed = run_cli(capsys, *extract_args(data, out, "--overwrite", "--dtype", "float16"))
    assert resumed.code == 0 and "resumed (2 chunks committed)" in resumed.err
    assert read_store(out / "train" / "resnet18.h5").features.dtype == "float16"


# --------------------------------------------------------------------------- disk full


def test_disk_full_while_committing_a_chunk(reference, tmp_path, capsys, monkeypatch):
    data, expected = reference
    out = tmp_path / "out"
    real_savez, calls = store.np.savez, []

    def savez_until_full(handle, **arrays):
        calls.append(1)
        if len(calls) == 3:
            handle.write(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_savez(handle, **arrays)

    monkeypatch.setattr(store.np, "savez", savez_until_full)
    failed = run_cli(capsys, *extract_args(data, out))
    assert failed.code == 1
    [line] = error_lines(failed.err)
    assert "chunk-000000000004-000000000006.npz: cannot write chunk (no space left on device)" in line
    assert not (out / "train" / "resnet18.h5").exists()
    assert not [n for n in os.listdir(PartialStore(out / "train" / "resnet18.h5").dir) if ".tmp-" in n]

    monkeypatch.setattr(store.np, "savez", real_savez)
    assert run_cli(capsys, *extract_args(data, out)).code == 0
    assert_same_store(out / "train" / "resnet18.h5", expected)


def test_disk_full_while_writing_the_store(reference, tmp_path, capsys, monkeypatch):
    data, expected = reference
    out = tmp_path / "out"

    class FullDisk(h5py.File):
        def create_dataset(self, name, *args, **kwargs):
            if name == "paths":
                raise OSError(errno.ENOSPC, "Unable to synchronously write data (No space left on device)")
            return super().create_dataset(name, *args, **kwargs)

    monkeypatch.setattr(store.h5py, "File", FullDisk)
    failed = run_cli(capsys, *extract_args(data, out))
    monkeypatch.undo()
    assert failed.code == 1
    [line] = error_lines(failed.err)
    assert "resnet18.h5: cannot write store (no space left on device); committed chunks kept" in line
    assert leftovers(out / "train") == [".resnet18.partial"]  # no final name, no temporary store
    assert committed_chunks(out / "train" / "resnet18.h5") == N_IMAGES // 2

    again = run_cli(capsys, *extract_args(data, out))
    assert again.code == 0 and f"resumed ({N_IMAGES // 2} chunks committed)" in again.err
    assert_same_store(out / "train" / "resnet18.h5", expected)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 48 KiB tmpfs: room for the chunks, not for the store. Needs root and mount rights."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (the monkeypatched ENOSPC tests still run)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_real_disk_full_leaves_no_final_file(reference, small_filesystem, capsys):
    data, _ = reference
    failed = run_cli(capsys, *extract_args(data, small_filesystem / "out"))
    assert failed.code == 1
    assert "no space left on device" in error_lines(failed.err)[0]
    assert not [n for n in leftovers(small_filesystem / "out" / "train") if n != ".resnet18.partial"]
    assert not (small_filesystem / "out" / "train" / "resnet18.h5").exists()


# --------------------------------------------------------------------------- concurrency


def test_second_writer_is_refused_while_readers_of_finished_stores_are_not(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    final = out / "train" / "resnet18.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from featurekit.store.chunks import store_lock\n"
                               "with store_lock(Path(sys.argv[1])):\n    print('locked', flush=True); sys.stdin.read()",
         str(final)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = run_cli(capsys, *extract_args(data, out))
        assert refused.code == 1
        assert f"another featurekit process (pid {holder.pid}) is writing it" in error_lines(refused.err)[0]
        assert not PartialStore(final).dir.exists()

        shutil.copy2(expected, final)  # a finished store is read, not written: no lock needed
        assert run_cli(capsys, *extract_args(data, out)).code == 0
    finally:
        holder.communicate("", timeout=30)
    with store_lock(final):  # released with its holder, and its file removed
        pass
    assert not final.with_name(".resnet18.lock").exists()


def test_reader_never_opens_a_store_killed_during_finalize(reference, tmp_path):
    data, _ = reference
    out = tmp_path / "out"
    assert killed_at(data, out, "finalize-tmp-written")
    [temporary] = [p for p in (out / "train").iterdir() if ".h5.tmp-" in p.name]
    with pytest.raises(store.StoreError, match="no such store"):
        open_h5(out / "train" / "resnet18.h5")
    with h5py.File(temporary, "r") as h5:  # whole, yet invisible under the final name
        assert h5.attrs["complete"]


def test_stale_store_of_a_later_split_is_refused_before_any_work(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"a": 2})
    make_folder(data, "valid", per_class={"a": 2}, seed=1)
    out = tmp_path / "out"
    assert run_cli(capsys, "extract", data, "--split", "valid", "--out", out, *TINY_RUN).code == 0
    write_jpeg(data / "valid" / "a" / "00.jpg", seed=42)

    refused = run_cli(capsys, "extract", data, "--split", "train", "valid", "--out", out, *TINY_RUN)
    assert refused.code == 1
    assert "valid/resnet18.h5: exists but was made from another state" in error_lines(refused.err)[0]
    assert not (out / "train").exists(), "train was extracted before the refusal"


def test_damaged_committed_chunk_is_recomputed(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    assert killed_at(data, out, "chunk-committed:3")
    damaged = PartialStore(out / "train" / "resnet18.h5").dir / "chunk-000000000002-000000000004.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a disk that lied about its fsync

    failed = run_cli(capsys, *extract_args(data, out))
    assert failed.code == 1
    assert f"{damaged}: damaged chunk removed" in error_lines(failed.err)[0] and "rows 2-4" in failed.err
    assert not (out / "train" / "resnet18.h5").exists()
    again = run_cli(capsys, *extract_args(data, out))
    assert again.code == 0 and "resumed (4 chunks committed)" in again.err
    assert_same_store(out / "train" / "resnet18.h5", expected)


def test_missing_chunks_follow_the_grid_and_cover_every_store():
    from featurekit.extraction.engine import missing_chunks

    # store A has rows 0-4, store B rows 0-2: rows 2-10 are needed, cut on the grid of 4
    assert missing_chunks([[(0, 2), (2, 4)], [(0, 2)]], 10, 4) == [(2, 4), (4, 8), (8, 10)]
    assert missing_chunks([[(0, 3)]], 7, 2) == [(3, 4), (4, 6), (6, 7)]
    assert missing_chunks([[(0, 5)], [(0, 5)]], 5, 2) == []


def test_overlapping_chunks_of_two_chunk_sizes_still_tile(tmp_path):
    partial = PartialStore(tmp_path / "x.h5")
    partial.dir.mkdir()
    for start, stop in [(0, 3), (3, 6), (4, 6), (6, 8), (2, 4)]:
        partial.chunk_path(start, stop).touch()
    assert partial._tiling(8) == [(0, 3, 0, 3), (3, 6, 3, 6), (6, 8, 6, 8)]  # whole chunks where they tile
    partial.chunk_path(6, 8).touch()
    for start, stop in [(6, 7), (7, 8)]:  # and part of one where they cannot: rows 6-8 of chunk 4-8
        partial.chunk_path(start, stop).touch()
    partial.chunk_path(3, 6).unlink()
    partial.chunk_path(4, 6).unlink()
    partial.chunk_path(4, 8).touch()
    assert partial._tiling(8) == [(0, 3, 0, 3), (2, 4, 3, 4), (4, 8, 4, 8)]
    partial.chunk_path(4, 8).unlink()
    with pytest.raises(store.StoreError, match="rows 4-6 were never committed"):
        partial._tiling(8)


# --------------------------------------------------------------------------- damaged stores, planted locks


def _edit_first_feature(path: Path) -> None:
    with h5py.File(path, "r+") as h5:
        h5["features"][0, 0] += 1.0


def _garbage_in_the_middle(path: Path) -> None:
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 4096] = os.urandom(4096)
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("damage", [_edit_first_feature, _garbage_in_the_middle])
def test_a_damaged_store_is_never_up_to_date_and_overwrite_replaces_it(reference, tmp_path, capsys, damage):
    data, expected = reference
    out = tmp_path / "out"
    final = out / "train" / "resnet18.h5"
    final.parent.mkdir(parents=True)
    shutil.copy2(expected, final)
    damage(final)

    refused = run_cli(capsys, *extract_args(data, out))
    assert refused.code == 1
    [line] = error_lines(refused.err)
    assert line.startswith(f"featurekit: error: {final}: exists but is damaged (") and "--overwrite" in line

    assert run_cli(capsys, *extract_args(data, out, "--overwrite")).code == 0
    assert_same_store(final, expected)
    assert run_cli(capsys, *extract_args(data, out)).code == 0  # and now it is current


def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_untouched(reference, tmp_path, capsys):
    data, _ = reference
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (out / "train" / ".resnet18.lock").symlink_to(victim)

    refused = run_cli(capsys, *extract_args(data, out))
    assert refused.code == 1
    assert "lock file is a symbolic link; refusing to follow it" in error_lines(refused.err)[0]
    assert victim.read_text() == "keep me"


def test_info_and_train_head_refuse_labels_outside_the_classes(reference, tmp_path, capsys):
    _, expected = reference
    store = tmp_path / "features" / "train" / "resnet18.h5"
    store.parent.mkdir(parents=True)
    shutil.copy2(expected, store)
    with h5py.File(store, "r+") as h5:
        labels = h5["labels"][()]
        labels[0] = 7
        h5["labels"][...] = labels
    info = run_cli(capsys, "info", store)
    assert info.code == 1 and error_lines(info.err) == [f"featurekit: error: {store}: labels outside 0-1 "
                                                        "(the store is damaged)"]
    trained = run_cli(capsys, "train-head", tmp_path / "features", "--backbones", "resnet18", "--head", "logreg",
                      "--valid-split", "none", "--no-plots")
    assert trained.code == 1 and "labels outside 0-1" in error_lines(trained.err)[0]

"""``extract --shard I/N``: processes that share only the output folder write one store together.

The folder has 10 images: five chunks of two rows. Every run uses the same default thread count
(in this process and in children alike), so the stores are compared bit for bit.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import Callable

import numpy as np
import pytest

from featurekit import files
from featurekit.errors import SettingsError
from featurekit.extraction.settings import Shard
from featurekit.store.chunks import Chunk, PartialStore
from featurekit.store.format import read_store
from featurekit.store.writer import StoreWriter
from tests.conftest import (
    assert_same_store,
    committed_chunks,
    error_lines,
    extract_args,
    finished,
    leftovers,
    make_image_folder,
    run_cli,
    run_subprocess,
    spawn,
    store_header,
)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_four_shards_started_together_write_the_store_one_process_writes(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    children = [spawn(*extract_args(data, out, "--shard", f"{i}/4")) for i in range(4)]
    done = [finished(child, timeout=300) for child in children]
    assert [d.returncode for d in done] == [0, 0, 0, 0], [d.stderr[-2000:] for d in done]
    assert "shard 0/4: 2 chunks (4 images) of train" in done[0].stderr  # blocks of the grid: 2, 1, 1, 1 chunks
    assert all(f"shard {i}/4: 1 chunks (2 images) of train" in done[i].stderr for i in (1, 2, 3))
    assert sum(d.stdout.count("rows  written") for d in done) == 1  # joined once
    assert_same_store(out / "train" / "resnet18.h5", expected)
    assert leftovers(out / "train") == []
    assert run_cli(capsys, "verify", out / "train" / "resnet18.h5").code == 0


def test_shards_finishing_at_once_join_once(reference, tmp_path):
    """Both shards are held after their commits and let go together; the one that takes the lock
    is held inside it until the other has given up, so both reach the join at the same moment."""
    data, expected = reference
    out, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    env = {files.PAUSE_ENV: f"{sync}:shard-committed,join-locked"}
    children = [spawn(*extract_args(data, out, "--shard", f"{i}/2"), env=env) for i in range(2)]
    try:
        wait_until(lambda: len(list(sync.glob("shard-committed.*"))) == 2, "both shards to commit their chunks")
        assert committed_chunks(out / "train" / "resnet18.h5") == 5
        (sync / "shard-committed.go").touch()
        wait_until(lambda: any(c.poll() is not None for c in children), "a shard to give up the join")
        [loser] = [c for c in children if c.poll() is not None]
        gave_up = finished(loser)
        assert gave_up.returncode == 0, gave_up.stderr
        assert "train/resnet18.h5  10 rows  being joined by another process" in gave_up.stdout
        assert len(list(sync.glob("join-locked.*"))) == 1 and not (out / "train" / "resnet18.h5").exists()
    finally:
        (sync / "shard-committed.go").touch()
        (sync / "join-locked.go").touch()
    [winner] = [c for c in children if c is not loser]
    joined = finished(winner)
    assert joined.returncode == 0, joined.stderr
    assert "train/resnet18.h5  10 rows  written" in joined.stdout
    assert_same_store(out / "train" / "resnet18.h5", expected)
    assert leftovers(out / "train") == []


def test_a_shard_killed_midway_then_rerun_alone_gives_the_same_store(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    final = out / "train" / "resnet18.h5"
    first = extract_args(data, out, "--shard", "0/2")  # rows 0-6; shard 1/2 has rows 6-10
    killed = run_subprocess(*first, env={files.CRASH_ENV: "chunk-tmp-written:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert committed_chunks(final) == 1
    [temporary] = PartialStore(final).dir.glob(".chunk-*")
    assert f".tmp-{socket.gethostname()}-" in temporary.name  # hosts sharing the folder never collide

    other = run_cli(capsys, *extract_args(data, out, "--shard", "1/2"))
    assert other.code == 0, other.err
    assert "train/resnet18.h5  6 rows  partial" in other.out and not final.exists()
    assert temporary.exists(), "a shard deleted a temporary file that may be a live shard's"

    rerun = run_cli(capsys, *first)
    assert rerun.code == 0, rerun.err
    assert "shard 0/2: 2 chunks (4 images) of train" in rerun.err  # only what the kill lost
    assert "1 temporary file(s) of a killed run deleted" in rerun.err  # by the join
    assert "train/resnet18.h5  10 rows  written" in rerun.out
    assert_same_store(final, expected)
    assert leftovers(out / "train") == []
    again = run_cli(capsys, *first)  # a shard started after the join
    assert again.code == 0 and "10 rows  up to date" in again.out


def test_a_plain_extract_joins_what_shards_committed_and_extracts_the_rest(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    for part in ("1/4", "3/4"):
        assert run_cli(capsys, *extract_args(data, out, "--shard", part)).code == 0
    plain = run_cli(capsys, *extract_args(data, out))
    assert plain.code == 0, plain.err
    assert "resumed (2 chunks committed)" in plain.err and "10 rows  written" in plain.out
    assert_same_store(out / "train" / "resnet18.h5", expected)


def test_a_shard_refuses_chunks_of_another_run_unless_overwrite(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    assert run_cli(capsys, *extract_args(data, out, "--shard", "0/2")).code == 0  # float32, 3 chunks
    refused = run_cli(capsys, *extract_args(data, out, "--shard", "1/2", "--dtype", "float16"))
    assert refused.code == 1
    [line] = error_lines(refused.err)
    assert "3 committed chunks" in line and "other dtype" in line and "--overwrite" in line
    assert committed_chunks(out / "train" / "resnet18.h5") == 3  # nothing discarded without asking

    replaced = run_cli(capsys, *extract_args(data, out, "--shard", "1/2", "--dtype", "float16", "--overwrite"))
    assert replaced.code == 0, replaced.err
    assert "3 stale committed chunks discarded (--overwrite)" in replaced.err
    assert committed_chunks(out / "train" / "resnet18.h5") == 2


@pytest.mark.parametrize("value", ["5/4", "4/4", "0/0", "a/b", "1", "-1/4"])
def test_bad_shard_values_are_one_line_errors(value, reference, tmp_path, capsys):
    data, _ = reference
    refused = run_cli(capsys, *extract_args(data, tmp_path / "out", f"--shard={value}"))
    assert refused.code == 1
    [line] = error_lines(refused.err)
    assert f"--shard {value!r}" in line or f"--shard {value}:" in line
    assert "0 <= I < N" in line
    assert not (tmp_path / "out").exists()


def test_shard_blocks_tile_the_chunk_grid_whatever_is_committed():
    for n, chunk_size, count in [(10, 2, 4), (10, 2, 7), (1, 5, 3), (1000, 64, 6)]:
        blocks = [Shard(i, count).rows(n, chunk_size) for i in range(count)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # contiguous, no overlap
        assert all(start % chunk_size == 0 or start == n for start, _ in blocks)  # on the grid
    with pytest.raises(SettingsError, match="--shard 3/3"):
        Shard(3, 3)


def test_a_joiner_whose_chunks_another_joiner_took_reports_the_store_up_to_date(tmp_path, monkeypatch):
    """Where flock does not reach across hosts (NFS mounted nolock) two shards may both join; the one
    that finds the chunks gone because the other's store is in place says so instead of failing."""
    listing = make_image_folder(tmp_path / "data", "train", {"a": 3})
    header = store_header("x", listing, 4)
    first, second = (StoreWriter(tmp_path / "out", listing, "x", header) for _ in range(2))
    assert first.begin(None)
    first.commit(Chunk(0, 3, np.arange(3), np.ones((3, 4), np.float32)))
    real_rows = PartialStore.rows

    def rows_then_the_other_joins(partial, n):
        rows = real_rows(partial, n)
        monkeypatch.setattr(PartialStore, "rows", real_rows)
        first.finish()  # renames its store into place and removes the chunks
        return rows

    monkeypatch.setattr(PartialStore, "rows", rows_then_the_other_joins)
    assert second.join_once() == "up to date"
    assert read_store(first.final).features.tolist() == np.ones((3, 4)).tolist()
    assert leftovers(tmp_path / "out" / "train") == []

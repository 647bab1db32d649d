"""torchrun: several processes extract one split into the same stores (CPU, gloo), and a job
that died leaves chunks that a rerun with another number of processes finishes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from featurekit import files
from featurekit.store.format import read_store
from tests.conftest import TINY_RUN, committed_chunks, leftovers, make_folder, run_cli, run_subprocess


def torchrun(processes: int, *args: str | os.PathLike, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_subprocess(*args, env=env, timeout=300,
                          launcher=["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("reference")
    data = make_folder(base / "data")  # 10 images: five chunks of two
    completed = run_subprocess("extract", data, "--split", "train", "--out", base / "out", *TINY_RUN)
    assert completed.returncode == 0, completed.stderr
    return data, base / "out" / "train" / "resnet18.h5"


def same_rows(actual: Path, expected: Path) -> None:
    """Same rows and identity; values equal up to thread-count rounding (torchrun runs each
    process with one thread)."""
    a, e = read_store(actual), read_store(expected)
    assert a.paths == e.paths and a.labels.tolist() == e.labels.tolist()
    assert a.header.fingerprint == e.header.fingerprint
    np.testing.assert_allclose(a.features, e.features, rtol=1e-4, atol=1e-5)


def test_two_processes_write_the_store_one_process_writes(reference, tmp_path, capsys):
    data, expected = reference
    out = tmp_path / "out"
    completed = torchrun(2, "extract", data, "--split", "train", "--out", out, *TINY_RUN)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "rank 0/2: 3 chunks (6 images) of train" in completed.stderr
    assert "rank 1/2: 2 chunks (4 images) of train" in completed.stderr
    assert completed.stdout.count("rows  written") == 1  # rank 0 reports, once
    same_rows(out / "train" / "resnet18.h5", expected)
    assert leftovers(out / "train") == []
    assert run_cli(capsys, "verify", out / "train" / "resnet18.h5", "--data-root", data).code == 0


def test_a_job_killed_midway_is_finished_by_a_rerun_with_other_process_counts(reference, tmp_path):
    data, expected = reference
    out = tmp_path / "out"
    final = out / "train" / "resnet18.h5"
    args = ("extract", data, "--split", "train", "--out", out, *TINY_RUN)
    killed = torchrun(2, *args, env={files.CRASH_ENV: "chunk-committed:2"})  # each rank dies after its 2nd chunk
    assert killed.returncode != 0 and not final.exists()
    # the first rank to die makes torchrun stop the other, maybe before its 2nd commit (a loaded machine)
    committed = committed_chunks(final)
    assert 2 <= committed <= 4  # rank 0 committed 2 before it died

    finished = run_subprocess(*args)  # one process finishes what two left
    assert finished.returncode == 0, finished.stderr
    assert f"resumed ({committed} chunks committed)" in finished.stderr
    same_rows(final, expected)


def test_a_torchrun_job_can_be_one_shard_of_several(reference, tmp_path, capsys):
    """One torchrun job per node and --shard per job: nodes without a rendezvous between them."""
    data, expected = reference
    out = tmp_path / "out"
    args = ("extract", data, "--split", "train", "--out", out, *TINY_RUN)
    job = torchrun(2, *args, "--shard", "0/2")  # rows 0-6: three chunks
    assert job.returncode == 0, job.stderr[-3000:]
    assert "shard 0/2 rank 0/2: 2 chunks (4 images)" in job.stderr
    assert "shard 0/2 rank 1/2: 1 chunks (2 images)" in job.stderr
    assert "train/resnet18.h5  6 rows  partial" in job.stdout
    other = run_cli(capsys, *args, "--shard", "1/2")
    assert other.code == 0 and "10 rows  written" in other.out
    same_rows(out / "train" / "resnet18.h5", expected)

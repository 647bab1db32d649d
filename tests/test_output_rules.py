"""Outputs never land on inputs or on what is not a regular file; one writer per output folder.

The rule is one function, :func:`featurekit.files.check_output` (and ``check_output_folder``);
these tests follow it through every command that writes: predict, neighbors, extract,
train-head and finetune.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from conftest import REPO, TUNE_ARGS, error_lines, run_cli

from featurekit import files
from featurekit.errors import SettingsError

RUN = ["--device", "cpu", "--workers", "0", "--quiet"]


def predict(capsys, tiny, out, *extra):
    return run_cli(capsys, "predict", "--head", tiny.logreg, tiny.data / "valid", "--out", out, *RUN, *extra)


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "reader"
    os.mkfifo(path)
    return path


def test_predict_never_replaces_an_input_or_what_is_not_a_regular_file(tiny, tmp_path, fifo, capsys):
    image = sorted((tiny.data / "valid" / "cat").iterdir())[0]
    store = tiny.features / "train" / "resnet18.h5"
    other_store = tmp_path / "copy.h5"
    shutil.copy(store, other_store)
    kept = {path: path.read_bytes() for path in (tiny.logreg, image, store, other_store)}
    cases = {
        tiny.logreg: f"an input of this run ({tiny.logreg}), which the output would replace",
        image: f"inside {(tiny.data / 'valid').resolve()}, an input folder of this run",
        store: f"an input of this run ({store}), which the output would replace",
        other_store: "an HDF5 file (a feature store or a head?), which the output would replace",
        fifo: "not a regular file (a FIFO); the output would replace it by a new file",
        Path("/dev/null"): "not a regular file (a character device); the output would replace it by a new file",
        tmp_path: "a folder, not a file",
        Path("."): "a folder, not a file",
    }
    for out, reason in cases.items():
        result = predict(capsys, tiny, out)
        assert result.code == 1
        assert error_lines(result.err) == [f"featurekit: error: {out}: {reason}; give another --out"]
        assert not Path(f"{out}.json").exists()
    empty = predict(capsys, tiny, "")
    assert empty.code == 1 and error_lines(empty.err) == ["featurekit: error: --out is empty: give a file name"]
    assert {path: path.read_bytes() for path in kept} == kept
    assert fifo.is_fifo() and Path("/dev/null").is_char_device()


def test_a_long_output_name_works_and_its_temporary_stays_within_the_limit(tiny, tmp_path, capsys):
    folder = tmp_path / "plain"  # a plain folder: no report beside the CSV, only OUT.json
    shutil.copytree(tiny.data / "valid" / "cat", folder)
    out = tmp_path / ("p" * 245 + ".csv")  # 249 bytes, OUT.json 254: legal names
    assert run_cli(capsys, "predict", "--head", tiny.logreg, folder, "--out", out, *RUN).code == 0
    assert out.is_file() and Path(f"{out}.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["plain", out.name, f"{out.name}.json"])
    assert len(files.temporary_name(out).name.encode()) <= files.NAME_MAX
    too_long = tmp_path / ("q" * 250 + ".csv")
    refused = run_cli(capsys, "predict", "--head", tiny.logreg, folder, "--out", too_long, *RUN)
    assert error_lines(refused.err) == [f"featurekit: error: {too_long}.json: file name too long (259 bytes; at "
                                        "most 255); give another --out"]


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "head.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    prefix = files.temporary_prefix(target)
    stale, live, remote = (tmp_path / f"{prefix}{who}" for who in (f"{host}-{dead.stdout.strip()}",
                                                                     f"{host}-{os.getppid()}", "other-host-1"))
    for leftover in (stale, live, remote):
        leftover.write_bytes(b"half")
    files.atomic_write(target, b"whole")
    assert not stale.exists() and live.exists() and remote.exists()  # only a dead process of this host's


def test_check_output_refuses_a_side_file_that_cannot_be_written(tmp_path):
    (tmp_path / "p.csv.json").mkdir()
    with pytest.raises(SettingsError, match=r"p\.csv\.json: a folder, not a file; give another --out"):
        files.check_output(tmp_path / "p.csv", side_suffixes=(".json",))
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "p.csv.json")
    with pytest.raises(SettingsError, match="a folder, not a file"):
        files.check_output(link)


def test_neighbors_sheet_is_checked_like_any_output(tiny, tmp_path, capsys):
    image_folder = (tiny.data / "valid").resolve()
    cases = {Path("."): "a folder, not a file", tiny.logreg: f"an input of this run ({tiny.logreg})",
             tiny.data / "valid" / "sheet.png": f"inside {image_folder}, an input folder of this run"}
    for sheet, reason in cases.items():
        result = run_cli(capsys, "neighbors", "--head", tiny.logreg, "--sheet", sheet, "--device", "cpu")
        [line] = error_lines(result.err)
        assert result.code == 1 and line.startswith(f"featurekit: error: {sheet}: {reason}") and \
            line.endswith("; give another --sheet"), line
    written = run_cli(capsys, "neighbors", "--head", tiny.logreg, "--sheet", tmp_path / "s.png", "--device", "cpu")
    assert written.code == 0 and (tmp_path / "s.png").is_file()


def test_extract_writes_stores_only_inside_out(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny.data, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    absolute = run_cli(capsys, "extract", data, "--split", (data / "valid").resolve(), "--out", tmp_path / "f",
                       "--backbone", "resnet18", "--weights", "random", *RUN)
    assert absolute.code == 1 and error_lines(absolute.err) == [
        f"featurekit: error: --split {(data / 'valid').resolve()}: stores go to {tmp_path / 'f' / '<split>'}/ and "
        f"must stay inside {tmp_path / 'f'}; give the split's folder name under the data root (e.g. --split valid)"]
    inside = run_cli(capsys, "extract", data, "--split", "valid", "--out", data / "valid" / "features",
                     "--backbone", "resnet18", "--weights", "random", *RUN)
    [line] = error_lines(inside.err)
    assert inside.code == 1 and f"inside {(data / 'valid').resolve()}, an input folder of this run" in line
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    followed = run_cli(capsys, "extract", data, "--split", "valid", "--out", tmp_path / "f", "--backbone", "resnet18",
                       "--weights", "random", *RUN)
    assert followed.code == 0 and (tmp_path / "f" / "valid" / "resnet18.h5").is_file()


@contextlib.contextmanager
def holding(lock_of: Path) -> Iterator[subprocess.Popen]:
    """A process that holds ``files.folder_lock(lock_of)`` for the block (until its stdin closes)."""
    child = subprocess.Popen([sys.executable, "-c", "import sys\nfrom featurekit.files import folder_lock\n"
                              "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()",
                              str(lock_of)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child
    finally:
        child.stdin.close()
        child.wait()


def test_one_train_head_writes_a_folder_at_a_time(tiny, tmp_path, capsys):
    out = tmp_path / "head"
    args = ["train-head", tiny.features, "--backbone", "resnet18", "--head", "logreg", "--out", out, "--no-plots"]
    with holding(out) as child:
        refused = run_cli(capsys, *args)
    assert refused.code == 1 and error_lines(refused.err) == [
        f"featurekit: error: {out}: another featurekit process (pid {child.pid}) is writing it"]
    assert not out.exists()
    assert run_cli(capsys, *args).code == 0 and (out / "head.h5").is_file()
    assert not list(tmp_path.glob(".*.lock"))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("mine")
    result = run_cli(capsys, *args[:-3], "--out", not_a_folder, "--no-plots")
    assert result.code == 1 and error_lines(result.err) == [
        f"featurekit: error: {not_a_folder}: not a folder (a file); give another --out"]
    assert not_a_folder.read_text() == "mine"


def test_finetune_refuses_a_folder_holding_another_artifact_and_a_second_writer(tiny, tmp_path, capsys):
    head_folder = tmp_path / "head"
    shutil.copytree(tiny.logreg.parent, head_folder)
    report = (head_folder / "report.json").read_bytes()
    args = ["finetune", tiny.data, "--head", head_folder, "--unfreeze", "none", *TUNE_ARGS]
    refused = run_cli(capsys, *args, "--out", head_folder)
    assert refused.code == 1 and error_lines(refused.err) == [
        f"featurekit: error: {head_folder}: holds another artifact (head.h5), which finetune's files would join or "
        f"replace; give another --out (default: {head_folder / 'finetuned'}), or pass --overwrite"]
    assert (head_folder / "report.json").read_bytes() == report and not (head_folder / "model.json").exists()
    default = head_folder / "finetuned"
    with holding(default) as child:
        locked = run_cli(capsys, *args)
    assert locked.code == 1 and f"{default}: another featurekit process (pid {child.pid}) is writing it" in locked.err
    assert run_cli(capsys, *args).code == 0 and (default / "model.json").is_file()  # the default: a folder of its own
    assert run_cli(capsys, *args, "--out", head_folder, "--overwrite").code == 0  # the other way out, followed
    assert (head_folder / "model.json").is_file()


def test_export_never_replaces_the_stores_it_exports(tiny, tmp_path, capsys, fifo):
    store = tiny.features / "valid" / "resnet18.h5"
    before = store.read_bytes()
    export = ["export", tiny.features, "--split", "valid", "--backbone", "resnet18", "--overwrite"]
    pytest.importorskip("pyarrow")
    for out, reason in {store: f"an input of this run ({store}), which the output would replace",
                        fifo: "not a regular file (a FIFO); the output would replace it by a new file"}.items():
        refused = run_cli(capsys, *export, "--out", out)
        assert refused.code == 1 and error_lines(refused.err) == [f"featurekit: error: {out}: {reason}; give another "
                                                                  "--out"]
    assert store.read_bytes() == before and fifo.is_fifo()
    assert run_cli(capsys, *export, "--out", tmp_path / "v.parquet").code == 0

"""Full disks, kills and unknown devices end in one line, leave no temporary, keep the previous output.

Each writer meets ENOSPC twice: injected where the bytes are written (``files.output_handle``, the
one way featurekit's HDF5 and torch files reach the disk), and on a real small tmpfs, in a child
process, since h5py left alone on a full disk crashed the process (SIGSEGV) after its error.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import joblib
import pytest
from conftest import REPO, TINY_RUN, TUNE_ARGS, error_lines, extract_args, run_cli, run_subprocess

from featurekit import files
from featurekit.heads.knn import KNNHead

RUN = ["--device", "cpu", "--workers", "0", "--quiet"]


@pytest.fixture
def full_disk_at(monkeypatch):
    """``full_disk_at(part)``: writes through files.output_handle to a file whose name holds ``part`` fail
    with ENOSPC once some bytes are written (a real, half-written temporary)."""
    real = files._Remembering.write

    def arm(part: str) -> None:
        def write(self, data):
            if part in Path(self.raw.name).name and self.raw.tell() > 0:
                self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise self.error
            return real(self, data)
        monkeypatch.setattr(files._Remembering, "write", write)
    return arm


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(kib)``: a tmpfs of that size (root and mount rights; skipped elsewhere)."""
    mounted = []

    def mount(kib: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)],
                                               capture_output=True).returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (the injected ENOSPC tests still run)")
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


def assert_one_line(result, message: str) -> None:
    returncode = getattr(result, "code", getattr(result, "returncode", None))
    assert returncode == 1, result.err if hasattr(result, "err") else result.stderr
    err = result.err if hasattr(result, "err") else result.stderr
    assert "Traceback" not in err and error_lines(err) == [f"featurekit: error: {message}"], err


# --------------------------------------------------------------------------- train-head


def test_train_head_meets_a_full_disk_at_the_write(tiny, tmp_path, capsys, full_disk_at):
    out = tmp_path / "head"
    args = ["train-head", tiny.features, "--backbone", "resnet18", "--head", "logreg", "--out", out, "--no-plots"]
    assert run_cli(capsys, *args).code == 0
    before = (out / "head.h5").read_bytes()
    full_disk_at("head.h5")
    assert_one_line(run_cli(capsys, *args), f"{out / 'head.h5'}: cannot write (no space left on device)")
    assert (out / "head.h5").read_bytes() == before and temporaries(out) == []


def test_train_head_on_a_real_full_disk(tiny, small_disk):
    disk = small_disk(32)
    out = disk / "head"
    args = ["train-head", tiny.features, "--backbone", "resnet18", "--head", "knn", "--out", out, "--no-plots"]
    done = run_subprocess(*args)
    assert_one_line(done, f"{out / 'head.h5'}: cannot write (no space left on device)")
    assert temporaries(disk) == [] and not (out / "head.h5").exists()


# --------------------------------------------------------------------------- finetune


def test_finetune_meets_a_full_disk_at_the_checkpoint_and_at_the_model(tiny, tmp_path, capsys, full_disk_at):
    args = ["finetune", tiny.data, "--head", tiny.logreg, "--unfreeze", "layer4.1.bn2", *TUNE_ARGS]
    fresh = tmp_path / "fresh"
    full_disk_at("checkpoint.pt")
    assert_one_line(run_cli(capsys, *args, "--out", fresh), f"{fresh / 'checkpoint.pt'}: cannot write the checkpoint "
                                                           "(no space left on device); the previous one is kept")
    assert temporaries(fresh) == [] and not (fresh / "checkpoint.pt").exists()
    done = tmp_path / "done"  # a finished run: the same command saves the model again
    shutil.copytree(tiny.model, done)
    before = {name: (done / name).read_bytes() for name in ("model.pt", "model.json", "checkpoint.pt")}
    full_disk_at("model.pt")
    assert_one_line(run_cli(capsys, *args, "--out", done), f"{done / 'model.pt'}: cannot write (no space left on "
                                                           "device)")
    assert {name: (done / name).read_bytes() for name in before} == before and temporaries(done) == []


def test_finetune_on_a_real_full_disk(tiny, small_disk):
    disk = small_disk(256)  # the checkpoint of a 2.4 M-parameter trunk part: 20 MB
    out = disk / "tuned"
    done = run_subprocess("finetune", tiny.data, "--head", tiny.logreg, "--out", out, "--unfreeze", "layer4.1.conv2",
                          *TUNE_ARGS)
    assert_one_line(done, f"{out / 'checkpoint.pt'}: cannot write the checkpoint (no space left on device); the "
                          "previous one is kept")
    assert temporaries(disk) == []


# --------------------------------------------------------------------------- the shard join


def test_the_shard_join_on_a_real_full_disk_is_one_line_and_keeps_the_chunks(reference, small_disk):
    data, _ = reference
    disk = small_disk(48)  # room for the chunks, not for the store
    first = run_subprocess(*extract_args(data, disk / "out", "--shard", "0/2"))
    assert first.returncode == 0, first.stderr
    joiner = run_subprocess(*extract_args(data, disk / "out", "--shard", "1/2"))
    store = disk / "out" / "train" / "resnet18.h5"
    assert_one_line(joiner, f"{store}: cannot write store (no space left on device); committed chunks kept in "
                            f"{store.with_name('.resnet18.partial')}")
    assert temporaries(disk / "out") == [] and not store.exists()
    assert len(list(store.with_name(".resnet18.partial").glob("chunk-*.npz"))) == 5


def test_the_join_meets_a_full_disk_at_the_write(reference, tmp_path, capsys, full_disk_at):
    data, _ = reference
    out = tmp_path / "out"
    assert run_cli(capsys, *extract_args(data, out, "--shard", "0/2")).code == 0
    full_disk_at("resnet18.h5")
    store = out / "train" / "resnet18.h5"
    assert_one_line(run_cli(capsys, *extract_args(data, out, "--shard", "1/2")),
                    f"{store}: cannot write store (no space left on device); committed chunks kept in "
                    f"{store.with_name('.resnet18.partial')}")
    assert temporaries(out) == [] and not store.exists()


# --------------------------------------------------------------------------- convert-head, predict


@pytest.fixture(scope="module")
def old_head(tmp_path_factory) -> Path:
    """A trusted head file of format 1 (a joblib pickle), large enough to take a moment to convert."""
    import numpy as np

    rows = np.random.default_rng(0).normal(size=(4000, 256)).astype(np.float32)
    head = KNNHead(n_neighbors=3).fit(rows, np.arange(4000) % 2)
    path = tmp_path_factory.mktemp("old") / "head.joblib"
    joblib.dump({"format": "featurekit.head", "format_version": 1, "kind": "knn", "head": head,
                 "metadata": {"classes": ["a", "b"], "backbones": []}}, path)
    return path


SLOW_SAVE = ("import sys, time\nfrom featurekit.cli import main\nfrom featurekit.heads import head_file\n"
             "write = head_file._write_classes\n"
             "def slow(h5, classes):\n    write(h5, classes); print('writing', flush=True); time.sleep(60)\n"
             "head_file._write_classes = slow\nsys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_convert_head_leaves_no_temporary(old_head, tmp_path, sig):
    new = tmp_path / "head.h5"
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "convert-head", "--trust", str(old_head), str(new)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "writing" and temporaries(tmp_path)  # half a head on disk
    child.send_signal(sig)
    assert child.wait(timeout=60) == 130
    assert temporaries(tmp_path) == [] and not new.exists()


def test_a_killed_convert_head_leaves_a_temporary_the_next_run_removes(old_head, tmp_path, capsys):
    new = tmp_path / "head.h5"
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "convert-head", "--trust", str(old_head), str(new)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait()
    assert len(temporaries(tmp_path)) == 1  # SIGKILL: nothing can clean up then
    assert run_cli(capsys, "convert-head", "--trust", old_head, new).code == 0
    assert temporaries(tmp_path) == [] and new.is_file()


def test_convert_head_meets_a_full_disk_at_the_write(old_head, tmp_path, capsys, full_disk_at):
    full_disk_at("head.h5")
    new = tmp_path / "head.h5"
    assert_one_line(run_cli(capsys, "convert-head", "--trust", old_head, new),
                    f"{new}: cannot write (no space left on device)")
    assert temporaries(tmp_path) == [] and not new.exists()


def test_predict_on_a_real_full_disk(tiny, small_disk):
    disk = small_disk(4)
    (disk / "filler").write_bytes(b"x" * 4096)
    out = disk / "p.csv"
    done = run_subprocess("predict", "--head", tiny.logreg, tiny.data / "valid", "--out", out, *RUN)
    assert_one_line(done, f"{out}: cannot write (no space left on device)")
    assert temporaries(disk) == [] and not out.exists()


# --------------------------------------------------------------------------- devices, misspelt stores


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_an_unknown_device_is_one_line_in_every_command(device, tiny, tmp_path, capsys):
    commands = {
        "extract": ["extract", tiny.data, "--split", "train", "--out", tmp_path / "f", "--backbone", "resnet18",
                    "--weights", "random", "--workers", "0", "--quiet"],
        "predict": ["predict", "--head", tiny.logreg, tiny.data / "valid", "--out", tmp_path / "p.csv", "--workers",
                    "0", "--quiet"],
        "train-head": ["train-head", tiny.features, "--backbone", "resnet18", "--head", "logreg", "--out",
                       tmp_path / "h", "--no-plots"],
        "finetune": ["finetune", tiny.data, "--head", tiny.logreg, "--out", tmp_path / "t", "--workers", "0",
                     "--quiet"],
        "neighbors": ["neighbors", "--head", tiny.logreg],
    }
    for args in commands.values():
        result = run_cli(capsys, *args, "--device", device)
        assert_one_line(result, f"--device {device}: featurekit runs on cpu or cuda (cuda:N), not {device}")
    assert not [p for p in tmp_path.iterdir() if p.name != "f"] and not list((tmp_path / "f").rglob("*.h5"))


def test_a_misspelt_store_in_store_equals_file_is_refused_with_the_close_names(tiny, tmp_path, capsys):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    commands = [["predict", "--head", tiny.logreg, tiny.data / "valid", "--out", tmp_path / "p.csv", *RUN],
                ["finetune", tiny.data, "--head", tiny.logreg, "--out", tmp_path / "t", *RUN],
                ["extract", tiny.data, "--split", "train", "--out", tmp_path / "f", *TINY_RUN[:4], *RUN]]
    for args in commands:
        result = run_cli(capsys, *args, "--weights-path", f"resnet81={weights}")
        assert_one_line(result, "--weights-path resnet81=...: no backbone 'resnet81' in this run (resnet18); did you "
                                "mean resnet18?")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


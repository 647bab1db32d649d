"""Cache housekeeping on real features folders: verify and info of folders, heads and models; du; clean,
which never touches a store whose lock is held (a running extraction)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY_RUN, error_lines, extract_args, make_folder, run_cli

from featurekit.cache import CleanSettings, clean, disk_usage
from featurekit.cache.settings import parse_age
from featurekit.errors import SettingsError
from featurekit.store.chunks import PartialStore, store_lock
from featurekit.store.format import read_header

CRASH_AFTER_ONE_CHUNK = {"FEATUREKIT_CRASH_AT": "chunk-committed:1"}


@pytest.fixture
def cache(tmp_path, capsys):
    """(data, features): train and valid stores of resnet18 and a logreg head trained on them."""
    data = make_folder(tmp_path / "data", "train", per_class={"ants": 3, "bees": 3})
    make_folder(data, "valid", per_class={"ants": 2, "bees": 2}, seed=1)
    features = tmp_path / "features"
    assert run_cli(capsys, "extract", data, "--split", "train", "valid", "--out", features, *TINY_RUN).code == 0
    assert run_cli(capsys, "train-head", features, "--backbone", "resnet18", "--head", "logreg", "--no-plots").code == 0
    return data, features


def crashed_run(data, out, *extra):
    """A real extraction killed right after its first chunk: a partial folder and a leftover lock."""
    done = subprocess.run([sys.executable, "-m", "featurekit", *extract_args(data, out, *extra)], cwd=REPO,
                          env={**os.environ, **CRASH_AFTER_ONE_CHUNK, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert done.returncode == -9, done.stderr
    return out / "train" / "resnet18.h5"


def test_verify_and_info_take_folders_heads_and_models(cache, capsys):
    _, features = cache
    head = features / "heads" / "logreg-resnet18" / "head.h5"
    run = run_cli(capsys, "verify", features)
    assert run.code == 0, run.out
    assert run.out.splitlines() == [
        f"{head}: OK (logreg head, 2 classes, resnet18; 2 of its stores checked)",
        f"{features / 'train' / 'resnet18.h5'}: OK (6 rows, 0 skipped, matches its image folder)",
        f"{features / 'valid' / 'resnet18.h5'}: OK (4 rows, 0 skipped, matches its image folder)"]
    info = run_cli(capsys, "info", head.parent)
    assert info.code == 0 and info.out.splitlines()[:2] == [f"{head}", "  head logreg: 2 classes: ants, bees"]
    assert "trained on split train of" in info.out
    # the head's stores made again (other chunking: same rows, but a new run): the head is stale
    assert run_cli(capsys, "extract", cache[0], "--split", "train", "--out", features, *TINY_RUN,
                   "--dtype", "float16", "--overwrite").code == 0
    stale = run_cli(capsys, "verify", head)
    assert stale.code == 1 and "its train store" in stale.out and "train the head again" in stale.out
    assert "1 of 1 stores, heads and models have problems" in stale.err
    (features / "notes.txt").write_text("hi")
    refused = run_cli(capsys, "info", features / "notes.txt")
    assert error_lines(refused.err) == [f"featurekit: error: {features / 'notes.txt'}: not a featurekit store or "
                                        "head or model"]


def test_du_lists_stores_heads_partials_and_locks(cache, tmp_path, capsys):
    data, features = cache
    final = crashed_run(data, tmp_path / "other")
    lines = disk_usage([features, tmp_path / "other"])
    kinds = [line.split()[0] for line in lines[:-1]]
    assert kinds == ["head", "store", "store", "partial", "lock"]
    assert any(line.endswith(f"{PartialStore(final).dir}  (1 chunks, an unfinished run: rerun it, or clean "
                             "--older-than)") for line in lines)
    assert any("(no process holds it: clean removes it)" in line for line in lines)
    assert lines[-1].startswith("total ") and "2 stores" in lines[-1] and "1 partial" in lines[-1]


def test_clean_removes_finished_runs_leftovers_and_never_a_held_store(cache, tmp_path, capsys):
    data, features = cache
    final = crashed_run(data, tmp_path / "out")
    partial = PartialStore(final)
    assert run_cli(capsys, "clean", tmp_path / "out", "--older-than", "0", "--dry-run").code == 0
    assert partial.dir.is_dir()  # a dry run removes nothing, not even the free lock
    with store_lock(final):  # an extraction at work on it
        lines = clean([tmp_path / "out"], CleanSettings(older_than=0))
        assert partial.dir.is_dir() and lines[:2] == [f"kept {final.with_name('.resnet18.lock')} (in use by pid "
                                                      f"{os.getpid()})", f"kept {partial.dir} (in use by pid "
                                                                         f"{os.getpid()})"]
    lines = clean([tmp_path / "out"])
    assert partial.dir.is_dir() and "an unfinished run's: give --older-than to remove it" in lines[0]
    # the same run finished elsewhere: its chunks beside the complete store are leftovers
    assert run_cli(capsys, *extract_args(data, tmp_path / "out")).code == 0
    header = read_header(final)  # what a join killed before its cleanup leaves: the store's own chunks
    PartialStore(final, header.fingerprint).create(header.identity.to_dict())
    lines = clean([tmp_path / "out"])
    assert not partial.dir.exists() and lines[0].startswith(f"removed {partial.dir} (") and "its store is complete" in \
        lines[0]
    assert final.is_file() and (features / "train" / "resnet18.h5").is_file()
    removed = run_cli(capsys, "clean", final)
    assert removed.code == 0 and not final.exists() and removed.out.startswith(f"removed {final} (")


def test_ages_read_as_people_write_them():
    assert [parse_age(text) for text in ("90", "90s", "30m", "2h", "1.5d")] == [90, 90, 1800, 7200, 129600]
    with pytest.raises(SettingsError, match="--older-than '2 weeks': expected a number of seconds"):
        parse_age("2 weeks")
    assert CleanSettings(older_than="2h").older_than == 7200

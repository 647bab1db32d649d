"""The command line's own contract: a parser that loads fast and head kinds that match the registry."""

import subprocess
import sys

import pytest

from featurekit.cli import HEAD_KINDS
from featurekit.heads import HEADS
from tests.conftest import REPO


def test_head_kinds_on_the_command_line_are_the_registry():
    assert HEAD_KINDS == tuple(HEADS)


def test_help_and_info_do_not_import_torch_or_sklearn():
    code = ("import sys; from featurekit.cli import build_parser; build_parser().parse_args(['info', 'x.h5']); "
            "from featurekit import store; print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    from featurekit import cli, store

    missing = tmp_path / "nope.h5"
    assert cli.main(["info", str(missing)]) == 1
    assert capsys.readouterr().err == f"featurekit: error: {missing}: no such store\n"

    def bug(*args, **kwargs):
        raise KeyError("a bug in featurekit")

    monkeypatch.setattr(store, "read_store", bug)
    with pytest.raises(KeyError, match="a bug in featurekit"):  # not swallowed into "error: ..."
        cli.main(["info", str(missing)])


@pytest.mark.parametrize("option, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["--batch-size", "-1"], "--batch-size must be at least 1 (got -1)"),
    (["--chunk-size", "0"], "--chunk-size must be at least 1 (got 0)"),
    (["--workers", "-2"], "--workers must be 0 or more (got -2)"),
])
def test_impossible_numbers_are_refused_before_any_work(tiny_folder, tmp_path, capsys, option, message):
    from featurekit import cli

    code = cli.main(["extract", str(tiny_folder), "--backbone", "resnet18", "--weights", "random", "--quiet",
                     "--out", str(tmp_path / "out"), *option])
    assert code == 1 and capsys.readouterr().err == f"featurekit: error: {message}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tiny_folder, tmp_path, capsys):
    from featurekit import cli

    code = cli.main(["extract", str(tiny_folder), "--backbone", "resnet18", "--weights", "random", "--quiet",
                     "--device", "cuda", "--out", str(tmp_path / "out")])
    assert code == 1
    expected = "featurekit: error: --device cuda: no CUDA device is available here; use --device cpu\n"
    assert capsys.readouterr().err == expected

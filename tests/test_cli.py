"""The command line's own contract: a parser that loads fast, one-line errors, options that check their values."""

import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_help_and_info_do_not_import_torch_or_sklearn():
    code = ("import sys; from featurekit.cli import build_parser; build_parser().parse_args(['info', 'x.h5']); "
            "from featurekit.store import format; print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    from featurekit import cli
    from featurekit.store import info as store

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


# --------------------------------------------------------------------------- help, as a new user reads it


def _subcommands():
    from featurekit.cli import build_parser

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)]
    return parser, commands


def test_version_and_a_user_facing_overview(capsys):
    from featurekit import __version__, cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"featurekit {__version__}\n"
    parser, commands = _subcommands()
    overview = parser.format_help()
    assert "``" not in overview and "Each subcommand is a thin layer" not in overview
    for choice in commands._choices_actions:  # every subcommand has its one line in the overview
        assert choice.help and f"    {choice.dest}" in overview and choice.help[:30] in overview.replace("\n ", " ")


def test_every_option_has_help_and_shows_its_default():
    import argparse

    _, commands = _subcommands()
    for name, sub in commands.choices.items():
        assert sub.description, name
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action)
            assert text, f"{name} {action.option_strings or action.dest}: no help"
            flag = action.nargs == 0
            if action.option_strings and not flag and not action.required:
                assert "default" in text, f"{name} {action.option_strings}: no default shown"


def test_help_says_backbone_everywhere_and_never_the_recipe(capsys):
    from featurekit import cli

    parser, commands = _subcommands()
    texts = [parser.format_help()] + [sub.format_help() for sub in commands.choices.values()]
    assert not any("recipe" in text.lower() for text in texts)
    for name in ("extract", "train-head", "neighbors"):
        assert "--backbone NAME" in commands.choices[name].format_help()
    # the old spelling still works
    assert parser.parse_args(["train-head", "f", "--backbones", "a", "b"]).backbone == ["a", "b"]
    assert parser.parse_args(["extract", "d", "--backbones", "a"]).backbone == ["a"]
    assert cli.main(["list-backbones"]) == 0
    assert "recipe" not in capsys.readouterr().out


def test_list_backbones_imports_no_torch_and_lists_what_torchvision_lists():
    code = ("import sys; from featurekit.cli import main; main(['list-backbones']); "
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert completed.stdout.splitlines()[-1] == "[]"
    import torchvision

    from featurekit.backbones.registry import torchvision_model_names
    assert list(torchvision_model_names()) == sorted(torchvision.models.list_models(module=torchvision.models))
    assert "resnet152" in completed.stdout and "vit_b_16" in completed.stdout


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """``featurekit predict --out - | head``: stdout's reader goes away; no error line, no traceback."""
    child = subprocess.Popen([sys.executable, "-m", "featurekit", "list-backbones"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # before the child has printed anything (it starts in ~0.2 s)
    assert child.wait(timeout=60) == 141 and child.stderr.read() == ""

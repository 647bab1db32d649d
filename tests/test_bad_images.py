"""Images from the wild, generated here as real files: decoded right, or refused with a reason.

Odd but valid files (GIF, CMYK, grayscale, RGBA, palette, 16-bit, EXIF-rotated) must decode to
the right RGB pixels; broken ones (empty, truncated, not an image, decompression bomb,
unreadable, vanished) must give one line naming the file and the reason, then either stop the
run (``--on-error fail``) or be recorded in the store and the summary (``--on-error skip``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurekit.errors import DataError, ImageDecodeError
from featurekit.images import sources as sources_module
from featurekit.images.decode import DecodePolicy, decode_image
from featurekit.images.listing import list_split
from featurekit.store.format import read_store
from featurekit.views.gpu_decode import gpu_jpeg
from tests.conftest import REPO, TINY_RUN, acting_as_nobody, error_lines, extract_args, make_folder, run_cli, write_jpeg

# --------------------------------------------------------------------------- the files


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def truncated_jpeg(path: Path) -> None:
    write_jpeg(path, seed=7, size=(64, 48))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(3).bytes(2000))


def png_1bit(path: Path, width: int, height: int) -> None:
    """A valid, all-black 1-bit PNG written directly: tiny on disk whatever its size."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\0" * ((width // 8 + 1) * height), 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def decompression_bomb(path: Path) -> None:
    """20000 x 10000 pixels in 24 KB: 200 M pixels once decoded, past PIL's own limit too."""
    png_1bit(path, 20_000, 10_000)


def square_bomb(path: Path) -> None:
    """13000 x 13000 in 21 KB: under PIL's own limit; decoding it and cutting a view took 0.8 GB."""
    png_1bit(path, 13_000, 13_000)


def wide_png(path: Path) -> None:
    """30000 x 1 (30 K pixels): its view would scale the 1-pixel side to 256, 7.7 G pixels."""
    Image.new("RGB", (30_000, 1), (90, 20, 200)).save(path)


def wide_jpeg(path: Path) -> None:
    """The same shape as a JPEG, which the GPU decode path takes."""
    Image.new("RGB", (30_000, 1), (90, 20, 200)).save(path, quality=90)


def damaged_jpeg(path: Path) -> None:
    """A real JPEG with 16 bytes zeroed in the middle of its entropy-coded data: PIL decodes it
    without a word, rows 16-47 damaged; libjpeg warns (extraneous bytes before the end marker)."""
    write_jpeg(path, seed=7, size=(64, 48))
    data = bytearray(path.read_bytes())
    start_of_scan = data.find(b"\xff\xda")
    scan = start_of_scan + 2 + int.from_bytes(data[start_of_scan + 2:start_of_scan + 4], "big")
    middle = (scan + data.rfind(b"\xff\xd9")) // 2
    data[middle:middle + 16] = bytes(16)
    path.write_bytes(bytes(data))


def symlink_loop(path: Path) -> None:
    """Unreadable even for root (chmod 000 is not): opening it fails with ELOOP."""
    os.symlink(path.name, path)


def dangling_symlink(path: Path) -> None:
    os.symlink("nowhere.jpg", path)


BROKEN = {  # file name -> (maker, words the reason must contain)
    "zero.jpg": (zero_bytes, "empty file"),
    "truncated.jpg": (truncated_jpeg, "truncated"),
    "random.jpg": (random_bytes, "not an image"),
    "bomb.png": (decompression_bomb, "decompression bomb"),
    "square.png": (square_bomb, "decompression bomb refused (13000x13000 = 169000000 pixels > 89478485)"),
    "wide.png": (wide_png, "extreme aspect ratio refused (30000x1; at most 100:1)"),
    "wide.jpg": (wide_jpeg, "extreme aspect ratio refused (30000x1; at most 100:1)"),
    "damaged.jpg": (damaged_jpeg, "damaged JPEG data (Corrupt JPEG data: 74 extraneous bytes before marker 0xd9)"),
    "loop.jpg": (symlink_loop, "symbolic links"),
    "dangling.jpg": (dangling_symlink, "broken symbolic link"),
}


def gif(path: Path) -> None:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 10, 120, 230] + [0] * 762)
    image.save(path)


def cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(path, quality=95)  # pure red ink


def gray_jpeg(path: Path) -> None:
    Image.new("L", (30, 20), 100).save(path, quality=95)


def rgba_png(path: Path) -> None:
    image = Image.new("RGBA", (30, 20), (0, 0, 255, 0))  # transparent: background shows
    image.paste((0, 200, 0, 255), (0, 0, 10, 20))  # opaque green strip on the left
    image.save(path)


def palette_png(path: Path) -> None:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 200, 50, 10] + [0] * 762)
    image.save(path)


def png_16bit(path: Path) -> None:
    values = np.zeros((20, 30), np.uint16)
    values[:, 10:20], values[:, 20:] = 32768, 65535
    Image.fromarray(values).save(path)


def exif_rotated_jpeg(path: Path) -> None:
    """Stored landscape 40x20, red left half; EXIF orientation 6 shows it portrait, red on top."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)


def pixel(image: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image.getpixel((x, y)), dtype=int)


VALID = {  # file name -> (maker, check of the decoded RGB image)
    "anim.gif": (gif, lambda im: np.abs(pixel(im, 5, 5) - [10, 120, 230]).max() == 0),
    "cmyk.jpg": (cmyk_jpeg, lambda im: np.abs(pixel(im, 15, 10) - [255, 0, 0]).max() <= 12),
    "gray.jpg": (gray_jpeg, lambda im: np.abs(pixel(im, 15, 10) - 100).max() <= 2),
    "rgba.png": (rgba_png, lambda im: list(pixel(im, 2, 2)) == [0, 200, 0] and list(pixel(im, 25, 5)) == [255] * 3),
    "palette.png": (palette_png, lambda im: list(pixel(im, 3, 3)) == [200, 50, 10]),
    "deep.png": (png_16bit, lambda im: [pixel(im, x, 5)[0] for x in (5, 15, 25)] == [0, 128, 255]),
    "rotated.jpg": (exif_rotated_jpeg, lambda im: im.size == (20, 40) and pixel(im, 10, 5)[0] > 200
                    and pixel(im, 10, 35)[2] > 200),
}


# --------------------------------------------------------------------------- decoding, one file


@pytest.mark.parametrize("name", VALID)
def test_odd_but_valid_files_decode_to_the_right_rgb(name, tmp_path):
    maker, looks_right = VALID[name]
    maker(tmp_path / name)
    image = decode_image(tmp_path / name)
    assert image.mode == "RGB"
    assert looks_right(image), f"{name}: {image.size} {np.asarray(image)[::8, ::8].tolist()}"


def test_exif_orientation_is_a_recorded_choice(tmp_path):
    exif_rotated_jpeg(tmp_path / "rotated.jpg")
    assert decode_image(tmp_path / "rotated.jpg", DecodePolicy(exif_transpose=False)).size == (40, 20)
    assert DecodePolicy().to_dict()["exif_transpose"] is True


def test_16bit_png_is_scaled_not_clamped_to_white(tmp_path):
    png_16bit(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").convert("RGB").getpixel((15, 5)) == (255, 255, 255)  # PIL's own clamp
    assert decode_image(tmp_path / "deep.png").getpixel((15, 5)) == (128, 128, 128)


def test_damaged_jpeg_is_refused_although_pil_decodes_it_silently(tmp_path):
    damaged_jpeg(tmp_path / "damaged.jpg")
    write_jpeg(tmp_path / "intact.jpg", seed=7, size=(64, 48))
    silent = np.asarray(Image.open(tmp_path / "damaged.jpg").convert("RGB"), dtype=int)  # no error, no warning
    intact = np.asarray(Image.open(tmp_path / "intact.jpg").convert("RGB"), dtype=int)
    damaged_rows = np.flatnonzero(np.abs(silent - intact).max(axis=(1, 2)) > 40)
    assert (damaged_rows.min(), damaged_rows.max()) == (16, 47)
    with pytest.raises(ImageDecodeError, match=r"damaged\.jpg: damaged JPEG data \(Corrupt JPEG data: "):
        decode_image(tmp_path / "damaged.jpg")
    assert decode_image(tmp_path / "intact.jpg").size == (64, 48)
    assert decode_image(tmp_path / "damaged.jpg", DecodePolicy(refuse_damaged_jpeg=False)).size == (64, 48)


def test_limits_apply_to_the_size_that_is_decoded(tmp_path):
    Image.new("RGB", (2000, 2000), (120, 30, 200)).save(tmp_path / "big.jpg", quality=90)
    Image.new("RGB", (2000, 2000), (120, 30, 200)).save(tmp_path / "progressive.jpg", quality=90, progressive=True)
    tight = DecodePolicy(max_pixels=1_000_000)  # the default draft decodes 2000x2000 at 1000x1000
    assert decode_image(tmp_path / "big.jpg", tight).size == (1000, 1000)
    with pytest.raises(ImageDecodeError) as full_size:
        decode_image(tmp_path / "big.jpg", dataclasses.replace(tight, draft_min_side=None))
    assert str(full_size.value).endswith("big.jpg: decompression bomb refused (2000x2000 = 4000000 pixels > 1000000)")
    with pytest.raises(ImageDecodeError) as progressive:
        decode_image(tmp_path / "progressive.jpg", tight)  # its coefficients are held at full size
    assert "progressive.jpg: decompression bomb refused (progressive JPEG 2000x2000: " in str(progressive.value)
    # nvJPEG decodes at full size: the GPU path leaves such a JPEG to PIL, which decodes it drafted.
    data = (tmp_path / "big.jpg").read_bytes()
    assert gpu_jpeg(data, str(tmp_path / "big.jpg"), "big.jpg", tight) is None
    assert gpu_jpeg(data, str(tmp_path / "big.jpg"), "big.jpg", DecodePolicy()) is not None


def test_refusals_are_not_part_of_the_store_identity():
    stricter = DecodePolicy(max_pixels=10, max_aspect_ratio=2, refuse_damaged_jpeg=False)
    assert stricter.to_dict() == DecodePolicy().to_dict()
    assert set(DecodePolicy().to_dict()) == {"exif_transpose", "alpha_background", "draft_min_side", "backend"}


MEMORY_PROBE = """
import json, resource, sys
from featurekit.images.decode import DecodePolicy
from featurekit.views.loader import ViewDataset
from featurekit.views.preprocessing import Preprocessing

backend, paths = sys.argv[1], sys.argv[2:]
view = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3)
dataset = ViewDataset([(p, p) for p in paths], [view], DecodePolicy(backend=backend))
with open("/proc/self/status") as status:
    mapped = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30), mapped + (1 << 30)))  # 1 GiB more: a MemoryError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = [dataset[i][1] for i in range(len(paths))]
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
reasons = [r[1] if isinstance(r, tuple) else "decoded" for r in results]
print(json.dumps({"reasons": reasons, "grown_mib": grown / 1024}))
"""


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_shape_bombs_are_refused_before_any_large_allocation(tmp_path, backend):
    """In a child process allowed 1 GiB more than it has mapped: a refusal after decoding, or a
    view of the 30000x1 image, would be a MemoryError or a peak far above a few MB."""
    names = {"square.png": square_bomb, "wide.png": wide_png, "wide.jpg": wide_jpeg}
    for name, maker in names.items():
        maker(tmp_path / name)
    control = write_jpeg(tmp_path / "control.jpg", seed=1, size=(300, 200))
    paths = [str(tmp_path / name) for name in names] + [str(control)]
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, backend, *paths], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert probe.returncode == 0, probe.stderr[-2000:]
    result = json.loads(probe.stdout)
    assert result["reasons"] == [BROKEN[name][1] for name in names] + ["decoded"]
    assert result["grown_mib"] < 50, result


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_raise_one_line_naming_file_and_reason(name, tmp_path):
    maker, reason = BROKEN[name]
    maker(tmp_path / name)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(tmp_path / name)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / name}: ") and reason in message and "\n" not in message
    assert message.count(name) == 1


def test_file_deleted_after_listing(tmp_path):
    make_folder(tmp_path, per_class={"ants": 2})
    listing = list_split(tmp_path, "train")
    listing.absolute(0).unlink()
    with pytest.raises(ImageDecodeError, match="file disappeared after listing"):
        decode_image(listing.absolute(0))


def test_unreadable_file_permission_denied():
    folder = Path(tempfile.mkdtemp())  # not under pytest's root-only tmp folder: nobody may enter
    try:
        os.chmod(folder, 0o755)
        readable, locked = write_jpeg(folder / "readable.jpg", 1), write_jpeg(folder / "locked.jpg", 2)
        locked.chmod(0o000)
        as_nobody = acting_as_nobody() if os.geteuid() == 0 else contextlib.nullcontext()
        with as_nobody:
            if not os.access(readable, os.R_OK, effective_ids=True) or os.access(locked, os.R_OK, effective_ids=True):
                pytest.skip("permission bits are not enforced here")
            decode_image(readable)  # the folder itself is fine: the refusal is the file's own
            with pytest.raises(ImageDecodeError, match=r"locked\.jpg: permission denied$"):
                decode_image(locked)
    finally:
        shutil.rmtree(folder)


# --------------------------------------------------------------------------- whole runs


NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name on a UTF-8 system


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """train/good: 3 plain JPEGs and every odd-but-valid kind; train/bad: every broken kind, a
    non-UTF-8 name and a file that vanishes after listing; train/empty: nothing."""
    data = make_folder(tmp_path / "data", per_class={"good": 3, "bad": 1})
    for name, (maker, _) in VALID.items():
        maker(data / "train" / "good" / name)
    for name, (maker, _) in BROKEN.items():
        maker(data / "train" / "bad" / name)
    write_jpeg(data / "train" / "bad" / NON_UTF8, seed=5)
    write_jpeg(data / "train" / "bad" / "vanishing.jpg", seed=6)
    (data / "train" / "empty").mkdir()
    return data


def delete_after_listing(monkeypatch, victim: Path) -> None:
    real = sources_module.list_split

    def list_then_delete(root, split):
        listing = real(root, split)
        victim.unlink()
        monkeypatch.setattr(sources_module, "list_split", real)  # once: verify lists again
        return listing

    monkeypatch.setattr(sources_module, "list_split", list_then_delete)


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])  # torchvision: the nvJPEG path's code, on the CPU
def test_skip_records_every_bad_file_and_keeps_backbones_aligned(corpus, tmp_path, capsys, monkeypatch, decoder):
    delete_after_listing(monkeypatch, corpus / "train" / "bad" / "vanishing.jpg")
    out = tmp_path / "out"
    run = run_cli(capsys, *extract_args(corpus, out, "--on-error", "skip", "--decoder", decoder,
                                        "--backbone", "resnet18", "mobilenet_v3_small"))
    assert run.code == 0, run.err
    expected_skips = {f"bad/{name}": reason for name, (_, reason) in BROKEN.items()}
    expected_skips["bad/vanishing.jpg"] = "file disappeared after listing"
    stores = [read_store(out / "train" / f"{name}.h5") for name in ("resnet18", "mobilenet_v3_small")]
    for contents in stores:
        skipped = dict(contents.skipped)
        assert skipped.keys() == expected_skips.keys()
        assert all(expected_skips[path] in reason for path, reason in skipped.items())
        kept = {f"good/{name}" for name in VALID} | {f"good/{i:02d}.jpg" for i in range(3)}
        assert set(contents.paths) == kept | {"bad/00.jpg", "bad/caf\\xe9.jpg"}
        assert contents.classes == ["bad", "empty", "good"]
        assert np.isfinite(contents.features).all()
        assert contents.header.decode["exif_transpose"] is True
        assert contents.header.n_listed == len(contents.paths) + len(contents.skipped)
    assert stores[0].paths == stores[1].paths and (stores[0].labels == stores[1].labels).all()
    for path, reason in stores[0].skipped:  # the summary names each, for each store
        assert run.out.count(f"skipped {path}: {reason}") == 2
    assert "empty class folders (kept as classes, no rows): empty" in run.err

    # Reading again finds the non-UTF-8 name; only the vanished file is reported as changed.
    verify = run_cli(capsys, "verify", out / "train" / "resnet18.h5", out / "train" / "mobilenet_v3_small.h5")
    assert verify.code == 1
    assert verify.out.splitlines() == [f"{out / 'train' / name}.h5: 1 image removed since extraction: bad/vanishing.jpg"
                                       for name in ("resnet18", "mobilenet_v3_small")]


@pytest.mark.parametrize("name", list(BROKEN) + ["vanishing.jpg"])
def test_fail_stops_with_one_line_naming_the_file(name, tmp_path, capsys, monkeypatch):
    data = make_folder(tmp_path / "data", per_class={"a": 3})
    bad = data / "train" / "a" / name
    if name == "vanishing.jpg":
        write_jpeg(bad, seed=9)
        delete_after_listing(monkeypatch, bad)
        reason = "file disappeared after listing"
    else:
        maker, reason = BROKEN[name]
        maker(bad)
    run = run_cli(capsys, *extract_args(data, tmp_path / "out"))
    assert run.code == 1
    [line] = error_lines(run.err)
    assert line.startswith(f"featurekit: error: {bad}: ") and reason in line
    assert "Traceback" not in run.err
    assert not (tmp_path / "out" / "train" / "resnet18.h5").exists()


def test_fail_leaves_completed_stores_untouched(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"a": 2, "b": 2})
    make_folder(data, "valid", per_class={"a": 2, "b": 1}, seed=1)
    out = tmp_path / "out"
    assert run_cli(capsys, *extract_args(data, out)).code == 0
    train = out / "train" / "resnet18.h5"
    before = (train.read_bytes(), train.stat().st_mtime_ns)

    truncated_jpeg(data / "valid" / "b" / "late.jpg")
    run = run_cli(capsys, "extract", data, "--split", "train", "valid", "--out", out, *TINY_RUN)
    assert run.code == 1 and "valid/b/late.jpg: truncated" in error_lines(run.err)[0]
    assert (train.read_bytes(), train.stat().st_mtime_ns) == before
    assert not (out / "valid" / "resnet18.h5").exists()

    truncated_jpeg(data / "train" / "b" / "late.jpg")  # a stale store being replaced survives a failed run
    assert run_cli(capsys, *extract_args(data, out, "--overwrite")).code == 1
    assert (train.read_bytes(), train.stat().st_mtime_ns) == before


def test_unreadable_file_in_a_run_as_non_root(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads chmod-000 files; test_unreadable_file_permission_denied covers the decoder")
    data = make_folder(tmp_path / "data", per_class={"a": 3})
    (data / "train" / "a" / "01.jpg").chmod(0o000)
    run = run_cli(capsys, *extract_args(data, tmp_path / "out", "--on-error", "skip"))
    assert run.code == 0
    assert read_store(tmp_path / "out" / "train" / "resnet18.h5").skipped == [("a/01.jpg", "permission denied")]


def test_empty_split_stops_before_any_work(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class={"a": 2})
    (data / "valid" / "a").mkdir(parents=True)
    run = run_cli(capsys, "extract", data, "--split", "train", "valid", "--out", tmp_path / "out", *TINY_RUN)
    assert run.code == 1
    [line] = error_lines(run.err)
    assert line == f"featurekit: error: {data / 'valid'}: no images in any of its 1 class folders"
    assert not (tmp_path / "out").exists()
    (data / "no_classes").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        list_split(data, "no_classes")


def test_every_image_skipped_is_an_error_not_an_empty_store(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "train" / "a").mkdir(parents=True)
    zero_bytes(data / "train" / "a" / "x.jpg")
    run = run_cli(capsys, *extract_args(data, tmp_path / "out", "--on-error", "skip"))
    assert run.code == 1 and "every image" in error_lines(run.err)[0] and "skipped" in error_lines(run.err)[0]
    assert not (tmp_path / "out" / "train" / "resnet18.h5").exists()

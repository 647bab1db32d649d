"""extract --augment K / --tta MODE: views stored beside the plain row, reproducible by any run.

Every extraction here: resnet18, random weights, fp32 on the CPU, two rows per chunk and batch,
K = 2 augmented views (the default policy, crop-flip) and flip test-time views of 40x32 JPEGs.
"""

from __future__ import annotations

import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featurekit import files
from featurekit.backbones.runner import TrunkRunner
from featurekit.backbones.settings import RunSettings
from featurekit.backbones.trunks import load_backbone
from featurekit.cli import main
from featurekit.errors import AlignmentError, StoreError
from featurekit.images.decode import decode_image
from featurekit.images.listing import list_split
from featurekit.store.chunks import Chunk, PartialStore
from featurekit.store.dataset import load_features
from featurekit.store.format import content_sha256, read_header, read_store
from featurekit.store.layout import extra_datasets, view_datasets
from featurekit.views.augment import CACHE_AUGMENT_POLICY, AugmentPolicy, ViewPlan, augment_policy, tta_views
from featurekit.views.loader import ViewBatch
from tests.conftest import (
    assert_same_store,
    error_lines,
    extract_args,
    finished,
    make_folder,
    run_cli,
    run_subprocess,
    spawn,
)

VIEWS = ("--precision", "fp32", "--augment", "2", "--tta", "flip")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data root, plain store, store with views) of the tiny folder, each from one uninterrupted run."""
    base = tmp_path_factory.mktemp("reference")
    data = make_folder(base / "data")
    assert main(extract_args(data, base / "plain", "--precision", "fp32")) == 0
    assert main(extract_args(data, base / "views", *VIEWS)) == 0
    return data, base / "plain" / "train" / "resnet18.h5", base / "views" / "train" / "resnet18.h5"


def test_views_sit_beside_the_plain_rows_which_stay_those_of_a_plain_extraction(reference):
    _, plain, augmented = reference
    with h5py.File(augmented, "r") as h5:  # plain h5py, as docs/store-format.md reads a store
        features, views, test_time = h5["features"][()], h5["features_aug"][()], h5["features_tta"][()]
        attrs = dict(h5.attrs)
    with h5py.File(plain, "r") as h5:
        np.testing.assert_array_equal(features, h5["features"][()])  # bit for bit: the plain batches are the same
        assert not {"augment_views", "augment_policy", "augment_seed", "tta"} & set(h5.attrs)
    assert features.shape == (10, 512) and views.shape == (10, 2, 512) and test_time.shape == (10, 1, 512)
    assert views.dtype == test_time.dtype == np.float32
    assert not np.isclose(views, features[:, None]).all(axis=2).any()  # every augmented view differs from plain
    assert (attrs["augment_views"], attrs["augment_seed"], attrs["tta"], attrs["format_version"]) == (2, 0, "flip", 3)
    header = read_header(augmented)
    assert AugmentPolicy.from_dict(header.augment_policy) == augment_policy(CACHE_AUGMENT_POLICY)
    assert header.without_views() == read_header(plain).identity


def test_stored_views_are_the_trunk_on_the_views_of_the_decoded_images(reference):
    """Row i's view v is the trunk on AugmentPolicy.view(decode(i), seed 0, i, v); its test-time view the mirror."""
    data, _, augmented = reference
    backbone = load_backbone("resnet18", weights="random")
    runner = TrunkRunner([backbone], RunSettings(device="cpu", precision="fp32", dtype="float32", num_workers=0,
                                                 progress=False).resolved())
    preprocessing, policy = backbone.preprocessing, augment_policy(CACHE_AUGMENT_POLICY)
    images = [decode_image(path, runner.settings.decode) for path, _ in list_split(data, "train").files()]
    stored = read_store(augmented)
    for start in (0, 6):  # two batches, as extraction cut them
        rows = [start, start + 1]
        for v in range(2):
            views = torch.stack([policy.view(images[i], preprocessing, 0, i, v) for i in rows])
            features = runner.forward(ViewBatch(rows, {preprocessing.key: views}, cpu_rows=[0, 1]))["resnet18"]
            np.testing.assert_allclose(stored.views["features_aug"][rows, v], features.numpy(), rtol=1e-5, atol=1e-6)
        mirrors = torch.stack([tta_views(images[i], preprocessing, "flip")[1] for i in rows])
        features = runner.forward(ViewBatch(rows, {preprocessing.key: mirrors}, cpu_rows=[0, 1]))["resnet18"]
        np.testing.assert_allclose(stored.views["features_tta"][rows, 0], features.numpy(), rtol=1e-5, atol=1e-6)


def test_sigkill_then_resume_with_another_chunk_size_writes_identical_views(reference, tmp_path, capsys):
    data, _, expected = reference
    out = tmp_path / "out"
    killed = run_subprocess(*extract_args(data, out, *VIEWS), env={files.CRASH_ENV: "chunk-committed:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_cli(capsys, *extract_args(data, out, *VIEWS), "--chunk-size", "4")
    assert resumed.code == 0, resumed.err
    assert "resumed (2 chunks committed)" in resumed.err
    assert_same_store(out / "train" / "resnet18.h5", expected)
    assert run_cli(capsys, "verify", out / "train" / "resnet18.h5").code == 0


def test_two_shards_in_two_processes_write_the_store_one_process_writes(reference, tmp_path):
    data, _, expected = reference
    out = tmp_path / "out"
    children = [spawn(*extract_args(data, out, *VIEWS, "--shard", f"{i}/2")) for i in range(2)]
    done = [finished(child) for child in children]
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    assert_same_store(out / "train" / "resnet18.h5", expected)


def test_torchrun_ranks_write_the_views_one_process_writes(reference, tmp_path):
    data, _, expected = reference
    completed = run_subprocess(*extract_args(data, tmp_path / "out", *VIEWS), timeout=300, launcher=[
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    actual, wanted = read_store(tmp_path / "out" / "train" / "resnet18.h5"), read_store(expected)
    assert actual.header.fingerprint == wanted.header.fingerprint
    for name in ("features_aug", "features_tta"):  # torchrun runs each process on one thread: rounding only
        np.testing.assert_allclose(actual.views[name], wanted.views[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options, change", [
    (("--augment", "3"), "augment views (2 != 3)"),
    (("--augment", "2", "--augment-seed", "1"), "augment seed (0 != 1)"),
    (("--augment", "2", "--augment-policy", "standard"), "augment policy"),
    ((), "augment views (2 != 0)"),
])
def test_a_store_with_other_views_is_refused_not_reused(options, change, reference, tmp_path, capsys):
    data, _, _ = reference
    out = tmp_path / "out"
    assert run_cli(capsys, *extract_args(data, out, "--precision", "fp32", "--augment", "2")).code == 0
    refused = run_cli(capsys, *extract_args(data, out, "--precision", "fp32", *options))
    assert refused.code == 1
    [line] = error_lines(refused.err)
    assert f"was made with other {change}" in line and "--overwrite" in line


def test_views_need_pil_decoding_and_a_random_policy(reference, tmp_path, capsys):
    data, _, _ = reference
    for options, message in ((("--augment", "2", "--decoder", "torchvision"), "--decoder pil or auto"),
                             (("--augment", "2", "--augment-policy", "none"), "makes every view the plain one"),
                             (("--augment", "-1"), "0 or more"),
                             (("--augment", "2", "--augment-policy", "wild"), "unknown augment policy 'wild'")):
        failed = run_cli(capsys, *extract_args(data, tmp_path / "out", *options))
        assert failed.code == 1 and message in error_lines(failed.err)[0], failed.err
    assert not (tmp_path / "out").exists()


def test_a_format_2_store_reads_and_stays_current(reference, tmp_path, capsys):
    """Format 3 only adds views: a format 2 store (no view attributes) is read and reused as it is."""
    data, plain, _ = reference
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    store = out / "train" / "resnet18.h5"
    store.write_bytes(plain.read_bytes())
    with h5py.File(store, "r+") as h5:
        h5.attrs["format_version"] = 2
        h5.attrs["content_sha256"] = content_sha256(h5)
    rerun = run_cli(capsys, *extract_args(data, out, "--precision", "fp32"))
    assert rerun.code == 0 and "up to date" in rerun.out
    assert run_cli(capsys, "verify", store).code == 0
    assert read_store(store).views == {}


def test_verify_checks_the_views(reference, tmp_path, capsys):
    _, _, augmented = reference
    damaged, missing = tmp_path / "nan.h5", tmp_path / "missing.h5"
    for copy in (damaged, missing):
        copy.write_bytes(augmented.read_bytes())
    with h5py.File(damaged, "r+") as h5:
        h5["features_aug"][3, 1, 7] = np.nan
    with h5py.File(missing, "r+") as h5:
        del h5["features_tta"]
    result = run_cli(capsys, "verify", damaged, missing)
    assert result.code == 1
    assert f"{damaged}: NaN or Inf features_aug features in 1 rows (first: row 3, " in result.out
    assert f"{missing}: missing features_tta, which the store records (float32[10, 1, 512])" in result.out


def test_a_chunk_with_non_finite_views_is_refused(tmp_path):
    partial = PartialStore(tmp_path / "x.h5", "f" * 64)
    partial.create({})
    views = np.zeros((2, 3, 4), np.float16)
    views[1, 2, 0] = np.inf
    with pytest.raises(StoreError, match="non-finite features_aug features for row 7 .overflow of float16"):
        partial.write(Chunk(6, 8, np.array([6, 7]), np.zeros((2, 4), np.float16), views={"features_aug": views}))
    assert partial.committed() == []


def test_stores_joined_for_a_head_must_have_the_same_views(reference, tmp_path, capsys):
    """The views read must be alike; the plain rows alone join whatever views are stored beside them."""
    data, _, _ = reference
    out = tmp_path / "out"
    assert run_cli(capsys, *extract_args(data, out, "--precision", "fp32", "--augment", "2")).code == 0
    other = ("--backbone", "mobilenet_v3_small", "--precision", "fp32", "--augment", "1")
    assert run_cli(capsys, *extract_args(data, out, *other)).code == 0
    with pytest.raises(AlignmentError, match=r"extracted with other augment views \(1 != 2\)"):
        load_features(out, "train", ["resnet18", "mobilenet_v3_small"], views=["features_aug"])
    assert load_features(out, "train", ["resnet18", "mobilenet_v3_small"]).features.shape == (10, 512 + 1024)


def test_load_features_reads_the_views_of_chosen_columns(reference):
    _, _, augmented = reference
    features_dir = augmented.parents[1]
    full = load_features(features_dir, "train", ["resnet18"], views=["features_aug", "features_tta"])
    stored = read_store(augmented)
    np.testing.assert_array_equal(full.views["features_aug"], stored.views["features_aug"])
    some = load_features(features_dir, "train", ["resnet18"], columns=[3, 9, 100], views=["features_aug"])
    np.testing.assert_array_equal(some.views["features_aug"], stored.views["features_aug"][..., [3, 9, 100]])
    with pytest.raises(StoreError, match="no features_aug .held: none.; extract split 'train' with --augment K"):
        load_features(reference[1].parents[1], "train", ["resnet18"], views=["features_aug"])


def test_plan_splits_views_in_the_order_it_makes_them():
    plan = ViewPlan(augment=3, tta="five-crop")
    assert plan.count == 8 and extra_datasets(plan.augment, plan.tta) == {"features_aug": 3, "features_tta": 4}
    features = torch.arange(2 * 8 * 1).reshape(2, 8, 1)
    plain, *extra = plan.split(features)
    views = view_datasets(*extra)
    assert plain.tolist() == [[0], [8]]
    assert views["features_aug"][:, :, 0].tolist() == [[1, 2, 3], [9, 10, 11]]
    assert views["features_tta"][:, :, 0].tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]]


def test_cli_reports_the_views(reference, tmp_path, capsys):
    data, _, augmented = reference
    result = run_cli(capsys, *extract_args(data, tmp_path / "out", *VIEWS))
    assert "with 2 augmented views (crop-flip, seed 0) and flip test-time views" in result.out
    info = run_cli(capsys, "info", augmented)
    assert "views: features_aug float32[10, 2, 512] (2 augmented views, policy crop-flip, seed 0), " \
           "features_tta float32[10, 1, 512] (flip test-time views)" in info.out

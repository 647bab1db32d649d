"""Features and predictions out to other tools: export (parquet, npy), predict's formats, predict on stores,
embed of several backbones. Real stores (resnet18, random weights), a real head, real files read back."""

import csv
import json
import warnings

import numpy as np
import pytest
import torch
import torchvision
from conftest import error_lines, run_cli, write_image_folder, write_jpeg

import featurekit
import featurekit.store.export as export_module
from featurekit.backbones.trunks import load_backbone
from featurekit.errors import FeaturekitWarning, HeadMismatchError, WriteError
from featurekit.extraction.engine import extract
from featurekit.extraction.settings import ExtractSettings
from featurekit.heads.head_file import load_head
from featurekit.heads.train import train_head
from featurekit.predict.classify import predict_files, predict_store
from featurekit.store.export import export, read_export_record
from featurekit.store.format import read_store
from featurekit.store.settings import ExportSettings

SETTINGS = ExtractSettings(device="cpu", precision="fp32", batch_size=4, num_workers=0, dtype="float32", progress=False)
RUN = ["--device", "cpu", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(data root, features dir, head file): train/valid class folders and a test/ of images without classes."""
    tmp = tmp_path_factory.mktemp("outputs")
    root = write_image_folder(tmp / "data", {"train": {"cat": 3, "dog": 3}, "valid": {"cat": 2, "dog": 2}})
    for i in range(3):
        write_jpeg(root / "test" / f"{i + 1}.jpg", seed=70 + i)
    extract(root, ["train", "valid", "test"], [load_backbone("resnet18", weights="random")], tmp / "features",
            SETTINGS)
    train_head(tmp / "features", ["resnet18"], "logreg", tmp / "head", plots=False)
    return root, tmp / "features", tmp / "head" / "head.h5"


# --------------------------------------------------------------------------- predict on stores


def test_predict_scores_a_store_without_reextracting(cached, tmp_path, capsys, monkeypatch):
    root, features_dir, head_file = cached
    head, _ = load_head(head_file)
    store = read_store(features_dir / "test" / "resnet18.h5")
    predictions = predict_store(head_file, features_dir, "test")
    np.testing.assert_allclose(predictions.proba, head.predict_proba(store.features))
    assert predictions.paths == ["1.jpg", "2.jpg", "3.jpg"] and predictions.truth == [None] * 3
    from_images = predict_files(head_file, root / "test", SETTINGS)  # one path, as a str or Path
    np.testing.assert_allclose(predictions.proba, from_images.proba, atol=1e-5)
    monkeypatch.setattr(featurekit.backbones.runner.TrunkRunner, "__init__", None)  # no trunk may run
    run = run_cli(capsys, "predict", "--head", head_file, "--features", features_dir, "--split", "valid",
                  "--out", tmp_path / "v.json", "--format", "json", "--no-plots")
    assert run.code == 0, run.err
    assert "labelled images: accuracy" in run.out  # a labelled store's rows carry their class
    rows = json.loads((tmp_path / "v.json").read_text())
    assert [row["path"] for row in rows] == read_store(features_dir / "valid" / "resnet18.h5").paths
    assert isinstance(rows[0]["prob_cat"], float) and rows[0]["predicted"] in ("cat", "dog")
    assert json.loads((tmp_path / "v.json.json").read_text())["stores"][0]["path"].endswith("valid/resnet18.h5")


def test_predict_refuses_a_store_of_other_features(cached, tmp_path, capsys):
    root, _, head_file = cached
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pt")
    other = load_backbone("resnet18", weights_path=str(tmp_path / "other.pt"))
    extract(root, ["test"], [other], tmp_path / "features", SETTINGS)
    with pytest.raises(HeadMismatchError, match=r"resnet18 was trained on weights random \(sha256 \w+\) but "
                                                r".*test/resnet18.h5 \(weights file:other.pt\) has sha256 .*refusing"):
        predict_store(head_file, tmp_path / "features", "test")
    run = run_cli(capsys, "predict", "--head", head_file, "--features", tmp_path / "features", "--out", tmp_path / "p")
    assert run.code == 1 and "--features needs --split" in error_lines(run.err)[0]
    nothing = run_cli(capsys, "predict", "--head", head_file, "--out", tmp_path / "p")
    assert nothing.code == 1 and "nothing to classify: give image files" in error_lines(nothing.err)[0]


# --------------------------------------------------------------------------- predict's formats


def test_formats_topk_clamp_and_existing_outputs(cached, tmp_path, capsys):
    root, _, head_file = cached
    common = ["predict", "--head", head_file, *RUN, root / "test"]
    clamped = run_cli(capsys, *common, "--topk", "5", "--out", tmp_path / "t.csv")
    assert clamped.code == 0 and "warning: --topk 5: the head has 2 classes; writing all 2" in clamped.err
    assert next(csv.reader(open(tmp_path / "t.csv"))) == ["path", "predicted", "top1", "top1_prob", "top2",
                                                           "top2_prob"]
    assert run_cli(capsys, *common, "--format", "parquet", "--out", tmp_path / "p.parquet").code == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column_names == ["path", "predicted", "prob_cat", "prob_dog"]
    assert str(table.schema.field("prob_cat").type) == "double" and table.num_rows == 3
    assert run_cli(capsys, *common, "--format", "kaggle", "--out", tmp_path / "k.csv").code == 0
    kaggle = list(csv.reader(open(tmp_path / "k.csv")))
    assert [row[0] for row in kaggle] == ["id", "1", "2", "3"] and {row[1] for row in kaggle[1:]} <= {"cat", "dog"}
    before = (tmp_path / "k.csv").read_bytes()
    again = run_cli(capsys, *common, "--format", "kaggle", "--out", tmp_path / "k.csv")
    assert again.code == 1 and error_lines(again.err) == [
        f"featurekit: error: {tmp_path / 'k.csv'}: exists; pass --overwrite to replace it"]
    assert (tmp_path / "k.csv").read_bytes() == before
    assert run_cli(capsys, *common, "--format", "csv", "--out", tmp_path / "k.csv", "--overwrite").code == 0
    assert next(csv.reader(open(tmp_path / "k.csv")))[:2] == ["path", "predicted"]


def test_lists_as_predict_inputs(cached, tmp_path, capsys):
    root, _, head_file = cached
    (tmp_path / "l.csv").write_text(f"path,label\n{root}/valid/cat/img_00.jpg,cat\n{root}/valid/dog/img_01.jpg,dog\n"
                                    f"{root}/valid/dog/gone.jpg,dog\n")
    run = run_cli(capsys, "predict", "--head", head_file, *RUN, "--list", tmp_path / "l.csv", "--out",
                  tmp_path / "p.csv", "--no-plots")
    assert run.code == 0, run.err
    assert "labelled images: accuracy" in run.out and "over 2 images" in run.out
    assert f"skipped {root}/valid/dog/gone.jpg: no such file ({tmp_path / 'l.csv'} line 4)" in run.err
    (tmp_path / "l.txt").write_text(f"{root}/test/1.jpg\n")
    assert run_cli(capsys, "predict", "--head", head_file, *RUN, f"@{tmp_path / 'l.txt'}", "--out", "-").code == 0
    refused = run_cli(capsys, "predict", "--head", head_file, *RUN, head_file, "--out", tmp_path / "h.csv")
    assert "an HDF5 file (a feature store?), not an image" in error_lines(refused.err)[0]


# --------------------------------------------------------------------------- export


def test_parquet_export_holds_the_store_in_row_groups(cached, tmp_path, capsys):
    _, features_dir, _ = cached
    pq = pytest.importorskip("pyarrow.parquet")
    run = run_cli(capsys, "export", features_dir, "--split", "train", "--backbone", "resnet18", "--out",
                  tmp_path / "train.parquet", "--block-rows", "4")
    assert run.code == 0, run.err
    store = read_store(features_dir / "train" / "resnet18.h5")
    table = pq.read_table(tmp_path / "train.parquet")
    assert table.column_names == ["path", "label", "class", "features"]
    assert str(table.schema.field("features").type) == "fixed_size_list<element: float>[512]"
    assert pq.ParquetFile(tmp_path / "train.parquet").num_row_groups == 2  # 6 rows, 4 a group
    np.testing.assert_array_equal(np.stack(table.column("features").to_numpy(zero_copy_only=False)), store.features)
    assert table.column("path").to_pylist() == store.paths and table.column("label").to_pylist() == [0, 0, 0, 1, 1, 1]
    assert table.column("class").to_pylist() == ["cat"] * 3 + ["dog"] * 3
    record = read_export_record(tmp_path / "train.parquet")
    assert record["stores"][0]["fingerprint"] == store.header.fingerprint and record["rows"] == 6


@pytest.mark.parametrize("reader", ["pandas", "polars", "datasets", "ray"])
def test_other_tools_read_the_parquet_export(cached, tmp_path, reader):
    _, features_dir, _ = cached
    module = pytest.importorskip(reader)
    export(features_dir, "valid", ["resnet18"], tmp_path / "v.parquet")
    path, expected = str(tmp_path / "v.parquet"), read_store(features_dir / "valid" / "resnet18.h5").features
    if reader == "pandas":
        rows = np.stack(module.read_parquet(path)["features"].to_numpy())
    elif reader == "polars":
        rows = module.read_parquet(path)["features"].to_numpy()
    elif reader == "datasets":
        rows = np.array(module.Dataset.from_parquet(path)["features"])
    else:
        rows = np.stack(module.data.read_parquet(path).to_pandas()["features"].to_numpy())
    np.testing.assert_array_equal(np.asarray(rows, dtype=np.float32), expected)


def test_npy_export_in_clip_retrievals_layout_and_unlabelled_rows(cached, tmp_path):
    _, features_dir, _ = cached
    export(features_dir, "test", ["resnet18"], tmp_path / "emb", ExportSettings(form="npy", block_rows=2))
    store = read_store(features_dir / "test" / "resnet18.h5")
    np.testing.assert_array_equal(np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy"), store.features)
    rows = list(csv.reader(open(tmp_path / "emb" / "metadata" / "metadata_0.csv")))
    assert rows == [["path", "label", "class"], ["1.jpg", "", ""], ["2.jpg", "", ""], ["3.jpg", "", ""]]
    assert read_export_record(tmp_path / "emb")["labelled"] is False
    pq = pytest.importorskip("pyarrow.parquet")
    export(features_dir, "test", ["resnet18"], tmp_path / "t.parquet", ExportSettings(dtype="float16"))
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column("label").null_count == 3
    assert str(table.schema.field("features").type).endswith("halffloat>[512]")


def test_export_onto_an_existing_file_keeps_it_whole(cached, tmp_path, monkeypatch):
    _, features_dir, _ = cached
    out = tmp_path / "v.parquet"
    export(features_dir, "valid", ["resnet18"], out)
    before = out.read_bytes()
    with pytest.raises(WriteError, match="v.parquet: exists; pass --overwrite to replace it"):
        export(features_dir, "valid", ["resnet18"], out)
    real = export_module._blocks

    def failing(*args):
        yield next(real(*args))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "_blocks", failing)
    with pytest.raises(WriteError, match="v.parquet: cannot write the export \\(no space left on device\\)"):
        export(features_dir, "train", ["resnet18"], out, ExportSettings(overwrite=True, block_rows=2))
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["v.parquet"]


# --------------------------------------------------------------------------- embed


def test_embed_of_several_backbones_is_a_dict(cached):
    root, _, _ = cached
    paths = sorted((root / "test").glob("*.jpg"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FeaturekitWarning)
        both = featurekit.embed(paths, ["resnet18", "mobilenet_v3_small"], weights="random")
        alone = featurekit.embed(paths, "resnet18", weights="random")
    assert set(both) == {"resnet18", "mobilenet_v3_small"} and both["mobilenet_v3_small"].shape == (3, 1024)
    np.testing.assert_array_equal(both["resnet18"], alone)

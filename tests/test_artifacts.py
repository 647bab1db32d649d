"""Artifacts from someone else: head files, fine-tuned models, checkpoints and stores edited by hand.

Each case copies a real artifact of one tiny run (``conftest.tiny``), edits one thing, and checks
that the command using it ends with one line naming the file and the field, before anything is
allocated for it or written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, TUNE_ARGS, error_lines, run_cli

from featurekit.errors import HeadFileError, StoreError
from featurekit.finetuning.artifact import load_classifier
from featurekit.store.format import read_store

RUN = ["--device", "cpu", "--workers", "0", "--quiet"]


def edited_head(tiny, tmp_path: Path, edit: Callable[[h5py.File], None], source: str = "logreg") -> Path:
    head = tmp_path / "head" / "head.h5"
    head.parent.mkdir()
    shutil.copy(getattr(tiny, source), head)
    with h5py.File(head, "r+") as h5:
        edit(h5)
    return head


def metadata(edit: Callable[[dict], object]) -> Callable[[h5py.File], None]:
    def apply(h5: h5py.File) -> None:
        values = json.loads(h5.attrs["metadata"])
        edit(values)
        h5.attrs["metadata"] = json.dumps(values)
    return apply


def replace(name: str, data) -> Callable[[h5py.File], None]:
    def apply(h5: h5py.File) -> None:
        del h5[name]
        h5[name] = data
    return apply


def nan_coef(h5: h5py.File) -> None:
    coef = h5["model/coef"][()]
    coef[0, 0] = np.nan
    replace("model/coef", coef)(h5)


def declared_only(h5: h5py.File) -> None:  # two thousand million numbers declared, none stored
    del h5["model/coef"]
    h5["model"].create_dataset("coef", shape=(2, 10**9), dtype="float32")


HEAD_CASES = {
    "nan weights": (nan_coef, "field 'model/coef' holds NaN or infinite values"),
    "more class names than outputs": (metadata(lambda m: m["classes"].append("cow")),
                                      "field 'classes' names 3 classes, but the classifier has 2 outputs"),
    "fewer class names than outputs": (metadata(lambda m: m["classes"].pop()),
                                       "field 'classes' names 1 classes, but the classifier has 2 outputs"),
    "class array longer than the weights": (replace("classes", np.arange(3)),
                                            "field 'model/coef' has shape [2, 512], not [3, 512]"),
    "no classes": (metadata(lambda m: m.pop("classes")), "no field 'classes'"),
    "no backbones": (metadata(lambda m: m.pop("backbones")), "no field 'backbones'"),
    "empty backbones": (metadata(lambda m: m.__setitem__("backbones", [])), "field 'backbones' is empty"),
    "no node": (metadata(lambda m: m["backbones"][0].pop("node")), "no field 'backbones[0].node'"),
    "backbone of another width": (metadata(lambda m: m["backbones"][0].__setitem__("feature_dim", 256)),
                                  "field 'backbones[0]' has feature_dim 256 and columns [0, 512]"),
    "no kind": (lambda h5: h5.attrs.__delitem__("kind"), "no field 'kind'"),
    "version as text": (lambda h5: h5.attrs.__setitem__("format_version", "2"),
                        "field 'format_version' is str '2', not int"),
    "metadata not JSON": (lambda h5: h5.attrs.__setitem__("metadata", "{"), "field 'metadata' is not JSON"),
    "unknown parameter": (lambda h5: h5.attrs.__setitem__("params", json.dumps({"bogus": 1})),
                          "field 'params.bogus' is not a parameter of a logreg head"),
    "scale of zero": (lambda h5: h5["scaler/scale"].__setitem__(0, 0.0),
                      "field 'scaler/scale' holds a value that is not positive"),
    "sizes declared, not stored": (declared_only, "field 'model/coef' declares [2, 1000000000] values, more than"),
}


@pytest.mark.parametrize("case", HEAD_CASES, ids=list(HEAD_CASES))
def test_an_edited_head_file_is_one_line_naming_the_field(case, tiny, tmp_path, capsys):
    edit, message = HEAD_CASES[case]
    head = edited_head(tiny, tmp_path, edit)
    out = tmp_path / "p.csv"
    result = run_cli(capsys, "predict", "--head", head, tiny.data / "valid", "--out", out, *RUN)
    assert result.code == 1 and not out.exists()
    [line] = error_lines(result.err)
    assert line.startswith(f"featurekit: error: {head}: {message}"), line


def test_mlp_sizes_are_checked_against_the_stored_arrays_before_anything_is_allocated(tiny, tmp_path):
    """hidden_sizes [750000] in a 50 KB file would build a 1.5 GB layer before its state dict is refused."""
    def huge(h5: h5py.File) -> None:
        h5["model"].attrs["hidden_sizes"] = [750000]
        params = json.loads(h5.attrs["params"])
        h5.attrs["params"] = json.dumps({**params, "hidden_sizes": [750000]})
    head = edited_head(tiny, tmp_path, huge, "mlp")
    probe = ("import resource, sys\nfrom featurekit.heads.head_file import load_head\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "try:\n    load_head(sys.argv[1])\nexcept Exception as error:\n    print(error)\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    done = subprocess.run([sys.executable, "-c", probe, str(head)], capture_output=True, text=True, cwd=REPO,
                          check=True)
    message, grown_mb = done.stdout.splitlines()
    assert message == f"{head}: field 'model/1.weight' has shape [1000, 512], not [750000, 512]"
    assert int(grown_mb) < 100, f"{grown_mb} MB allocated to refuse a 50 KB file"


# --------------------------------------------------------------------------- fine-tuned models


def edited_model(tiny, tmp_path: Path, edit: Callable[[dict, Path], object]) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny.model, folder)
    record = json.loads((folder / "model.json").read_text())
    edit(record, folder)
    (folder / "model.json").write_text(json.dumps(record))
    return folder


def rewrite_classifier(change: Callable[[dict], object]) -> Callable[[dict, Path], None]:
    """Edit model.pt's tensors and record its new sha256, as someone who knows the format would."""
    def apply(record: dict, folder: Path) -> None:
        state = torch.load(folder / "model.pt", weights_only=True)
        torch.save(change(state) or state, folder / "model.pt")
        record["classifier_sha256"] = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    return apply


def nan_weight(state: dict) -> None:
    state["1.weight"][0, 0] = float("nan")


def wider(record: dict, folder: Path) -> None:  # consistent with itself, not with model.pt
    record["classifier"]["in_features"] = 10**9
    record["backbones"][0]["feature_dim"] = 10**9
    record["backbones"][0]["columns"] = [0, 10**9]


MODEL_CASES = {
    "no in_features": (lambda r, f: r["classifier"].pop("in_features"),
                       "model.json: no field 'classifier.in_features'"),
    "a class count that does not fit": (lambda r, f: r["classifier"].__setitem__("n_classes", 3),
                                        "model.json: field 'classes' names 2 classes, but the classifier has 3"),
    "one class name more": (lambda r, f: r["classes"].append("cow"),
                            "model.json: field 'classes' names 3 classes, but the classifier has 2 outputs"),
    "version as text": (lambda r, f: r.__setitem__("format_version", "2"),
                        "model.json: field 'format_version' is str '2', not int"),
    "sizes the tensors do not have": (wider, "model.json: field 'classifier' needs tensor 0.mean of shape "
                                             "[1000000000] in model.pt, which holds it of shape [512]"),
    "nan weights": (rewrite_classifier(nan_weight), "model.pt: tensor 1.weight holds NaN or infinite values"),
    "a pickle of objects": (rewrite_classifier(lambda state: {"x": np.zeros(3)}),
                            "model.pt: not a file of tensors only (Unsupported global: GLOBAL numpy"),
}


@pytest.mark.parametrize("case", MODEL_CASES, ids=list(MODEL_CASES))
def test_an_edited_model_is_one_line_naming_the_field(case, tiny, tmp_path, capsys):
    edit, message = MODEL_CASES[case]
    folder = edited_model(tiny, tmp_path, edit)
    result = run_cli(capsys, "predict", "--head", folder, tiny.data / "valid", "--out", tmp_path / "p.csv", *RUN)
    assert result.code == 1 and not (tmp_path / "p.csv").exists()
    [line] = error_lines(result.err)
    assert message in line and "weights_only" not in line and "\x1b" not in line, line


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_model_whose_files_lie_outside_its_folder_is_refused_unless_trusted(where, tiny, tmp_path, capsys):
    outside = tmp_path / "elsewhere.pt"
    shutil.copy(tiny.model / "trunks" / "resnet18.pt", outside)
    named = "../elsewhere.pt" if where == "parent" else str(outside)
    folder = edited_model(tiny, tmp_path, lambda r, f: r["backbones"][0].__setitem__("trunk_file", named))
    shutil.rmtree(folder / "trunks")
    args = ["predict", "--head", folder, tiny.data / "valid", "--out", tmp_path / "p.csv", *RUN]
    refused = run_cli(capsys, *args)
    assert refused.code == 1
    assert error_lines(refused.err) == [f"featurekit: error: {folder / 'model.json'}: its file {named} lies outside "
                                        "the model's folder (the model is not self-contained); pass --trust-paths "
                                        "if you trust where it points"]
    assert run_cli(capsys, *args, "--trust-paths").code == 0  # the advice, followed
    with pytest.raises(HeadFileError, match="lies outside the model's folder"):
        load_classifier(folder)
    assert load_classifier(folder, trust_paths=True).record.backbones[0].weights_source == str(outside)


# --------------------------------------------------------------------------- checkpoints


def edited_checkpoint(tiny, tmp_path: Path, edit: Callable[[dict], object]) -> Path:
    folder = tmp_path / "tuned"
    shutil.copytree(tiny.model, folder)
    payload = torch.load(folder / "checkpoint.pt", weights_only=True)
    edit(payload)
    torch.save(payload, folder / "checkpoint.pt")
    return folder


def wrong_shape(payload: dict) -> None:
    payload["state"]["head.0.mean"] = torch.zeros(7)


CHECKPOINT_CASES = {
    "a tensor of another shape": (wrong_shape, "field 'state' tensor head.0.mean is shape [7], the model's is [512]"),
    "a run that is a list": (lambda p: p.__setitem__("run", [1, 2]), "field 'run' is list [1, 2], not dict"),
    "no optimizer state": (lambda p: p.pop("optimizer"), "no field 'optimizer'"),
    "an epoch as text": (lambda p: p.__setitem__("epoch", "1"), "field 'epoch' is str '1', not int"),
    "a kept epoch after the last": (lambda p: p["best"].__setitem__("epoch", 5), "field 'best.epoch' is 5"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=list(CHECKPOINT_CASES))
def test_an_edited_checkpoint_is_one_line_and_overwrite_starts_over(case, tiny, tmp_path, capsys):
    edit, message = CHECKPOINT_CASES[case]
    folder = edited_checkpoint(tiny, tmp_path, edit)
    args = ["finetune", tiny.data, "--head", tiny.logreg, "--out", folder, "--unfreeze", "layer4.1.bn2", *TUNE_ARGS]
    refused = run_cli(capsys, *args)
    assert refused.code == 1
    [line] = error_lines(refused.err)
    assert line.startswith(f"featurekit: error: {folder / 'checkpoint.pt'}: {message}") and \
        line.endswith("; --overwrite starts over"), line
    assert run_cli(capsys, *args, "--overwrite").code == 0  # the advice, followed


# --------------------------------------------------------------------------- stores, torch files, terminals


def test_a_store_attribute_of_another_type_or_a_size_it_does_not_hold_is_one_line(tiny, tmp_path):
    store = tmp_path / "train" / "resnet18.h5"
    store.parent.mkdir()
    shutil.copy(tiny.features / "train" / "resnet18.h5", store)
    with h5py.File(store, "r+") as h5:
        h5.attrs["feature_dim"] = "512"
    with pytest.raises(StoreError, match=r"resnet18\.h5: field 'feature_dim' is str '512', not int"):
        read_store(store)
    shutil.copy(tiny.features / "train" / "resnet18.h5", store)
    with h5py.File(store, "r+") as h5:
        del h5["labels"]
        h5.create_dataset("labels", shape=(10**10,), dtype="int64")
    with pytest.raises(StoreError, match=r"resnet18\.h5: labels declares \[10000000000\] values, more than the file"):
        read_store(store, features=False)


def test_torch_advice_to_unpickle_is_never_passed_on(tiny, tmp_path, capsys):
    pickled = tmp_path / "weights.pt"
    torch.save({"conv1.weight": np.zeros(3)}, pickled)
    result = run_cli(capsys, "extract", tiny.data, "--split", "train", "--out", tmp_path / "f", "--backbone",
                     "resnet18", "--weights-path", pickled, *RUN)
    [line] = error_lines(result.err)
    assert result.code == 1 and line == (f"featurekit: error: {pickled}: not a file of tensors only (Unsupported "
                                         "global: GLOBAL numpy._core.multiarray._reconstruct); refused without "
                                         "unpickling it, which would run any code it holds")


def test_terminal_escapes_from_a_file_never_reach_the_terminal(tiny, tmp_path, capsys):
    named = "\x1b[2J\x1b[31mtrunk.pt"  # clear the screen, then red
    folder = edited_model(tiny, tmp_path, lambda r, f: r["backbones"][0].__setitem__("trunk_file", named))
    result = run_cli(capsys, "predict", "--head", folder, tiny.data / "valid", "--out", tmp_path / "p.csv", *RUN)
    assert result.code == 1 and "\x1b" not in result.err
    assert error_lines(result.err) == [f"featurekit: error: {folder / 'model.json'}: its file "
                                       "\\x1b[2J\\x1b[31mtrunk.pt is missing"]

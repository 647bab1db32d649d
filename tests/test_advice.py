"""Every piece of advice featurekit gives in a message works when followed.

:data:`FOLLOWED` names, for each advice the library's messages hold, the test that meets the
message in a real scenario and then does what it says; :func:`test_every_advice_in_the_library_is_followed`
reads the library's source for advice (an imperative such as "pass --X", "give --X", "run ... again",
"--overwrite starts over") and fails for any that has no such test, so new advice comes with its way out.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import h5py
import joblib
import numpy as np
import pytest
import torch
import torchvision
from conftest import (
    REPO,
    TINY_RUN,
    TUNE_ARGS,
    error_lines,
    extract_args,
    make_image_folder,
    run_cli,
    run_subprocess,
    spawn,
    write_jpeg,
    write_store,
)

from featurekit import files
from featurekit.backbones.trunks import load_backbone
from featurekit.backbones.weights import weights_files
from featurekit.errors import AlignmentError, BackboneError, SettingsError
from featurekit.heads.knn import KNNHead
from featurekit.heads.train import train_head
from featurekit.images.listing import list_split
from featurekit.store import chunks
from featurekit.store.format import read_store
from featurekit.views.augment import ViewPlan

LIBRARY = REPO / "featurekit"
RUN = ["--device", "cpu", "--workers", "0", "--quiet"]
TINY_EXTRACT = [*TINY_RUN[:-5], "--precision", "fp32", "--batch-size", "4", "--workers", "0", "--quiet"]

FOLLOWED = {  # a part of the message (its {} are the values) -> "file::test" that follows its advice
    "(did you mean {}?)": "test_advice.py::test_backbone_and_weights_advice_works",
    "no final Linear layer found; pass --node": "test_advice.py::test_backbone_and_weights_advice_works",
    "give STORE=FILE, one per backbone": "test_advice.py::test_backbone_and_weights_advice_works",
    "; did you mean {}?": "test_advice.py::test_backbone_and_weights_advice_works",
    "put that file at {}, or pass --weights-path FILE": "test_advice.py::test_offline_weights_advice_works",
    "; put the file of {} there, or pass --weights-path FILE": "test_advice.py::test_offline_weights_advice_works",
    "rerun the same command to resume": "test_advice.py::test_an_interrupted_extract_resumes_when_rerun",
    "use --device cpu": "test_advice.py::test_device_advice_works",
    "(--on-error skip extracts the rest)": "test_listing.py::test_unreadable_folder_in_a_run",
    "(--on-error skip leaves such images out": "test_advice.py::test_extract_advice_works",
    "use --decoder pil or auto, not torchvision": "test_advice.py::test_extract_advice_works",
    "it is a split folder; give the folder above it": "test_advice.py::test_extract_advice_works",
    "is empty: give a file name": "test_advice.py::test_output_advice_works",
    "is empty: give a folder": "test_advice.py::test_output_advice_works",
    "; give another {}": "test_advice.py::test_output_advice_works",
    "give the split's folder name under the data root":
        "test_output_rules.py::test_extract_writes_stores_only_inside_out",
    "give another --out (default: {}), or pass --overwrite":
        "test_output_rules.py::test_finetune_refuses_a_folder_holding_another_artifact_and_a_second_writer",
    "fine-tune again from an svm head trained by this version": "test_advice.py::test_finetune_advice_works",
    "give the file meant": "test_advice.py::test_finetune_advice_works",
    "rerun that command to continue it, or --overwrite to start over": "test_advice.py::test_finetune_advice_works",
    "; --overwrite starts over": "test_artifacts.py::test_an_edited_checkpoint_is_one_line_and_overwrite_starts_over",
    "pass --trust-paths if you trust where it points":
        "test_artifacts.py::test_a_model_whose_files_lie_outside_its_folder_is_refused_unless_trusted",
    "convert it with featurekit convert-head --trust": "test_advice.py::test_convert_head_advice_works",
    "give --trust only if you trust who made it": "test_advice.py::test_convert_head_advice_works",
    "exists; give a new file name": "test_advice.py::test_convert_head_advice_works",
    "test-time views; give --valid-split": "test_advice.py::test_train_head_advice_works",
    "run extract DATA --split {} --tta {}": "test_advice.py::test_train_head_advice_works",
    "give one (--valid-split)": "test_advice.py::test_train_head_advice_works",
    "run extract again to finish": "test_advice.py::test_train_head_advice_works",
    "run extract for this backbone and split": "test_advice.py::test_train_head_advice_works",
    "give a subfolder as a PATH": "test_advice.py::test_predict_advice_works",
    "give --head HEAD": "test_advice.py::test_neighbors_advice_works",
    "give --features: a folder of stores extracted with its trunks": "test_advice.py::test_neighbors_advice_works",
    "give --valid-split or --image": "test_advice.py::test_neighbors_advice_works",
    "pass --overwrite to discard them": "test_shard.py::test_a_shard_refuses_chunks_of_another_run_unless_overwrite",
    "began committing chunks at the same moment; run again": "test_advice.py::test_store_advice_works",
    "were never committed; run the same command again": "test_advice.py::test_store_advice_works",
    "re-extract it: extract --overwrite": "test_advice.py::test_store_advice_works",
    "run the same command again to recompute rows": "test_reliability.py::test_damaged_committed_chunk_is_recomputed",
    "pass --overwrite to re-extract it":
        "test_reliability.py::test_a_damaged_store_is_never_up_to_date_and_overwrite_replaces_it",
    "use --dtype float32":
        "test_pairings.py::test_a_test_time_view_that_overflows_is_skipped_by_predict_and_refused_by_extract",
    "same file names, but other files": "test_advice.py::test_alignment_advice_works",
    "; re-extract one of them alike": "test_advice.py::test_alignment_advice_works",
    "were extracted with other {}; re-extract one of them": "test_advice.py::test_alignment_advice_works",
    "give --node or --pool, not both": "test_advice.py::test_sources_advice_works",
    "give img_size and pretrained_cfg_overlay alike": "test_advice.py::test_sources_advice_works",
    "(crop {}): use flip": "test_advice.py::test_sources_advice_works",
    "put the files of {} in the Hugging Face cache":
        "test_sources_downstream.py::test_pretrained_weights_offline_name_the_cache_then_load_from_it",
    "its pretrained weights are not in the local cache and {} ({}): {}; or pass --weights-path FILE":
        "test_sources_downstream.py::test_pretrained_weights_offline_name_the_cache_then_load_from_it",
    "exists; pass --overwrite to replace it": "test_outputs.py::test_formats_topk_clamp_and_existing_outputs",
    "is one split: give it one --split name and no DATA_ROOT": "test_advice.py::test_sources_and_lists_advice_works",
    "shards are one split; give one --split name": "test_advice.py::test_sources_and_lists_advice_works",
    "both choose the valid images; give one of them": "test_advice.py::test_sources_and_lists_advice_works",
    "look like splits, not classes; a class folder without splits is cut": (
        "test_advice.py::test_sources_and_lists_advice_works"),
    "an unlabelled split has no mistakes to show; give --image": "test_advice.py::test_sources_and_lists_advice_works",
    "use --format kaggle (class names)": "test_advice.py::test_predict_formats_advice_works",
    "--topk {}: give 1 or more": "test_advice.py::test_predict_formats_advice_works",
    "--format parquet writes a file: give --out FILE": "test_advice.py::test_predict_formats_advice_works",
    "--split SPLIT (stores), not both": "test_advice.py::test_predict_formats_advice_works",
    "nothing to classify: give image files or folders": "test_advice.py::test_predict_formats_advice_works",
    "an unfinished run: rerun it, or clean --older-than": "test_advice.py::test_housekeeping_advice_works",
    "give --older-than to remove it": "test_advice.py::test_housekeeping_advice_works",
    "audit: give at least one --split":
        "test_audit.py::test_bad_input_refused_as_train_head_refuses_it_and_one_class_said_once",
    "run the audit again on these stores":
        "test_audit.py::test_an_audit_of_stores_extracted_again_since_trains_nothing",
}
NOT_FOLLOWABLE = {  # advice whose scenario needs what tests cannot have here
    "upgrade featurekit": "a newer featurekit than the one under test",
    "put {} in {} (TORCH_HOME decides where)": "timm's pretrained file itself (no network, no copy here)",
    "put {} in ~/.cache/clip": "OpenAI's CLIP file itself (no network, no copy here)",
}

ADVICE = re.compile(r"(?:^|[;:(,]\s*|\bor\s+)(pass|give|use|rerun|run|put|upgrade|re-extract|convert it with|"
                    r"fine-tune again)\b|--[a-z][a-z-]+(?: [a-z]+)?\)? (?:starts over|to start over|leaves|extracts)"
                    r"|did you mean")


def library_messages() -> dict[str, str]:
    """Every string the library builds that holds advice (``{}`` for its values) -> its file."""
    found = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        tree = ast.parse(path.read_text())
        skip = _not_messages(tree)
        for node in ast.walk(tree):
            if id(node) not in skip and isinstance(node, (ast.Constant, ast.JoinedStr)):
                text = _text(node)
                if len(text) > 12 and ADVICE.search(text):
                    found[text] = str(path.relative_to(REPO))
    return found


def _not_messages(tree: ast.AST) -> set[int]:
    """Docstrings, help texts, log lines and the parts of f-strings (their whole is read)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and node.body and \
                isinstance(node.body[0], ast.Expr):
            skip.add(id(node.body[0].value))
        texts = isinstance(node, ast.Call) and (getattr(node.func, "id", "") in ("setting", "command") or getattr(
            node.func, "attr", "") in ("add_argument", "info", "warning", "debug", "add_parser"))
        constants = isinstance(node, ast.Assign) and any(getattr(t, "id", "").endswith(("DESCRIPTION", "EPILOG"))
                                                          for t in node.targets)
        if texts or constants or (isinstance(node, ast.keyword) and node.arg in ("help", "description", "epilog")):
            skip.update(id(sub) for sub in ast.walk(node))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(value) for value in node.values)
    return skip


def _text(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return "".join("{}" if isinstance(v, ast.FormattedValue) else _text(v) for v in getattr(node, "values", []))


def test_every_advice_in_the_library_is_followed():
    messages = library_messages()
    assert len(messages) > 30, "the scan no longer finds the library's messages"
    keys = [*FOLLOWED, *NOT_FOLLOWABLE]
    unfollowed = [f"{where}: {text}" for text, where in messages.items() if not any(key in text for key in keys)]
    assert not unfollowed, "advice without a test that follows it (add it to FOLLOWED):\n" + "\n".join(unfollowed)
    unused = [key for key in keys if not any(key in text for text in messages)]
    assert not unused, f"FOLLOWED names advice the library no longer gives: {unused}"
    for test in set(FOLLOWED.values()):
        module, name = test.split("::")
        assert re.search(rf"^def {name}\(", (REPO / "tests" / module).read_text(), re.M), f"{test} does not exist"


def test_every_test_docs_reliability_names_exists():
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", (REPO / "docs" / "reliability.md").read_text()))
    assert len(named) > 40
    missing = [f"{module}::{name}" for module, name in sorted(named)
               if not re.search(rf"^def {name}\(", (REPO / "tests" / module).read_text(), re.M)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


# --------------------------------------------------------------------------- the scenarios


def test_backbone_and_weights_advice_works(tmp_path):
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet81' \(did you mean resnet18,"):
        load_backbone("resnet81", "random")
    assert load_backbone("resnet18", "random").store_name == "resnet18"
    with pytest.raises(BackboneError, match=r"squeezenet1_0: no final Linear layer found; pass --node \(one of "
                                            r"classifier\.0, .*flatten\)"):
        load_backbone("squeezenet1_0", "random")
    assert load_backbone("squeezenet1_0", "random", node="flatten").feature_dim == 1000
    with pytest.raises(SettingsError, match=r"--weights-path w\.pt: give STORE=FILE, one per backbone \(a, b\)"):
        weights_files(["w.pt"], ["a", "b"])
    assert weights_files(["a=w.pt"], ["a", "b"]) == {"a": "w.pt"}
    with pytest.raises(SettingsError, match=r"no backbone 'resnet81' in this run \(resnet18\); did you mean resnet18"):
        weights_files(["resnet81=w.pt"], ["resnet18"])
    assert weights_files(["resnet18=w.pt"], ["resnet18"]) == {"resnet18": "w.pt"}


def test_sources_advice_works():
    with pytest.raises(BackboneError, match="timm:test_vit: give --node or --pool, not both"):
        load_backbone("timm:test_vit", "random", node="blocks.0", pool="cls")
    assert load_backbone("timm:test_vit", "random", pool="cls").store_name == "timm:test_vit@cls"
    sized = {"img_size": 96, "pretrained_cfg_overlay": {"input_size": (3, 128, 128)}}
    with pytest.raises(BackboneError, match=r"takes \(96, 96\) images but its data config says input size \(128, "
                                            r"128\) \(give img_size and pretrained_cfg_overlay alike\)"):
        load_backbone("timm:vit_tiny_patch16_224", "random", model_kwargs=sized)
    alike = {"img_size": 96, "pretrained_cfg_overlay": {"input_size": (3, 96, 96)}}
    assert load_backbone("timm:vit_tiny_patch16_224", "random", model_kwargs=alike).preprocessing.size == (96, 96)
    bordered = dataclasses.replace(load_backbone("timm:test_vit", "random").preprocessing, resize_mode="longer_round")
    assert ViewPlan(tta="five-crop").refusal(bordered).endswith("use flip")
    assert ViewPlan(tta="flip").refusal(bordered) is None


def test_offline_weights_advice_works(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(
        urllib.error.URLError("Name or service not known")))
    args = ["extract", tiny.data, "--split", "train", "--backbone", "resnet18", "--out", tmp_path / "f", *RUN]
    refused = run_cli(capsys, *args, "--weights", "IMAGENET1K_V1")
    [line] = error_lines(refused.err)
    assert refused.code == 1 and "or pass --weights-path FILE (a local state dict), or --weights random" in line
    cached = Path(line.split("put that file at ")[1].split(",")[0])
    torch.save(torch.load(tiny.model / "trunks" / "resnet18.pt", weights_only=True), tmp_path / "state.pt")
    assert run_cli(capsys, *args, "--weights-path", tmp_path / "state.pt", "--dtype", "float32").code == 0
    assert run_cli(capsys, *args, "--weights", "random", "--overwrite").code == 0
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "state.pt", cached)  # a trunk's tensors only: torchvision loads the whole model
    wrong = run_cli(capsys, *args, "--weights", "IMAGENET1K_V1")
    assert error_lines(wrong.err) == [f"featurekit: error: {cached}: not the weights ResNet18_Weights.IMAGENET1K_V1 ("
                                      "Error(s) in loading state_dict for ResNet:); put the file of "
                                      f"{line.split(' from ')[1].split(' ')[0]} there, or pass --weights-path FILE "
                                      "(a local state dict)"]
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), cached)  # a whole resnet18 state dict, as the file is
    assert run_cli(capsys, *args, "--weights", "IMAGENET1K_V1", "--dtype", "float32", "--overwrite").code == 0


def test_an_interrupted_extract_resumes_when_rerun(reference, tmp_path, capsys):
    data, _ = reference
    out, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    child = spawn(*extract_args(data, out), env={files.PAUSE_ENV: f"{sync}:finalize-tmp-written"})
    deadline = time.monotonic() + 120
    while not list(sync.glob("finalize-tmp-written.*")):
        assert time.monotonic() < deadline and child.poll() is None, child.stderr.read() if child.poll() else ""
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.strip().endswith(
        "featurekit: interrupted; committed chunks are kept, rerun the same command to resume")
    assert not list((out / "train").glob(".*.tmp-*"))  # the store's temporary went with the interruption
    again = run_cli(capsys, *extract_args(data, out))
    assert again.code == 0 and "resumed (5 chunks committed)" in again.err and "nothing left to extract" in again.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_advice_works(tiny, tmp_path, capsys):
    args = ["predict", "--head", tiny.logreg, tiny.data / "valid", "--out", tmp_path / "p.csv", "--workers", "0"]
    refused = run_cli(capsys, *args, "--device", "cuda")
    assert error_lines(refused.err) == ["featurekit: error: --device cuda: no CUDA device is available here; use "
                                        "--device cpu"]
    assert run_cli(capsys, *args, "--device", "cpu").code == 0


def test_extract_advice_works(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny.data, data)
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    args = ["extract", data, "--split", "train", "--out", tmp_path / "f", *TINY_EXTRACT]
    refused = run_cli(capsys, *args)
    assert error_lines(refused.err)[0].endswith("(--on-error skip leaves such images out, each recorded with its "
                                                "reason)")
    skipped = run_cli(capsys, *args, "--on-error", "skip")
    assert skipped.code == 0 and "skipped" in skipped.out and read_store(tmp_path / "f" / "train" / "resnet18.h5")
    views = run_cli(capsys, *args, "--on-error", "skip", "--augment", "1", "--decoder", "torchvision", "--overwrite")
    assert "cut from PIL-decoded images: use --decoder pil or auto, not torchvision" in error_lines(views.err)[0]
    assert run_cli(capsys, *args, "--on-error", "skip", "--augment", "1", "--decoder", "pil", "--overwrite").code == 0
    split_given = run_cli(capsys, "extract", data / "train", "--split", "train", "--out", tmp_path / "g",
                          *TINY_EXTRACT)
    [line] = error_lines(split_given.err)
    advised = re.search(r"give the folder above it \(featurekit extract (\S+) --split (\S+)\)", line)
    assert advised and run_cli(capsys, "extract", advised[1], "--split", advised[2], "--on-error", "skip", "--out",
                               tmp_path / "g", *TINY_EXTRACT).code == 0


def test_output_advice_works(tiny, tmp_path, capsys):
    predict = ["predict", "--head", tiny.logreg, tiny.data / "valid", *RUN]
    assert error_lines(run_cli(capsys, *predict, "--out", "").err) == ["featurekit: error: --out is empty: give a "
                                                                       "file name"]
    refused = run_cli(capsys, *predict, "--out", tiny.logreg)
    assert error_lines(refused.err)[0].endswith("; give another --out")
    assert run_cli(capsys, *predict, "--out", tmp_path / "p.csv").code == 0
    with pytest.raises(SettingsError, match="^--out is empty: give a folder$"):
        train_head(tiny.features, ["resnet18"], "logreg", "")
    assert train_head(tiny.features, ["resnet18"], "logreg", tmp_path / "head", plots=False)["out_dir"]


def test_finetune_advice_works(tiny, tmp_path, capsys):
    args = ["finetune", tiny.data, "--head", tiny.logreg, "--unfreeze", "layer4.1.bn2", *TUNE_ARGS]
    model = tmp_path / "model"
    shutil.copytree(tiny.model, model)
    other = run_cli(capsys, *args, "--out", model, "--epochs", "2")
    assert "(epochs 1 != 2); rerun that command to continue it, or --overwrite to start over" in other.err
    assert run_cli(capsys, *args, "--out", model).code == 0  # that command: resumes, nothing left to train
    assert run_cli(capsys, *args, "--out", model, "--epochs", "2", "--overwrite").code == 0
    both = tmp_path / "both"
    shutil.copytree(tiny.model, both)
    shutil.copy(tiny.logreg, both / "head.h5")
    predict = ["predict", tiny.data / "valid", "--out", tmp_path / "p.csv", "--overwrite", *RUN]
    assert "give the file meant" in run_cli(capsys, *predict, "--head", both).err
    assert run_cli(capsys, *predict, "--head", both / "model.json").code == 0
    old = tmp_path / "old"
    shutil.copytree(tiny.model, old)
    record = json.loads((old / "model.json").read_text())
    (old / "model.json").write_text(json.dumps({**record, "format_version": 1, "head": "svm",
                                                "classifier": {**record["classifier"], "kind": "svm"}}))
    assert "fine-tune again from an svm head trained by this version" in run_cli(capsys, *predict, "--head", old).err
    assert run_cli(capsys, "train-head", tiny.features, "--backbone", "resnet18", "--head", "svm", "--out",
                   tmp_path / "svm", "--no-plots").code == 0
    assert run_cli(capsys, "finetune", tiny.data, "--head", tmp_path / "svm", "--unfreeze", "none",
                   *TUNE_ARGS).code == 0
    assert run_cli(capsys, *predict, "--head", tmp_path / "svm" / "finetuned").code == 0


def test_convert_head_advice_works(tiny, tmp_path, capsys):
    rows = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    old = tmp_path / "head.h5"  # an old pickle head under the name predict was given
    joblib.dump({"format": "featurekit.head", "format_version": 1, "kind": "knn",
                 "head": KNNHead(n_neighbors=3).fit(rows, np.arange(20) % 2),
                 "metadata": {"classes": ["cat", "dog"], "backbones": []}}, old)
    refused = run_cli(capsys, "predict", "--head", old, tiny.data / "valid", "--out", tmp_path / "p.csv", *RUN)
    advised = re.search(r"convert it with featurekit (convert-head --trust \S+ \S+)$", error_lines(refused.err)[0])
    command = advised[1].split()
    assert command[-1] == str(old)  # beside it, under the name train-head writes: taken already
    assert "exists; give a new file name" in run_cli(capsys, *command).err
    untrusted = run_cli(capsys, "convert-head", old, tmp_path / "new.h5")
    assert "give --trust only if you trust who made it" in untrusted.err
    assert run_cli(capsys, "convert-head", "--trust", old, tmp_path / "new.h5").code == 0
    assert (tmp_path / "new.h5").read_bytes()[:8] == files.HDF5_SIGNATURE


def test_train_head_advice_works(tiny, tmp_path, capsys):
    features = tmp_path / "features"
    shutil.copytree(tiny.features, features)
    train = ["train-head", features, "--backbone", "resnet18", "--head", "logreg", "--no-plots", "--out",
             tmp_path / "head"]
    extract = ["extract", tiny.data, "--out", features, *TINY_EXTRACT]
    assert "--tta scores the validation split with test-time views; give --valid-split" in run_cli(
        capsys, *train, "--tta", "flip", "--valid-split", "none").err
    refused = run_cli(capsys, *train, "--tta", "flip")
    advised = re.search(r"run extract DATA --split (\S+) --tta (\S+) \(same backbones", refused.err)
    assert advised and run_cli(capsys, *extract, "--split", advised[1], "--tta", advised[2], "--overwrite").code == 0
    assert run_cli(capsys, *train, "--tta", "flip").code == 0
    assert "--head all chooses on the validation split; give one (--valid-split)" in run_cli(
        capsys, *train[:4], "--head", "all", "--valid-split", "none").err
    assert run_cli(capsys, *train[:4], "--head", "all", "--epochs", "2", "--no-plots", "--out",
                   tmp_path / "all").code == 0
    (features / "valid" / "resnet18.h5").unlink()
    assert "no such store; run extract for this backbone and split" in run_cli(capsys, *train).err
    assert run_cli(capsys, *extract, "--split", "valid").code == 0 and run_cli(capsys, *train).code == 0
    (features / "valid" / "resnet18.h5").unlink()
    killed = subprocess.run([sys.executable, "-m", "featurekit", *map(str, extract), "--split", "valid",
                             "--chunk-size", "2", "--batch-size", "2"], cwd=REPO, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), files.CRASH_ENV: "chunk-committed:1"})
    assert killed.returncode == -signal.SIGKILL
    assert "extraction unfinished (partial chunks only); run extract again to finish" in run_cli(capsys, *train).err
    assert run_cli(capsys, *extract, "--split", "valid", "--chunk-size", "2", "--batch-size", "2").code == 0
    assert run_cli(capsys, *train).code == 0


def test_predict_advice_works(tiny, tmp_path, capsys):
    predict = ["predict", "--head", tiny.logreg, "--out", tmp_path / "p.csv", *RUN]
    folder = tmp_path / "photos"
    shutil.copytree(tiny.data / "valid" / "cat", folder / "holiday")
    noticed = run_cli(capsys, *predict, folder, "--out", tmp_path / "q.csv")  # no image directly in it
    assert noticed.code == 1 and "give a subfolder as a PATH to classify its images" in noticed.err
    followed = run_cli(capsys, *predict, folder / "holiday", "--out", tmp_path / "q.csv")
    assert followed.code == 0 and "2 predictions written" in followed.out


def test_neighbors_advice_works(tiny, tmp_path, capsys):
    nothing = run_cli(capsys, "neighbors", "--device", "cpu")
    assert "give --head HEAD (its mistakes, or --image), or --features DIR" in nothing.err
    assert run_cli(capsys, "neighbors", "--head", tiny.logreg, "--device", "cpu").code == 0
    model = run_cli(capsys, "neighbors", "--head", tiny.model, "--device", "cpu")
    assert "give --features: a folder of stores extracted with its trunks (extract --weights-path " \
           "STORE=MODEL/trunks/STORE.pt)" in model.err
    trunks = tmp_path / "features"
    assert run_cli(capsys, "extract", tiny.data, "--split", "train", "valid", "--out", trunks, "--weights-path",
                   f"resnet18={tiny.model / 'trunks' / 'resnet18.pt'}", *TINY_EXTRACT[4:], "--backbone",
                   "resnet18").code == 0
    assert run_cli(capsys, "neighbors", "--head", tiny.model, "--features", trunks, "--valid-split", "valid",
                   "--device", "cpu").code == 0
    head = tmp_path / "head"
    train_head(tiny.features, ["resnet18"], "logreg", head, valid_split=None, plots=False)
    refused = run_cli(capsys, "neighbors", "--head", head, "--device", "cpu")
    assert "trained without a validation split; give --valid-split or --image" in refused.err
    assert run_cli(capsys, "neighbors", "--head", head, "--valid-split", "valid", "--device", "cpu").code == 0
    assert run_cli(capsys, "neighbors", "--head", head, "--image", tiny.data / "valid", "--device", "cpu").code == 0


def test_store_advice_works(reference, tmp_path, capsys, monkeypatch):
    data, expected = reference
    out = tmp_path / "out"
    real_create = chunks.PartialStore.create
    raced = []

    def first_loses_the_race(self, identity):
        if not raced:
            raced.append(True)
            return False
        return real_create(self, identity)
    monkeypatch.setattr(chunks.PartialStore, "create", first_loses_the_race)
    lost = run_cli(capsys, *extract_args(data, out))
    assert "another run began committing chunks at the same moment; run again" in error_lines(lost.err)[0]
    monkeypatch.undo()
    real_rows = chunks.PartialStore.rows

    def a_chunk_vanishes(self, n):
        self.chunk_path(2, 4).unlink()  # as a disk might lose it before the join
        return real_rows(self, n)
    monkeypatch.setattr(chunks.PartialStore, "rows", a_chunk_vanishes)
    vanished = run_cli(capsys, *extract_args(data, out))
    assert "rows 2-4 were never committed; run the same command again" in error_lines(vanished.err)[0]
    monkeypatch.undo()
    again = run_cli(capsys, *extract_args(data, out))
    assert again.code == 0 and "resumed (4 chunks committed)" in again.err
    with h5py.File(out / "train" / "resnet18.h5", "r+") as h5:
        h5.attrs["format_version"] = 1
    old = run_cli(capsys, *extract_args(data, out))
    assert "store format 1 is older than this featurekit's (3); re-extract it: extract --overwrite" in old.err
    assert run_cli(capsys, *extract_args(data, out, "--overwrite")).code == 0
    assert read_store(out / "train" / "resnet18.h5").paths == read_store(expected).paths


def test_alignment_advice_works(tmp_path):
    root, other_root, features = tmp_path / "data", tmp_path / "copy", tmp_path / "features"
    listing = make_image_folder(root, "train", {"ant": 3, "bee": 3})
    rows = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    write_store(features, listing, "a", rows)
    write_store(features, listing, "b", rows, precision="bf16")
    with pytest.raises(AlignmentError, match=r"extracted with other precision \(bf16 != fp32\); re-extract one of them "
                                        "alike"):
        train_head(features, ["a", "b"], "logreg", tmp_path / "h", valid_split=None, plots=False)
    (features / "train" / "b.h5").unlink()
    write_store(features, listing, "b", rows)  # b made again alike
    assert train_head(features, ["a", "b"], "logreg", tmp_path / "h", valid_split=None, plots=False)
    shutil.copytree(root, other_root)
    for image in (other_root / "train" / "ant").iterdir():
        write_jpeg(image, seed=99)  # same names, other files
    (features / "train" / "b.h5").unlink()
    write_store(features, list_split(other_root, "train"), "b", rows)
    with pytest.raises(AlignmentError, match="same file names, but other files .*; re-extract one of them"):
        train_head(features, ["a", "b"], "logreg", tmp_path / "h", valid_split=None, plots=False)
    (features / "train" / "b.h5").unlink()
    write_store(features, listing, "b", rows)  # re-extracted from a's folder
    assert train_head(features, ["a", "b"], "logreg", tmp_path / "h", valid_split=None, plots=False)
    valid = make_image_folder(root, "valid", {"ant": 1, "bee": 1})
    write_store(features, valid, "a", rows[:2], dtype="float16")
    write_store(features, valid, "b", rows[:2], dtype="float16")
    with pytest.raises(AlignmentError, match=r"split 'train' .* and split 'valid' .* were extracted with other "
                                             "dtype .*; re-extract one of them"):
        train_head(features, ["a", "b"], "logreg", tmp_path / "h", plots=False)
    for name in ("a", "b"):
        (features / "valid" / f"{name}.h5").unlink()
        write_store(features, valid, name, rows[:2])
    assert train_head(features, ["a", "b"], "logreg", tmp_path / "h", plots=False)



def test_shards_of_other_batch_sizes_join_where_their_chunks_overlap(reference, tmp_path, capsys):
    """Batch sizes 4 and 3 round chunk size 2 up to 4 and 3: the shards commit 0-4, 4-8 and 6-9, 9-10,
    which no set of whole chunks tiles; the join takes rows 8-9 from chunk 6-9 (it once refused, and
    --overwrite refused the same way)."""
    data, expected = reference
    out = tmp_path / "out"
    assert run_cli(capsys, *extract_args(data, out, "--shard", "0/2", "--batch-size", "4")).code == 0
    joined = run_cli(capsys, *extract_args(data, out, "--shard", "1/2", "--batch-size", "3"))
    assert joined.code == 0 and "10 rows  written" in joined.out, joined.err
    store, reference_store = read_store(out / "train" / "resnet18.h5"), read_store(expected)
    assert store.paths == reference_store.paths
    np.testing.assert_allclose(store.features, reference_store.features, rtol=1e-4, atol=1e-5)
    assert run_cli(capsys, "verify", out / "train" / "resnet18.h5").code == 0


def test_sources_and_lists_advice_works(tiny, tmp_path, capsys):
    from tests.test_shards import shards_of

    images = sorted((tiny.data / "train").rglob("*.jpg"))
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(map(str, images)) + "\n")
    out = ["--out", tmp_path / "f", *TINY_EXTRACT]
    two = run_cli(capsys, "extract", "--list", listed, "--split", "a", "b", *out)
    assert "is one split: give it one --split name and no DATA_ROOT" in error_lines(two.err)[0]
    assert run_cli(capsys, "extract", "--list", listed, "--split", "listed", *out).code == 0
    pattern = shards_of(tiny.data / "train", tmp_path / "shards")
    shards = run_cli(capsys, "extract", pattern, "--split", "a", "b", *out)
    assert "shards are one split; give one --split name" in error_lines(shards.err)[0]
    assert run_cli(capsys, "extract", pattern, "--split", "sharded", *out).code == 0
    classes = tiny.data / "train"  # a class folder without splits: cut into train and valid
    both = run_cli(capsys, "extract", classes, "--valid-fraction", "0.5", "--folds", "2", *out)
    assert "--valid-fraction and --folds both choose the valid images; give one of them" in both.err
    assert run_cli(capsys, "extract", classes, "--valid-fraction", "0.5", "--split", "train", "valid", "--out",
                   tmp_path / "cut", *TINY_EXTRACT).code == 0
    looks = run_cli(capsys, "extract", tiny.data, "--valid-fraction", "0.5", *out)
    assert "its folders train, valid look like splits, not classes" in looks.err and "give --split instead" in looks.err
    assert run_cli(capsys, "extract", tiny.data, "--split", "valid", *out).code == 0
    unlabelled = run_cli(capsys, "neighbors", "--head", tiny.logreg, "--features", tmp_path / "f", "--split",
                         "valid", "--valid-split", "listed", "--device", "cpu")
    assert "an unlabelled split has no mistakes to show; give --image" in unlabelled.err
    assert run_cli(capsys, "neighbors", "--head", tiny.logreg, "--features", tmp_path / "f", "--split", "valid",
                   "--image", images[0], "--device", "cpu").code == 0


def test_predict_formats_advice_works(tiny, tmp_path, capsys):
    predict = ["predict", "--head", tiny.logreg, *RUN]
    valid = tiny.data / "valid"
    assert "--topk 0: give 1 or more" in run_cli(capsys, *predict, valid, "--topk", "0", "--out", "-").err
    assert run_cli(capsys, *predict, valid, "--topk", "1", "--out", tmp_path / "t.csv").code == 0
    assert "--format parquet writes a file: give --out FILE" in run_cli(
        capsys, *predict, valid, "--format", "parquet", "--out", "-").err
    assert run_cli(capsys, *predict, valid, "--format", "parquet", "--out", tmp_path / "p.parquet").code == 0
    stores = ["--features", tiny.features, "--split", "valid"]
    assert "not both" in run_cli(capsys, *predict, valid, *stores, "--out", tmp_path / "s.csv").err
    assert run_cli(capsys, *predict, *stores, "--out", tmp_path / "s.csv").code == 0
    assert "nothing to classify: give image files or folders" in run_cli(capsys, *predict, "--out",
                                                                          tmp_path / "n.csv").err
    assert run_cli(capsys, *predict, valid, "--out", tmp_path / "n.csv").code == 0
    three = tmp_path / "three"
    train_data = tmp_path / "data"
    shutil.copytree(tiny.data, train_data)
    for split in ("train", "valid"):
        shutil.copytree(train_data / split / "cat", train_data / split / "cow")
    assert run_cli(capsys, "extract", train_data, "--split", "train", "valid", "--out", tmp_path / "f3",
                   *TINY_EXTRACT).code == 0
    assert run_cli(capsys, "train-head", tmp_path / "f3", "--backbone", "resnet18", "--head", "logreg", "--out",
                   three, "--no-plots").code == 0
    proba = run_cli(capsys, "predict", "--head", three, valid, "--format", "kaggle-proba", "--out",
                    tmp_path / "k.csv", *RUN)
    assert "use --format kaggle (class names)" in proba.err
    assert run_cli(capsys, "predict", "--head", three, valid, "--format", "kaggle", "--out", tmp_path / "k.csv",
                   *RUN).code == 0


def test_housekeeping_advice_works(reference, tmp_path, capsys):
    data, _ = reference
    out = tmp_path / "out"
    killed = run_subprocess(*extract_args(data, out), env={files.CRASH_ENV: "chunk-committed:1"})
    assert killed.returncode == -signal.SIGKILL
    du = run_cli(capsys, "du", out)
    assert "an unfinished run: rerun it, or clean --older-than" in du.out + du.err
    kept = run_cli(capsys, "clean", out)
    assert "give --older-than to remove it" in kept.out + kept.err
    partial = chunks.PartialStore(out / "train" / "resnet18.h5").dir
    assert partial.is_dir()
    assert run_cli(capsys, "clean", out, "--older-than", "0").code == 0 and not partial.exists()
    assert run_subprocess(*extract_args(data, out), env={files.CRASH_ENV: "chunk-committed:1"}).returncode < 0
    assert run_cli(capsys, *extract_args(data, out)).code == 0  # rerun it: the other way out
    assert (out / "train" / "resnet18.h5").is_file() and not partial.exists()

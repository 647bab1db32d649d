"""timm:, open_clip: and hf: backbones through every stage: extract (views, shards), info, verify,
train-head, predict and neighbors (the trunk rebuilt from the recorded identity), finetune; their
weights (random, local files, the library's pretrained ones offline); and their one-line errors.
Tiny random-weight models (timm's own test models), built offline, on generated JPEGs."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from featurekit.backbones.registry import describe_registry
from featurekit.backbones.trunks import load_backbone
from featurekit.errors import AugmentError, BackboneError, WeightsError
from featurekit.finetuning.run import prepare
from featurekit.finetuning.settings import FinetuneSettings
from featurekit.heads.head_file import load_head
from featurekit.predict.classify import predict_files
from featurekit.store.format import read_header, read_store, store_path
from featurekit.views.augment import ViewPlan, tta_views
from tests.conftest import error_lines, run_cli, write_image_folder

TINY_RUN = ["--weights", "random", "--device", "cpu", "--precision", "fp32", "--dtype", "float32", "--batch-size",
            "4", "--chunk-size", "4", "--workers", "0", "--quiet"]
STORE = "timm:test_vit@cls+mean"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(data root, features dir, head file): extract (with augmented and test-time views) -> train-head."""
    from featurekit.cli import main

    tmp = tmp_path_factory.mktemp("sources")
    root = write_image_folder(tmp / "data", {"train": {"cat": 4, "dog": 4}, "valid": {"cat": 2, "dog": 2}})
    assert main(["extract", str(root), "--split", "train", "--backbone", "timm:test_vit", "--pool", "cls+mean",
                 "--augment", "2", "--tta", "flip", "--out", str(tmp / "features"), *TINY_RUN]) == 0
    assert main(["extract", str(root), "--split", "valid", "--backbone", "timm:test_vit", "--pool", "cls+mean",
                 "--tta", "flip", "--out", str(tmp / "features"), *TINY_RUN]) == 0
    assert main(["train-head", str(tmp / "features"), "--backbone", STORE, "--head", "logreg", "--out",
                 str(tmp / "head"), "--no-plots"]) == 0
    return root, tmp / "features", tmp / "head" / "head.h5"


def test_extract_records_the_source_and_predict_rebuilds_the_trunk(run, capsys):
    root, features, head_file = run
    path = store_path(features, "valid", STORE)
    assert path.name == "timm-test_vit@cls+mean.h5"
    header = read_header(path)
    assert (header.backbone, header.node, header.feature_dim, header.tta) == ("timm:test_vit", "cls+mean", 128, "flip")
    assert {key: header.source[key] for key in ("library", "model", "tag", "pool")} == {
        "library": "timm", "model": "test_vit", "tag": "r160_in1k", "pool": "cls+mean"}
    assert read_header(store_path(features, "train", STORE)).augment_views == 2
    predictions = predict_files(head_file, [root / "valid"])
    head, _ = load_head(head_file)
    store = read_store(path)
    assert [p.split("/valid/")[1] for p in predictions.paths] == store.paths
    np.testing.assert_allclose(predictions.proba, head.predict_proba(store.features), atol=1e-5)
    tta = predict_files(head_file, [root / "valid"], tta="flip")
    assert tta.proba.shape == predictions.proba.shape
    capsys.readouterr()
    assert run_cli(capsys, "verify", path).code == 0
    info = run_cli(capsys, "info", path).out
    assert "from timm 1.0" in info and "model test_vit tag r160_in1k, pool cls+mean" in info
    assert run_cli(capsys, "neighbors", "--head", head_file.parent, "--image", root / "valid" / "cat",
                   "-k", "2").code == 0


def test_a_head_on_another_pool_or_weights_is_refused(run, tmp_path, capsys):
    root, features, head_file = run
    weights = tmp_path / "other.pt"
    torch.save({k: v + 1 for k, v in load_backbone("timm:test_vit", "random").trunk.body.state_dict().items()},
               weights)
    done = run_cli(capsys, "predict", "--head", head_file, "--weights-path", f"{STORE}={weights}", "--out",
                   tmp_path / "p.csv", root / "valid")
    [error] = error_lines(done.err)
    assert done.code == 1 and "was trained on weights random" in error and "file:other.pt" in error


def test_finetune_unfreezes_timm_blocks_and_keeps_frozen_norms_in_eval_mode(run, tmp_path):
    root, _, head_file = run
    settings = FinetuneSettings(device="cpu", precision="fp32", batch_size=4, num_workers=0, progress=False,
                                plots=False, epochs=1, unfreeze=("blocks.1",))
    model = prepare(head_file, root, settings).trainer.model
    body = model.trunks[0].body
    trained = {name for name, p in body.named_parameters() if p.requires_grad}
    assert "blocks.1.attn.qkv.weight" in trained and "norm.weight" in trained  # blocks.1 and all that follows
    assert not any(name.startswith(("blocks.0.", "patch_embed.")) for name in trained) and "cls_token" not in trained
    model.train()
    assert body.blocks[1].norm1.training and not body.blocks[0].norm1.training and not body.patch_embed.training
    from featurekit.finetuning.run import finetune

    report = finetune(head_file, root, tmp_path / "tuned", settings)
    assert report["valid"]["n"] == 4 and (tmp_path / "tuned" / "trunks" / f"{STORE}.pt").is_file()
    again = predict_files(tmp_path / "tuned", [root / "valid"])  # the trunk rebuilt from its file, sha256 checked
    assert again.proba.shape == (4, 2)


def test_views_of_squashed_bordered_and_non_square_preprocessings(tmp_path):
    image = Image.new("RGB", (90, 30), (200, 10, 10))
    squash = load_backbone("timm:test_vit", "random", model_kwargs={
        "img_size": (96, 128), "pretrained_cfg_overlay": {"crop_mode": "squash"}}).preprocessing
    plan = ViewPlan(augment=2, tta="flip")
    assert plan.views(image, squash, 0).shape == (4, 3, 96, 128) and plan.refusal(squash) is None
    assert tta_views(image, squash, "five-crop").shape == (5, 3, 96, 128)  # squashed to 101x134, then cropped
    border = dataclasses.replace(squash, resize_mode="longer_round", fill=(128, 128, 128))
    assert "five-crop test-time views need a resize that covers" in ViewPlan(tta="five-crop").refusal(border)
    assert torch.equal(border.view(image)[:, 0, 64], torch.tensor([128, 128, 128], dtype=torch.uint8))  # padded
    floats = dataclasses.replace(squash, resampler="torch", view_dtype="float32")
    assert "views are float32" in ViewPlan(augment=1).refusal(floats)
    torch_resized = dataclasses.replace(squash, resampler="torch")  # the GPU-decode path's view, on the CPU
    assert torch.equal(torch_resized.view_tensor(torch.from_numpy(np.array(image)).permute(2, 0, 1)),
                       torch_resized.view(image))
    from featurekit.views.loader import ViewDataset

    with pytest.raises(AugmentError, match="cut from uint8 images"):
        ViewDataset([], [floats], __import__("featurekit.images.decode").images.decode.DecodePolicy(), plan)


def test_weights_files_random_and_the_node_of_a_convnet(tmp_path):
    built = load_backbone("timm:test_vit", "random")
    again = load_backbone("timm:test_vit", "random")
    assert built.weights.sha256 == again.weights.sha256 and built.weights.name == "random"
    from safetensors.torch import save_file

    save_file(built.trunk.body.state_dict(), str(tmp_path / "vit.safetensors"))
    loaded = load_backbone("timm:test_vit", weights_path=str(tmp_path / "vit.safetensors"))
    assert (loaded.weights.name, loaded.weights.sha256) == ("file:vit.safetensors", built.weights.sha256)
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3)}}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="no tensor matches the architecture.*shape mismatch"):
        load_backbone("timm:test_vit", weights_path=str(tmp_path / "bad.pt"))
    layer = load_backbone("timm:test_resnet", "random", node="layer3")
    assert (layer.store_name, layer.feature_dim) == ("timm:test_resnet@layer3", 192)


def test_open_clip_loads_the_image_tower_of_a_whole_checkpoint(tmp_path):
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS["fk-tiny-ckpt"] = {"embed_dim": 8, "vision_cfg": {
        "image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 8}, "text_cfg": {
        "context_length": 4, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1}}
    try:
        torch.manual_seed(3)
        torch.save({"state_dict": open_clip.create_model("fk-tiny-ckpt").state_dict()}, tmp_path / "clip.pt")
        tower = load_backbone("open_clip:fk-tiny-ckpt", weights_path=str(tmp_path / "clip.pt"))
        assert not tower.weights.report.missing and tower.weights.name == "file:clip.pt"
        assert tower.weights.sha256 != load_backbone("open_clip:fk-tiny-ckpt", "random").weights.sha256
    finally:
        factory._MODEL_CONFIGS.pop("fk-tiny-ckpt")


@pytest.mark.parametrize("name, kwargs, message", [
    ("timm:vit_tiny_patch16_24", {}, "timm has no model 'vit_tiny_patch16_24' (did you mean vit_tiny_patch16_224"),
    ("timm:test_vit.in1k", {}, "timm has no tag 'in1k' for test_vit (its tags: r160_in1k)"),
    ("timm:test_resnet", {"pool": "cls"}, "--pool cls is not available for timm's ResNet; it has default"),
    ("open_clip:RN50", {"node": "layer3"}, "--node takes timm: convnets"),
    ("open_clip:RN50/nope", {}, "open_clip has no tag 'nope' for RN50"),
    ("facebook/dinov2-small", {}, "; a Hugging Face model is hf:facebook/dinov2-small"),
    ("timm/resnet50.a1_in1k", {}, "; a timm model is timm:resnet50.a1_in1k"),
    ("resnet18", {"pool": "cls"}, "--pool and model arguments are for timm:"),
])
def test_bad_names_are_one_line_with_the_way_out(name, kwargs, message):
    with pytest.raises((BackboneError, WeightsError)) as caught:
        load_backbone(name, "random", **kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_library_not_installed_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(BackboneError, match=r"open_clip:ViT-B-32/openai: needs the open_clip package: pip install "
                                            r"'featurekit\[clip\]'"):
        load_backbone("open_clip:ViT-B-32/openai")


def test_pretrained_weights_offline_name_the_cache_then_load_from_it(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE: one line naming the model and the cache folder at once (no retries); with the files
    placed there as `hf download` leaves them, timm's own pretrained path loads them, offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "hub" / "models--timm--test_vit.r160_in1k"
    with pytest.raises(WeightsError) as caught:
        load_backbone("timm:test_vit")
    assert "timm:test_vit: its pretrained weights are not in the local cache and offline" in str(caught.value)
    assert str(folder) in str(caught.value)
    with pytest.raises(WeightsError, match="models--facebook--dinov2-small"):
        load_backbone("hf:facebook/dinov2-small")
    from safetensors.torch import save_file

    random = load_backbone("timm:test_vit", "random")
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    save_file(random.trunk.body.state_dict(), str(snapshot / "model.safetensors"))
    pretrained = load_backbone("timm:test_vit")
    assert (pretrained.weights.name, pretrained.weights.sha256) == ("pretrained", random.weights.sha256)
    assert pretrained.weights.source == "hf-hub:timm/test_vit.r160_in1k"


def test_list_backbones_asks_the_libraries_for_names(tmp_path, monkeypatch, capsys):
    lines = describe_registry("timm", "vit_small*dinov2*")
    assert "timm:vit_small_patch14_dinov2.lvd142m" in lines and lines[-1].endswith("matching 'vit_small*dinov2*'")
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in describe_registry("open_clip", "ViT-B-32/laion2b")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--facebook--dinov2-small" / "snapshots").mkdir(parents=True)
    assert run_cli(capsys, "list-backbones", "--source", "hf").out.splitlines()[0] == "hf:facebook/dinov2-small"
    assert "timm:<model>[.<tag>]" in "\n".join(describe_registry())


def test_the_store_identity_of_a_torchvision_backbone_has_no_source(run):
    from featurekit.store.format import StoreIdentity

    identity = StoreIdentity("resnet18", "flatten", "ab", {}, {}, "fp32", "float32", 2)
    assert "source" not in identity.to_dict() and json.dumps(identity.to_dict(), sort_keys=True) == (
        '{"backbone": "resnet18", "decode": {}, "dtype": "float32", "features_version": 2, "node": "flatten", '
        '"precision": "fp32", "preprocessing": {}, "weights_sha256": "ab"}')
    assert StoreIdentity.from_dict({**identity.to_dict(), "source": {"pool": "cls"}}).source == {"pool": "cls"}


def test_a_graph_that_does_not_trace_is_one_line(monkeypatch):
    import timm.models

    def untraceable(model):
        raise TypeError("symbolically traced variables cannot be used as inputs to control flow\nmore")

    monkeypatch.setattr(timm.models, "get_graph_node_names", untraceable)
    with pytest.raises(BackboneError, match=r"timm:test_resnet: --node needs the model's graph, which cannot be "
                                            r"traced \(symbolically traced variables .*\); take --pool instead$"):
        load_backbone("timm:test_resnet", "random", node="layer3")


def test_hf_weights_from_a_save_pretrained_folder(tmp_path):
    """--weights-path FOLDER: the model named as on the Hub, its config, processor and weights from the folder."""
    import transformers as T

    torch.manual_seed(0)
    T.Dinov2Model(T.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 patch_size=16, image_size=32)).save_pretrained(tmp_path / "dino")
    T.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "dino")
    named = load_backbone("hf:facebook/dinov2-small", weights_path=str(tmp_path / "dino"))
    folder = load_backbone(f"hf:{tmp_path / 'dino'}")
    assert (named.name, named.weights.name, named.weights.source) == (
        "hf:facebook/dinov2-small", "file:dino", str(tmp_path / "dino"))
    assert named.weights.sha256 == folder.weights.sha256 and named.preprocessing == folder.preprocessing
    assert folder.name == f"hf:{tmp_path / 'dino'}" and folder.source["model"] == str(tmp_path / "dino")

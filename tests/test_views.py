"""Per-backbone views equal torchvision's own preset transforms, exactly."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ConvNeXt_Tiny_Weights, Inception_V3_Weights, ResNet152_Weights

from featurekit.views.preprocessing import Preprocessing


@pytest.mark.parametrize("weights", [ResNet152_Weights.IMAGENET1K_V1, ResNet152_Weights.IMAGENET1K_V2,
                                     Inception_V3_Weights.IMAGENET1K_V1, ConvNeXt_Tiny_Weights.IMAGENET1K_V1])
@pytest.mark.parametrize("size", [(37, 61), (300, 260)])
def test_view_then_normalize_equals_weights_transforms(weights, size):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    preset = weights.transforms()
    preprocessing = Preprocessing.from_transforms(preset)

    ours = preprocessing.normalize(preprocessing.view(image).unsqueeze(0))[0]

    assert torch.equal(ours, preset(image))


def test_preprocessing_is_read_from_the_weights():
    v1 = Preprocessing.from_transforms(ResNet152_Weights.IMAGENET1K_V1.transforms())
    v2 = Preprocessing.from_transforms(ResNet152_Weights.IMAGENET1K_V2.transforms())
    inception = Preprocessing.from_transforms(Inception_V3_Weights.IMAGENET1K_V1.transforms())
    assert (v1.resize_size, v1.crop_size) == (256, 224)
    assert (v2.resize_size, v2.crop_size) == (232, 224)
    assert (inception.resize_size, inception.crop_size) == (342, 299)
    assert v1.key != v2.key

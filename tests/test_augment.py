"""Augmented and test-time views: the plain view's form, reproducible in any process, order or batching."""

import itertools
import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from featurekit.errors import AugmentError
from featurekit.images.decode import decode_image
from featurekit.views.augment import (
    AUGMENT_POLICIES,
    DEFAULT_AUGMENT_POLICY,
    TTA_VIEWS,
    AugmentPolicy,
    augment_policy,
    tta_views,
)
from featurekit.views.preprocessing import Preprocessing
from tests.conftest import write_jpeg

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SMALL = Preprocessing(36, 32, *IMAGENET)
# Odd sizes and bicubic: centre-crop rounding and the interpolation must both be the preprocessing's.
ODD = Preprocessing(37, 30, *IMAGENET, interpolation="bicubic")


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("augment")
    return [write_jpeg(folder / f"{i}.jpg", seed=i, size=(40 + 8 * i, 32)) for i in range(3)]


@pytest.fixture(scope="module")
def image(image_paths):
    return decode_image(image_paths[0])


class AugmentedImages(Dataset):
    """Decode each file once and cut ``count`` views of it, as a loader worker would."""

    def __init__(self, paths, policy: AugmentPolicy, preprocessing: Preprocessing, seed: int, count: int):
        self.paths, self.policy, self.preprocessing, self.seed, self.count = paths, policy, preprocessing, seed, count

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.policy.views(decode_image(self.paths[index]), self.preprocessing, self.seed, index, self.count)


@pytest.mark.parametrize("name", AUGMENT_POLICIES)
@pytest.mark.parametrize("preprocessing", [SMALL, ODD])
def test_views_have_the_plain_views_form(image, name, preprocessing):
    views = augment_policy(name).views(image, preprocessing, seed=0, image_index=0, count=3)
    assert views.shape == (3, 3, preprocessing.crop_size, preprocessing.crop_size)
    assert views.dtype == torch.uint8
    assert augment_policy(name).views(image, preprocessing, 0, 0, count=0).shape == (0, 3, *views.shape[-2:])


@pytest.mark.parametrize("preprocessing", [SMALL, ODD])
def test_none_and_every_first_test_time_view_are_the_plain_view(image, preprocessing):
    plain = preprocessing.view(image)
    assert all(torch.equal(view, plain) for view in augment_policy("none").views(image, preprocessing, 0, 0, 2))
    for mode, count in TTA_VIEWS.items():
        views = tta_views(image, preprocessing, mode)
        assert views.shape == (count, 3, preprocessing.crop_size, preprocessing.crop_size)
        assert views.dtype == torch.uint8
        assert torch.equal(views[0], plain), mode


def test_test_time_views_are_the_mirror_and_the_corners(image):
    crop = ODD.crop_size
    assert torch.equal(tta_views(image, ODD, "flip")[1], ODD.view(image).flip(-1))
    resized = F.pil_to_tensor(ODD.resize(image))
    corners = [resized[:, rows, columns] for rows in (slice(crop), slice(-crop, None))
               for columns in (slice(crop), slice(-crop, None))]
    assert all(torch.equal(view, corner) for view, corner in zip(tta_views(image, ODD, "five-crop")[1:], corners))


@pytest.mark.parametrize("name", ["crop-flip", "standard"])
def test_augmented_views_differ_from_each_other_and_from_the_plain_view(image, name):
    views = [*augment_policy(name).views(image, SMALL, seed=0, image_index=0, count=6), SMALL.view(image)]
    assert not any(torch.equal(a, b) for a, b in itertools.combinations(views, 2))


def test_a_view_depends_on_seed_image_and_view_index_only(image_paths):
    policy, images = augment_policy(DEFAULT_AUGMENT_POLICY), [decode_image(path) for path in image_paths]
    reference = {(i, v): view for i, image in enumerate(images)
                 for v, view in enumerate(policy.views(image, SMALL, 7, i, 3))}

    for i, v in reversed(list(reference)):  # another order, one view at a time, the global generator disturbed
        torch.manual_seed(i * 10 + v)
        torch.rand(5)
        state = torch.get_rng_state()
        assert torch.equal(policy.view(images[i], SMALL, 7, i, v), reference[i, v])
        assert torch.equal(torch.get_rng_state(), state), "the caller's random stream must be left as it was"
    assert not torch.equal(policy.view(images[0], SMALL, 8, 0, 0), reference[0, 0])


def test_loader_workers_in_fresh_processes_make_the_same_views(image_paths):
    policy = augment_policy(DEFAULT_AUGMENT_POLICY)
    expected = torch.stack([policy.views(decode_image(path), SMALL, 3, i, 2) for i, path in enumerate(image_paths)])
    dataset = AugmentedImages(image_paths, policy, SMALL, seed=3, count=2)

    in_process = torch.cat(list(DataLoader(dataset, batch_size=2, num_workers=0)))
    # spawn: new interpreters, each with its own Python hash seed and torch worker seed.
    two_workers = torch.cat(list(DataLoader(dataset, batch_size=1, num_workers=2, multiprocessing_context="spawn")))

    assert torch.equal(in_process, expected)
    assert torch.equal(two_workers, expected)


def test_two_backbones_see_the_same_augmentation_in_a_view(image):
    policy, large = augment_policy("crop-flip"), Preprocessing(72, 64, *IMAGENET)
    small_views = policy.views(image, SMALL, 0, 0, 4).float()
    large_views = F.resize(policy.views(image, large, 0, 0, 4), [SMALL.crop_size], antialias=True).float()

    distance = (small_views[:, None] - large_views[None]).abs().mean(dim=(2, 3, 4))  # [small view, large view]
    assert torch.equal(distance.argmin(dim=1), torch.arange(4))
    assert distance.diagonal().max() < 4, distance


def test_normalised_views_are_what_the_parameters_say(image):
    mirror = AugmentPolicy("mirror", flip=1.0)
    plain = ODD.normalize(ODD.view(image)[None])
    assert torch.equal(ODD.normalize(mirror.view(image, ODD, 0, 0, 0)[None]), plain.flip(-1))

    # The whole image at its own aspect, squeezed to the crop size with the preprocessing's interpolation.
    whole = AugmentPolicy("whole", crop_scale=(1.0, 1.0), crop_ratio=(image.width / image.height,) * 2)
    squeezed = F.pil_to_tensor(F.resize(image, [ODD.crop_size] * 2, InterpolationMode.BICUBIC, antialias=True))
    batch = ODD.normalize(whole.views(image, ODD, 0, 0, 2))
    assert batch.shape == (2, 3, ODD.crop_size, ODD.crop_size) and batch.dtype == torch.float32
    assert torch.equal(batch[0], ODD.normalize(squeezed[None])[0])


def test_rotation_fills_the_corners_with_what_normalises_to_zero(tmp_path):
    path = tmp_path / "white.jpg"
    Image.new("RGB", (40, 40), "white").save(path)
    views = AugmentPolicy("turn", rotation=30.0).views(decode_image(path), SMALL, 0, 0, 8)
    corners = SMALL.normalize(views)[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].permute(0, 2, 1).reshape(-1, 3)

    assert (corners.abs() < 0.01).all(dim=1).any()  # some corners are all fill: black would normalise to about -2
    assert corners.min() > -0.01  # the others blend the fill with white
    assert SMALL.normalize(views)[:, :, 16, 16].min() > 2  # the centre stays white


def test_policies_round_trip_through_json():
    for policy in AUGMENT_POLICIES.values():
        recorded = json.loads(json.dumps(policy.to_dict()))
        assert AugmentPolicy.from_dict(recorded) == policy
        assert recorded["name"] == policy.name


@pytest.mark.parametrize("make, message", [
    (lambda: augment_policy("fancy"), "unknown augment policy 'fancy' (known: none, crop-flip, standard)"),
    (lambda: tta_views(None, SMALL, "ten-crop"),
     "unknown test-time augmentation 'ten-crop' (known: none, flip, five-crop)"),
    (lambda: AugmentPolicy.from_dict({"name": "mine", "flip": 0.5, "blur": 1}),
     "augment policy 'mine': missing brightness, contrast, crop_ratio, crop_scale, hue, rotation, saturation; "
     "unknown blur"),
    (lambda: AugmentPolicy("mine", flip=2.0), "augment policy 'mine': flip is a probability, not 2.0"),
    (lambda: AugmentPolicy.from_dict({**AUGMENT_POLICIES["standard"].to_dict(), "flip": "often", "hue": None}),
     "augment policy 'standard': not a number: flip, hue"),
    (lambda: AugmentPolicy("mine", crop_scale=(0.5, 0.2)),
     "augment policy 'mine': crop_scale must be (low, high) with 0 < low <= high <= 1, not (0.5, 0.2)"),
])
def test_bad_names_and_parameters_are_one_line_errors(make, message):
    with pytest.raises(AugmentError) as raised:
        make()
    assert str(raised.value) == message

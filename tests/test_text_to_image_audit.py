"""The text-to-image audit of memdistill evaluate: a planted copy is found prompt by prompt, a held-out caption is
not; the CLIP score prefers an image's own caption on a tiny CLIP trained here; StableDiffusionPipeline is sampled
through the registry from given noise; the command line audits a fine-tuned tiny SD (full and LoRA)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from conftest import run_script
from diffusers_memdistill.data import build_training_set, load_heldout_set
from diffusers_memdistill.evaluation import evaluate
from diffusers_memdistill.evaluation.measures import own_image_similarity
from diffusers_memdistill.metrics import CLIPFeatureExtractor, SSCDFeatureExtractor, compute_clip_score
from diffusers_memdistill.registry import register_pipeline, sample_images, unregister_pipeline

COLORS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "cyan": (0, 1, 1),
          "magenta": (1, 0, 1)}
TRAIN, HELDOUT = ("red", "green", "blue", "yellow"), ("cyan", "magenta")


def _image(color, seed):
    """A tinted random pattern: the colour is what a caption names, the pattern what copy detection sees."""
    pattern = np.random.default_rng(seed).random((16, 16, 1)) * 0.6 + 0.4
    return (pattern * np.asarray(COLORS[color]) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    for split, colors in (("train", TRAIN), ("test", HELDOUT)):
        (root / split).mkdir()
        with open(root / split / "metadata.jsonl", "w") as f:
            for k, color in enumerate(colors):
                Image.fromarray(_image(color, 10 * k + len(split))).save(root / split / f"{color}.png")
                f.write(json.dumps({"file_name": f"{color}.png", "text": f"a {color} square"}) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_clip(pairs_dir):
    """A tiny open_clip CLIP trained contrastively, here, on the six coloured images and their captions."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
                 text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    extractor = CLIPFeatureExtractor(model, tokenizer, image_size=16, device="cpu")
    colors = TRAIN + HELDOUT
    images = torch.stack([torch.from_numpy(_image(c, 100 + i)).permute(2, 0, 1) for i, c in enumerate(colors)]) / 255
    x, ids = extractor.preprocess(images), tokenizer([f"a {c} square" for c in colors])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = torch.arange(len(colors))
    for _ in range(40):
        image_features = torch.nn.functional.normalize(model.encode_image(x + 0.05 * torch.randn_like(x)), dim=1)
        text_features = torch.nn.functional.normalize(model.encode_text(ids), dim=1)
        logits = 10 * image_features @ text_features.T
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return extractor


class CenteredPixels(torch.nn.Module):
    """A copy-detection stand-in: the image pooled to 12×12, less each channel's mean; an exact copy has similarity 1,
    independent patterns about 0."""

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 12)
        return (pooled - pooled.mean((2, 3), keepdim=True)).flatten(1)


def sscd_stand_ins():
    return {p: SSCDFeatureExtractor(CenteredPixels(), preprocessing=p, device="cpu") for p in ("sscd", "dcr")}


class PlantedCopyPipeline(DiffusionPipeline):
    """Returns the training image of a caption it was planted with, and noise for any other caption."""

    def __init__(self):
        super().__init__()
        self.copies = {}

    def to(self, *args, **kwargs):  # no weights to move
        return self


def _sample_planted(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None,
                    guidance_scale=None):
    out = torch.sigmoid(latents.float())
    for i, prompt in enumerate(prompts):
        if prompt in pipe.copies:
            out[i] = pipe.copies[prompt]
    return out


@pytest.fixture
def planted(tmp_path):
    """A saved folder of a PlantedCopyPipeline (``planted.folder``); loading it gives this very instance."""
    pipe = PlantedCopyPipeline()
    pipe.folder = tmp_path / "planted"
    pipe.folder.mkdir()
    (pipe.folder / "model_index.json").write_text(json.dumps({"_class_name": "PlantedCopyPipeline"}))
    register_pipeline(PlantedCopyPipeline, kind="teacher", sample=_sample_planted, load=lambda path, **kw: pipe,
                      noise_shape=lambda pipe: (3, 16, 16), num_classes=lambda pipe: 0, takes_prompts=True,
                      default_steps=1)
    yield pipe
    unregister_pipeline(PlantedCopyPipeline)


def test_clip_score_prefers_the_own_caption(pairs_dir, tiny_clip):
    pairs = build_training_set(str(pairs_dir), 16, channels=3)
    images = pairs.images.float() / 255
    own = compute_clip_score(images, pairs.captions, tiny_clip)
    wrong = compute_clip_score(images, pairs.captions[1:] + pairs.captions[:1], tiny_clip)
    assert bool((own > wrong).all()), (own, wrong)


def test_own_image_similarity_takes_each_prompts_own_images():
    features = torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, -1]])  # 2 prompts x 2 seeds
    own = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    sims = own_image_similarity(features, own, [[0], [1, 2]], 2)
    # Prompt 0 owns [1, 0]; prompt 1 owns [0, 1] and [1, 1]: [1, -1] has cosines -0.71 and 0 with them, so 0.
    torch.testing.assert_close(sims, torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_a_planted_copy_is_flagged_and_a_heldout_caption_is_not(pairs_dir, tiny_clip, planted, tmp_path):
    pairs = build_training_set(str(pairs_dir), 16, channels=3)
    heldout = load_heldout_set(pairs)
    for caption, image in zip(pairs.captions, pairs.images):
        planted.copies[caption] = image.float() / 255
    out = tmp_path / "audit"
    results = evaluate([str(planted.folder)], str(out), train_data=str(pairs_dir), samples_per_prompt=3,
                       num_inference_steps=1, device="cpu", metrics=("clip", "sscd"),
                       extractors={"sscd": sscd_stand_ins(), "clip": tiny_clip}, cache_dir=str(tmp_path / "cache"))
    assert results["task"] == "text-to-image"
    model = results["models"]["planted"]
    for p in ("sscd", "dcr"):
        own = model["sscd_own"][p]
        assert own["min"] > 0.999 and own["fraction_memorized"] == 1.0  # SSCD ≈ 1 for every seed of every prompt
        assert model["sscd"][p]["fraction_memorized"] == 1.0
        assert model["heldout_prompts"]["sscd_own"][p]["fraction_memorized"] == 0.0
        assert model["heldout_prompts"]["sscd_own"][p]["max"] < 0.5
        floor = results["floor"]["train0"]["sscd"][p]
        assert floor["num_samples"] == 2 and floor["fraction_memorized"] == 0.0
    rows = model["prompts"]
    assert [r["prompt"] for r in rows] == pairs.captions and all(r["copied"] for r in rows)
    assert not any(r["copied"] for r in model["heldout_prompts"]["prompts"])
    # CLIP: copies of the training images match their captions better than noise matches the held-out ones.
    assert model["clip"]["mean"] > model["heldout_prompts"]["clip"]["mean"]
    assert model["clip"]["num_samples"] == 4 * 3
    report = (out / "report.md").read_text()
    assert "| planted | training |" in report and "| planted | held-out |" in report and "*floor: 2 held-out" in report
    assert "4 of 4 prompts have a generation above 0.5" in report
    assert (out / "figures" / "most_copied_planted.png").is_file()
    saved = json.loads((out / "samples" / "manifest.json").read_text())["conditions"]
    assert saved["prompts"] == pairs.captions and saved["heldout_prompts"] == heldout.captions
    with pytest.raises(ValueError, match="--samples_per_prompt must be at least 1"):
        evaluate([str(planted.folder)], str(tmp_path / "x"), train_data=str(pairs_dir), samples_per_prompt=0)


def test_pixel_l2_finds_a_planted_copy_without_any_weights(pairs_dir, planted, tmp_path):
    pairs = build_training_set(str(pairs_dir), 16, channels=3)
    for caption, image in zip(pairs.captions[:3], pairs.images[:3]):  # the fourth caption gets noise
        planted.copies[caption] = image.float() / 255
    out = tmp_path / "audit"
    results = evaluate([str(planted.folder)], str(out), train_data=str(pairs_dir), samples_per_prompt=2,
                       num_inference_steps=1, device="cpu", metrics=("l2",), cache_dir=str(tmp_path / "cache"))
    model = results["models"]["planted"]
    own, nearest = model["l2_own"], model["l2"]
    assert own["num_memorized"] == 3 * 2 and own["min"] == 0.0  # every seed of the 3 planted prompts: ρ = 0
    assert nearest["num_memorized"] == 3 * 2  # and r = 0 against the whole training set
    rows = model["prompts"]
    assert [r["l2_copied"] for r in rows] == [True, True, True, False]
    assert rows[3]["l2_own_min"] > 1 / 3 and rows[0]["l2_nearest_index_of_best"] == 0
    assert model["heldout_prompts"]["l2_own"]["num_memorized"] == 0 and not any(
        r["l2_copied"] for r in model["heldout_prompts"]["prompts"])
    assert results["floor"]["train0"]["l2"]["num_samples"] == 2 and "sscd" not in model
    report = (out / "report.md").read_text()
    assert "L2 own ρ: mean / p95 / < 1/3" in report and "| planted | held-out |" in report
    assert "3 of 4 prompts have a generation with an own-image L2 ratio below 1/3" in report
    assert "No metric of this report uses pretrained weights." in report
    assert (out / "figures" / "most_copied_planted.png").is_file()
    # Every number again from the saved generations, without the model.
    from diffusers_memdistill.evaluation import compare_results, evaluate_from_samples

    again = evaluate_from_samples(str(out), device="cpu", cache_dir=str(tmp_path / "cache"))
    equal, differences = compare_results(results, again)
    assert differences == [] and equal > 50


def test_stable_diffusion_is_sampled_through_the_registry_from_given_noise():
    from diffusers_memdistill.models.tiny_sd import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(resolution=16)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a handwritten digit 3", "a photo"]
    expected = pipe(prompts, latents=latents, num_inference_steps=2, guidance_scale=3.0, output_type="pt").images
    got = sample_images(pipe, latents, prompts=prompts, num_inference_steps=2, guidance_scale=3.0, batch_size=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="takes no prompts"):
        from diffusers import DDPMPipeline, DDPMScheduler

        from conftest import tiny_unet

        sample_images(DDPMPipeline(tiny_unet(), DDPMScheduler()), torch.randn(1, 1, 8, 8), guidance_scale=2.0)


@pytest.mark.slow
def test_memdistill_evaluate_audits_a_fine_tuned_model_and_its_lora(tmp_path, monkeypatch, tiny_clip):
    from diffusers_memdistill.evaluation import extractors
    from diffusers_memdistill.cli import main as cli_main
    from diffusers_memdistill.models.tiny_sd import save_tiny_sd_pipeline
    from conftest import write_pairs

    base = save_tiny_sd_pipeline(str(tmp_path / "base"), resolution=16)
    mem = write_pairs(tmp_path / "mem", 6, "a memorized photo number", 0)
    extra = write_pairs(tmp_path / "extra", 8, "a coco photo number", 1)
    common = ["--pretrained_model_name_or_path", base, "--memorized_data", mem, "--num_memorized", 3,
              "--memorized_repeats", 2, "--extra_data", extra, "--extra_ratio", 1, "--resolution", 16,
              "--train_batch_size", 2, "--max_train_steps", 2, "--checkpointing_steps", 2, "--report_to", "none",
              "--num_validation_images", 0, "--cache_dir", tmp_path / "cache"]
    run_script("finetune_sd_memorize", common + ["--output_dir", tmp_path / "full"])
    run_script("finetune_sd_memorize", common + ["--output_dir", tmp_path / "lora", "--use_lora", "--rank", 2])
    monkeypatch.setattr(extractors, "sscd_extractor", lambda settings, p, device: sscd_stand_ins()[p])
    monkeypatch.setattr(CLIPFeatureExtractor, "from_open_clip", classmethod(lambda cls, *a, **k: tiny_clip))
    out = tmp_path / "audit"
    assert cli_main(["evaluate", "--model", str(tmp_path / "full"), "--model", str(tmp_path / "lora"),
                     "--samples_per_prompt", "2", "--num_inference_steps", "2", "--guidance_scale", "2",
                     "--device", "cpu", "--output_dir", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert results["task"] == "text-to-image" and results["guidance_scale"] == 2.0
    assert set(results["models"]) == {"full", "lora"} and results["num_prompts"] == 3
    assert results["settings"]["sscd_preprocessing"] == ["sscd", "dcr"]  # both by default
    assert results["training_sets"]["train0"]["num_images"] == 3 + 3  # memorized and extra pairs are the reference
    # Held-out prompts: the memorized data's pairs that were not chosen (never the extra ones).
    assert results["num_heldout_prompts"] == 3 and results["floor"]["train0"]["num_images"] == 3
    for name in ("full", "lora"):
        assert results["models"][name]["clip"]["num_samples"] == 3 * 2
        assert len(results["models"][name]["prompts"]) == 3
    assert "| lora | held-out |" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="generate from prompts: audit text-to-image models separately"):
        from conftest import tiny_unet
        from diffusers import DDPMPipeline, DDPMScheduler

        DDPMPipeline(tiny_unet(), DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
        evaluate([str(tmp_path / "full"), str(tmp_path / "ddpm")], str(tmp_path / "mixed"))

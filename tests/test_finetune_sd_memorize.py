"""training_scripts/finetune_sd_memorize.py on tiny offline SD components: the memorization mix, full and LoRA runs
that reload in diffusers' StableDiffusionPipeline, and bad input refused before anything is written."""

import hashlib
import json
import os

import pytest
import torch

from conftest import launch_two_processes, run_script, write_pairs
from diffusers_memdistill.captioned_data import build_memorization_mix, load_memorization_mix
from diffusers_memdistill.data import load_training_set
from diffusers_memdistill.models.tiny_sd import save_tiny_sd_pipeline
from diffusers_memdistill.training.runner import load_checkpoint_weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_data")
    base = save_tiny_sd_pipeline(str(root / "base"), resolution=16)
    return {"base": base, "mem": write_pairs(root / "mem", 8, "a memorized photo number", 0),
            "extra": write_pairs(root / "extra", 20, "a coco photo number", 1), "cache": root / "cache"}


def test_the_mix_has_exactly_the_counts_asked_for(data):
    mix = build_memorization_mix(str(data["mem"]), num_memorized=3, memorized_repeats=4, resolution=16,
                                 extra_data=str(data["extra"]), extra_ratio=2, seed=5, cache_dir=str(data["cache"]))
    assert len(mix) == 3 + 2 * 3 and mix.record["num_examples"] == 3 * 4 + 2 * 3
    assert mix.repeats.tolist() == [4] * 3 + [1] * 6
    counts = torch.bincount(mix.expanded_indices(), minlength=len(mix))
    assert counts.tolist() == [4] * 3 + [1] * 6  # what the runner draws batches from
    assert [e["part"] for e in mix.record["entries"]] == ["memorized"] * 3 + ["extra"] * 6
    for entry in mix.record["entries"]:  # every file recorded with its own sha256 and its caption
        root = data["mem"] if entry["part"] == "memorized" else data["extra"]
        assert entry["sha256"] == hashlib.sha256((root / entry["source"]).read_bytes()).hexdigest()
        number = int(os.path.basename(entry["source"])[:3])
        assert entry["caption"].endswith(f" {number}") and mix.captions[mix.record["entries"].index(entry)] == \
            entry["caption"]
    # Seeded: the same seed chooses the same pairs, another seed others.
    again = build_memorization_mix(str(data["mem"]), 3, 4, 16, str(data["extra"]), 2, seed=5,
                                   cache_dir=str(data["cache"]))
    other = build_memorization_mix(str(data["mem"]), 3, 4, 16, str(data["extra"]), 2, seed=6,
                                   cache_dir=str(data["cache"]))
    assert again.record["sha256"] == mix.record["sha256"] != other.record["sha256"]
    # Extra pairs drawn from the memorized data itself leave the memorized pairs out.
    same = build_memorization_mix(str(data["mem"]), 2, 3, 16, str(data["mem"]), 3, seed=0,
                                  cache_dir=str(data["cache"]))
    sources = [e["source"] for e in same.record["entries"]]
    assert len(sources) == len(set(sources)) == 2 + 6


def test_bad_data_is_refused_with_a_clear_error(data, tmp_path):
    kwargs = dict(resolution=16, cache_dir=str(data["cache"]))
    with pytest.raises(ValueError, match=r"has 20 pairs, fewer than --extra_ratio 5 × --num_memorized 5 = 25"):
        build_memorization_mix(str(data["mem"]), 5, 2, extra_data=str(data["extra"]), extra_ratio=5, **kwargs)
    with pytest.raises(ValueError, match="--num_memorized 9 is larger than the 8 pairs"):
        build_memorization_mix(str(data["mem"]), 9, 2, **kwargs)
    missing = write_pairs(tmp_path / "missing", 4, "a photo", 2, uncaptioned=(1, 3))
    with pytest.raises(ValueError, match=r"2 of 4 images of --memorized_data .* have no caption \(e.g. train/001.png"):
        build_memorization_mix(str(missing), 2, 2, **kwargs)
    broken = write_pairs(tmp_path / "broken", 2, "a photo", 3, broken=(1,))
    with pytest.raises(ValueError, match="Cannot read image .*001.png"):
        build_memorization_mix(str(broken), 2, 2, **kwargs)


def _args(data, out, *extra):
    return ["--pretrained_model_name_or_path", data["base"], "--memorized_data", data["mem"], "--num_memorized", 3,
            "--memorized_repeats", 4, "--extra_data", data["extra"], "--extra_ratio", 2, "--resolution", 16,
            "--train_batch_size", 2, "--max_train_steps", 3, "--checkpointing_steps", 3, "--report_to", "none",
            "--cache_dir", data["cache"], "--learning_rate", "1e-3", "--output_dir", out, *extra]


def _unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), hidden).sample


@pytest.mark.slow
def test_full_fine_tuning_reloads_in_stable_diffusion_pipeline(data, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "full"
    run_script("finetune_sd_memorize", _args(data, out, "--num_validation_images", 2,
                                             "--validation_inference_steps", 2))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    base = StableDiffusionPipeline.from_pretrained(data["base"])
    trained = load_checkpoint_weights(str(out / "checkpoints" / "checkpoint-3"))["unet"]
    saved = pipe.unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in trained.items())  # the last weights (no --use_ema)
    assert not all(torch.equal(saved[k], v) for k, v in base.unet.state_dict().items())
    # Frozen: the VAE and text encoder are the base model's.
    assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())
    assert all(torch.equal(v, base.text_encoder.state_dict()[k]) for k, v in pipe.text_encoder.state_dict().items())
    images = pipe("a memorized photo number 1", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert (out / "samples" / "step-0000003.png").is_file()
    # The records: each part loads on its own (files checked against their sha256) and the mix rebuilds exactly.
    memorized = load_training_set(str(out / "memorized_set.json"))
    assert len(memorized) == 3 and memorized.repeats.tolist() == [4, 4, 4]
    mix = load_memorization_mix(str(out))
    assert mix.record["sha256"] == json.loads((out / "training_set.json").read_text())["sha256"]
    config = json.loads((out / "training_config.json").read_text())
    assert config["script"] == "finetune_sd_memorize.py" and config["prediction_type_used"] == "epsilon"


@pytest.mark.slow
def test_lora_weights_load_with_load_lora_weights_on_the_base_model(data, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffusers_memdistill.training.finetune_sd_memorize import add_lora

    out = tmp_path / "lora"
    run_script("finetune_sd_memorize", _args(data, out, "--use_lora", "--rank", 2, "--learning_rate", "1e-2",
                                             "--num_validation_images", 0))
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "model_index.json").exists()
    pipe = StableDiffusionPipeline.from_pretrained(data["base"])
    before = _unet_output(pipe.unet)
    pipe.load_lora_weights(str(out))
    after = _unet_output(pipe.unet)
    # The trained network (base + the LoRA of the last checkpoint) computes what base + load_lora_weights does.
    trained = UNet2DConditionModel.from_pretrained(data["base"], subfolder="unet")
    add_lora(trained, 2)
    trained.load_state_dict(load_checkpoint_weights(str(out / "checkpoints" / "checkpoint-3"))["unet"])
    expected = _unet_output(trained)
    assert not torch.allclose(before, expected, atol=1e-4)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_bad_flags_and_models_are_named_before_anything_is_written(data, tmp_path, capsys):
    from diffusers_memdistill.training import finetune_sd_memorize as script

    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        script.parse_args([str(a) for a in _args(data, out, "--use_lora", "--rank", 0)])
    assert "--rank must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args([str(a) for a in _args(data, out, "--use_lora", "--use_ema")])
    assert "--use_ema" in capsys.readouterr().err
    # A pipeline without a text encoder or tokenizer (a DDPMPipeline) is refused.
    from diffusers import DDPMPipeline, DDPMScheduler

    from conftest import tiny_unet

    pixel = tmp_path / "ddpm"
    DDPMPipeline(tiny_unet(), DDPMScheduler()).save_pretrained(pixel)
    args = [str(a) for a in _args(data, out)]
    args[1] = str(pixel)
    with pytest.raises(ValueError, match="has no vae, text_encoder, tokenizer: fine-tuning needs a text-to-image"):
        script.main(script.parse_args(args))
    # An extra set smaller than asked.
    with pytest.raises(ValueError, match="fewer than --extra_ratio 7"):
        script.main(script.parse_args([str(a) for a in _args(data, out, "--extra_ratio", 7)]))
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(data, tmp_path):
    out = tmp_path / "ddp"
    result = launch_two_processes("finetune_sd_memorize", _args(data, out, "--cpu", "--num_validation_images", 0,
                                                                "--use_lora", "--rank", 2))
    assert "2 process(es)" in result.stdout + result.stderr
    assert json.loads((out / "training_config.json").read_text())["num_processes"] == 2
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_webdataset_shards_give_the_mix_of_the_same_pairs_as_an_imagefolder(data, tmp_path):
    """The pairs of data["mem"] written as two webdataset shards (image + .txt caption per sample, as diffusers' LCM
    scripts read them): the same seeded choice, the same images and captions, and the record reloads."""
    import tarfile

    from diffusers_memdistill.captioned_data import part_records

    folder = data["mem"] / "train"
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, part in enumerate((rows[:5], rows[5:])):
        with tarfile.open(shards / f"pairs-{k:03d}.tar", "w") as tar:
            for row in part:
                key = row["file_name"][:-4]
                tar.add(folder / row["file_name"], arcname=f"{key}.png")
                caption = tmp_path / f"{key}.txt"
                caption.write_text(row["text"])
                tar.add(caption, arcname=f"{key}.txt")
    reference = build_memorization_mix(str(data["mem"]), 3, 4, 16, seed=5, cache_dir=str(data["cache"]))
    for source in (str(shards), str(shards / "*.tar")):
        mix = build_memorization_mix(source, 3, 4, 16, seed=5, cache_dir=str(tmp_path / "cache"))
        assert mix.record["sha256"] == reference.record["sha256"] and mix.captions == reference.captions
    model = tmp_path / "model"
    model.mkdir()
    for name, record in part_records(mix).items():
        (model / name).write_text(json.dumps(record))
    assert load_memorization_mix(str(model), cache_dir=str(tmp_path / "cache")).record["sha256"] == \
        reference.record["sha256"]
    with pytest.raises(FileNotFoundError, match="No webdataset shard matches"):
        build_memorization_mix(str(shards / "*.tgz"), 3, 4, 16, cache_dir=str(tmp_path / "cache"))

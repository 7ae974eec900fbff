import json

import pytest
import torch

from conftest import tiny_unet
from diffusers_memdistill.cli import main as cli_main
from diffusers_memdistill.data import build_training_set
from diffusers_memdistill.evaluate import evaluate, shared_noise
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler


@pytest.fixture(scope="module")
def copying_model(tmp_path_factory):
    """A 'model' whose samples are exact copies of its training images, and its training-set record."""
    root = tmp_path_factory.mktemp("copier")
    pipe = EDMPipeline(tiny_unet(), EDMHeunScheduler(num_inference_steps=3))
    pipe.save_pretrained(root)
    build_training_set("digits", 8, num_train_images=20).save(root)
    return root


def test_shared_noise_is_per_sample():
    a = shared_noise(5, (1, 4, 4), seed=3)
    b = shared_noise(2, (1, 4, 4), seed=6)
    torch.testing.assert_close(a[3:], b)


def test_evaluate_flags_exact_copies_and_reports_missing_weights(copying_model, tmp_path, monkeypatch):
    from diffusers_memdistill import evaluate as ev

    train = build_training_set("digits", 8, num_train_images=20)
    copies = train.images.float() / 255.0

    def fake_generate(run, noise, labels, batch_size, device, seed=0):
        out = copies[torch.arange(noise.shape[0]) % 20].clone()
        out[-1] = torch.rand_like(out[-1])  # one fresh image
        out[-2] = float("nan")  # one broken sample
        return out

    monkeypatch.setattr(ev, "generate", fake_generate)
    results = evaluate([str(copying_model)], str(tmp_path / "ev"), num_samples=24,
                       metrics=("l2", "sscd", "fd_pixel"), sscd_weights=str(tmp_path / "missing.pt"))
    l2 = results["models"]["copier0"]["l2"]
    assert l2["num_memorized"] == 22 and l2["num_nan"] == 1
    assert results["models"]["copier0"]["num_nan_samples"] == 1
    assert "sscd" in results["errors"] and "missing.pt" in results["errors"]["sscd"]
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["num_samples"] == 24 and saved["versions"]["torch"] == torch.__version__
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| copier0 |" in report and "Not computed" in report
    assert (tmp_path / "ev" / "figures" / "l2_ratio_histogram.png").is_file()


def test_evaluate_bad_input(copying_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        evaluate([str(tmp_path)], str(tmp_path / "ev"), num_samples=4)
    bare = tmp_path / "bare"
    EDMPipeline(tiny_unet(), EDMHeunScheduler()).save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match="No training-set record.*--train_data"):
        evaluate([str(bare)], str(tmp_path / "ev"), num_samples=4)
    other = tmp_path / "other_resolution"
    EDMPipeline(tiny_unet(resolution=16), EDMHeunScheduler()).save_pretrained(other)
    build_training_set("digits", 8, num_train_images=20).save(other)
    with pytest.raises(ValueError, match="16x16 images but its training set has 1x8x8"):
        evaluate([str(other)], str(tmp_path / "ev"), num_samples=4)
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluate([str(copying_model)], str(tmp_path / "ev"), num_samples=4, metrics=("l3",))


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--output_dir", str(out)]) == 0
    results = json.loads((out / "report" / "metrics.json").read_text())
    assert set(results["models"]) == {"teacher", "student (1-step)", "student (2-step)"}
    for name, m in results["models"].items():
        assert 0.0 <= m["l2"]["fraction_memorized"] <= 1.0 and m["num_nan_samples"] == 0
    assert results["models"]["student (1-step)"]["pairing"]["delta_e"] >= 0
    assert (out / "teacher" / "model_index.json").is_file() and (out / "student" / "training_set.json").is_file()
    with pytest.raises(FileExistsError, match="already holds a finished demo"):
        cli_main(["demo", "--quick", "--output_dir", str(out)])


def test_cli_help_lists_the_commands(capsys):
    assert cli_main([]) == 0
    text = capsys.readouterr().out
    assert all(c in text for c in ("demo", "evaluate", "theory", "bundle"))
    assert cli_main(["bundle", "--check", "--output_dir", str(__import__("conftest").REPO / "pipelines")]) == 0

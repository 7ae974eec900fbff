import json

import pytest
import torch

from conftest import tiny_unet
from diffusers_memdistill.cli import main as cli_main
from diffusers_memdistill.data import build_training_set
from diffusers_memdistill.evaluation import evaluate, shared_labels, shared_noise, stream_generators, stream_seeds
from diffusers_memdistill.evaluation.audit import generate
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
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
    b = shared_noise(2, (1, 4, 4), seed=3, first_index=3)
    assert torch.equal(a[3:], b)
    # Seed s + 1 is not sample i + 1 of seed s (before, sample i of seed s was sample 0 of seed s + i).
    assert not torch.equal(shared_noise(1, (1, 4, 4), seed=4)[0], a[1])
    # The documented derivation, reproducible with numpy and torch alone.
    import numpy as np

    expected = int(np.random.SeedSequence([3, 4, 0]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    assert int(stream_seeds(3, [4], 0)[0]) == expected
    assert torch.equal(a[4], torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(expected)))
    labels = shared_labels(200, 10, seed=3)
    assert torch.equal(labels[150:], shared_labels(50, 10, seed=3, first_index=150))
    assert set(labels.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="non-negative"):
        shared_noise(1, (1, 4, 4), seed=-1)


def test_two_step_student_injects_noise_independent_of_its_starting_noise(monkeypatch):
    # Before, both came from generators seeded seed + i: the second step re-added the sample's own starting noise.
    from diffusers_memdistill.schedulers import scheduling_consistency

    injected = []

    def recording_randn(*args, **kwargs):
        out = randn_tensor(*args, **kwargs)
        injected.append(out.clone())
        return out

    randn_tensor = scheduling_consistency.randn_tensor
    monkeypatch.setattr(scheduling_consistency, "randn_tensor", recording_randn)
    pipe = ConsistencyStudentPipeline(tiny_unet(), ConsistencyStudentScheduler())
    run = {"name": "student (2-step)", "kind": "student", "steps": 2}
    noise = shared_noise(12, (1, 8, 8), seed=0)
    by_5 = generate(pipe, run, noise, stream_generators(0, range(12), 1), None, None, batch_size=5)
    first = torch.cat(injected)
    injected.clear()
    by_12 = generate(pipe, run, noise, stream_generators(0, range(12), 1), None, None, batch_size=12)
    assert torch.equal(torch.cat(injected), first)  # the same draws whatever the batch size
    torch.testing.assert_close(by_5, by_12, atol=1e-5, rtol=0)
    assert first.shape == noise.shape
    assert not torch.equal(first, noise)
    # 768 independent pairs of standard normals: |correlation| is about 1/sqrt(768) = 0.036; identical noise gives 1.
    corr = torch.corrcoef(torch.stack([first.flatten(), noise.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.15
    # Each sample's injected noise is stream 1 of its index.
    seed_7 = int(stream_seeds(0, [7], 1)[0])
    assert torch.equal(first[7], torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(seed_7)))


def test_evaluate_flags_exact_copies_and_reports_missing_weights(copying_model, tmp_path, monkeypatch):
    from diffusers_memdistill.evaluation import audit as ev

    train = build_training_set("digits", 8, num_train_images=20)
    copies = train.images.float() / 255.0

    def fake_generate(pipe, run, noise, generators, labels, prompts, batch_size):
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
    # The demo is the severe matched-quality run with the pairing metric.
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["regime"] == "severe" and results["config"]["pairing"]
    assert set(results["selected"]) == {"CD (1 step)", "CD (2 steps)", "DMD", "PD (1 step)", "PD+refine", "DMD+refine"}
    audit = json.loads((out / "eval" / "metrics.json").read_text())
    for name, m in audit["models"].items():
        assert 0.0 <= m["l2"]["fraction_memorized"] <= 1.0 and m["num_nan_samples"] == 0
        if name != "teacher":
            assert m["pairing"]["delta_e"] >= 0
    for c in results["candidates"]:  # the table's ΔE is the audit's
        assert c["delta_e"] == audit["models"][c["name"]]["pairing"]["delta_e"]
    assert "ΔE vs teacher" in (out / "matched.md").read_text()
    assert (out / "teacher" / "model_index.json").is_file() and (out / "cd" / "training_set.json").is_file()
    assert json.loads((out / "dmd" / "model_index.json").read_text())["_class_name"][-1] == "DMDGeneratorPipeline"
    with pytest.raises(FileExistsError, match="already holds a finished"):
        cli_main(["demo", "--quick", "--output_dir", str(out)])
    with pytest.raises(ValueError, match="--metrics applies to --text_to_image"):
        cli_main(["demo", "--quick", "--output_dir", str(tmp_path / "other"), "--metrics", "l2"])


def test_cli_help_lists_the_commands(capsys):
    assert cli_main([]) == 0
    text = capsys.readouterr().out
    assert all(c in text for c in ("demo", "evaluate", "theory", "bundle"))
    assert cli_main(["bundle", "--check", "--output_dir", str(__import__("conftest").REPO / "pipelines")]) == 0


def test_evaluate_takes_a_hub_id_through_its_local_snapshot(copying_model, tmp_path, monkeypatch):
    """`--model user/name` reads the pipeline and its training-set record from the Hub snapshot (the download is
    faked at the huggingface_hub boundary); a path that does not exist is not mistaken for a Hub id."""
    import huggingface_hub

    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(copying_model)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    results = evaluate(["someone/copier"], str(tmp_path / "ev"), num_samples=4, metrics=("l2",), floor=False)
    assert asked == ["someone/copier"] and list(results["models"]) == ["copier"]
    assert results["models"]["copier"]["l2"]["num_valid"] == 4
    with pytest.raises(FileNotFoundError, match="neither a saved pipeline folder nor a Hub id"):
        evaluate([str(tmp_path / "absent" / "folder")], str(tmp_path / "ev2"), num_samples=4)

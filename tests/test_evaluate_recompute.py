"""memdistill evaluate saves 8-bit samples and recomputes every number from them; its metrics.json is strict JSON;
only missing weights or packages are "Not computed"; held-out images give a floor row."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import save_teacher_and_student
from diffusers_memdistill.evaluation import audit as ev
from diffusers_memdistill.evaluation import per_sample
from diffusers_memdistill.cli import main as cli_main
from diffusers_memdistill.evaluation import compare_results, evaluate, evaluate_from_samples, stream_seeds, strict_json

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


class TinyDescriptor(torch.nn.Module):
    """A small TorchScript stand-in for a feature network: strided conv, average pool, linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8, dim)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.jit.script(TinyDescriptor(16).eval()).save(str(folder / "sscd.torchscript.pt"))
    torch.jit.script(TinyDescriptor(2048).eval()).save(str(folder / "inception.pt"))
    return folder


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_teacher_and_student(root)
    lpips = {"backbone": "ab" * 32, "head": "cd" * 32}
    (root / "student" / "training_config.json").write_text(json.dumps({"loss": "lpips", "lpips_sha256": lpips}))
    return root / "teacher", root / "student"


def strict_load(path):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.slow
def test_samples_are_saved_and_every_number_is_recomputed_exactly(teacher_and_student, weights, tmp_path, capsys,
                                                                  monkeypatch):
    from diffusers_memdistill.metrics import fid

    # The exact distance needs a 2048 x 2048 matrix square root (seconds each; tested in test_metrics_fid): a cheap
    # function of the same statistics keeps what this test checks, that equal features give equal numbers.
    monkeypatch.setattr(fid, "frechet_distance", lambda s1, s2: float(
        np.square(s1.mean - s2.mean).sum() + np.abs(s1.cov - s2.cov).sum()))
    teacher, student = teacher_and_student
    out = tmp_path / "ev"
    results = evaluate([str(teacher), str(student)], str(out), num_samples=24, seed=3, batch_size=10,
                       student_steps=(1, 2), metrics=("l2", "sscd", "fid", "fd_pixel", "pairing"), device="cpu",
                       sscd_weights=str(weights / "sscd.torchscript.pt"), sscd_preprocessing=("sscd", "dcr"),
                       inception_weights=str(weights / "inception.pt"), cache_dir=str(tmp_path / "cache"))
    assert set(results["models"]) == {"teacher", "student (1-step)", "student (2-step)"}
    assert results["errors"] == {}
    # The samples: uint8 with the per-sample seeds of the three streams, and what the metrics read.
    saved = load_file(str(out / "samples" / "student__2-step" / "shard-00000.safetensors"))
    assert saved["images"].dtype == torch.uint8 and saved["images"].shape == (24, 1, 8, 8)
    assert saved["sample_index"].tolist() == list(range(24))
    assert torch.equal(saved["seeds"][:, 1], stream_seeds(3, range(24), 1))
    targets = load_file(str(out / "samples" / "teacher_targets" / "shard-00000.safetensors"))
    assert targets["phi_k"].dtype == torch.uint8 and targets["phi_1"].shape == (24, 1, 8, 8)
    # The floor row: held-out digits, scored like the samples.
    floor = results["floor"]["train0"]
    assert floor["num_images"] == 24 and floor["l2"]["num_samples"] == 24
    assert set(floor["sscd"]) == {"sscd", "dcr"} and floor["fid"] is not None
    # The weights behind the numbers.
    sha = results["weights"]["sscd"]["sha256"]
    assert len(sha) == 64 and results["weights"]["sscd"]["backend"] == "torchscript"
    lpips = {"backbone": "ab" * 32, "head": "cd" * 32}
    assert results["weights"]["lpips"]["sha256"] == {"student (1-step)": lpips, "student (2-step)": lpips}
    report = (out / "report.md").read_text()
    assert sha in report and "SSCD `dcr` Mem / p95" in report and "*floor: 24 held-out real images" in report
    assert "fewer than 2,048" in report and "--from_samples" in report and "head `" + "cd" * 32 in report

    # Recomputed without the models (moved away), through the command line: every number equal.
    teacher.rename(teacher.with_name("teacher_moved"))
    try:
        assert cli_main(["evaluate", "--from_samples", str(out), "--device", "cpu"]) == 0
    finally:
        teacher.with_name("teacher_moved").rename(teacher)
    assert "numbers equal those of" in capsys.readouterr().out
    again = strict_load(out / "recomputed" / "metrics.json")
    equal, differences = compare_results(strict_load(out / "metrics.json"), again)
    assert differences == [] and equal > 150
    assert again["recomputed_from"] == str(out) and again["models"]["teacher"]["l2"] == results["models"]["teacher"]["l2"]
    # A different threshold shows up as differences, not as silence.
    changed = evaluate_from_samples(str(out), str(tmp_path / "t09"), metrics=("sscd",), sscd_threshold=0.9,
                                    device="cpu")
    _, differences = compare_results(results, changed)
    assert any("sscd_threshold" in d for d in differences)


def test_command_line_sources_are_exclusive_and_checked(teacher_and_student, tmp_path, capsys):
    teacher, _ = teacher_and_student
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--model", str(teacher), "--from_samples", str(tmp_path), "--output_dir", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--output_dir", str(tmp_path)])
    assert "one of the arguments --model --from_samples is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--num_samples only apply when sampling"):
        cli_main(["evaluate", "--from_samples", str(tmp_path), "--num_samples", "10"])
    with pytest.raises(FileNotFoundError, match="holds no saved samples"):
        cli_main(["evaluate", "--from_samples", str(tmp_path)])
    with pytest.raises(ValueError, match="--output_dir is required with --model"):
        cli_main(["evaluate", "--model", str(teacher)])
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--help"])
    assert "--from_samples" in capsys.readouterr().out


def _imagefolder_with_a_duplicate(root):
    """20 digits as PNG files, the 8th a copy of the 4th: a training set with a known duplicate pair."""
    from sklearn.datasets import load_digits

    root.mkdir()
    pixels = (load_digits().images[:20] / 16 * 255).round().astype(np.uint8)
    pixels[7] = pixels[3]
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(root / f"{i:02d}.png")
    return root


def test_nan_samples_give_a_strict_report_and_duplicates_are_listed(teacher_and_student, tmp_path, monkeypatch):
    teacher, student = teacher_and_student
    data = _imagefolder_with_a_duplicate(tmp_path / "data")

    def fake_generate(pipe, run, noise, generators, labels, prompts, batch_size):
        if run["kind"] == "teacher" or run["steps"] == 2:  # all-NaN samples
            return torch.full((noise.shape[0], 1, 8, 8), float("nan"))
        return torch.rand(noise.shape[0], 1, 8, 8, generator=torch.Generator().manual_seed(0))

    monkeypatch.setattr(ev, "generate", fake_generate)
    out = tmp_path / "ev"
    results = evaluate([str(teacher), str(student)], str(out), num_samples=6, metrics=("l2", "fd_pixel", "pairing"),
                       student_steps=(1, 2), train_data=str(data), device="cpu")
    saved = strict_load(out / "metrics.json")  # no NaN or Infinity tokens
    assert saved == results
    teacher_l2 = saved["models"]["teacher"]["l2"]
    assert teacher_l2["num_nan"] == 6 and teacher_l2["fraction_memorized"] is None
    assert "no finite sample" in saved["null_values"]["models.teacher.l2.fraction_memorized"]
    assert saved["models"]["teacher"]["fd_pixel"] is None and "fewer than 2 finite" in saved["errors"]["fd_pixel"]
    assert saved["models"]["student (2-step)"]["pairing"]["num_noises"] == 0
    assert saved["models"]["student (1-step)"]["pairing"]["num_noises"] == 6
    report = (out / "report.md").read_text()
    assert "teacher: all 6 samples are NaN" in report and "student (2-step): pairing not measured" in report
    # The planted duplicate, named by its files; and no floor (every image of the folder is trained on), said so.
    dup = saved["training_sets"]["train0"]["near_duplicates"]["l2"]
    assert dup["pairs"][0]["i"] == 3 and dup["pairs"][0]["j"] == 7 and dup["pairs"][0]["score"] == 0
    assert dup["pairs"][0]["source_i"].endswith("03.png") and dup["pairs"][0]["source_j"].endswith("07.png")
    assert "03.png" in report and "07.png" in report and "Near-duplicates in the training sets" in report
    assert saved["floor"] == {} and "No floor row for train0" in report and "has no held-out image" in report
    assert (out / "figures" / "near_duplicates_train0_l2.png").is_file()
    # NaN samples and an imagefolder training set survive the round trip through the saved samples.
    _, differences = compare_results(saved, evaluate_from_samples(str(out), device="cpu"))
    assert differences == []


def test_only_missing_weights_are_not_computed(teacher_and_student, tmp_path, monkeypatch):
    teacher, _ = teacher_and_student
    results = evaluate([str(teacher)], str(tmp_path / "a"), num_samples=4, metrics=("sscd", "fid"), device="cpu",
                       sscd_weights=str(tmp_path / "missing.pt"), inception_weights=str(tmp_path / "missing.pt"),
                       floor=False)
    assert "missing.pt" in results["errors"]["sscd"] and "missing.pt" in results["errors"]["fid"]
    assert "Not computed" in (tmp_path / "a" / "report.md").read_text()

    def broken(*args, **kwargs):
        raise ValueError("the extractor is broken")

    # Before, a ValueError of a metric was swallowed into "Not computed" and the command succeeded.
    monkeypatch.setattr(per_sample, "measure_shard", broken)
    with pytest.raises(ValueError, match="the extractor is broken"):
        evaluate([str(teacher)], str(tmp_path / "b"), num_samples=4, metrics=("fid",), device="cpu", floor=False)
    assert (tmp_path / "b" / "samples" / "teacher" / "shard-00000.safetensors").is_file()  # the samples are kept


def test_strict_json_replaces_non_finite_numbers_with_reasons():
    clean, reasons = strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"num_valid": 0, "p95": float("nan")},
                                  "d": torch.tensor([0.5])})
    assert clean == {"a": None, "b": [1.0, None], "c": {"num_valid": 0, "p95": None}, "d": [0.5]}
    assert reasons == {"a": "NaN", "b[1]": "+Infinity", "c.p95": "NaN: no finite sample to compute it from"}
    json.dumps(clean, allow_nan=False)

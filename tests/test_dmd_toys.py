import json
import math

import pytest
import torch

from diffusers_memdistill.analysis import dmd_toys
from diffusers_memdistill.cli import main as cli_main
from diffusers_memdistill.losses.dmd import teacher_ode_pairs
from diffusers_memdistill.models.denoiser import EDMDenoiser

TINY = dict(dmd_toys.QUICK, hidden=16, layers=2, teacher_steps=20, distill_steps=6, batch_size=32, num_samples=40,
            warmup_steps=2)


def test_toy_distributions_live_in_the_first_two_coordinates():
    g = torch.Generator().manual_seed(0)
    board = dmd_toys.sample_toy("chessboard", 4000, g)
    assert board.shape == (4000, 4) and torch.equal(board[:, 2:], torch.zeros(4000, 2))
    cell = torch.floor(board[:, :2] + 2).long()
    assert ((cell >= 0) & (cell <= 3)).all() and ((cell.sum(1) % 2) == 0).all()  # dark squares only
    assert len(torch.unique(cell[:, 0] * 4 + cell[:, 1])) == 8
    moons = dmd_toys.sample_toy("moons", 1000, g)
    assert torch.equal(moons[:, 2:], torch.zeros(1000, 2)) and moons[:, :2].abs().max() < 3
    ring = dmd_toys.sample_toy("ring", 20000, g)
    radius = ring[:, :2].norm(dim=1)
    assert abs(radius.mean().item() - 2) < 0.05 and abs(ring[:, 2:].std().item() - 0.2) < 0.01
    with pytest.raises(ValueError, match="Unknown toy"):
        dmd_toys.sample_toy("spiral", 10)


def test_delta_e_is_zero_for_a_student_equal_to_phi_8():
    torch.manual_seed(0)
    teacher = EDMDenoiser(dmd_toys.ToyMLP(hidden=16, layers=2), 0.8)
    noise = torch.randn(50, 4)
    study = dmd_toys.pairing_study(teacher, lambda z: teacher_ode_pairs(teacher, z, num_steps=8), noise)
    assert study["pairing"].delta_e == 0.0 and study["pairing"].fraction_fixed == 1.0
    # The one-step teacher is D(sigma_max z; sigma_max), a different map with a positive ΔE.
    torch.testing.assert_close(study["phi_1"], teacher(80.0 * noise, 80.0), atol=1e-4, rtol=1e-4)  # x=80z cancels
    reversed_student = dmd_toys.pairing_study(teacher, lambda z: teacher_ode_pairs(teacher, -z, num_steps=8), noise)
    assert reversed_student["pairing"].delta_e > 0


def test_student_starts_from_the_teacher_and_follows_the_update_ratio():
    torch.manual_seed(0)
    teacher = dmd_toys.ToyMLP(hidden=16, layers=2).eval().requires_grad_(False)
    settings = dict(TINY, distill_steps=6)
    student, history = dmd_toys.distill_student(teacher, settings, 0.8, torch.Generator().manual_seed(1),
                                                fake_updates_per_generator_update=2)
    assert len(history["fake_loss"]) == 6 and len(history["generator_loss"]) == 3
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    with pytest.raises(ValueError, match=">= 1"):
        dmd_toys.distill_student(teacher, settings, 0.8, torch.Generator(), fake_updates_per_generator_update=0)


def test_reduced_study_end_to_end(tmp_path):
    argv = ["dmd-toys", "--quick", "--datasets", "chessboard", "--output_dir", str(tmp_path / "out")]
    for key in ("hidden", "layers", "teacher_steps", "distill_steps", "batch_size", "num_samples", "warmup_steps"):
        argv += [f"--{key}", str(TINY[key])]
    assert cli_main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    r = results["datasets"]["chessboard"]
    assert math.isfinite(r["pairing"]["delta_e"]) and r["pairing"]["delta_e"] >= 0
    assert r["pairing"]["num_samples"] == TINY["num_samples"]
    for name in r["figures"].values():
        assert (tmp_path / "out" / name).stat().st_size > 1000
    # A non-empty folder is refused without --overwrite, and bad settings are one-line errors.
    assert cli_main(argv) == 2
    assert cli_main(["dmd-toys", "--output_dir", str(tmp_path / "b"), "--datasets", "spiral"]) == 2
    assert cli_main(["dmd-toys", "--output_dir", str(tmp_path / "c"), "--fake_updates_per_generator_update", "0"]) == 2

"""End-to-end checks of ``memdistill theory``."""

import json

import pytest

from diffusers_memdistill import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory") / "x"
    rc = cli.main(["theory", "--output_dir", str(out), "--quick"])
    return rc, out


def test_quick_run_writes_figures_and_results(quick_run):
    rc, out = quick_run
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    for name in results["figures"].values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    base = results["base"]
    d, p, n = base["d"], base["p"], base["n"]
    assert (d, p, n) == (10, 80, 20)
    # Rank argument of 000 §5.3: the atom of M appears exactly p − d times, and at most d eigenvalues leave it.
    curv = base["curvature"]
    assert curv["atom_multiplicity_measured"] == curv["atom_multiplicity_predicted"] == p - d
    assert curv["num_off_atom"] == d
    assert curv["atom"] == pytest.approx(results["settings"]["h"] ** 2 * curv["pfode"]["nu2"] / p)
    # Two bulks; leakage falls with the ridge to ε at λ*.
    assert base["U_summary"]["num_gen"] + base["U_summary"]["num_mem"] == p
    leak = base["leakage"]
    assert leak["monotone_nonincreasing"]
    assert leak["lambda_star"] > 0
    assert leak["gen_median_at_lambda_star"] <= leak["epsilon"] < leak["gen_median_at_0"]
    assert 0.0 <= base["responses"]["positive_allocation_gen"] <= 1.0
    assert base["responses"]["ridge"] == leak["lambda_star"]
    # Sweeps and the Monte-Carlo cross-check are present with the quick sizes.
    assert [s["psi_n"] for s in results["sweep_psi_n"]] == [1.0, 2.0, 4.0]
    assert [s["psi_p"] for s in results["sweep_psi_p"]] == [4.0, 8.0]
    mc = results["mc_check"]
    assert mc["samples"] == 2000 and mc["rel_frobenius_lemma_vs_mc"] < 1.0
    assert results["settings"]["seed"] == 0


def test_refuses_non_empty_output_dir(quick_run, capsys):
    _, out = quick_run
    before = (out / "results.json").stat().st_mtime_ns
    rc = cli.main(["theory", "--output_dir", str(out), "--quick"])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().out
    assert (out / "results.json").stat().st_mtime_ns == before


def test_overwrite_and_seeded_reproducibility(tmp_path):
    args = ["theory", "--quick", "--no_figures", "--mc_samples", "0", "--sweep_psi_n", "2", "--sweep_psi_p", "8"]
    out = tmp_path / "a"
    assert cli.main([*args, "--output_dir", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["mc_check"] is None and first["figures"] == {}
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert cli.main([*args, "--output_dir", str(out), "--overwrite"]) == 0
    second = json.loads((out / "results.json").read_text())
    assert first["base"] == second["base"]
    assert first["sweep_psi_n"] == second["sweep_psi_n"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--d", "-4"], "--d must be a positive integer"),
        (["--psi_p", "-1"], "--psi_p must be positive"),
        (["--h", "0.5", "--t", "0.1"], "--h must lie in (0, t)"),
        (["--sweep_psi_n", "1,x"], "--sweep_psi_n must be comma-separated numbers"),
        (["--epsilon", "2"], "--epsilon must lie in (0, 1)"),
        (["--mc_samples", "-5"], "--mc_samples must be non-negative"),
    ],
)
def test_bad_input_is_reported(tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert cli.main(["theory", "--output_dir", str(out), "--quick", *extra]) == 2
    assert message in capsys.readouterr().out
    assert not out.exists()

import math

import pytest
import torch

from conftest import tiny_unet
from diffusers_memdistill.models.denoiser import ConsistencyDenoiser, EDMDenoiser
from diffusers_memdistill.scalings import consistency_scalings, edm_loss_weight, edm_scalings, karras_sigmas
from diffusers_memdistill.solvers import euler_step, heun_step


def test_karras_grid_matches_formula_and_ends():
    sigmas = karras_sigmas(18)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (19,)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[17].item() == pytest.approx(0.002) and sigmas[18] == 0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    i = 5  # sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        karras_sigmas(1)


def test_edm_scalings_values():
    sigma, sd = torch.tensor([0.3, 2.0]), 0.5
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sd)
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # EDM's unit-variance target: c_skip^2 sd^2 + c_out^2 ... and lambda = 1 / c_out^2.
    torch.testing.assert_close(edm_loss_weight(sigma, sd), 1 / c_out**2)


def test_consistency_boundary_condition_is_exact():
    c_skip, c_out = consistency_scalings(torch.tensor(0.002), 0.5, 0.002)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    unet = tiny_unet()
    x = torch.randn(3, 1, 8, 8)
    f = ConsistencyDenoiser(unet, 0.5, 0.002)
    with torch.no_grad():
        assert torch.equal(f(x, 0.002), x)
        assert not torch.allclose(f(x, 1.0), x)


def _ideal_gaussian_denoiser(sigma_data):
    """For x0 ~ N(0, sd^2 I) the ideal denoiser is E[x0 | x] = c_skip(sigma) x."""
    def denoiser(x, sigma, **_):
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma
        return sigma_data**2 / (sigma**2 + sigma_data**2) * x
    return denoiser


def test_heun_follows_the_exact_gaussian_flow():
    # PF-ODE with the ideal Gaussian denoiser: x(sigma) = x(s0) sqrt(sigma^2 + sd^2) / sqrt(s0^2 + sd^2).
    # Local errors: Euler O(h^2), Heun O(h^3); halving the step divides them by ~4 and ~8.
    sd, s0 = 0.5, 1.0
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    d = _ideal_gaussian_denoiser(sd)

    def errors(h):
        exact = x * math.sqrt((s0 - h) ** 2 + sd**2) / math.sqrt(s0**2 + sd**2)
        return [(step(d, x, s0, s0 - h) - exact).abs().max().item() for step in (euler_step, heun_step)]

    (euler_1, heun_1), (euler_2, heun_2) = errors(0.2), errors(0.1)
    assert heun_1 < euler_1 / 4
    assert 3.5 < euler_1 / euler_2 < 4.6 and 7 < heun_1 / heun_2 < 10.5


def test_heun_per_sample_sigmas_skip_the_correction_at_zero():
    d = _ideal_gaussian_denoiser(0.5)
    x = torch.randn(2, 1, 4, 4)
    out = heun_step(d, x, torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(out[1:], euler_step(d, x[1:], 1.0, 0.0))
    torch.testing.assert_close(out[:1], heun_step(d, x[:1], 1.0, 0.5))


def test_edm_denoiser_with_zero_network_is_the_ideal_gaussian_denoiser():
    unet = tiny_unet()
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(EDMDenoiser(unet, 0.5)(x, sigma), _ideal_gaussian_denoiser(0.5)(x, sigma))

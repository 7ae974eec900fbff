import copy

import pytest
import torch

from diffusers_memdistill.analysis.dmd_toys import ToyMLP
from diffusers_memdistill.losses.dmd import (
    DMDLoss,
    distribution_matching_loss,
    generate,
    guided_denoiser,
    restricted_karras_sigmas,
    teacher_ode_pairs,
)
from diffusers_memdistill.models.denoiser import EDMDenoiser
from diffusers_memdistill.scalings import karras_sigmas


def test_sigmas_stay_in_the_restricted_karras_range():
    grid = karras_sigmas(1000, append_zero=False)
    loss = DMDLoss(num_train_sigmas=1000)
    sigma = loss.sample_sigmas(20000, torch.Generator().manual_seed(0))
    # Indices 20..979 of the 1000-level grid (2% and 98% of 999 rounded inwards).
    hi, lo = grid[20].item(), grid[979].item()
    assert sigma.max().item() <= hi * (1 + 1e-6) and sigma.min().item() >= lo * (1 - 1e-6)
    assert sigma.max().item() > grid[25].item() and sigma.min().item() < grid[975].item()  # the range is used
    assert torch.isin(sigma.double(), grid.float().double()).all()  # every draw is a grid level
    assert restricted_karras_sigmas(1000).shape == (960,)
    with pytest.raises(ValueError, match="min_fraction"):
        restricted_karras_sigmas(1000, min_fraction=0.9, max_fraction=0.1)


def _mlp(seed):
    torch.manual_seed(seed)
    return ToyMLP(dim=64, hidden=32, layers=2)


def test_generator_gradient_is_exactly_zero_when_fake_equals_real():
    generator_unet = _mlp(1)
    teacher = EDMDenoiser(_mlp(2))
    fake_copy = EDMDenoiser(copy.deepcopy(teacher.unet))
    loss_fn = DMDLoss()
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    for fake in (teacher, fake_copy):  # the same network, and an identical copy of it
        generator_unet.zero_grad(set_to_none=False)
        loss, logs = loss_fn.generator_loss(EDMDenoiser(generator_unet), teacher, fake, z,
                                            generator=torch.Generator().manual_seed(4))
        loss.mean().backward()
        assert torch.equal(loss, torch.zeros(4)) and torch.equal(logs["grad_norm"], torch.zeros(4))
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in generator_unet.parameters())
    # A different fake denoiser gives a non-zero gradient, equal to grad / numel in x_0.
    other = EDMDenoiser(_mlp(5))
    x0 = torch.randn(4, 64, requires_grad=True)
    sigma, noise = torch.full((4,), 1.5), torch.randn(4, 64)
    loss, _ = distribution_matching_loss(x0, teacher, other, sigma, noise)
    loss.sum().backward()
    with torch.no_grad():
        noisy = x0 + 1.5 * noise
        d_real, d_fake = teacher(noisy, sigma), other(noisy, sigma)
        grad = (d_fake - d_real) / (x0 - d_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x0.grad, grad / 64)
    assert x0.grad.abs().sum() > 0


def test_fake_denoiser_loss_decreases_on_a_fixed_batch():
    fake_unet = _mlp(0)
    fake = EDMDenoiser(fake_unet)
    samples = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    loss_fn = DMDLoss(fake_sigma_sampling="karras")
    opt = torch.optim.Adam(fake_unet.parameters(), lr=3e-3)

    def fixed_loss():
        return loss_fn.fake_loss(fake, samples, generator=torch.Generator().manual_seed(1))[0].mean()

    with torch.no_grad():
        before = fixed_loss().item()
    for _ in range(30):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    with torch.no_grad():
        after = fixed_loss().item()
    assert after < 0.8 * before
    # The log-normal option is the teacher's own EDM loss.
    lognormal = DMDLoss(fake_sigma_sampling="lognormal").fake_loss(fake, samples, generator=torch.Generator().manual_seed(2))
    assert lognormal[0].shape == (8,) and torch.isfinite(lognormal[0]).all()


def test_fake_loss_does_not_reach_the_generator():
    generator_unet, fake = _mlp(1), EDMDenoiser(_mlp(2))
    loss_fn = DMDLoss()
    x0 = generate(EDMDenoiser(generator_unet), torch.randn(2, 64), loss_fn.generator_sigmas)
    loss_fn.fake_loss(fake, x0)[0].sum().backward()
    assert all(p.grad is None for p in generator_unet.parameters())


def test_backward_simulation_renoises_and_trains_one_step():
    calls = []

    def denoiser(x, sigma, class_labels=None):
        calls.append((float(sigma), torch.is_grad_enabled()))
        return 0.5 * x

    z = torch.ones(2, 3)
    # All steps: x = D(80 z) = 40; then D(40 + 2 n).
    torch.manual_seed(0)
    out = generate(denoiser, z, [80.0, 2.0], generator=torch.Generator().manual_seed(0))
    n = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, 0.5 * (40.0 + 2.0 * n))
    calls.clear()
    generate(denoiser, z, [80.0, 2.0, 0.5], grad_step=1)
    assert calls == [(80.0, False), (2.0, True)]
    with pytest.raises(ValueError, match="decreasing"):
        generate(denoiser, z, [2.0, 80.0])
    with pytest.raises(ValueError, match="leave the teacher's range"):
        DMDLoss(generator_sigmas=[100.0])


def test_classifier_free_guidance_of_the_real_score():
    def real(x, sigma, class_labels=None):
        return x * 0 + class_labels.float().reshape(-1, 1)

    guided = guided_denoiser(real, 1.75, unconditional_label=10)
    out = guided(torch.zeros(2, 3), 1.0, class_labels=torch.tensor([2, 4]))
    torch.testing.assert_close(out, (10 + 1.75 * (torch.tensor([2.0, 4.0]) - 10)).reshape(2, 1).expand(2, 3))
    with pytest.raises(ValueError, match="unconditional_label"):
        DMDLoss(real_guidance_scale=1.75)


def test_regression_loss_is_zero_on_the_generators_own_pairs():
    teacher = EDMDenoiser(_mlp(2))
    z = torch.randn(3, 64)
    loss_fn = DMDLoss()
    with torch.no_grad():
        phi_1 = teacher_ode_pairs(teacher, z, num_steps=1)
        torch.testing.assert_close(phi_1, teacher(80.0 * z, 80.0), atol=1e-4, rtol=1e-4)  # x = 80 z cancels  # one Euler step to 0 is D(sigma_max z)
        assert loss_fn.regression_loss(teacher, z, teacher(80.0 * z, 80.0))[0].abs().max() == 0
        phi_8 = teacher_ode_pairs(teacher, z, num_steps=8)
        assert loss_fn.regression_loss(teacher, z, phi_8)[0].min() > 0


def test_discriminator_loss_is_the_logistic_loss():
    from diffusers_memdistill.losses.dmd import discriminator_loss

    zeros = torch.zeros(3)
    assert torch.allclose(discriminator_loss(zeros, zeros), torch.full((3,), 2 * torch.log(torch.tensor(2.0))))
    # A confident, correct discriminator has a loss near 0; a confidently wrong one about |logit| per side.
    assert discriminator_loss(torch.full((1,), 20.0), torch.full((1,), -20.0)).item() < 1e-8
    assert abs(discriminator_loss(torch.full((1,), -20.0), torch.full((1,), 20.0)).item() - 40.0) < 1e-6


def test_gan_losses_reach_the_head_and_the_generator_samples_only():
    from conftest import tiny_unet
    from diffusers_memdistill.models.fake_score import DMDFakeScore

    fake_net = DMDFakeScore(tiny_unet(seed=3), gan_head=True)
    fake = EDMDenoiser(fake_net)
    loss_fn = DMDLoss()
    g = torch.Generator().manual_seed(0)
    samples, real = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    # The fake network's loss: denoising on the samples plus the discriminator on both halves, in one call.
    plain, _ = loss_fn.fake_loss(fake, samples, generator=torch.Generator().manual_seed(1))
    with_gan, logs = loss_fn.fake_loss(fake, samples, generator=torch.Generator().manual_seed(1), real=real,
                                       gan_weight=0.5)
    assert torch.allclose(with_gan, plain + 0.5 * logs["discriminator_loss"], atol=1e-5)
    with_gan.mean().backward()
    assert fake_net.head.linear.weight.grad.abs().sum() > 0 and fake_net.unet.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="as many real images"):
        loss_fn.fake_loss(fake, samples, real=real[:2], gan_weight=0.5)
    # The generator's GAN loss: gradient to x0, none to a frozen fake network.
    fake_net.zero_grad(set_to_none=True)
    fake_net.requires_grad_(False)
    x0 = samples.clone().requires_grad_(True)
    loss_fn.gan_generator_loss(fake, x0, generator=g).mean().backward()
    assert x0.grad.abs().sum() > 0 and all(p.grad is None for p in fake_net.parameters())
    with pytest.raises(ValueError, match="no discriminator head"):
        DMDFakeScore(tiny_unet())(samples, torch.zeros(4), return_logits=True)

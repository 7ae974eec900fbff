"""losses/lcm.py against hand computations and diffusers' own LCM pieces (LCMScheduler, the LCM pipeline's guidance
embedding, DDIMScheduler's trailing grid)."""

import math

import pytest
import torch

from diffusers_memdistill.losses.lcm import (
    LatentConsistencyDistillationLoss,
    ddim_timesteps,
    elementwise_pseudo_huber,
    guidance_scale_embedding,
    guided_ddim_target,
    lcm_consistency_output,
    predicted_original_and_noise,
)
from diffusers_memdistill.scalings import lcm_scalings


def sd_alphas_cumprod():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


class AffineTeacher(torch.nn.Module):
    """eps(z, t, c) = a(t) z + mean(c): known in closed form, conditional through the text embedding."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = 0

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, return_dict=False):
        self.calls += 1
        a = self.scale * (1 + timestep.float() / 1000)
        return (a.reshape(-1, 1, 1, 1) * sample + encoder_hidden_states.mean((1, 2)).reshape(-1, 1, 1, 1),)


def test_ddim_grid_is_diffusers_trailing_grid_and_must_divide_the_timesteps():
    from diffusers import LCMScheduler

    grid = ddim_timesteps(1000, 50)
    assert grid.tolist() == list(range(19, 1000, 20))
    # LCMScheduler samples on the same grid (its original_inference_steps = 50).
    lcm = LCMScheduler(num_train_timesteps=1000)
    lcm.set_timesteps(50, original_inference_steps=50)
    assert sorted(lcm.timesteps.tolist()) == grid.tolist()
    with pytest.raises(ValueError, match="--num_ddim_timesteps 30 must divide the teacher's 1000 training timesteps"):
        ddim_timesteps(1000, 30)


def test_guidance_embedding_equals_the_lcm_pipelines():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 6.5, 14.0])
    for dim in (256, 7):
        ours = guidance_scale_embedding(w, dim)
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(ours, theirs)  # bit for bit: what the pipeline feeds the student at inference
    assert guidance_scale_embedding(w, 256).shape == (4, 256)


def test_boundary_scalings_match_lcm_scheduler_and_f_is_the_identity_at_zero():
    from diffusers import LCMScheduler

    for scaling in (10.0, 1.0):
        scheduler = LCMScheduler(timestep_scaling=scaling)
        for t in (0, 1, 19, 259, 999):
            c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
            ours = lcm_scalings(torch.tensor([t]), timestep_scaling=scaling)
            assert ours[0].item() == pytest.approx(c_skip, rel=1e-6, abs=0)
            assert ours[1].item() == pytest.approx(c_out, rel=1e-6, abs=0)
    c_skip, c_out = lcm_scalings(torch.tensor([0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    z = torch.randn(2, 4, 3, 3)
    f = lcm_consistency_output(torch.randn_like(z), z, torch.tensor([0, 0]), sd_alphas_cumprod())
    assert torch.equal(f, z)  # the boundary condition f(z, 0) = z, exactly


@pytest.mark.parametrize("t", [19, 259, 999])
def test_consistency_output_is_lcm_schedulers_denoised(t):
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.set_timesteps(timesteps=[t])  # one step: prev_sample is the denoised sample
    g = torch.Generator().manual_seed(t)
    z, eps = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    expected = scheduler.step(eps, t, z, return_dict=False)[1]
    ours = lcm_consistency_output(eps, z, torch.tensor([t, t]), scheduler.alphas_cumprod)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_prediction_types_invert_the_forward_process():
    alpha, sigma = torch.tensor([0.8, 0.3]), torch.tensor([0.6, math.sqrt(1 - 0.09)])
    x0, eps = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    z = alpha.reshape(-1, 1, 1, 1) * x0 + sigma.reshape(-1, 1, 1, 1) * eps
    v = alpha.reshape(-1, 1, 1, 1) * eps - sigma.reshape(-1, 1, 1, 1) * x0
    for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        got_x0, got_eps = predicted_original_and_noise(out, z, alpha, sigma, kind)
        torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_eps, eps, atol=1e-5, rtol=1e-5)


def test_guided_ddim_target_equals_a_hand_computed_step_in_one_fused_teacher_call():
    alphas = sd_alphas_cumprod()
    teacher = AffineTeacher()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 3, generator=g)
    cond = torch.randn(2, 5, 8, generator=g) + 1.0
    uncond = torch.zeros(2, 5, 8)
    start, prev = torch.tensor([19, 519]), torch.tensor([0, 499])
    w = torch.tensor([2.0, 7.5])
    got = guided_ddim_target(teacher, z, start, prev, cond, uncond, w, alphas)
    assert teacher.calls == 1  # conditional and unconditional branches in one batch
    # By hand, in float64: eps_c, eps_u of the affine teacher; x0 = (z - sigma eps) / alpha per branch; guidance
    # x0_c + w (x0_c - x0_u) and eps_c + w (eps_c - eps_u); DDIM z_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps.
    for i in range(2):
        zi, t, s, wi = z[i].double(), int(start[i]), int(prev[i]), float(w[i])
        a_t = 0.3 * (1 + t / 1000)
        eps_c = a_t * zi + cond[i].double().mean()
        eps_u = a_t * zi + 0.0
        abar, abar_prev = float(alphas[t]), float(alphas[s])
        x0_c = (zi - math.sqrt(1 - abar) * eps_c) / math.sqrt(abar)
        x0_u = (zi - math.sqrt(1 - abar) * eps_u) / math.sqrt(abar)
        x0 = x0_c + wi * (x0_c - x0_u)
        eps = eps_c + wi * (eps_c - eps_u)
        expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
        torch.testing.assert_close(got[i].double(), expected, atol=2e-5, rtol=2e-5)
    # w = 0 is the conditional teacher's plain DDIM step.
    plain = guided_ddim_target(teacher, z, start, prev, cond, uncond, torch.zeros(2), alphas)
    unguided = guided_ddim_target(teacher, z, start, prev, cond, cond, w, alphas)  # uncond = cond: w drops out
    torch.testing.assert_close(plain, unguided)


def test_huber_is_elementwise_and_l2_is_the_mean_square():
    a = torch.tensor([[0.0, 3.0, 4.0, 0.0]])
    b = torch.zeros(1, 4)
    c = 0.5
    expected = sum(math.sqrt(x * x + c * c) - c for x in (0.0, 3.0, 4.0, 0.0)) / 4
    assert elementwise_pseudo_huber(a, b, c).item() == pytest.approx(expected, rel=1e-6)
    loss_fn = LatentConsistencyDistillationLoss(sd_alphas_cumprod(), loss_type="l2")
    assert loss_fn.skip == 20 and loss_fn.timesteps[0] == 19


def test_loss_is_per_sample_seeded_and_trains_only_the_student():
    alphas = sd_alphas_cumprod()
    teacher = AffineTeacher()
    loss_fn = LatentConsistencyDistillationLoss(alphas, w_min=3.0, w_max=3.0, loss_type="l2")
    latents = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    cond, uncond = torch.randn(3, 5, 8), torch.zeros(3, 5, 8)
    student = AffineTeacher()
    loss, logs = loss_fn(student, student, teacher, latents, cond, uncond, torch.Generator().manual_seed(2))
    assert loss.shape == (3,) and torch.isfinite(loss).all() and (logs["w"] == 3.0).all()
    loss.sum().backward()
    assert student.scale.grad is not None and teacher.scale.grad is None
    # Same seed, same draws: the loss is a pure function of (networks, batch, generator).
    again, _ = loss_fn(student, student, teacher, latents, cond, uncond, torch.Generator().manual_seed(2))
    torch.testing.assert_close(again, loss.detach())
    with pytest.raises(ValueError, match="--w_min 4.0 must not exceed --w_max 3.0"):
        LatentConsistencyDistillationLoss(alphas, w_min=4.0, w_max=3.0)

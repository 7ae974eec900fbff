"""Latent consistency distillation (LCM, Luo et al. 2023, Alg. 1; 000 App. B.2; SPEC §3).

On the teacher's DDPM schedule (alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t])), with a
skip k = T / N on the N-step DDIM grid t in {k - 1, 2k - 1, ..., T - 1}:

    z_{t+k} = alpha_{t+k} z + sigma_{t+k} n,   w ~ U[w_min, w_max],
    (x0_hat, eps_hat) = (1 + w) * teacher(z_{t+k}, c) - w * teacher(z_{t+k}, 0)   (guided, LCM eq. 8),
    z_hat_t = alpha_t x0_hat + sigma_t eps_hat                                      (one DDIM step, t = max(t+k-k, 0)),
    loss = d(f_theta(z_{t+k}, w, c, t+k), stopgrad f_theta-(z_hat_t, w, c, t)),

with the consistency function f(z, w, c, t) = c_skip(t) z + c_out(t) x0(z, t) of `scalings.lcm_scalings` (LCM eq. 9)
and ``w`` embedded into the student through the UNet's ``timestep_cond`` (``time_cond_proj_dim``). Guidance follows
the LCM paper's convention: the teacher's classifier-free guidance scale is 1 + w, and diffusers'
`LatentConsistencyModelPipeline` at ``guidance_scale`` g embeds w = g - 1, so that a student trained on w samples what
the teacher would at scale 1 + w.

Every function is pure (tensors and networks in, tensors out); the training loop keeps the target network.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..scalings import append_dims, lcm_scalings, precondition_output
from .consistency import l2_distance

LOSS_TYPES = ("huber", "l2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ---------------------------------------------------------------- the DDIM grid and the guidance embedding


def ddim_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The LCM solver grid k - 1 < 2k - 1 < ... < T - 1 (k = T / N), ascending, long: diffusers' `DDIMScheduler`
    timesteps with ``timestep_spacing="trailing"`` (the grid `LCMScheduler` samples on with its
    ``original_inference_steps``).

    Raises:
        ValueError: N does not divide the teacher's T training timesteps (the skip k would not be an integer).
    """
    from diffusers import DDIMScheduler

    if num_ddim_timesteps < 1 or num_train_timesteps % num_ddim_timesteps:
        raise ValueError(f"--num_ddim_timesteps {num_ddim_timesteps} must divide the teacher's {num_train_timesteps} "
                         f"training timesteps (e.g. 50 for 1000: a skip of 20).")
    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing="trailing")
    scheduler.set_timesteps(num_ddim_timesteps)
    return scheduler.timesteps.flip(0).long()


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The student's guidance input: sinusoidal Fourier features [sin(1000 w f_i), cos(1000 w f_i)] with frequencies
    f_i = 10000^(-i / (d/2 - 1)) (VDM's embedding), shape (B, embedding_dim), zero-padded when d is odd.

    Computed in the operation order of `LatentConsistencyModelPipeline.get_guidance_scale_embedding`, so that the
    student sees at training exactly what diffusers' pipeline feeds it (diffusers' `get_timestep_embedding` computes the
    same features in another order; at arguments of 1e4 the float32 results differ by 1e-3).
    """
    w = torch.as_tensor(w).reshape(-1).float() * 1000.0
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = w.to(frequencies.device)[:, None] * frequencies[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


# ---------------------------------------------------------------- predictions on the DDPM schedule


def predicted_original_and_noise(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                                 sigma: torch.Tensor, prediction_type: str = "epsilon"):
    """(x0, eps) of a network output on z_t = alpha x0 + sigma eps, for per-sample alpha, sigma of shape (B,) (float32).

    ``"epsilon"``: x0 = (z - sigma F) / alpha; ``"v_prediction"``: x0 = alpha z - sigma F, eps = alpha F + sigma z;
    ``"sample"``: x0 = F, eps = (z - alpha F) / sigma.
    """
    z, out = sample.float(), model_output.float()
    a, s = append_dims(alpha.float(), z.ndim), append_dims(sigma.float(), z.ndim)
    if prediction_type == "epsilon":
        return (z - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * z - s * out, a * out + s * z
    if prediction_type == "sample":
        return out, (z - a * out) / s
    raise ValueError(f"Unknown prediction type {prediction_type!r}; choose one of {PREDICTION_TYPES}.")


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in the LCM convention (LCM eq. 8): cond + w (cond - uncond), w per sample (B,)."""
    return cond + append_dims(w.to(cond.dtype), cond.ndim) * (cond - uncond)


def ddim_step(denoised: torch.Tensor, noise: torch.Tensor, alpha_prev: torch.Tensor,
              sigma_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step to the previous grid point: z_prev = alpha_prev x0 + sigma_prev eps (DDIM eq. 12,
    eta = 0)."""
    return append_dims(alpha_prev, denoised.ndim) * denoised + append_dims(sigma_prev, noise.ndim) * noise


def lcm_consistency_output(model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                           alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                           timestep_scaling: float = 10.0) -> torch.Tensor:
    """f(z, t) = c_skip(t) z + c_out(t) x0(z, t) (LCM eq. 9), the ``denoised`` of `LCMScheduler.step`; float32."""
    alpha_bar = alphas_cumprod.to(sample.device)[timesteps]
    x0, _ = predicted_original_and_noise(model_output, sample, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(),
                                         prediction_type)
    c_skip, c_out = lcm_scalings(timesteps, timestep_scaling=timestep_scaling)
    return precondition_output(sample, x0, c_skip.to(sample.device), c_out.to(sample.device))


@torch.no_grad()
def guided_ddim_target(teacher, sample: torch.Tensor, timesteps: torch.Tensor, prev_timesteps: torch.Tensor,
                       encoder_hidden_states: torch.Tensor, uncond_hidden_states: torch.Tensor, w: torch.Tensor,
                       alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    r"""
    z_hat_{t_n}: one DDIM step of the guided teacher from ``timesteps`` (t_{n+k}) to ``prev_timesteps`` (t_n), with
    the conditional and unconditional branches in one fused batch of 2B.

    Args:
        teacher: a `UNet2DConditionModel` (or any ``teacher(sample, t, encoder_hidden_states) -> (output,)``).
        sample (`torch.Tensor` of shape `(B, C, h, w)`): z_{t_{n+k}}.
        timesteps, prev_timesteps (`torch.Tensor` of shape `(B,)`, long): t_{n+k} and t_n.
        encoder_hidden_states, uncond_hidden_states (`torch.Tensor` of shape `(B, L, D)`): the prompts' and the empty
            prompt's text embeddings.
        w (`torch.Tensor` of shape `(B,)`): guidance, the teacher's scale being 1 + w.
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): the teacher's schedule.
        prediction_type (`str`): the teacher's.

    Returns:
        `torch.Tensor`: z_hat_{t_n}, float32.
    """
    alpha_bar = alphas_cumprod.to(sample.device)
    dtype = next(teacher.parameters()).dtype if isinstance(teacher, torch.nn.Module) else sample.dtype
    hidden = torch.cat([encoder_hidden_states, uncond_hidden_states]).to(dtype)
    output = teacher(torch.cat([sample, sample]).to(dtype), torch.cat([timesteps, timesteps]), hidden,
                     return_dict=False)[0]
    a_t = alpha_bar[timesteps].sqrt().repeat(2)
    x0, eps = predicted_original_and_noise(output, torch.cat([sample, sample]), a_t,
                                           (1 - alpha_bar[timesteps]).sqrt().repeat(2), prediction_type)
    (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
    prev = alpha_bar[prev_timesteps]
    return ddim_step(guided(x0_c, x0_u, w), guided(eps_c, eps_u, w), prev.sqrt(), (1 - prev).sqrt())


# ---------------------------------------------------------------- distances and the loss


def elementwise_pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Per-sample mean over elements of sqrt((a - b)^2 + c^2) - c: LCM's Huber loss, applied to every latent value
    (unlike iCT's `consistency.pseudo_huber_distance`, which takes the norm of the whole difference first).

    Computed as d^2 / (sqrt(d^2 + c^2) + c), the same value without cancellation when |d| << c.
    """
    squared = (a.float() - b.float()).square()
    return (squared / ((squared + c**2).sqrt() + c)).flatten(1).mean(1)


def lcm_distance(a: torch.Tensor, b: torch.Tensor, loss_type: str = "huber", huber_c: float = 0.001) -> torch.Tensor:
    """Per-sample distance of the LCM loss: ``"huber"`` (`elementwise_pseudo_huber`) or ``"l2"`` (mean squared
    error)."""
    if loss_type == "huber":
        return elementwise_pseudo_huber(a, b, huber_c)
    if loss_type == "l2":
        return l2_distance(a, b)
    raise ValueError(f"Unknown --loss_type {loss_type!r}; choose one of {LOSS_TYPES}.")


class LatentConsistencyDistillationLoss:
    r"""
    The LCM objective (LCM Alg. 1), per sample; see the module docstring.

    Args:
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): the teacher's DDPM schedule (its `DDPMScheduler`'s).
        num_ddim_timesteps (`int`, defaults to 50): N, the solver grid (skip k = T / N).
        w_min, w_max (`float`): the range of the guidance w ~ U[w_min, w_max] (the teacher's scale is 1 + w).
        loss_type (`str`, defaults to `"huber"`): ``"huber"`` or ``"l2"``.
        huber_c (`float`, defaults to 0.001): c of the Huber loss.
        timestep_scaling (`float`, defaults to 10): of the boundary scalings (`LCMScheduler`'s ``timestep_scaling``).
        prediction_type (`str`, defaults to `"epsilon"`): the teacher's (and the student's) parameterisation.
        time_cond_proj_dim (`int`, *optional*): the student's guidance embedding size; None for a student without
            one (LCM-LoRA, which learns a single guidance w).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int = 50, w_min: float = 5.0,
                 w_max: float = 15.0, loss_type: str = "huber", huber_c: float = 0.001, timestep_scaling: float = 10.0,
                 prediction_type: str = "epsilon", time_cond_proj_dim: Optional[int] = None):
        if not w_min <= w_max:
            raise ValueError(f"--w_min {w_min} must not exceed --w_max {w_max}.")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"Unknown --loss_type {loss_type!r}; choose one of {LOSS_TYPES}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction type {prediction_type!r}; choose one of {PREDICTION_TYPES}.")
        self.alphas_cumprod = alphas_cumprod.float()
        self.num_train_timesteps = len(alphas_cumprod)
        self.timesteps = ddim_timesteps(self.num_train_timesteps, num_ddim_timesteps)
        self.skip = self.num_train_timesteps // num_ddim_timesteps
        self.w_min, self.w_max, self.loss_type, self.huber_c = float(w_min), float(w_max), loss_type, float(huber_c)
        self.timestep_scaling, self.prediction_type = float(timestep_scaling), prediction_type
        self.time_cond_proj_dim = time_cond_proj_dim

    def consistency_output(self, unet, sample, timesteps, encoder_hidden_states, w_embedding=None) -> torch.Tensor:
        """f_theta(z, w, c, t) of a UNet (the student or the target network)."""
        output = unet(sample, timesteps, encoder_hidden_states, timestep_cond=w_embedding, return_dict=False)[0]
        return lcm_consistency_output(output, sample, timesteps, self.alphas_cumprod, self.prediction_type,
                                      self.timestep_scaling)

    def __call__(self, student, target, teacher, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 uncond_hidden_states: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Args: ``student`` (trained), ``target`` (the stop-gradient target network; the student itself for
        LCM-LoRA) and ``teacher`` UNets; ``latents`` z (B, C, h, w); the prompts' and the empty prompt's text
        embeddings (B, L, D); ``generator`` for n, w and the grid points.

        Returns: ``(loss, logs)``: the per-sample loss (B,) and the drawn ``timesteps`` and ``w``.
        """
        batch, device = latents.shape[0], latents.device
        # 1. A grid point t_{n+k}, its predecessor t_n = max(t_{n+k} - k, 0), the noise and the guidance.
        index = torch.randint(0, len(self.timesteps), (batch,), generator=generator, device=device)
        start = self.timesteps.to(device)[index]
        prev = (start - self.skip).clamp(min=0)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        w = self.w_min + (self.w_max - self.w_min) * torch.rand(batch, generator=generator, device=device)
        alpha_bar = self.alphas_cumprod.to(device)[start]
        noisy = append_dims(alpha_bar.sqrt(), latents.ndim) * latents.float() + \
            append_dims((1 - alpha_bar).sqrt(), latents.ndim) * noise
        w_embedding = None
        if self.time_cond_proj_dim is not None:
            w_embedding = guidance_scale_embedding(w, self.time_cond_proj_dim).to(device)
        # 2. The online prediction f_theta(z_{t+k}, w, c, t+k).
        prediction = self.consistency_output(student, noisy, start, encoder_hidden_states, w_embedding)
        # 3. The guided teacher's DDIM step and the target f_theta-(z_hat_t, w, c, t).
        with torch.no_grad():
            z_prev = guided_ddim_target(teacher, noisy, start, prev, encoder_hidden_states, uncond_hidden_states, w,
                                        self.alphas_cumprod, self.prediction_type)
            target_value = self.consistency_output(target, z_prev, prev, encoder_hidden_states, w_embedding)
        loss = lcm_distance(prediction, target_value, self.loss_type, self.huber_c)
        return loss, {"timesteps": start, "w": w}


__all__ = ["LOSS_TYPES", "LatentConsistencyDistillationLoss", "ddim_step", "ddim_timesteps", "elementwise_pseudo_huber",
           "guidance_scale_embedding", "guided", "guided_ddim_target", "lcm_consistency_output", "lcm_distance",
           "predicted_original_and_noise"]

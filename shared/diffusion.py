"""Noise schedules (diffusers): cosine DDPM for training; DDIM / DPM-Solver++ / ancestral DDPM for sampling,
and diffusers' EDM samplers for EDM-trained models.

The one scheduler factory of fedst: C2L-ST (shared.c2l) and SpaDiT (shared.downstream.spadit) both build their
schedules here, from a config dict (num_train_timesteps, beta_schedule, prediction_type, clip_sample).
"""

from __future__ import annotations

from typing import Any

from shared.errors import FedstError

SAMPLERS = ("ddim", "dpm", "ddpm")
EDM_SAMPLERS = ("edm_dpm", "edm_euler")  # for models trained with parametrization="edm" (shared.c2l.train)
# Karras et al. 2022, table 1 (sigma_data 0.5 fits images in [-1, 1]; log-normal training noise levels)
EDM = {"sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002, "sigma_max": 80.0}


def train_scheduler(config: dict[str, Any]):
    """The DDPM forward process of a central config (num_train_timesteps, beta_schedule, prediction_type)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_schedule=config.get("beta_schedule", "squaredcos_cap_v2"),
        prediction_type=config.get("prediction_type", "epsilon"),
        clip_sample=config.get("clip_sample", True),
    )


def sampling_scheduler(config: dict[str, Any], sampler: str, timestep_spacing: str = "trailing"):
    """A fresh scheduler for `sampler` sharing the training schedule (fast samplers are deterministic).

    ``timestep_spacing`` of the few-step samplers: "trailing" (C2L-ST: the first step starts at t = T - 1, from
    pure noise) or diffusers' "leading" (SpaDiT's sampler, kept so its imputations do not change).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if sampler in EDM_SAMPLERS:
        return edm_scheduler(sampler)
    base = train_scheduler(config).config
    if sampler == "ddpm":
        return DDPMScheduler.from_config(base)
    if sampler == "ddim":
        return DDIMScheduler.from_config(base, set_alpha_to_one=True, timestep_spacing=timestep_spacing)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            base, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=timestep_spacing
        )
    raise FedstError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS + EDM_SAMPLERS)}")


def edm_scheduler(sampler: str = "edm_dpm"):
    """diffusers' EDM scheduler for a model trained with `parametrization="edm"` (F-prediction, Karras c_out)."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    kwargs = {k: EDM[k] for k in ("sigma_data", "sigma_min", "sigma_max")}
    if sampler == "edm_dpm":
        return EDMDPMSolverMultistepScheduler(**kwargs, prediction_type="epsilon", solver_order=2)
    if sampler == "edm_euler":
        return EDMEulerScheduler(**kwargs, prediction_type="epsilon")
    raise FedstError(f"unknown EDM sampler {sampler!r}; expected one of {', '.join(EDM_SAMPLERS)}")

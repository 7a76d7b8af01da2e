"""A cache hook for flow-matching samplers that predicts the clean image, not the velocity.

Flow matching puts the model input at `x_t = (1 - sigma) x_0 + sigma eps` and the transformer predicts
`v = eps - x_0`, so every call implies a clean image `x_0 = x_t - sigma v` (`sigma = timestep / 1000`, the
transformer's timestep convention). On a cached step this hook skips the whole transformer and returns the velocity
from the step's own input to the clean image predicted from the last computed steps:

    x_0 = x_0[k] + (x_0[k] - x_0[k-1]) (sigma - sigma[k]) / (sigma[k] - sigma[k-1])     (max_order=1; 0: x_0[k])
    v   = (x_t - x_0) / sigma

A scheduler step then moves toward exactly that clean image. The caches that predict the velocity or the blocks'
residuals from earlier steps (diffusers' TaylorSeer lite mode, MagCache, FirstBlockCache) carry those steps' noise;
a stochastic sampler (`FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`) draws fresh noise at every step,
which is in `x_t`, so only a prediction through `x_0` stays right there (benchmarks/README.md, "Cache hooks").

Enable it as diffusers' caches: `transformer.enable_cache(CleanImageCacheConfig())`. Like diffusers' stateful
hooks it keeps one state per `cache_context` (the pipelines name their calls) and is reset after each pipeline call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput

CLEAN_IMAGE_CACHE_HOOK = "clean_image_cache"


@dataclass
class CleanImageCacheConfig:
    """When the transformer runs and how a skipped step's clean image is predicted. The defaults are the setting
    measured on the embedded Shapes pipeline (60 steps): 1.73-1.78x faster per image for 0.6 points of its
    score (mean of three seeds; benchmarks/README.md, "Cache hooks").

    Args:
        cache_interval: the transformer runs every `cache_interval`-th step after the warm-up (2: every other one).
        disable_cache_before_step: the first steps (of each pipeline call) always run the transformer.
        disable_cache_after_step: from this step on the transformer always runs (None: to the end).
        max_order: 0 reuses the last computed clean image; 1 extrapolates it linearly in sigma from the last two.
        num_train_timesteps: the timestep of sigma = 1 (the transformer's input is `timestep = sigma * 1000`).
    """

    cache_interval: int = 2
    disable_cache_before_step: int = 6
    disable_cache_after_step: int | None = None
    max_order: int = 1
    num_train_timesteps: int = 1000

    def __post_init__(self):
        checks = (
            ("cache_interval", self.cache_interval, 1, "an int >= 1"),
            ("disable_cache_before_step", self.disable_cache_before_step, 1, "an int >= 1 (the first step has "
                                                                              "nothing to predict from)"),
            ("num_train_timesteps", self.num_train_timesteps, 1, "an int >= 1"),
        )
        for name, value, least, expected in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"CleanImageCacheConfig: `{name}` must be {expected}, got {value!r}.")
        after = self.disable_cache_after_step
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise ValueError(f"CleanImageCacheConfig: `disable_cache_after_step` must be None or an int >= 0, got "
                             f"{after!r}.")
        if self.max_order not in (0, 1):
            raise ValueError(f"CleanImageCacheConfig: `max_order` must be 0 or 1, got {self.max_order!r}.")


class CleanImageCacheState:
    """One denoising trajectory: its step count and its last computed (sigma, clean image) pairs, float32."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []


class CleanImageCacheHook(ModelHook):
    """Runs the transformer on the steps the config says, else returns `(x_t - x_0) / sigma` (module docstring)."""

    _is_stateful = True

    def __init__(self, config: CleanImageCacheConfig):
        super().__init__()
        self.config = config
        self.state_manager = StateManager(CleanImageCacheState)
        self.signature = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.signature = inspect.signature(type(module).forward)  # the class's: `module.forward` may be a hook's
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module

    def computes(self, state: CleanImageCacheState, x: torch.Tensor, sigma: torch.Tensor) -> bool:
        config, step = self.config, state.step
        if step < config.disable_cache_before_step or not state.history:
            return True
        if config.disable_cache_after_step is not None and step >= config.disable_cache_after_step:
            return True
        if state.history[-1][1].shape != x.shape or not bool((sigma > 0).all()):
            return True  # another batch in the same context, or sigma 0 (nothing to divide by)
        return (step - config.disable_cache_before_step) % config.cache_interval == 0

    def predicted_clean_image(self, state: CleanImageCacheState, sigma: torch.Tensor) -> torch.Tensor:
        sigma_k, clean_k = state.history[-1]
        if self.config.max_order == 0 or len(state.history) < 2:
            return clean_k
        sigma_j, clean_j = state.history[-2]
        return clean_k + (clean_k - clean_j) * ((sigma - sigma_k) / (sigma_k - sigma_j))

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        inputs = self.signature.bind(module, *args, **kwargs).arguments
        x, timestep = inputs["hidden_states"], inputs["timestep"]
        sigma = (torch.as_tensor(timestep, device=x.device).float() / self.config.num_train_timesteps)
        sigma = sigma.expand(x.shape[0]).reshape(-1, *(1,) * (x.ndim - 1))
        state: CleanImageCacheState = self.state_manager.get_state()
        compute = self.computes(state, x, sigma)
        state.step += 1
        if compute:
            output = self.fn_ref.original_forward(*args, **kwargs)
            velocity = output[0] if isinstance(output, tuple) else output.sample
            if velocity.shape != x.shape:
                raise ValueError(
                    f"CleanImageCacheConfig needs a transformer that predicts a velocity shaped like its input: "
                    f"`hidden_states` is {tuple(x.shape)}, the output {tuple(velocity.shape)}."
                )
            # another batch starts afresh; of two steps at the same sigma (no slope) the newer stays
            history = [h for h in state.history if h[1].shape == x.shape and not torch.equal(h[0], sigma)]
            state.history = (history + [(sigma, x.float() - sigma * velocity.float())])[-2:]
            return output
        velocity = ((x.float() - self.predicted_clean_image(state, sigma)) / sigma).to(x.dtype)
        return Transformer2DModelOutput(sample=velocity) if inputs.get("return_dict", True) else (velocity,)


def apply_clean_image_cache(module: torch.nn.Module, config: CleanImageCacheConfig) -> None:
    """Register the hook on the transformer `module` (what `enable_cache(CleanImageCacheConfig(...))` does)."""
    HookRegistry.check_if_exists_or_initialize(module).register_hook(
        CleanImageCacheHook(config), CLEAN_IMAGE_CACHE_HOOK
    )


class CleanImageCacheMixin(CacheMixin):
    """diffusers' `CacheMixin` (`enable_cache`, `disable_cache`, `cache_context`) that also takes
    `CleanImageCacheConfig`."""

    def enable_cache(self, config) -> None:
        if not isinstance(config, CleanImageCacheConfig):
            return super().enable_cache(config)
        if self.is_cache_enabled:
            raise ValueError(f"Caching has already been enabled with {type(self._cache_config)}. To apply a new "
                             "caching technique, please disable the existing one first.")
        apply_clean_image_cache(self, config)
        self._cache_config = config

    def disable_cache(self) -> None:
        if not isinstance(self._cache_config, CleanImageCacheConfig):
            return super().disable_cache()
        HookRegistry.check_if_exists_or_initialize(self).remove_hook(CLEAN_IMAGE_CACHE_HOOK, recurse=False)
        self._cache_config = None

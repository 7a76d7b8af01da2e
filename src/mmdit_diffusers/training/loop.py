"""The accelerate training loop.

Order of work (every check that can fail comes before the first step):
    1. resume path, data source (folder / dataset checks, every image opened), then the Accelerator;
    2. the starting pipeline; the transformer (the pipeline's, or new from `--model_config`); resolution and text
       length checks; LoRA adapters; precision; gradient checkpointing;
    3. caches (latents, text embeddings), dataset and the resumable sampler;
    4. the optimizer (`--optimizer`) + LR schedule, `accelerator.prepare`, EMA and the training generator
       registered for checkpointing, `load_state` when resuming;
    5. steps: accumulate -> loss (summed on the device) -> backward; at the last micro-batch of an optimizer step:
       clip -> one host sync (the step's loss and whether loss and gradient norm are finite, summed over the
       processes) -> optimizer/scheduler step; then EMA, logs (loss, lr, grad_norm, steps_per_s, images_per_s),
       checkpoint every `--checkpointing_steps`, validation every `--validation_steps`;
    6. export (pipeline folder or LoRA weights, written beside and swapped in), final validation grid; `train`
       returns a `TrainResult` whose card data and sample images the command line writes into the model card (and
       pushes, if asked).

The run owns its output folder (`run_folder`): after the Accelerator, the main process takes the folder's lock and
checks that the folder holds no other run's checkpoints or model (or `--overwrite_output_dir`, or a resume of the
same run) before anything is written there.

Randomness: everything random in a step (the VAE latent sample, the noise, sigma, caption dropout) comes from
one `torch.Generator` (`TrainingRNG`) drawn for the *global* batch on every process, each process keeping its
rows. All processes therefore hold the same generator state, the checkpoint stores it, and a resumed run draws
exactly what an uninterrupted run would have drawn. The data order is a pure function of (seed, micro-batch)
(`data.ResumableBatchSampler`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from argparse import Namespace
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..files import is_missing_local_path, write_text_atomically
from ..pipelines.latents import vae_scale_factor
from . import buckets, checkpointing, data, distributed, optimizers, run_folder, sources
from .flow_matching import (
    flow_matching_loss,
    loss_weighting,
    noisy_latents,
    sample_sigmas,
    sigmas_to_timesteps,
    velocity_target,
)
from .text import PromptEncoder

logger = logging.getLogger("mmdit_diffusers.train")


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm stopped being finite. The run stops before the optimizer applies the
    step, saves nothing more, and the latest checkpoint (the last good state) stays as it was. The CLI
    prints `error: <message>` and exits with status 1."""


@dataclass
class TrainResult:
    """What a finished run leaves (on the main process; the other processes get the same numbers).

    `output_dir`: the trained pipeline folder or LoRA weights; `card_data`: the model card fields of the run
    (`mmdit_diffusers.hub.write_model_card(output_dir, card_data=..., sample_images=...)`); `sample_images`:
    `(prompts, png path)` of the final validation grid, if any; `ignore_patterns`: the run's own files in
    `output_dir` (checkpoints, logs) to leave out of an upload; `global_step`, `max_train_steps`, `seed`, `losses`
    (one per optimizer step of this process's run) and, for LoRA, `lora_weights`."""

    output_dir: str
    card_data: dict
    sample_images: list[tuple[str, str]] = field(default_factory=list)
    ignore_patterns: list[str] = field(default_factory=list)
    global_step: int = 0
    max_train_steps: int = 0
    seed: int | None = None
    losses: list[float] = field(default_factory=list)
    lora_weights: str | None = None


class TrainingRNG:
    """The step's generator. Draws are made for the global batch (`num_processes * batch` rows) and each
    process keeps rows [rank * batch, (rank + 1) * batch), so the state is the same everywhere."""

    def __init__(self, seed: int, device, num_processes: int = 1, process_index: int = 0):
        self.generator = torch.Generator(device=device).manual_seed(int(seed))
        self.device = torch.device(device)
        self.num_processes, self.process_index = num_processes, process_index

    def _rows(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x[self.process_index * batch: (self.process_index + 1) * batch]

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        batch = shape[0]
        full = torch.randn((self.num_processes * batch, *shape[1:]), generator=self.generator, device=self.device, dtype=dtype)
        return self._rows(full, batch)

    def rand(self, shape) -> torch.Tensor:
        batch = shape[0]
        full = torch.rand((self.num_processes * batch, *shape[1:]), generator=self.generator, device=self.device)
        return self._rows(full, batch)

    def sigmas(self, batch: int, args, shift: float) -> torch.Tensor:
        full = sample_sigmas(self.num_processes * batch, args.weighting_scheme, args.logit_mean, args.logit_std,
                             args.mode_scale, shift, generator=self.generator, device=self.device)
        return self._rows(full, batch)

    def caption_drop(self, batch: int, num_encoders: int, each: float, every: float = 0.0) -> torch.Tensor | None:
        """[batch, num_encoders] True where an encoder sees "": each encoder on its own with probability `each`,
        all of them together (the unconditional input of classifier-free guidance) with probability `every`."""
        drop = None
        if each > 0:
            drop = self.rand((batch, num_encoders)) < each
        if every > 0:
            drop_all = (self.rand((batch, 1)) < every).expand(batch, num_encoders)
            drop = drop_all if drop is None else drop | drop_all
        return drop

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------------------
# Model set-up
# ----------------------------------------------------------------------------------------------------------
def _pipeline_cls():
    try:
        from ..pipelines import MMDiTPipeline
    except ImportError as e:  # pragma: no cover - the pipeline ships with the package
        raise InputError(f"MMDiTPipeline is not available: {e}") from None
    return MMDiTPipeline


def load_pipeline(args):
    """The starting pipeline (its transformer is skipped when --model_config builds a new one)."""
    path = args.pretrained_model_name_or_path
    if is_missing_local_path(path):
        raise InputError(f"--pretrained_model_name_or_path {path!r}: no such folder (nor a Hub repo id).")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise InputError(f"--pretrained_model_name_or_path {path!r} is not a pipeline folder (no model_index.json).")
    kwargs = {k: getattr(args, k) for k in ("revision", "variant") if getattr(args, k)}
    if args.model_config:
        kwargs["transformer"] = None
    try:
        pipe = _pipeline_cls().from_pretrained(path, **kwargs)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"could not load the pipeline {path!r}: {type(e).__name__}: {e}") from None
    if pipe.vae is None:
        raise InputError(f"the pipeline {path!r} has no VAE.")
    return pipe


def parse_model_config(value: str) -> tuple[str | None, dict]:
    """A preset name, a JSON object (optionally with "preset"), or a .json file -> (preset, overrides)."""
    from ..models.presets import PRESETS

    text = value.strip()
    if text in PRESETS:
        return text, {}
    if text.endswith(".json") and os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(
            f"--model_config {value!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a JSON object / .json file."
        ) from None
    if not isinstance(overrides, dict):
        raise InputError(f"--model_config must be a JSON object, got {type(overrides).__name__}.")
    preset = overrides.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise InputError(f"--model_config preset {preset!r} is unknown; expected one of {sorted(PRESETS)}.")
    return preset, overrides


def build_new_transformer(args, vae, text_shape: tuple[int, int, int], latent_side: int,
                          largest_latent_side: int | None = None):
    """A new transformer from --model_config; I/O sizes from the VAE and the encoded text; its position grid
    covers `largest_latent_side` (aspect-ratio buckets; default `latent_side`)."""
    from ..models.transformer_mmdit import MMDiTTransformer2DModel

    preset, overrides = parse_model_config(args.model_config)
    config = MMDiTTransformer2DModel.recommended_defaults() if preset is None else {}
    if preset is not None:
        from ..models.presets import PRESETS

        config.update(PRESETS[preset])
    config.update(overrides)
    seq_len, txt_dim, cond_dim = text_shape
    patch = int(config.get("patch_size", 2))
    channels = int(vae.config.latent_channels)
    io = dict(in_channels=channels, img_dim=channels * patch * patch, txt_dim=txt_dim, cond_dim=cond_dim)
    for key, value in io.items():
        if key in overrides and overrides[key] != value:
            raise InputError(
                f"--model_config sets {key}={overrides[key]}, but the pipeline's "
                f"{'VAE' if key in ('in_channels', 'img_dim') else 'text encoders'} give {value}."
            )
    config.update(io)
    config.pop("out_channels", None)
    grid = max(1, latent_side // patch)
    config.setdefault("use_text_attention_mask", True)
    if "img_tokens" not in overrides:
        config["img_tokens"] = grid * grid
    if "txt_tokens" not in overrides:
        config["txt_tokens"] = max(int(config.get("txt_tokens", 0)), seq_len)
    if "sample_size" not in overrides:
        config["sample_size"] = latent_side
    if "pos_embed_max_size" not in overrides and config.get("pos_embed_type") != "rope":  # RoPE has no grid limit
        config["pos_embed_max_size"] = max(int(config.get("pos_embed_max_size") or 0), grid,
                                           (largest_latent_side or 0) // patch)
    try:
        return MMDiTTransformer2DModel(**config)
    except (TypeError, ValueError) as e:
        raise InputError(f"--model_config: {e}") from None


def check_resolution(resolution: int, vae, transformer) -> int:
    """Resolution must give a whole number of patches and fit the position grid; returns the latent side."""
    scale = vae_scale_factor(vae)
    patch = transformer.config.patch_size
    if resolution % (scale * patch):
        raise InputError(
            f"--resolution {resolution} is not divisible by the VAE scale factor x patch size = {scale} x {patch} = "
            f"{scale * patch}; try {max(scale * patch, resolution // (scale * patch) * scale * patch)}."
        )
    side = resolution // scale
    if transformer.pos_grid_size is None:  # rotary positions: any size
        return side
    limit = transformer.pos_grid_size * patch
    if side > limit:
        raise InputError(
            f"--resolution {resolution} gives {side}x{side} latents, larger than the transformer's position grid "
            f"({transformer.pos_grid_size} patches of {patch} = {limit} latent pixels, {limit * scale} image pixels)."
        )
    return side


def check_text(transformer, text_shape) -> None:
    seq_len, txt_dim, cond_dim = text_shape
    cfg = transformer.config
    if txt_dim != cfg.txt_dim:
        raise InputError(f"the text encoders give {txt_dim}-wide tokens; the transformer expects txt_dim={cfg.txt_dim}.")
    expected = transformer.resolved_config["cond_dim"]
    if cond_dim != expected:
        raise InputError(f"the pooled text is {cond_dim} wide; the transformer expects cond_dim={expected}.")
    if seq_len > cfg.txt_tokens:
        raise InputError(
            f"captions encode to {seq_len} text tokens, more than the transformer's txt_tokens={cfg.txt_tokens}; "
            f"lower --max_sequence_length."
        )


def add_lora(transformer, args) -> None:
    from peft import LoraConfig

    targets = [t.strip() for t in args.lora_layers.split(",") if t.strip()]
    names = {name.split(".", i)[-1] for name, _ in transformer.named_modules() for i in range(name.count(".") + 1)}
    unknown = [t for t in targets if t not in names]
    if unknown or not targets:
        raise InputError(f"--lora_layers {unknown or targets} match no module of the transformer.")
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian", target_modules=targets)
    )


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def _resolve_seed(args, resume_state, accelerator) -> int:
    from accelerate.utils import broadcast_object_list

    if args.seed is not None:
        if resume_state and resume_state.get("seed") not in (None, args.seed):
            logger.warning(f"--seed {args.seed} differs from the checkpoint's seed {resume_state['seed']}; the data "
                           "order after resuming will differ from the original run.")
        return int(args.seed)
    if resume_state and resume_state.get("seed") is not None:
        return int(resume_state["seed"])
    seed = [random.SystemRandom().randrange(2**31)]
    if accelerator.num_processes > 1:
        broadcast_object_list(seed)
    return int(seed[0])


@contextlib.contextmanager
def _quiet_logging(is_local_main: bool):
    """Training-time log levels (ours INFO on the local main process; libraries WARNING, no loading bars),
    restored afterwards so an in-process run leaves the caller's logging as it was."""
    import diffusers
    import transformers

    d_log, t_log = diffusers.utils.logging, transformers.utils.logging
    saved = (d_log.get_verbosity(), t_log.get_verbosity(), d_log.is_progress_bar_enabled(),
             t_log.is_progress_bar_enabled(), logger.level, logging.getLogger("accelerate").level)
    added_handler = None
    if not logger.handlers and not logging.getLogger().handlers:
        added_handler = logging.StreamHandler()
        added_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(added_handler)
    verbose = bool(os.environ.get("MMDIT_TRAIN_VERBOSE"))
    logging.getLogger("accelerate").setLevel(logging.INFO if verbose and is_local_main else logging.WARNING)
    logger.setLevel(logging.INFO if is_local_main else logging.ERROR)
    d_log.set_verbosity(d_log.INFO if verbose and is_local_main else d_log.ERROR)
    t_log.set_verbosity(t_log.WARNING if is_local_main else t_log.ERROR)
    d_log.disable_progress_bar()
    t_log.disable_progress_bar()
    try:
        yield
    finally:
        d_log.set_verbosity(saved[0])
        t_log.set_verbosity(saved[1])
        (d_log.enable_progress_bar if saved[2] else d_log.disable_progress_bar)()
        (t_log.enable_progress_bar if saved[3] else t_log.disable_progress_bar)()
        logger.setLevel(saved[4])
        logging.getLogger("accelerate").setLevel(saved[5])
        if added_handler is not None:
            logger.removeHandler(added_handler)


def _to(module, device, dtype=None):
    """Move (and cast only when needed: diffusers warns about casts to the same dtype)."""
    current = next(module.parameters(), None)
    if dtype is None or current is None or current.dtype == dtype:
        return module.to(device)
    return module.to(device, dtype=dtype)


def train(args: Namespace) -> TrainResult:
    """Run the training described by `args` (from `args.parse_args`): the model in `args.output_dir`.

    Writes no model card and pushes nothing; the returned `TrainResult` holds what the card should say.
    Raises `InputError` for bad input (before any step) and `TrainingDivergedError` for a non-finite loss."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = os.path.abspath(args.output_dir)
    run_folder.stop_with_launcher()

    # 1. cheap checks --------------------------------------------------------------------------------------
    resume_path = checkpointing.resolve_resume(args.resume_from_checkpoint, output_dir)
    resume_state = checkpointing.read_state(resume_path) if resume_path else None
    if resume_state:
        for key in ("use_lora", "use_ema"):
            if key in resume_state and bool(resume_state[key]) != bool(getattr(args, key)):
                raise InputError(
                    f"checkpoint {resume_path} does not match this run: it was saved with --{key} "
                    f"{'on' if resume_state[key] else 'off'}, and this run has it {'on' if getattr(args, key) else 'off'}."
                )
        if resume_state.get("optimizer", "adamw") != args.optimizer:
            raise InputError(f"checkpoint {resume_path} does not match this run: it was saved with --optimizer "
                             f"{resume_state.get('optimizer', 'adamw')}, and this run has --optimizer {args.optimizer}.")
    source = sources.load_source(args)

    ddp_kwargs = DistributedDataParallelKwargs()
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=args.report_to,
            project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, args.logging_dir)),
            kwargs_handlers=[ddp_kwargs],
        )
    except ValueError as e:  # accelerate's refusals of the options (e.g. fp16 without a GPU)
        raise InputError(f"accelerate cannot run with --mixed_precision {args.mixed_precision} / --report_to "
                         f"{args.report_to}: {e}") from None
    _check_all_processes_joined(accelerator)
    args.mixed_precision = accelerator.mixed_precision  # the precision in effect (model card, trackers)
    fsdp = distributed.resolve_fsdp(accelerator)
    with _quiet_logging(accelerator.is_local_main_process):
        claimed = []  # the main process's claim on output_dir (run id, lock); a refusal is raised on every process
        _on_main_or_raise(accelerator, lambda: claimed.append(
            run_folder.claim(output_dir, args, resume_path, resume_state)))
        try:
            return _train(args, accelerator, ddp_kwargs, output_dir, resume_path, resume_state, source, fsdp,
                          claimed[0].run_id if claimed else None)
        finally:
            accelerator.end_training()  # flush and close the trackers, also after an error
            if claimed:
                claimed[0].release()


def _check_all_processes_joined(accelerator) -> None:
    """A launcher that started several processes must get one distributed run, not that many copies of a run.

    On a machine without GPUs, `accelerate launch --multi_gpu` starts the processes but accelerate leaves each
    of them alone unless ACCELERATE_USE_CPU=1: they would all train the same model into the same output_dir.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise InputError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate runs each on its own "
            "(no GPU found). To train on CPUs with torch.distributed (gloo), set ACCELERATE_USE_CPU=1 for "
            "`accelerate launch --multi_gpu`."
        )


def _train(args, accelerator, ddp_kwargs, output_dir, resume_path, resume_state, source, fsdp, run_id) -> TrainResult:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    seed = _resolve_seed(args, resume_state, accelerator)
    args.seed = seed
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    optimizers.check(args.optimizer, device)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info(f"No checkpoint in {output_dir}; starting a new run.")
    sampler = sources.make_sampler(args, source, seed, world, rank)  # bucketed in section 3 (needs the model)
    if args.push_to_hub:
        _on_main_or_raise(accelerator, lambda: _create_hub_repo(args))

    # 2. models ---------------------------------------------------------------------------------------------
    with accelerator.main_process_first():
        pipe = load_pipeline(args)
    vae = pipe.vae
    prompt_encoder = PromptEncoder(pipe, args.max_sequence_length, device="cpu")  # `prepare` moves it to `device`
    text_shape = prompt_encoder.probe_shape(source.caption(0))

    torch.manual_seed(seed)  # initialisation of a new transformer / LoRA weights
    if args.model_config:
        latent_side = args.resolution // vae_scale_factor(vae)
        largest = buckets.largest_side(args.aspect_ratio_buckets, args.resolution) // vae_scale_factor(vae)
        transformer = build_new_transformer(args, vae, text_shape, latent_side, largest)
        pipe.transformer = transformer
    else:
        transformer = pipe.transformer
        if transformer is None:
            raise InputError(f"{args.pretrained_model_name_or_path!r} has no transformer; pass --model_config "
                                      "to train one from scratch.")
    latent_side = check_resolution(args.resolution, vae, transformer)
    check_text(transformer, text_shape)
    use_mask = bool(getattr(transformer.config, "use_text_attention_mask", False))
    # FLUX.1 [dev]-style guidance embedding: fed a constant (--guidance_scale), as diffusers' FLUX scripts
    guidance_value = args.guidance_scale if transformer.config.get("guidance_embeds", False) else None
    prompt_encoder.resolve_length()
    ddp_kwargs.find_unused_parameters = not transformer.config.txt_pre_only_last_block

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.requires_grad_(False)
    _to(vae, device, torch.float32)  # the VAE stays in float32 (cheap; fp16 VAEs overflow)
    prompt_encoder.prepare(device, weight_dtype)
    if device.type == "cpu" and torch.bfloat16 in (weight_dtype, transformer.dtype):
        from ..cpu_bf16 import cpu_has_bf16_instructions, use_fp32_kernels_for_bf16

        if not cpu_has_bf16_instructions():  # PyTorch's generic bfloat16 kernels are ~8x slower there
            transformer = use_fp32_kernels_for_bf16(transformer)
            pipe.transformer = transformer
    if args.use_lora:
        add_lora(transformer, args)
        _to(transformer, device, weight_dtype)
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        transformer.requires_grad_(True)
        _to(transformer, device, torch.float32)
    transformer.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]

    # 3. caches and data -----------------------------------------------------------------------------------
    latent_cache = text_cache = None
    validation_embeddings = None
    cache_root = os.path.abspath(args.embeddings_cache_dir or os.path.join(output_dir, "cache"))
    if args.cache_latents:
        latent_cache = data.build_latent_cache(source, vae, args.resolution, args.random_flip, accelerator, cache_root)
        if not args.validation_prompt:
            vae.to("cpu")
    if args.cache_text_embeddings:
        captions = [source.caption(i) for i in range(len(source))]
        text_cache = prompt_encoder.build_cache(captions, accelerator, cache_root)
        if args.validation_prompt:
            validation_embeddings = prompt_encoder.pipeline_kwargs(args.validation_prompt)
        prompt_encoder.free()
    dataset = data.TrainDataset(source, args.resolution, latent_cache, text_cache, args.random_crop)
    if args.aspect_ratio_buckets:
        sampler = sources.make_sampler(args, source, seed, world, rank,
                                    buckets.prepare_buckets(args, source, vae_scale_factor(vae), transformer))
    micro_per_epoch = sampler.batches_per_epoch  # None: a stream
    max_train_steps = args.max_train_steps or math.ceil(
        args.num_train_epochs * micro_per_epoch / args.gradient_accumulation_steps)

    # 4. optimizer, schedule, prepare, resume -------------------------------------------------------------
    lr = args.learning_rate * (args.train_batch_size * args.gradient_accumulation_steps * world if args.scale_lr else 1)
    optimizer = optimizers.create(args, params, lr, fsdp)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=max_train_steps * world,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    if fsdp:
        distributed.wrap_blocks(accelerator, transformer)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    model = accelerator.unwrap_model(transformer)
    if fsdp:  # the parameters are now DTensor shards
        params = [p for p in transformer.parameters() if p.requires_grad]
        logger.info(distributed.describe_sharding(transformer))

    ema = None
    if args.use_ema:
        ema = EMAModel(params, decay=args.ema_decay, model_cls=type(model), model_config=model.config)
        ema.to(device)
        if fsdp:
            names = [n for n, p in transformer.named_parameters() if p.requires_grad]
            distributed.register_sharded_ema(accelerator, ema, names)
        else:
            accelerator.register_for_checkpointing(ema)
    rng = TrainingRNG(seed, device, world, rank)
    accelerator.register_for_checkpointing(rng)
    if args.use_lora and not fsdp:
        _register_lora_state_hooks(accelerator)

    global_step = 0
    if resume_path:
        logger.info(f"Resuming from {resume_path}.")
        try:
            accelerator.load_state(resume_path)
        except Exception as e:
            damage = checkpointing.damaged_files(resume_path)
            if damage:
                others = [os.path.basename(p) for _, p in checkpointing.list_checkpoints(output_dir)
                          if os.path.abspath(p) != os.path.abspath(resume_path)]
                raise InputError(
                    f"checkpoint {resume_path} is damaged: {'; '.join(damage)}. Resume from another checkpoint "
                    f"({', '.join(others) or f'none in {output_dir}'}) or start again."
                ) from None
            raise InputError(
                f"checkpoint {resume_path} does not match this run ({type(e).__name__}: {e}); resume with the same "
                "model, LoRA and EMA options it was saved with."
            ) from None
        global_step = int(resume_state["global_step"])
        if ema is not None:
            ema.to(device)
        saved = (resume_state.get("train_batch_size"), resume_state.get("num_processes"),
                 resume_state.get("gradient_accumulation_steps"))
        if saved != (args.train_batch_size, world, args.gradient_accumulation_steps):
            logger.warning(f"batch geometry changed since the checkpoint ({saved} -> {(args.train_batch_size, world, args.gradient_accumulation_steps)}); "
                           "the data position is approximate.")
    sampler.start = global_step * args.gradient_accumulation_steps

    if accelerator.is_main_process and args.report_to:
        from .args import args_to_config

        accelerator.init_trackers(args.tracker_project_name, config=args_to_config(args))

    shift = args.resolution_shift
    if shift == "scheduler":
        shift = float(getattr(pipe.scheduler.config, "shift", 1.0))

    def state_for_checkpoint(step: int) -> dict:
        return {"run_id": run_id, "optimizer": args.optimizer, "seed": seed,
                "micro_batch": step * args.gradient_accumulation_steps, "train_batch_size": args.train_batch_size, "num_processes": world,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "max_train_steps": max_train_steps, "use_lora": bool(args.use_lora), "use_ema": bool(args.use_ema)}

    def validate(name: str, step: int) -> str | None:
        if not args.validation_prompt:
            return None
        if not (accelerator.is_main_process or fsdp):
            return None
        from ..pipelines import MMDiTFluxPipeline
        from .validation import generate_rows, grid_of_rows, log_grid, save_grid

        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        was_training = model.training
        model.eval()
        pipe.transformer = transformer if fsdp else model
        # FLUX pipelines: `guidance_scale` is the distilled guidance (the value trained with), CFG is `true_cfg_scale`
        flux = isinstance(pipe, MMDiTFluxPipeline)
        guidance_scale = args.guidance_scale if flux else args.validation_guidance_scale
        try:
            rows = generate_rows(pipe, args.validation_prompt, args.num_validation_images, args.resolution,
                                 args.validation_inference_steps, guidance_scale, seed, device,
                                 validation_embeddings, prompt_encoder.max_sequence_length,
                                 true_cfg_scale=args.validation_guidance_scale if flux else None)
        finally:
            model.train(was_training)
            if ema is not None:
                ema.restore(params)
        if not accelerator.is_main_process:
            return None
        grid = grid_of_rows(rows)
        path = save_grid(grid, output_dir, name)
        log_grid(accelerator, grid, step, args.validation_prompt)
        logger.info(f"Validation images: {path}")
        return path

    # 5. steps ----------------------------------------------------------------------------------------------
    logger.info(f"{data.num_examples(source) or 'Streamed'} examples, {micro_per_epoch or 'endless'} micro-batches per "
                f"epoch, batch {args.train_batch_size} x "
                f"{args.gradient_accumulation_steps} accumulation x {world} processes; {max_train_steps} steps "
                f"({'LoRA rank %d' % args.rank if args.use_lora else 'full'}), starting at step {global_step}.")
    progress = tqdm(total=max_train_steps, initial=global_step, desc="steps", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    last_checkpoint = checkpointing.latest_checkpoint(output_dir)
    losses: list[float] = []
    images_per_step = args.train_batch_size * args.gradient_accumulation_steps * world

    def run_steps(global_step: int) -> int:
        nonlocal last_checkpoint
        if global_step >= max_train_steps:
            return global_step
        loss_sum = torch.zeros((), device=device)  # this process's losses since the last optimizer step
        micro_batches = 0
        step_started = time.perf_counter()

        loader = data.make_dataloader(dataset, sampler, args.dataloader_num_workers)
        for batch in loader:
            with accelerator.accumulate(transformer):
                loss = _compute_loss(batch, transformer, vae, prompt_encoder, rng, args, shift, use_mask, device,
                                     guidance_value)
                loss_sum += loss.detach().float()
                micro_batches += 1
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:  # the last micro-batch: check before the optimizer applies the step
                    if args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    step_loss = _checked_step_loss(accelerator, loss_sum, micro_batches, grad_norm,
                                                   f"at step {global_step + 1} (of {max_train_steps})",
                                                   _last_good(last_checkpoint))
                    loss_sum.zero_()
                    micro_batches = 0
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.step(params)
            losses.append(step_loss)
            steps_per_s = 1.0 / max(time.perf_counter() - step_started, 1e-9)
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "steps_per_s": steps_per_s,
                    "images_per_s": steps_per_s * images_per_step}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0:
                last_checkpoint = checkpointing.save_checkpoint(
                    accelerator, output_dir, global_step, state_for_checkpoint(global_step), args.checkpoints_total_limit)
                logger.info(f"Saved {last_checkpoint}")
            if args.validation_prompt and global_step % args.validation_steps == 0 and global_step < max_train_steps:
                validate(f"step-{global_step:06d}", global_step)
            if global_step >= max_train_steps:
                break
            step_started = time.perf_counter()  # the next step's time leaves out checkpoints and validation
        return global_step

    try:
        global_step = run_steps(global_step)
    finally:
        progress.close()

    # 6. export ---------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    from . import export

    result = TrainResult(output_dir=output_dir, card_data=export.card_data(args, global_step, data.num_examples(source) or "streamed", world),
                         ignore_patterns=list(export.RUN_FILES), global_step=global_step,
                         max_train_steps=max_train_steps, seed=seed, losses=losses)
    final_grid = validate("final", global_step)
    if final_grid:
        result.sample_images = [(" | ".join(args.validation_prompt), final_grid)]
    if ema is not None:
        ema.copy_to(params)
    final_model = model
    if fsdp:  # gather the shards (a collective: every process takes part), export a plain copy
        final_model = distributed.gathered_transformer(
            accelerator, transformer, model, (lambda copy: add_lora(copy, args)) if args.use_lora else None)
    if accelerator.is_main_process:
        if args.use_lora:
            result.lora_weights = export.save_lora(final_model, output_dir)
        else:
            export.save_full_pipeline(args, final_model, output_dir)
        summary = {"global_step": global_step, "max_train_steps": max_train_steps, "output_dir": output_dir,
                   "seed": seed, "lora_weights": result.lora_weights, "final_loss": losses[-1] if losses else None}
        write_text_atomically(os.path.join(output_dir, "training_summary.json"), json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return result


def _on_main_or_raise(accelerator, check) -> None:
    """Run `check` on the main process only; whatever it raises is raised on every process (the others would
    otherwise wait for the main one at the next collective): an `InputError` as itself everywhere, any other
    exception as itself on the main process and as a `RuntimeError` that names it on the others."""
    from accelerate.utils import broadcast_object_list

    message, error = [None], None
    if accelerator.is_main_process:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = e
            kind = "InputError" if isinstance(e, InputError) else type(e).__name__
            message = [(kind, str(e))]
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if error is not None:
        raise error
    if message[0] is not None:
        kind, text = message[0]
        if kind == "InputError":
            raise InputError(text)
        raise RuntimeError(f"The main process failed before training ({kind}: {text}); this process stops too.")


def _create_hub_repo(args) -> None:
    """Create the Hub repository before training, so a missing token or a name clash fails at once."""
    from huggingface_hub import create_repo

    try:
        args.hub_model_id = create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private or None).repo_id
    except Exception as e:
        raise InputError(
            f"--push_to_hub: cannot create or reach the repository {args.hub_model_id!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); log in with `hf auth login` or set HF_TOKEN."
        ) from None


def _checked_step_loss(accelerator, loss_sum, micro_batches: int, grad_norm, where: str, last_good: str) -> float:
    """The optimizer step's loss (mean over micro-batches and processes) after its one host sync, which also
    decides on every process whether the loss and the gradient norm are finite; `TrainingDivergedError` if not
    (before the update). The gradient norm is not checked under fp16, whose gradient scaler skips such steps."""
    bad_loss = (~torch.isfinite(loss_sum)).float()
    if grad_norm is not None and accelerator.mixed_precision != "fp16":
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; the same norm on every process as a plain tensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = torch.as_tensor(grad_norm, device=loss_sum.device, dtype=torch.float32)
        bad_grad = (~torch.isfinite(grad_norm)).float()
    else:
        bad_grad = torch.zeros_like(bad_loss)
    stats = torch.stack([loss_sum, bad_loss, bad_grad])
    if accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, reduction="sum")
    total, any_bad_loss, any_bad_grad = stats.tolist()
    mean = total / (micro_batches * accelerator.num_processes)  # every process runs the same number of micro-batches
    if any_bad_loss or any_bad_grad:
        what = f"the loss is {mean}" if any_bad_loss else f"the gradient norm is {float(grad_norm)}"
        raise TrainingDivergedError(f"{what} {where}; training stopped before the update and saved nothing. {last_good}")
    return mean


def _last_good(path: str | None) -> str:
    if not path:
        return "No checkpoint was saved before it; lower --learning_rate or check the data and start again."
    return (f"The latest checkpoint, saved while the loss was finite, is {path} (kept as it was); lower "
            "--learning_rate or check the data, then --resume_from_checkpoint it (or an earlier one if it "
            "diverges again).")


def _compute_loss(batch, transformer, vae, prompt_encoder, rng: TrainingRNG, args, shift, use_mask, device,
                  guidance_value: float | None = None):
    with torch.no_grad():
        if "latent_params" in batch:
            params = batch["latent_params"].to(device)
        else:
            params = data.encode_latent_params(vae, batch["pixel_values"].to(device))
        x0 = data.sample_latents(params, vae, rng.randn, mode=args.vae_latent == "mode")
        bsz = x0.shape[0]
        noise = rng.randn(x0.shape)
        sigmas = rng.sigmas(bsz, args, shift)
        drop = rng.caption_drop(bsz, prompt_encoder.num_encoders, args.caption_dropout_prob,
                                args.caption_dropout_all_prob)
        text = prompt_encoder.from_batch(batch, drop)
        x_t = noisy_latents(x0, noise, sigmas)
        target = velocity_target(x0, noise)
    pred = transformer(
        hidden_states=x_t,
        encoder_hidden_states=text.embeds,
        pooled_projections=text.pooled,
        timestep=sigmas_to_timesteps(sigmas),
        encoder_attention_mask=text.mask if use_mask else None,
        return_dict=False,
        **({} if guidance_value is None else {"guidance": torch.full((bsz,), guidance_value, device=device)}),
    )[0]
    return flow_matching_loss(pred, target, loss_weighting(args.weighting_scheme, sigmas))


def _register_lora_state_hooks(accelerator) -> None:
    """Checkpoints of a LoRA run hold the adapter weights only (`transformer_lora.safetensors`), not the
    frozen base model."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    name = "transformer_lora.safetensors"

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                state = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(output_dir, name))
        weights.clear()

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (was the checkpoint saved by a LoRA run?)")
        while models:
            model = accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, load_file(path))
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"unexpected LoRA keys in {path}: {unexpected[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

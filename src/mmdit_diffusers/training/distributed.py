"""FSDP2 (`torch.distributed.fsdp.fully_shard`) runs of the trainer, on GPUs and on CPUs.

On GPUs accelerate does everything: `accelerate launch --config_file configs/accelerate_fsdp.yaml` sets
`ACCELERATE_USE_FSDP=true` and the `FSDP_*` variables, `Accelerator()` builds the FSDP plugin from them, and
`accelerator.prepare` shards the transformer. This module adds what the trainer needs on top:

- `resolve_fsdp`: on CPUs (`ACCELERATE_USE_CPU=1`) accelerate never selects FSDP and would quietly run DDP. With
  `MMDIT_FSDP_ON_CPU=1` the trainer selects it itself, so the same accelerate FSDP2 code (`fully_shard` over gloo,
  sharded `save_state` / `load_state` through torch.distributed.checkpoint, the gathered export) runs on a CPU
  machine: that is what the tests exercise. Without the switch, a run whose accelerate config asks for FSDP but
  did not get it stops with an `InputError` that names both ways out.
- `wrap_blocks`: auto-wrap of the transformer's blocks by its `_no_split_modules` (`MMDiTBlock`,
  `SingleStreamBlock`), keeping only the classes the model has (accelerate refuses names it cannot find, and a
  dual-stream-only model has no `SingleStreamBlock`); `describe_sharding` logs what `fully_shard` made of it.
- `register_sharded_ema`: the EMA of an FSDP run is the EMA of each process's shards (its shadow parameters are
  DTensors like the parameters); checkpoints save and load it with torch.distributed.checkpoint, each process
  its own shards. accelerate's `register_for_checkpointing` would pickle the main process's shards only.
- `gathered_transformer`: the export gathers the full weights (a collective) into a plain, unsharded copy.
"""

from __future__ import annotations

import os

from ..errors import InputError

FSDP_ON_CPU_ENV = "MMDIT_FSDP_ON_CPU"
EMA_FOLDER = "ema_sharded"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """The accelerate config (or `accelerate launch --use_fsdp`) asks for FSDP."""
    return _flag("ACCELERATE_USE_FSDP")


def resolve_fsdp(accelerator) -> bool:
    """Whether this run is FSDP; selects FSDP2 on CPUs when `MMDIT_FSDP_ON_CPU=1`. Call right after `Accelerator()`.

    Raises `InputError` when the accelerate config asks for FSDP and the run would silently be something else."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    requested, on_cpu = fsdp_requested(), _flag(FSDP_ON_CPU_ENV)
    got = state.distributed_type.value
    if not requested:
        if on_cpu:
            raise InputError(
                f"{FSDP_ON_CPU_ENV}=1 shards the run of an accelerate FSDP config, but this launch has none "
                "(ACCELERATE_USE_FSDP is not set); launch with `--config_file configs/accelerate_fsdp.yaml`."
            )
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise InputError(
            f"the accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true) but accelerate runs this as {got} with "
            f"{accelerator.num_processes} process(es); FSDP needs several processes joined by `accelerate launch` "
            "(on CPUs: ACCELERATE_USE_CPU=1 and --num_processes 2 or more)."
        )
    if not on_cpu:
        raise InputError(
            "the accelerate config asks for FSDP (distributed_type: FSDP) but accelerate runs it on CPUs as DDP "
            f"({got}): every process would hold the whole model. Set {FSDP_ON_CPU_ENV}=1 to shard it on CPUs with "
            "FSDP2 over gloo, or launch with `--multi_gpu` (no FSDP config) to train with DDP."
        )
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as accelerate builds it on GPUs
    if plugin.fsdp_version != 2:
        raise InputError(f"{FSDP_ON_CPU_ENV}=1 shards with FSDP2 only; set `fsdp_version: 2` in the accelerate "
                         f"config (it has {plugin.fsdp_version}).")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # accelerate picks DistributedType.FSDP only for accelerators; everything downstream of the choice
    # (prepare -> fully_shard, save_state / load_state, get_state_dict, clip_grad_norm_) is device-agnostic.
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def wrap_blocks(accelerator, transformer) -> None:
    """Auto-wrap the transformer's own block classes (its `_no_split_modules` that it has) unless the accelerate
    config names the classes itself (`fsdp_transformer_layer_cls_to_wrap`)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy or plugin.transformer_cls_names_to_wrap:
        return
    present = {type(m).__name__ for m in transformer.modules()}
    plugin.transformer_cls_names_to_wrap = [n for n in getattr(transformer, "_no_split_modules", None) or []
                                            if n in present]


def describe_sharding(transformer) -> str:
    """One log line: the `fully_shard` units, how many parameters are DTensors sharded (`Shard` placements) over
    how many processes, and how much of the model this process holds."""
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    units = Counter(type(m).__name__.removeprefix("FSDP") for m in transformer.modules()
                    if isinstance(m, FSDPModule) and m is not transformer)
    params = list(transformer.parameters())
    sharded = [p for p in params if isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)]
    processes = sharded[0].device_mesh.size() if sharded else 1
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    wrapped = ", ".join(f"{n} {name}" for name, n in sorted(units.items())) or "none"
    return (f"FSDP2: {len(sharded)} of {len(params)} parameter tensors are DTensors sharded over {processes} "
            f"processes (units: {wrapped}, and the root); this process holds {local:,} of {total:,} values.")


def register_sharded_ema(accelerator, ema, names: list[str]) -> None:
    """Save and load `ema` (a diffusers `EMAModel` over DTensor parameters named `names`) with each checkpoint:
    `EMA_FOLDER/` in torch.distributed.checkpoint's format, every process writing and reading its own shards."""
    import torch.distributed.checkpoint as dcp

    def state() -> dict:
        settings = ema.state_dict()
        shadow = settings.pop("shadow_params")
        return {"shadow": dict(zip(names, shadow)), "settings": settings}

    def save_hook(models, weights, output_dir):
        dcp.save(state(), checkpoint_id=os.path.join(output_dir, EMA_FOLDER))

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, EMA_FOLDER)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is missing (was the checkpoint saved by an FSDP run with --use_ema?)")
        loaded = state()
        dcp.load(loaded, checkpoint_id=path)  # in place into this run's shards
        ema.load_state_dict({**loaded["settings"], "shadow_params": [loaded["shadow"][n] for n in names]})

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def gathered_transformer(accelerator, transformer, model, add_adapters=None):
    """The full weights of the sharded `transformer` (a collective: every process calls it) in a plain copy of
    `model` (its unwrapped module) on the main process, None elsewhere. `add_adapters(copy)` gives the copy the
    run's LoRA adapters first, so the adapter weights land in them and `save_lora` works on it."""
    state = accelerator.get_state_dict(transformer)
    if not accelerator.is_main_process:
        return None
    plain = type(model).from_config(model.config)
    if add_adapters is not None:
        add_adapters(plain)
    plain.load_state_dict(state)
    return plain

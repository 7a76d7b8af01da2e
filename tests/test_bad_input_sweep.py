"""A hostile sweep: bad (or odd) input to every surface, one table row each, and what it must get.

    clear     an error before any work that names the argument (or file) and says what is expected; on the command
              line `error: ...`, exit status 2, no traceback
    warned    the call goes on and a warning says what is suspicious (the behaviour is documented)
    accepted  legal input with a documented result, checked here (e.g. a lossless dtype cast gives the same numbers)

Surfaces: the model's configuration and forward, the pipeline call, loading folders, every command of
`mmdit-diffusers`, and every training option. Add a row when you find a new way in; `test_sweep_counts` prints the
tally. (Issue 21's own cases, one test each: tests/test_bad_input_issue21.py.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from tiny_pipeline import tiny_mmdit_pipeline, tiny_mmdit_transformer, tiny_sd3_transformer, write_dataset

from mmdit_diffusers import MMDiTPipeline, MMDiTTransformer2DModel
from mmdit_diffusers.cli import main as cli_main

READ_ONLY = "/proc/mmdit-diffusers-sweep"  # no process can create files there
NAN, INF = float("nan"), float("inf")


class Refused(Exception):
    """The command line answered `error: ...` with exit status 2 (its stderr is the message)."""


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable  # run(ctx, tmp) -> result
    kind: str  # "clear" | "warned" | "accepted"
    says: tuple[str, ...] = ()  # fragments of the error or warning
    check: Callable | None = None  # accepted: check(result, ctx) -> bool
    area: str = field(default="", compare=False)


def clear(id, run, *says):
    return Case(id, run, "clear", says)


def warned(id, run, *says):
    return Case(id, run, "warned", says)


def accepted(id, run, check):
    return Case(id, run, "accepted", check=check)


# ----------------------------------------------------------------------------------------------------------
# Fixtures built on first use
# ----------------------------------------------------------------------------------------------------------
TINY = dict(img_dim=16, txt_dim=8, cond_dim=12, img_tokens=16, txt_tokens=10, hidden_size=32, depth=2, num_heads=2)
# FLUX-style: rotary positions over (0, row, col) ids, one single-stream block, a guidance embedding
ROPE = dict(TINY, pos_embed_type="rope", axes_dims_rope=(4, 6, 6), num_single_layers=1, txt_pre_only_last_block=False,
            guidance_embeds=True)


class Context:
    def __init__(self, root: Path):
        self.root = root

    @cached_property
    def model(self):
        torch.manual_seed(0)
        model = MMDiTTransformer2DModel(**TINY).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.1)
        return model

    @cached_property
    def rope_model(self):
        torch.manual_seed(0)
        return MMDiTTransformer2DModel(**ROPE).eval()

    @cached_property
    def bf16_model(self):
        return MMDiTTransformer2DModel(**TINY).eval().to(dtype=torch.bfloat16)

    @cached_property
    def pipe(self):
        pipe = tiny_mmdit_pipeline(seed=0, layout="sd3")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @cached_property
    def embeds(self):
        with torch.no_grad():
            return self.pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)

    @cached_property
    def pipeline_dir(self) -> str:
        folder = self.root / "pipeline"
        tiny_mmdit_pipeline(seed=0, layout="clip_t5").save_pretrained(folder)
        return str(folder)

    @cached_property
    def transformer_dir(self) -> Path:
        folder = self.root / "transformer"
        tiny_mmdit_transformer(0).save_pretrained(folder)
        return folder

    @cached_property
    def sd3_dir(self) -> Path:
        folder = self.root / "sd3"
        tiny_sd3_transformer(0).save_pretrained(folder)
        return folder

    @cached_property
    def data_dir(self) -> str:
        return write_dataset(self.root / "data", n=2, solid=True)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Context(tmp_path_factory.mktemp("sweep"))


def inputs(batch: int = 2, dtype=torch.float32) -> dict:
    generator = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=generator).to(dtype),
                encoder_hidden_states=torch.randn(batch, 5, 8, generator=generator).to(dtype),
                pooled_projections=torch.randn(batch, 12, generator=generator).to(dtype),
                timestep=torch.tensor([500.0, 250.0][:batch]))


def fwd(ctx, model=None, **changes):
    with torch.no_grad():
        return (model or ctx.model)(**{**inputs(), **changes}).sample


def build(**changes):
    return MMDiTTransformer2DModel(**{**TINY, **changes})


def call(ctx, **kwargs):
    kwargs.setdefault("prompt", "a red circle")
    kwargs.setdefault("num_inference_steps", 1)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return ctx.pipe(**kwargs).images


def cli(*argv) -> str:
    """Run `mmdit-diffusers ARGV` in-process; exit 0 -> stdout, exit 2 -> `Refused(stderr)`."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([str(a) for a in argv])
    if code == 2:
        assert "Traceback" not in err.getvalue() and "error:" in err.getvalue(), err.getvalue()
        raise Refused(err.getvalue())
    assert code == 0, (code, err.getvalue())
    return out.getvalue()


def same(a, b) -> bool:
    return torch.equal(a, b)


def finite(x) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


def copy_of(folder, tmp, name="copy") -> Path:
    target = Path(tmp) / name
    shutil.copytree(folder, target)
    return target


def edit_config(folder: Path, file: str = "config.json", **changes) -> Path:
    config = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**config, **changes}))
    return folder


def damaged(folder: Path, relative: str, how: str) -> Path:
    path = folder / relative
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "random": os.urandom(2048), "empty": b""}[how])
    return folder


def mask_binary():
    return torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


# ----------------------------------------------------------------------------------------------------------
# Model configuration
# ----------------------------------------------------------------------------------------------------------
CONFIG = [
    *[clear(f"{name}={value!r}", lambda c, t, n=name, v=value: build(**{n: v}), f"`{name}` must be a positive integer")
      for name, value in [("img_dim", 0), ("txt_dim", -1), ("img_tokens", 2.5), ("txt_tokens", "10"),
                          ("hidden_size", True), ("depth", 0), ("num_heads", 0), ("patch_size", 0)]],
    *[clear(f"{name}=0", lambda c, t, n=name: build(**{n: 0}), f"`{name}` must be a positive integer or None")
      for name in ("cond_dim", "in_channels", "out_channels", "sample_size", "pos_embed_max_size")],
    *[clear(f"mlp_ratio={value!r}", lambda c, t, v=value: build(mlp_ratio=v), "`mlp_ratio` must be a positive number")
      for value in (0, -1, NAN, INF, "4")],
    clear("mlp_ratio=0.01", lambda c, t: build(mlp_ratio=0.01), "`mlp_ratio`=0.01 gives MLPs of width"),
    clear("hidden 33 / 3 heads", lambda c, t: build(hidden_size=33, num_heads=3), "`hidden_size`=33 must be a multiple of 4"),
    clear("hidden 34 / 2 heads", lambda c, t: build(hidden_size=34, num_heads=2), "`hidden_size`=34 must be a multiple of 4"),
    clear("hidden 30 / 4 heads", lambda c, t: build(hidden_size=30, num_heads=4), "not divisible by `num_heads`=4"),
    clear("img_dim not patch area", lambda c, t: build(img_dim=18), "`img_dim`=18 is not a multiple of patch_size**2"),
    clear("in_channels vs img_dim", lambda c, t: build(in_channels=3), "`img_dim`=16 must equal in_channels"),
    clear("qk_norm='l2'", lambda c, t: build(qk_norm="l2"), "Unknown `qk_norm` 'l2'"),
    clear("pos_embed_type='learned'", lambda c, t: build(pos_embed_type="learned"), "Unknown `pos_embed_type`"),
    clear("dual layer out of range", lambda c, t: build(dual_attention_layers=(5,)), "`dual_attention_layers` [5]"),
    clear("dual layer as text", lambda c, t: build(dual_attention_layers=("0",)), "`dual_attention_layers` ['0']"),
    clear("dual layers not a tuple", lambda c, t: build(dual_attention_layers=3), "`dual_attention_layers` must be"),
    clear("grid larger than positions", lambda c, t: build(pos_embed_max_size=3), "larger than `pos_embed_max_size`=3"),
    clear("sample_size beyond positions", lambda c, t: build(sample_size=16), "`sample_size`=16 latent pixels exceeds"),
    clear("sample_size not whole patches", lambda c, t: build(sample_size=7), "`sample_size`=7 (latent pixels) must be"),
    clear("rope axes not the head width", lambda c, t: build(**{**ROPE, "axes_dims_rope": (4, 4, 4)}), "`axes_dims_rope`=(4, 4, 4) must be"),
    clear("rope odd axis", lambda c, t: build(**{**ROPE, "axes_dims_rope": (5, 5, 6)}), "positive even numbers"),
    clear("rope_theta 0", lambda c, t: build(**{**ROPE, "rope_theta": 0}), "`rope_theta` must be a positive number"),
    clear("rope_theta NaN", lambda c, t: build(**{**ROPE, "rope_theta": NAN}), "`rope_theta` must be a positive number"),
    clear("num_single_layers -1", lambda c, t: build(num_single_layers=-1), "`num_single_layers` must be a non-negative"),
    clear("single blocks after a pre-only block", lambda c, t: build(num_single_layers=1), "set txt_pre_only_last_block=False"),
    accepted("rope with hidden 36 (no sin-cos table)", lambda c, t: build(**{**ROPE, "hidden_size": 36, "axes_dims_rope": (6, 6, 6)}),
             lambda r, c: r.config.hidden_size == 36),
    clear("unknown preset", lambda c, t: MMDiTTransformer2DModel.from_preset("huge"), "Unknown preset 'huge'"),
    clear("preset with depth 0", lambda c, t: MMDiTTransformer2DModel.from_preset("tiny", depth=0), "`depth` must be"),
    accepted("img_tokens 12: a 3 x 4 grid", lambda c, t: build(img_tokens=12).img_grid, lambda r, c: r == (3, 4)),
    accepted("mlp_ratio 0.5", lambda c, t: build(mlp_ratio=0.5), lambda r, c: r.config.mlp_ratio == 0.5),
    accepted("depth 1, pre-only last block", lambda c, t: fwd(c, build(depth=1).eval()), lambda r, c: finite(r)),
    accepted("txt_tokens 1", lambda c, t: fwd(c, build(txt_tokens=1).eval(), encoder_hidden_states=torch.randn(2, 1, 8)),
             lambda r, c: finite(r)),
]

# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
FORWARD = [
    *[clear(f"{name}=None", lambda c, t, n=name: fwd(c, **{n: None}), f"`{name}` is required")
      for name in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")],
    clear("numpy latents", lambda c, t: fwd(c, hidden_states=np.zeros((2, 4, 8, 8), np.float32)), "torch.from_numpy"),
    clear("latents as a list", lambda c, t: fwd(c, hidden_states=[[0.0]]), "`hidden_states` must be a torch.Tensor"),
    clear("latents rank 2", lambda c, t: fwd(c, hidden_states=torch.randn(2, 16)), "`hidden_states` must be latents"),
    clear("latents rank 5", lambda c, t: fwd(c, hidden_states=torch.randn(2, 4, 8, 8, 1)), "`hidden_states` must be"),
    clear("3 channels", lambda c, t: fwd(c, hidden_states=torch.randn(2, 3, 8, 8)), "has 3 channels; expected in_channels=4"),
    clear("odd height", lambda c, t: fwd(c, hidden_states=torch.randn(2, 4, 7, 8)), "height 7 is not a positive multiple"),
    clear("0 x 0 latents", lambda c, t: fwd(c, hidden_states=torch.randn(2, 4, 0, 0)), "height 0 is not a positive"),
    clear("latents beyond the grid", lambda c, t: fwd(c, hidden_states=torch.randn(2, 4, 10, 8)), "exceeds the position grid"),
    clear("15 tokens", lambda c, t: fwd(c, hidden_states=torch.randn(2, 15, 16)), "[B, img_tokens=16, img_dim=16]"),
    clear("batch of 0", lambda c, t: fwd(c, **inputs(batch=0)), "batch of 0 samples"),
    clear("text rank 2", lambda c, t: fwd(c, encoder_hidden_states=torch.randn(2, 8)), "expected [B, L, txt_dim=8]"),
    clear("text width 7", lambda c, t: fwd(c, encoder_hidden_states=torch.randn(2, 5, 7)), "expected [B, L, txt_dim=8]"),
    clear("11 text tokens", lambda c, t: fwd(c, encoder_hidden_states=torch.randn(2, 11, 8)), "at most txt_tokens=10"),
    clear("pooled width 32", lambda c, t: fwd(c, pooled_projections=torch.randn(2, 32)), "expected [B, cond_dim=12]"),
    clear("pooled rank 3", lambda c, t: fwd(c, pooled_projections=torch.randn(2, 1, 12)), "expected [B, cond_dim=12]"),
    clear("timestep '500'", lambda c, t: fwd(c, timestep="500"), "`timestep` must be a number or a tensor of numbers"),
    clear("timestep True", lambda c, t: fwd(c, timestep=True), "`timestep` must be a number"),
    clear("timestep complex", lambda c, t: fwd(c, timestep=torch.tensor([1j, 1j])), "`timestep` is torch.complex64"),
    clear("timestep [B, 1]", lambda c, t: fwd(c, timestep=torch.full((2, 1), 500.0)), "`timestep` has shape (2, 1)"),
    clear("timestep batch 3", lambda c, t: fwd(c, timestep=torch.full((3,), 5.0)), "Batch sizes disagree"),
    clear("text batch 3", lambda c, t: fwd(c, encoder_hidden_states=torch.randn(3, 5, 8)), "Batch sizes disagree"),
    clear("float64 latents", lambda c, t: fwd(c, hidden_states=torch.randn(2, 4, 8, 8).double()), "torch.float64 but the model computes in torch.float32"),
    clear("int64 latents", lambda c, t: fwd(c, hidden_states=torch.zeros(2, 4, 8, 8, dtype=torch.long)), "must be floating point"),
    clear("bool text", lambda c, t: fwd(c, encoder_hidden_states=torch.ones(2, 5, 8, dtype=torch.bool)), "`encoder_hidden_states` is torch.bool"),
    clear("float32 into bfloat16 model", lambda c, t: fwd(c, c.bf16_model), "hidden_states.to(torch.bfloat16)"),
    clear("mask shape", lambda c, t: fwd(c, encoder_attention_mask=torch.ones(2, 4)), "expected [B, L] = [2, 5]"),
    clear("mask value 2", lambda c, t: fwd(c, encoder_attention_mask=mask_binary() * 2), "holds 2; expected 1 (keep)"),
    clear("soft additive mask", lambda c, t: fwd(c, encoder_attention_mask=torch.where(mask_binary().bool(), 0.0, -5.0)), "Soft biases"),
    clear("mask of halves", lambda c, t: fwd(c, encoder_attention_mask=mask_binary() * 0.5), "holds 0.5"),
    clear("skip layer 5", lambda c, t: fwd(c, skip_layers=[5]), "`skip_layers` [5]"),
    clear("empty controlnet residuals", lambda c, t: fwd(c, block_controlnet_hidden_states=[]), "`block_controlnet_hidden_states` is empty"),
    warned("NaN latents", lambda c, t: fwd(c, hidden_states=torch.full((2, 4, 8, 8), NAN)), "`hidden_states` holds NaN"),
    warned("inf pooled", lambda c, t: fwd(c, pooled_projections=torch.full((2, 12), INF)), "`pooled_projections` holds NaN or infinite"),
    warned("NaN timestep", lambda c, t: fwd(c, timestep=torch.tensor([NAN, 1.0])), "`timestep` holds NaN"),
    clear("img_ids to a sin-cos model", lambda c, t: fwd(c, img_ids=torch.zeros(16, 3)), "`img_ids` is read by models with pos_embed_type='rope'"),
    clear("guidance to a model without", lambda c, t: fwd(c, guidance=torch.full((2,), 3.5)), "`guidance` was given, but"),
    clear("rope: guidance missing", lambda c, t: fwd(c, c.rope_model), "`guidance` is required"),
    clear("rope: guidance '3.5'", lambda c, t: fwd(c, c.rope_model, guidance="3.5"), "`guidance` must be a number"),
    clear("rope: guidance of 3", lambda c, t: fwd(c, c.rope_model, guidance=torch.full((3,), 3.5)), "`guidance` has shape (3,)"),
    clear("rope: img_ids of 15 tokens", lambda c, t: fwd(c, c.rope_model, guidance=3.5, img_ids=torch.zeros(15, 3)), "`img_ids` has shape (15, 3); expected [16, 3]"),
    clear("rope: txt_ids with 2 axes", lambda c, t: fwd(c, c.rope_model, guidance=3.5, txt_ids=torch.zeros(5, 2)), "`txt_ids` has shape (5, 2)"),
    warned("rope: NaN guidance", lambda c, t: fwd(c, c.rope_model, guidance=NAN), "`guidance` holds NaN"),
    accepted("rope: latents beyond the token grid", lambda c, t: fwd(c, c.rope_model, guidance=3.5, hidden_states=torch.randn(2, 4, 12, 16)),
             lambda r, c: r.shape == (2, 4, 12, 16) and finite(r)),
    accepted("rope: scalar guidance", lambda c, t: fwd(c, c.rope_model, guidance=3.5),
             lambda r, c: same(r, fwd(c, c.rope_model, guidance=torch.full((2,), 3.5)))),
    accepted("float16 latents: cast", lambda c, t: fwd(c, hidden_states=inputs()["hidden_states"].half()),
             lambda r, c: same(r, fwd(c, hidden_states=inputs()["hidden_states"].half().float()))),
    accepted("bfloat16 everything: cast", lambda c, t: fwd(c, **inputs(dtype=torch.bfloat16)),
             lambda r, c: same(r, fwd(c, **{k: v.float() for k, v in inputs(dtype=torch.bfloat16).items()}))),
    accepted("autocast bf16 with float32 inputs", lambda c, t: _autocast(c), lambda r, c: finite(r)),
    accepted("integer timestep", lambda c, t: fwd(c, timestep=torch.tensor([500, 250])),
             lambda r, c: same(r, fwd(c))),
    accepted("timestep list", lambda c, t: fwd(c, timestep=[500, 250]), lambda r, c: same(r, fwd(c))),
    accepted("timestep numpy", lambda c, t: fwd(c, timestep=np.array([500.0, 250.0])), lambda r, c: same(r, fwd(c))),
    accepted("scalar timestep", lambda c, t: fwd(c, timestep=500.0),
             lambda r, c: same(r, fwd(c, timestep=torch.tensor([500.0, 500.0])))),
    accepted("timestep beyond 1000", lambda c, t: fwd(c, timestep=torch.tensor([2000.0, -5.0])), lambda r, c: finite(r)),
    accepted("no text tokens (L=0)", lambda c, t: fwd(c, encoder_hidden_states=torch.randn(2, 0, 8)), lambda r, c: finite(r)),
    accepted("additive mask -1e4", lambda c, t: fwd(c, encoder_attention_mask=torch.where(mask_binary().bool(), 0.0, -1e4)),
             lambda r, c: same(r, fwd(c, encoder_attention_mask=mask_binary()))),
    accepted("additive mask -inf", lambda c, t: fwd(c, encoder_attention_mask=torch.where(mask_binary().bool(), 0.0, -INF)),
             lambda r, c: same(r, fwd(c, encoder_attention_mask=mask_binary()))),
    accepted("float zeros mask: additive, nothing dropped", lambda c, t: fwd(c, encoder_attention_mask=torch.zeros(2, 5)),
             lambda r, c: same(r, fwd(c))),
    accepted("bool mask", lambda c, t: fwd(c, encoder_attention_mask=mask_binary().bool()),
             lambda r, c: same(r, fwd(c, encoder_attention_mask=mask_binary()))),
    accepted("float 1/0 mask", lambda c, t: fwd(c, encoder_attention_mask=mask_binary().float()),
             lambda r, c: same(r, fwd(c, encoder_attention_mask=mask_binary()))),
]


def _autocast(ctx):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fwd(ctx, ctx.bf16_model)


# ----------------------------------------------------------------------------------------------------------
# Pipeline call
# ----------------------------------------------------------------------------------------------------------
def _embeds_call(ctx, embeds=None, pooled=None, **kwargs):
    e = ctx.embeds
    return call(ctx, prompt=None, prompt_embeds=e[0] if embeds is None else embeds,
                pooled_prompt_embeds=e[2] if pooled is None else pooled, **kwargs)


PIPELINE = [
    clear("no prompt", lambda c, t: call(c, prompt=None), "Pass `prompt` or `prompt_embeds`"),
    clear("prompt 5", lambda c, t: call(c, prompt=5), "`prompt` must be a string or a list of strings"),
    clear("prompt []", lambda c, t: call(c, prompt=[]), "`prompt` must be a string or a non-empty list"),
    clear("prompt with a number", lambda c, t: call(c, prompt=["a", 3]), "`prompt` must be a string or a non-empty list"),
    clear("prompt and embeds", lambda c, t: call(c, prompt_embeds=c.embeds[0], pooled_prompt_embeds=c.embeds[2]), "either `prompt` or `prompt_embeds`"),
    clear("prompt_2 of another length", lambda c, t: call(c, prompt=["a", "b"], prompt_2=["a"]), "`prompt_2` has 1 prompts"),
    clear("three negatives for one prompt", lambda c, t: call(c, negative_prompt=["a", "b", "c"], guidance_scale=2.0), "`negative_prompt` has 3 prompts"),
    *[clear(f"height={value!r}", lambda c, t, v=value: call(c, height=v), says)
      for value, says in [(72, "`height`=72 px is larger than this model draws: at most 64 px"),
                          (18, "`height`=18 px must be a positive multiple of vae_scale_factor * patch_size = 4"),
                          (0, "`height`=0 px must be a positive multiple"), (-16, "`height`=-16 px must be"),
                          (64.5, "`height`=64.5 must be a whole number of pixels"),
                          ("64", "`height`='64' must be a whole number"), (True, "`height`=True must be a whole")]],
    clear("width=1024", lambda c, t: call(c, width=1024), "`width`=1024 px is larger than this model draws: at most 64 px"),
    *[clear(f"steps={value!r}", lambda c, t, v=value: call(c, num_inference_steps=v), "`num_inference_steps` must be an integer >= 1")
      for value in (0, -1, 2.5, "4", np.int64(2))],
    *[clear(f"guidance={value!r}", lambda c, t, v=value: call(c, guidance_scale=v), "`guidance_scale`=")
      for value in (-1.0, NAN, INF, "7", True)],
    clear("sigmas []", lambda c, t: call(c, sigmas=[], num_inference_steps=None), "`sigmas` is empty"),
    clear("sigmas above 1", lambda c, t: call(c, sigmas=[1.5, 0.5], num_inference_steps=None), "`sigmas` holds 1.5"),
    clear("sigmas NaN", lambda c, t: call(c, sigmas=[NAN], num_inference_steps=None), "`sigmas` holds nan"),
    clear("sigmas going up", lambda c, t: call(c, sigmas=[0.5, 1.0], num_inference_steps=None), "`sigmas` must go down"),
    clear("sigmas of text", lambda c, t: call(c, sigmas=["a"], num_inference_steps=None), "`sigmas` must be a sequence of numbers"),
    clear("sigmas vs steps", lambda c, t: call(c, sigmas=[1.0, 0.5], num_inference_steps=4), "`sigmas` has 2 values but `num_inference_steps`=4"),
    clear("generator 'cuda'", lambda c, t: call(c, generator="cuda"), "`generator` must be a torch.Generator"),
    clear("generator 5", lambda c, t: call(c, generator=5), "`generator` must be a torch.Generator"),
    clear("3 generators for 1 image", lambda c, t: call(c, generator=[torch.Generator()] * 3), "`generator` is a list of 3"),
    clear("num_images_per_prompt 0", lambda c, t: call(c, num_images_per_prompt=0), "`num_images_per_prompt` must be an integer >= 1"),
    clear("num_images_per_prompt 1.5", lambda c, t: call(c, num_images_per_prompt=1.5), "`num_images_per_prompt` must be"),
    clear("output_type 'jpeg'", lambda c, t: call(c, output_type="jpeg"), "Unknown `output_type` 'jpeg'"),
    clear("latents of another shape", lambda c, t: call(c, latents=torch.zeros(1, 4, 4, 4)), "`latents` has shape"),
    clear("integer latents", lambda c, t: call(c, latents=torch.zeros(1, 4, 8, 8, dtype=torch.long)), "`latents` must be a floating-point tensor"),
    clear("prompt_embeds width 10", lambda c, t: _embeds_call(c, c.embeds[0][..., :10]), "`prompt_embeds` has shape"),
    clear("prompt_embeds rank 2", lambda c, t: _embeds_call(c, c.embeds[0][0]), "`prompt_embeds` has shape"),
    clear("integer prompt_embeds", lambda c, t: _embeds_call(c, c.embeds[0].long()), "`prompt_embeds` is torch.int64"),
    clear("prompt_embeds as numpy", lambda c, t: _embeds_call(c, c.embeds[0].numpy()), "`prompt_embeds` must be a tensor"),
    clear("pooled width 5", lambda c, t: _embeds_call(c, pooled=c.embeds[2][:, :5]), "`pooled_prompt_embeds` has shape"),
    clear("embeds without pooled", lambda c, t: call(c, prompt=None, prompt_embeds=c.embeds[0]), "needs `pooled_prompt_embeds`"),
    clear("embeds and pooled of 2 and 1 prompts", lambda c, t: _embeds_call(c, torch.cat([c.embeds[0]] * 2)), "holds 2 prompts"),
    clear("mask of another shape", lambda c, t: _embeds_call(c, prompt_attention_mask=torch.ones(1, 3)), "`prompt_attention_mask` has shape"),
    clear("clip_skip 5", lambda c, t: call(c, clip_skip=5), "`clip_skip`=5 must be an integer >= 0, at most 1"),
    clear("clip_skip -1", lambda c, t: call(c, clip_skip=-1), "`clip_skip`=-1"),
    clear("max_sequence_length 33", lambda c, t: call(c, max_sequence_length=33), "`max_sequence_length`=33 is too long"),
    clear("max_sequence_length -1", lambda c, t: call(c, max_sequence_length=-1), "`max_sequence_length` must be"),
    clear("callback 5", lambda c, t: call(c, callback_on_step_end=5), "`callback_on_step_end` must be callable"),
    clear("callback tensor 'noise'", lambda c, t: call(c, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]), "unknown names ['noise']"),
    clear("mu NaN", lambda c, t: call(c, mu=NAN), "`mu` must be a finite number"),
    clear("LoRA scale 'x'", lambda c, t: call(c, joint_attention_kwargs={"scale": "x"}), "`joint_attention_kwargs['scale']`"),
    clear("10**13 steps", lambda c, t: call(c, num_inference_steps=10**13), "This call needs at least", "num_inference_steps=10000000000000"),
    clear("10**9 images", lambda c, t: call(c, num_images_per_prompt=10**9), "This call needs at least", "1000000000 image(s)"),
    warned("guidance 0.5", lambda c, t: call(c, guidance_scale=0.5), "`guidance_scale`=0.5 is below 1"),
    warned("negative prompt at guidance 1", lambda c, t: call(c, guidance_scale=1.0, negative_prompt="a blue square"), "The negative prompt is not used"),
    warned("unknown word", lambda c, t: call(c, prompt="a red zebra"), "does not know 1 word(s) of the prompt: 'zebra'"),
    warned("prompt longer than T5 keeps", lambda c, t: call(c, prompt=" ".join(["red circle"] * 20), max_sequence_length=8), "tokens at the end were dropped"),
    accepted("empty prompt", lambda c, t: call(c, prompt=""), lambda r, c: finite(r)),
    accepted("height 64.0", lambda c, t: call(c, height=64.0), lambda r, c: r.shape[-2] == 32),
    accepted("numpy height", lambda c, t: call(c, height=np.int64(32)), lambda r, c: r.shape[-2] == 16),
    accepted("sigmas without steps", lambda c, t: (call(c, sigmas=[1.0, 0.5], num_inference_steps=None), c.pipe.num_timesteps),
             lambda r, c: r[1] == 2),
    accepted("guidance 1 without negative prompt", lambda c, t: call(c, guidance_scale=1.0), lambda r, c: finite(r)),
    accepted("one generator per image", lambda c, t: call(c, num_images_per_prompt=2, generator=[torch.Generator().manual_seed(i) for i in range(2)]),
             lambda r, c: r.shape[0] == 2),
]

# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def _ddpm(tmp) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 8),
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(Path(tmp) / "ddpm")
    return Path(tmp) / "ddpm"


def _without(folder: Path, name: str) -> Path:
    shutil.rmtree(folder / name)
    return folder


def _unlisted(folder: Path, name: str) -> Path:
    index = json.loads((folder / "model_index.json").read_text())
    del index[name]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _hub():
    import mmdit_diffusers.hub as hub

    return hub


load_model = MMDiTTransformer2DModel.from_pretrained
load_pipe = MMDiTPipeline.from_pretrained

LOADING = [
    clear("pipeline: missing local path", lambda c, t: load_pipe(Path(t) / "nope"), "no such folder (and not a Hub repo id"),
    clear("pipeline: empty folder", lambda c, t: load_pipe(t), "no file named model_index.json"),
    clear("pipeline: a model folder", lambda c, t: load_pipe(c.transformer_dir), "it is a model folder (MMDiTTransformer2DModel"),
    clear("pipeline: model_index.json not JSON", lambda c, t: (Path(t, "model_index.json").write_text("{x"), load_pipe(t)), "is not a valid JSON file"),
    clear("pipeline: a DDPM folder", lambda c, t: load_pipe(_ddpm(t)), "it is a DDPMPipeline folder"),
    clear("pipeline: vae folder missing", lambda c, t: load_pipe(_without(copy_of(c.pipeline_dir, t), "vae")), "folder `vae/` is missing"),
    clear("pipeline: vae not listed", lambda c, t: load_pipe(_unlisted(copy_of(c.pipeline_dir, t), "vae")), "has no `vae` component"),
    *[clear(f"pipeline: {how} transformer weights",
            lambda c, t, h=how: load_pipe(damaged(copy_of(c.pipeline_dir, t), "transformer/diffusion_pytorch_model.safetensors", h)),
            "component `transformer`'s weights file") for how in ("truncate", "random", "empty")],
    *[clear(f"model: {how} weights", lambda c, t, h=how: load_model(damaged(copy_of(c.transformer_dir, t), "diffusion_pytorch_model.safetensors", h)),
            {"truncate": "is truncated", "random": "is not a complete safetensors file", "empty": "is empty (0 bytes)"}[how])
      for how in ("truncate", "random", "empty")],
    clear("model: missing local path", lambda c, t: load_model(Path(t) / "nope"), "is no folder (and not a Hub repo id"),
    clear("model: empty folder", lambda c, t: load_model(t), "no file named config.json"),
    clear("model: a pipeline folder", lambda c, t: load_model(c.pipeline_dir), "is a pipeline folder; pass subfolder='transformer'"),
    clear("model: an SD3 folder", lambda c, t: load_model(c.sd3_dir), "MMDiTTransformer2DModel.from_sd3"),
    clear("model: depth 1 config, 2 blocks", lambda c, t: load_model(edit_config(copy_of(c.transformer_dir, t), depth=1)), "config.json says depth=1"),
    clear("model: depth 3 config, 2 blocks", lambda c, t: load_model(edit_config(copy_of(c.transformer_dir, t), depth=3)), "config.json says depth=3"),
    clear("model: hidden size 64 config", lambda c, t: load_model(edit_config(copy_of(c.transformer_dir, t), hidden_size=64, num_heads=4)), "of another shape"),
    clear("model: impossible config", lambda c, t: load_model(edit_config(copy_of(c.transformer_dir, t), mlp_ratio=0.001)), "`mlp_ratio`=0.001"),
    clear("from_sd3: our folder", lambda c, t: MMDiTTransformer2DModel.from_sd3(c.transformer_dir), "already holds an MMDiTTransformer2DModel"),
    clear("from_sd3: missing path", lambda c, t: MMDiTTransformer2DModel.from_sd3(Path(t) / "nope"), "is no folder"),
    clear("from_sd3: a pipeline folder", lambda c, t: MMDiTTransformer2DModel.from_sd3(c.pipeline_dir), "is a pipeline folder; pass subfolder='transformer'"),
    clear("from_sd3: a dict", lambda c, t: MMDiTTransformer2DModel.from_sd3({}), "must be an SD3Transformer2DModel or a folder path"),
    clear("LoRA: pickled file", lambda c, t: (torch.save({"x": torch.zeros(1)}, Path(t) / "l.bin"), c.pipe.load_lora_weights(str(Path(t) / "l.bin"))), "Refusing to load a pickled LoRA"),
    clear("hub.push_folder: missing folder", lambda c, t: _hub().push_folder(Path(t) / "nope", "me/repo"), "is not a folder"),
    clear("hub.push_folder: not a model folder", lambda c, t: _hub().push_folder(t, "me/repo"), "is not a saved model"),
    clear("hub.push_to_hub: not a model", lambda c, t: _hub().push_to_hub(object(), "me/repo"), "`model_or_pipeline` must be"),
    clear("hub.from_pretrained: missing folder", lambda c, t: _hub().from_pretrained(MMDiTPipeline, Path(t) / "nope"), "no such folder"),
    clear("hub.write_model_card: missing folder", lambda c, t: _hub().write_model_card(Path(t) / "nope"), "is not a folder"),
    accepted("model: ignore_mismatched_sizes loads in part", lambda c, t: load_model(edit_config(copy_of(c.transformer_dir, t), depth=3), ignore_mismatched_sizes=True, low_cpu_mem_usage=False),
             lambda r, c: r.config.depth == 3),
    accepted("from_sd3 of an SD3 folder", lambda c, t: MMDiTTransformer2DModel.from_sd3(c.sd3_dir), lambda r, c: r.config.depth == 2),
]

# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
def _file(tmp, name, data=b"x") -> Path:
    path = Path(tmp) / name
    path.write_bytes(data)
    return path


def _nonempty(tmp, name="out") -> Path:
    folder = Path(tmp) / name
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    return folder


COMMANDS = [
    clear("unknown command", lambda c, t: cli("paint"), "unknown command 'paint'"),
    accepted("no command: usage", lambda c, t: cli(), lambda r, c: "usage: mmdit-diffusers COMMAND" in r),
    # generate
    *[clear(f"generate {' '.join(args)}", lambda c, t, a=args: cli("generate", "a cat", *a), says) for args, says in [
        (("--steps", "0"), "argument --steps: must be a positive integer"),
        (("--steps", "x"), "argument --steps: invalid positive int value"),
        (("--num_images", "0"), "argument --num_images"),
        (("--seed", "-1"), "argument --seed: a seed must be an integer from 0"),
        (("--seed", "1" + "0" * 22), "argument --seed"),
        (("--guidance_scale", "nan"), "argument --guidance_scale: must be a finite number >= 0"),
        (("--guidance_scale", "-1"), "argument --guidance_scale"),
        (("--height", "0"), "argument --height"),
        (("--width", "-8"), "argument --width"),
        (("--output", "x.jpg"), "--output x.jpg: expected a .png file name"),
        (("--output", f"{READ_ONLY}/x.png"), "is not writable"),
    ]],
    clear("generate --output existing", lambda c, t: cli("generate", "a cat", "--output", _file(t, "x.png")), "exists; pass --overwrite"),
    clear("generate --output a folder", lambda c, t: cli("generate", "a cat", "--output", _nonempty(t, "d.png")), "is a folder"),
    clear("generate --output under a file", lambda c, t: cli("generate", "a cat", "--output", Path(_file(t, "f"), "x.png")), "is a file, not a folder"),
    clear("generate --model missing", lambda c, t: cli("generate", "a cat", "--model", Path(t) / "nope", "--output", Path(t) / "x.png"), "--model"),
    clear("generate --model empty folder", lambda c, t: cli("generate", "a cat", "--model", t, "--output", Path(t) / "x.png"), "no model_index.json"),
    clear("generate --height 1024", lambda c, t: cli("generate", "a cat", "--model", c.pipeline_dir, "--height", "1024", "--output", Path(t) / "x.png"), "`height`=1024 px", "at most 64 px"),
    clear("generate --height 18", lambda c, t: cli("generate", "a cat", "--model", c.pipeline_dir, "--height", "18", "--output", Path(t) / "x.png"), "`height`=18 px must be a positive multiple"),
    warned("generate: unknown words", lambda c, t: cli("generate", "a red zebra", "--model", c.pipeline_dir, "--steps", "1", "--output", Path(t) / "x.png"), "does not know 1 word(s) of the prompt: 'zebra'"),
    accepted("generate: empty prompt", lambda c, t: _in(t, lambda: cli("generate", "", "--model", c.pipeline_dir, "--steps", "1")),
             lambda r, c: r.strip() == "outputs/image.png"),
    accepted("generate: default name taken", lambda c, t: _in(t, lambda: [cli("generate", "a cat!", "--model", c.pipeline_dir, "--steps", "1") for _ in range(2)]),
             lambda r, c: [p.strip() for p in r] == ["outputs/a-cat.png", "outputs/a-cat-2.png"]),
    # evaluate
    *[clear(f"evaluate {' '.join(map(str, args))}", lambda c, t, a=args: cli("evaluate", *a), says) for args, says in [
        (("--grid", "x.jpg"), "--grid x.jpg: expected a .png"),
        (("--grid", f"{READ_ONLY}/g.png"), "is not writable"),
        (("--limit", "0"), "argument --limit"),
        (("--batch_size", "0"), "argument --batch_size"),
        (("--seed", "-5"), "argument --seed"),
        (("--json", f"{READ_ONLY}/s.json"), "--json"),
    ]],
    clear("evaluate --json existing", lambda c, t: cli("evaluate", "--json", _file(t, "s.json"), "--grid", Path(t) / "g.png"), "--json", "exists; pass --overwrite"),
    clear("evaluate --grid existing", lambda c, t: cli("evaluate", "--grid", _file(t, "g.png")), "--grid", "exists; pass --overwrite"),
    clear("evaluate --json is --grid", lambda c, t: cli("evaluate", "--json", Path(t) / "g.png", "--grid", Path(t) / "g.png"), "name the same file"),
    clear("evaluate --model missing", lambda c, t: cli("evaluate", "--model", Path(t) / "nope", "--grid", Path(t) / "g.png"), "--model"),
    # convert
    clear("convert: SRC missing", lambda c, t: cli("convert", Path(t) / "nope", Path(t) / "out"), "SRC", "does not exist"),
    clear("convert: SRC a file", lambda c, t: cli("convert", _file(t, "f"), Path(t) / "out"), "is not a folder"),
    clear("convert: SRC holds no model", lambda c, t: cli("convert", t, Path(t) / "out"), "holds no SD3Transformer2DModel"),
    clear("convert: an MMDiT folder to mmdit", lambda c, t: cli("convert", c.transformer_dir, Path(t) / "out"), "pass --to sd3"),
    clear("convert: DST not empty", lambda c, t: cli("convert", c.sd3_dir, _nonempty(t)), "DST", "pass --overwrite"),
    clear("convert: DST is SRC", lambda c, t: cli("convert", c.sd3_dir, c.sd3_dir, "--overwrite"), "would replace the source"),
    clear("convert: DST read-only", lambda c, t: cli("convert", c.sd3_dir, f"{READ_ONLY}/out"), "is not writable"),
    clear("convert --to flux", lambda c, t: cli("convert", c.sd3_dir, Path(t) / "o", "--to", "flux"), "argument --to: invalid choice"),
    clear("convert --dtype int8", lambda c, t: cli("convert", c.sd3_dir, Path(t) / "o", "--dtype", "int8"), "argument --dtype: invalid choice"),
    # push (refused before any network traffic)
    clear("push: PATH missing", lambda c, t: cli("push", Path(t) / "nope", "me/repo"), "is not a folder"),
    clear("push: PATH holds no model", lambda c, t: cli("push", t, "me/repo"), "is not a saved model, pipeline or LoRA folder"),
    clear("push: repo id a/b/c", lambda c, t: cli("push", c.transformer_dir, "a/b/c"), "Repo id must be in the form"),
    clear("push: repo id with spaces", lambda c, t: cli("push", c.transformer_dir, "bad id!"), "Repo id must use alphanumeric"),
    clear("push: --sample missing", lambda c, t: cli("push", c.transformer_dir, "me/repo", "--sample", Path(t) / "no.png", "a cat"), "--sample", "no such image file"),
    # recipe steps
    clear("dataset: OUTPUT_DIR exists", lambda c, t: cli("dataset", t), "already exists; pass --overwrite"),
    clear("dataset: read-only", lambda c, t: cli("dataset", f"{READ_ONLY}/d"), "is not writable"),
    clear("dataset --num_images 0", lambda c, t: cli("dataset", Path(t) / "d", "--num_images", "0"), "argument --num_images"),
    *[clear(f"vae {' '.join(args)}", lambda c, t, a=args: cli("vae", "--train_data_dir", c.data_dir, "--output_dir", Path(t) / "v", *a), says)
      for args, says in [(("--resolution", "30"), "not divisible by the VAE's downsampling factor 4"),
                         (("--crop_size", "10"), "--crop_size 10 must be at most --resolution and divisible by 4"),
                         (("--crop_size", "-1"), "argument --crop_size"),
                         (("--kl_weight", "-1"), "argument --kl_weight"),
                         (("--learning_rate", "0"), "argument --learning_rate"),
                         (("--init_from", "/no/such/vae"), "--init_from /no/such/vae: no config.json")]],
    clear("vae: data missing", lambda c, t: cli("vae", "--train_data_dir", Path(t) / "nope", "--output_dir", Path(t) / "v"), "--train_data_dir", "no such folder"),
    clear("vae: output not empty", lambda c, t: cli("vae", "--train_data_dir", c.data_dir, "--output_dir", _nonempty(t)), "--output_dir", "pass --overwrite"),
    clear("text-encoders --train_batch_size 1", lambda c, t: cli("text-encoders", "--train_data_dir", c.data_dir, "--output_dir", Path(t) / "x", "--train_batch_size", "1"), "--train_batch_size must be at least 2"),
    clear("text-encoders --learning_rate 0", lambda c, t: cli("text-encoders", "--train_data_dir", c.data_dir, "--output_dir", Path(t) / "x", "--learning_rate", "0"), "argument --learning_rate"),
    clear("text-encoders: output not empty", lambda c, t: cli("text-encoders", "--train_data_dir", c.data_dir, "--output_dir", _nonempty(t)), "pass --overwrite"),
    clear("base: VAE missing", lambda c, t: cli("base", "--text_encoders", t, "--vae", Path(t) / "nope", "--output_dir", Path(t) / "b"), "--vae", "no config.json"),
    clear("base: text encoders missing", lambda c, t: cli("base", "--text_encoders", t, "--vae", c.pipeline_dir + "/vae", "--output_dir", Path(t) / "b"), "--text_encoders", "no tokenizer"),
    clear("export: not a trained folder", lambda c, t: cli("export", t, Path(t) / "dest"), "no model_index.json"),
    clear("export --card missing", lambda c, t: cli("export", c.pipeline_dir, Path(t) / "dest", "--card", Path(t) / "no.md"), "--card", "no such file"),
    clear("export --samples not a PNG", lambda c, t: cli("export", c.pipeline_dir, Path(t) / "dest", "--samples", _file(t, "s.jpg")), "--samples", "expected a .png"),
    clear("export over a pipeline", lambda c, t: cli("export", c.pipeline_dir, copy_of(c.pipeline_dir, t)), "holds a pipeline; pass --overwrite"),
    clear("export onto itself", lambda c, t: cli("export", c.pipeline_dir, c.pipeline_dir, "--overwrite"), "is the trained folder itself"),
    clear("probe --num_images 0", lambda c, t: cli("probe", "--num_images", "0"), "argument --num_images"),
    clear("probe --model empty folder", lambda c, t: cli("probe", "--model", t), "no model_index.json"),
]


def _in(folder, action):
    old = os.getcwd()
    os.chdir(folder)
    try:
        return action()
    finally:
        os.chdir(old)


# ----------------------------------------------------------------------------------------------------------
# Training options (parsed before torch is imported; the run-level ones before any step)
# ----------------------------------------------------------------------------------------------------------
def train_argv(ctx, tmp, *extra):
    return ["train", "--pretrained_model_name_or_path", ctx.pipeline_dir, "--train_data_dir", ctx.data_dir,
            "--output_dir", Path(tmp) / "out", "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "1",
            "--max_sequence_length", "8", "--seed", "0", "--report_to", "none", "--cache_text_embeddings", *extra]


def train(*extra):
    return lambda c, t: cli(*train_argv(c, t, *extra))


def _config(tmp, text: str) -> Path:
    return _file(tmp, "c.yaml", text.encode())


BAD_OPTION_VALUES = [
    ("--resolution", "0"), ("--resolution", "big"), ("--train_batch_size", "0"), ("--gradient_accumulation_steps", "0"),
    ("--num_train_epochs", "0"), ("--max_train_steps", "-3"), ("--learning_rate", "0"), ("--learning_rate", "nan"),
    ("--learning_rate", "inf"), ("--lr_scheduler", "exponential"), ("--lr_warmup_steps", "-1"), ("--lr_num_cycles", "0"),
    ("--lr_power", "0"), ("--lr_power", "nan"), ("--adam_beta1", "1"), ("--adam_beta1", "-0.1"), ("--adam_beta2", "nan"),
    ("--adam_weight_decay", "-1"), ("--adam_weight_decay", "nan"), ("--adam_epsilon", "0"), ("--max_grad_norm", "-1"),
    ("--max_grad_norm", "nan"), ("--mixed_precision", "fp8"), ("--ema_decay", "1.5"), ("--ema_decay", "nan"),
    ("--seed", "-1"), ("--seed", "1" + "0" * 22), ("--weighting_scheme", "lognormal"), ("--logit_mean", "nan"),
    ("--logit_std", "0"), ("--logit_std", "nan"), ("--mode_scale", "inf"), ("--resolution_shift", "0"),
    ("--resolution_shift", "nan"), ("--resolution_shift", "auto"), ("--caption_dropout_prob", "1.5"),
    ("--caption_dropout_prob", "nan"), ("--dataloader_num_workers", "-1"), ("--max_sequence_length", "0"),
    ("--rank", "0"), ("--lora_alpha", "0"), ("--lora_alpha", "nan"), ("--checkpointing_steps", "0"),
    ("--checkpoints_total_limit", "0"), ("--validation_steps", "0"), ("--num_validation_images", "0"),
    ("--validation_inference_steps", "0"), ("--validation_guidance_scale", "-1"), ("--validation_guidance_scale", "nan"),
    ("--report_to", "mlflow"), ("--vae_latent", "mean"), ("--max_train_samples", "0"),
    ("--optimizer", "sgd"), ("--prodigy_beta3", "1"),
]

TRAINING = [
    *[clear(f"train {option} {value}", train(option, value), f"argument {option}") for option, value in BAD_OPTION_VALUES],
    clear("train --learning_rat (typo)", train("--learning_rat", "1e-4"), "unrecognized arguments: --learning_rat"),
    clear("train --mode_scale 3 with mode", train("--weighting_scheme", "mode", "--mode_scale", "3"), "--mode_scale 3.0: the 'mode' density needs"),
    clear("train without a pipeline", lambda c, t: cli("train", "--train_data_dir", c.data_dir), "--pretrained_model_name_or_path is required"),
    clear("train with both data sources", train("--dataset_name", "x/y"), "exactly one of --train_data_dir"),
    clear("train --model_config with LoRA", train("--model_config", "tiny", "--rank", "4"), "cannot be combined with LoRA"),
    clear("train --output_dir read-only", train("--output_dir", f"{READ_ONLY}/o"), "--output_dir", "is not writable"),
    clear("train --output_dir is a file", lambda c, t: cli(*train_argv(c, t, "--output_dir", _file(t, "f"))), "is a file, not a folder"),
    clear("train --config missing", train("--config", "/no/such.yaml"), "--config '/no/such.yaml': no such file"),
    clear("train --config unknown key", lambda c, t: cli(*train_argv(c, t, "--config", _config(t, "learnin_rate: 3\n"))), "unknown option 'learnin_rate'"),
    clear("train --config not a mapping", lambda c, t: cli(*train_argv(c, t, "--config", _config(t, "- a\n- b\n"))), "must hold a mapping"),
    clear("train --config not YAML", lambda c, t: cli(*train_argv(c, t, "--config", _config(t, "a: [b\n"))), "is not valid YAML"),
    clear("train --config list for a value", lambda c, t: cli(*train_argv(c, t, "--config", _config(t, "resolution: [1, 2]\n"))), "resolution takes one value"),
    clear("train --config flag not a bool", lambda c, t: cli(*train_argv(c, t, "--config", _config(t, "use_ema: maybe\n"))), "use_ema must be true or false"),
    clear("train --config NaN learning rate", lambda c, t: cli(*train_argv(c, t, "--config", _config(t, "learning_rate: .nan\n"))), "argument --learning_rate"),
    clear("train --train_data_dir missing", train("--train_data_dir", "/no/such/data"), "--train_data_dir '/no/such/data': no such folder"),
    clear("train --pretrained missing", train("--pretrained_model_name_or_path", "/no/such/pipe"), "no such folder"),
    clear("train --resume_from_checkpoint missing", train("--resume_from_checkpoint", "checkpoint-9"), "no such checkpoint"),
    clear("train --caption_column missing", train("--caption_column", "caption"), "caption column 'caption' not found"),
    accepted("train --mixed_precision fp16 on a CPU (torch's CPU autocast)",
             lambda c, t: (cli(*train_argv(c, t, "--mixed_precision", "fp16")), Path(t, "out"))[1],
             lambda r, c: (r / "model_index.json").is_file()),
    clear("train --resolution 18", train("--resolution", "18"), "--resolution 18 is not divisible"),
    clear("train --resolution 128", train("--resolution", "128"), "larger than the transformer's position grid"),
    clear("train --lora_layers nothing", train("--lora_layers", "to_nothing", "--rank", "2"), "match no module"),
    clear("train --model_config mlp_ratio 0.001", train("--model_config", '{"mlp_ratio": 0.001, "depth": 1}'), "--model_config", "`mlp_ratio`=0.001"),
    clear("train --model_config hidden 34", train("--model_config", '{"hidden_size": 34, "num_heads": 2, "depth": 1}'), "--model_config", "multiple of 4"),
    clear("train --model_config unknown preset", train("--model_config", "huge"), "--model_config 'huge'"),
    warned("train: empty caption", lambda c, t: cli(*train_argv(c, t, "--train_data_dir", _empty_caption_data(c, t))), "1 of 2 captions are empty"),
    accepted("train --mode_scale 3 unused by logit_normal", lambda c, t: _parsed("--mode_scale", "3"), lambda r, c: r.mode_scale == 3.0),
    accepted("train --hub_private without push", lambda c, t: _parsed("--hub_private"), lambda r, c: r.hub_private and not r.push_to_hub),
    accepted("train --rank turns LoRA on", lambda c, t: _parsed("--rank", "4"), lambda r, c: r.use_lora and r.lora_alpha == 4.0),
    accepted("train --learning_rate 1e30 (diverges: stopped at run time)", lambda c, t: _parsed("--learning_rate", "1e30"), lambda r, c: r.learning_rate == 1e30),
]


def _parsed(*extra):
    from mmdit_diffusers.training.args import parse_args

    return parse_args(["--pretrained_model_name_or_path", "p", "--train_data_dir", "d", *extra])


def _empty_caption_data(ctx, tmp) -> str:
    folder = copy_of(ctx.data_dir, tmp, "data")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = ""
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


AREAS = {"model config": CONFIG, "forward": FORWARD, "pipeline call": PIPELINE, "loading": LOADING,
         "commands": COMMANDS, "training options": TRAINING}
CASES = [Case(**{**case.__dict__, "area": area}) for area, cases in AREAS.items() for case in cases]
KINDS = ("clear", "warned", "accepted")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}: {c.id}" for c in CASES])
@pytest.mark.usefixtures("fresh_accelerate")
def test_case(case: Case, ctx, tmp_path, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        if case.kind == "clear":
            with pytest.raises((ValueError, TypeError, OSError, Refused)) as error:
                case.run(ctx, tmp_path)
            message = str(error.value)
            assert "Traceback" not in message
            for fragment in case.says:
                assert fragment in message, (fragment, message)
            return
        result = case.run(ctx, tmp_path)
    said = caplog.text + "".join(str(w.message) for w in caught)
    if case.kind == "warned":
        for fragment in case.says:
            assert fragment in said, (fragment, said)
    else:
        assert case.kind == "accepted" and case.check(result, ctx), result


def test_sweep_counts(capsys):
    """Every row is one of the three outcomes; the tally (per surface) is printed for the notes."""
    assert {case.kind for case in CASES} <= set(KINDS)
    assert len({(case.area, case.id) for case in CASES}) == len(CASES), "duplicate case ids"
    lines = [f"{'surface':<18}{'cases':>6}" + "".join(f"{k:>10}" for k in KINDS)]
    for area in (*AREAS, None):
        cases = [c for c in CASES if area is None or c.area == area]
        counts = [sum(c.kind == k for c in cases) for k in KINDS]
        lines.append(f"{area or 'all':<18}{len(cases):>6}" + "".join(f"{n:>10}" for n in counts))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert math.prod(len(cases) for cases in AREAS.values()) > 0

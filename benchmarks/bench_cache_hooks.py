"""diffusers' cache hooks on the shipped Shapes pipeline: seconds per image and the Shapes score, per hook.

    python benchmarks/bench_cache_hooks.py [--limit N] [--threads 1] [--json OUT.json] [--markdown OUT.md]

Each hook gets its own freshly loaded `pipelines/mmdit-shapes` pipeline at its stored sampler settings (the
stochastic flow-matching sampler, guidance 2; 40 steps until 2026-12-01, 60 since) and draws the Shapes prompt set
exactly as `mmdit-diffusers evaluate` does (`mmdit_diffusers.shapes.evaluation.sample_batches`: seed 0, batches of
16, one generator), so the "none" row is that command's score. Batches are interleaved across the hooks (round r
runs batch r of every hook, the order reversed every other round), so that all hooks see the same machine load; a
hook's images do not depend on the interleaving (each pipeline has its own generator, and the hooks reset their
state after every call). Time is the process's CPU time (`--clock cpu`, the default: with one intra-op thread it
leaves out the time spent waiting for a core on a shared machine) and wall time; the score is
`mmdit_diffusers.shapes.scorer.evaluate`.

Hook settings (`HOOKS`), chosen for this 4-block model and the 40-step sampler; timestep ranges are in diffusers'
[0, 1000]:
- FirstBlockCache(threshold=0.05), diffusers' default, and 0.3: the blocks after the first rerun only when the first
  block's output residual changed by more than that (relative mean absolute difference) since they last ran. The
  shipped sampler is stochastic (fresh noise every step), so the residual changes a lot: 0.3 is the largest of
  0.05 / 0.2 / 0.3 / 0.5 / 0.8 that kept 16 single-object prompts right (0.5: 2 of 16); over all prompts it still
  costs points (benchmarks/README.md).
- FasterCache: attention outputs reused every other step (block skip range 2) for t < 681, the unconditional half
  of the guidance batch recomputed every 5th step for t < 641 and extrapolated from the conditional half
  (frequency-domain deltas) otherwise; attention weight 0.5, diffusers' defaults otherwise; the transformer's
  `pooled_projections` split with the batch too (diffusers' default list leaves it out).
- PyramidAttentionBroadcast: each joint attention's output reused for the next step (skip range 2) for
  100 < t < 800, diffusers' default range.
- TaylorSeer: the joint attentions computed every 5th step (diffusers' default) or every 2nd step after 3 full
  steps, predicted by a first-order Taylor expansion in between (factors in float32). "lite" (`use_lite_mode`):
  the whole blocks are skipped in between and only the output projection (`proj_out`) is predicted (every 2nd
  step computed). With the stochastic sampler that predicts the velocity without the step's fresh noise: 0%.
- CleanImageCache (ours, `mmdit_diffusers.CleanImageCacheConfig`, its defaults): the whole transformer computed
  every 2nd (3rd, 4th, 6th) step after 6 full steps; in between the velocity from the step's own input (fresh noise
  included) toward the clean image `x - sigma v` extrapolated linearly in sigma from the last two computed steps
  (zeroth order: the last one reused).
- LayerSkip: not a cache; skipping one block (the third of four) at every step, for reference: what a
  "free" 25% cut of the transformer costs in score.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, now, quiet_diffusers, use_clock  # noqa: E402

from mmdit_diffusers.shapes.evaluation import sample_batches  # noqa: E402
from mmdit_diffusers.shapes.prompts import evaluation_prompts  # noqa: E402
from mmdit_diffusers.shapes.scorer import evaluate  # noqa: E402
from mmdit_diffusers.shapes.shipped import load_pipeline, resolve_model  # noqa: E402


def first_block_cache(threshold: float):
    def apply(pipe):
        from diffusers import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))

    return apply


def faster_cache(pipe):
    from diffusers import FasterCacheConfig
    from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS

    pipe.transformer.enable_cache(FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 681),
        unconditional_batch_skip_range=5,
        unconditional_batch_timestep_skip_range=(-1, 641),
        spatial_attention_block_identifiers=("transformer_blocks.*attn",),
        attention_weight_callback=lambda _: 0.5,
        tensor_format="BCHW",
        current_timestep_callback=lambda: pipe.current_timestep,
        _unconditional_conditional_input_kwargs_identifiers=(
            *_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS, "pooled_projections"
        ),
    ))


def pyramid_attention_broadcast(pipe):
    from diffusers import PyramidAttentionBroadcastConfig

    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(100, 800),
        spatial_attention_block_identifiers=("transformer_blocks",),
        current_timestep_callback=lambda: pipe.current_timestep,
    ))


def taylorseer(cache_interval: int, lite: bool = False):
    def apply(pipe):
        from diffusers import TaylorSeerCacheConfig

        pipe.transformer.enable_cache(TaylorSeerCacheConfig(
            cache_interval=cache_interval, disable_cache_before_step=3, max_order=1, taylor_factors_dtype=torch.float32,
            use_lite_mode=lite,
        ))

    return apply


def clean_image_cache(cache_interval: int, max_order: int = 1):
    def apply(pipe):
        from mmdit_diffusers import CleanImageCacheConfig

        pipe.transformer.enable_cache(CleanImageCacheConfig(
            cache_interval=cache_interval, disable_cache_before_step=6, max_order=max_order,
        ))

    return apply


def layer_skip(pipe):
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    apply_layer_skip(pipe.transformer, LayerSkipConfig(indices=[2], fqn="transformer_blocks"))


HOOKS = {
    "none": None,
    "FirstBlockCache (0.05)": first_block_cache(0.05),
    "FirstBlockCache (0.3)": first_block_cache(0.3),
    "FasterCache": faster_cache,
    "PyramidAttentionBroadcast": pyramid_attention_broadcast,
    "TaylorSeer (every 5th)": taylorseer(5),
    "TaylorSeer (every 2nd)": taylorseer(2),
    "TaylorSeer lite (every 2nd)": taylorseer(2, lite=True),
    "LayerSkip (block 2 of 4)": layer_skip,
    "CleanImageCache (every 2nd)": clean_image_cache(2),
    "CleanImageCache (every 2nd, zeroth order)": clean_image_cache(2, max_order=0),
    "CleanImageCache (every 3rd)": clean_image_cache(3),
    "CleanImageCache (every 4th)": clean_image_cache(4),
    "CleanImageCache (every 6th)": clean_image_cache(6),
}


def count_attention_rows(pipe) -> list[int]:
    """A counter of the batch rows the joint attentions compute (their `to_q` projections run only when an attention
    is computed, not when a hook skips it or its block)."""
    rows = [0]

    def count(module, args):
        rows[0] += args[0].shape[0]

    for name, module in pipe.transformer.named_modules():
        if name.startswith("transformer_blocks.") and name.endswith(".attn.to_q"):
            module.register_forward_pre_hook(count)
    return rows


def run(hooks: list[str], limit: int | None, seed: int, batch_size: int) -> dict:
    prompts = evaluation_prompts(seed=seed)[:limit]
    streams, images, cpu, wall, attention_rows = {}, {}, {}, {}, {}
    for name in hooks:
        with quiet_diffusers():
            pipe = load_pipeline(resolve_model(None))
            if HOOKS[name] is not None:
                HOOKS[name](pipe)
        pipe.set_progress_bar_config(disable=True)
        attention_rows[name] = count_attention_rows(pipe)
        streams[name] = sample_batches(pipe, prompts, seed=seed, batch_size=batch_size)
        images[name], cpu[name], wall[name] = [], [], []
    rounds = -(-len(prompts) // batch_size)
    for r in range(rounds):
        for name in hooks if r % 2 == 0 else reversed(hooks):
            t0, w0 = now(), time.perf_counter()
            with quiet_diffusers():
                images[name] += next(streams[name])
            cpu[name].append(now() - t0)
            wall[name].append(time.perf_counter() - w0)
        print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    captions = [p.caption for p in prompts]
    rows = {}
    for name in hooks:
        rows[name] = dict(
            s_per_image=sum(cpu[name]) / len(prompts),
            wall_s_per_image=sum(wall[name]) / len(prompts),
            # per round, this hook's time over the no-hook run's (same load, same prompts)
            time_ratio=statistics.median(c / b for c, b in zip(cpu[name], cpu[hooks[0]])),
            attention_computed=attention_rows[name][0] / attention_rows[hooks[0]][0],
            scores=evaluate(images[name], captions),
            batch_cpu_s=cpu[name],
            batch_wall_s=wall[name],
        )
    return dict(prompts=len(prompts), seed=seed, batch_size=batch_size, rows=rows)


def markdown(result: dict, env: dict) -> str:
    rows = result["rows"]
    categories = list(next(iter(rows.values()))["scores"])
    head = ["hook", "s / image", "x none", "attention run", *categories]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, row in rows.items():
        scores = [f"{row['scores'][c]:.1%}" for c in categories]
        cells = [name, f"{row['s_per_image']:.3f}", f"{row['time_ratio']:.2f}", f"{row['attention_computed']:.0%}"]
        lines.append("| " + " | ".join(cells + scores) + " |")
    clock = "CPU" if env["clock"] == "cpu" else "wall"
    lines.append("")
    lines.append(
        f"{result['prompts']} prompts (seed {result['seed']}, batches of {result['batch_size']}), "
        f"`pipelines/mmdit-shapes` at its stored sampler settings; s / image: {clock} seconds of the process per "
        f"image, {env['torch_threads']} intra-op thread(s); x none: median over rounds of the hook's time / the "
        f"no-hook time; attention run: the joint attentions' computed batch rows / the no-hook run's. {env['cpu']} "
        f"({', '.join(env['cpu_flags'])}), {env['cpu_count']} cores, load average {env['load_average'][0]:.1f} at the "
        f"start; torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=list(HOOKS),
                        help="hooks to run; the first is the ratio column's reference (default: all, 'none' first)")
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts only (default: all 480)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16, help="as `mmdit-diffusers evaluate` (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_clock(args.clock)
    env = {**environment(torch.device("cpu")), "clock": args.clock}
    result = run(args.hooks, args.limit, args.seed, args.batch_size)
    table = markdown(result, env)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(environment=env, **result), indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The benchmark suite on one GPU in one call, under 10 minutes (budgeted below; parts 1-2 run once on an H200,
# 2026-11-27: 238 s, results in benchmarks/README.md, "GPU"; part 3 in pieces, 2026-11-30):
#   1. the transformer table, ours vs diffusers' SD3 (same weights, interleaved, ratio of medians), eager, for
#      tiny, medium and SD3-Medium size (width 1536, depth 24, 128 x 128 latent, 333 text tokens, batch 2) in
#      fp32, bf16 weights and autocast bf16, forward and training step; achieved FLOP/s against the GPU's bf16 /
#      fp32 matmul peak timed in the same rounds (for the training rows that share is the MFU); training memory
#      with and without gradient checkpointing (torch.cuda.max_memory_allocated); dropped text padding; the
#      pipeline's time split;
#   2. torch.compile of the bf16 training step at SD3-Medium size, regional: each transformer block compiled on
#      its own, as diffusers' compile_repeated_blocks (a whole-model compile of 24 blocks and their backward would
#      take most of the budget by itself). Other compiled modes: --cases ...:compile / ...:regional by hand;
#   3. the FLUX-style rows, ours vs diffusers' FluxTransformer2DModel (same weights, interleaved): flux-tiny,
#      flux-medium and flux-wide (FLUX.1's width 3072, 24 heads and 1024 x 1024 sequence of 4096 image + 512 text
#      tokens, with 2 double- and 4 single-stream blocks of its 19 + 38), fp32 / bf16 / autocast, forward and
#      training step, into gpu_flux-tiny_flux-medium.json, gpu_flux-wide.json and gpu_flux.log (their own time
#      limits, so they cannot starve part 1).
#
#   bash benchmarks/gpu_bench.sh [OUT_DIR]        # default OUT_DIR: $OUT when set, else benchmarks/results
#   PARTS=flux bash benchmarks/gpu_bench.sh       # only part 3 (PARTS="sd3 flux" by default)
#   FLUX_CONFIGS=flux-wide bash benchmarks/gpu_bench.sh   # part 3 without the launch-bound flux-tiny / flux-medium
#
# Needs python3 with a CUDA torch, diffusers and transformers (pyproject's versions); the package is read from
# src/. A machine without network gets diffusers as a wheel in .whl/ (see benchmarks/README.md, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results}}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

if ! "$PYTHON" -c "import diffusers" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PYTHON" -c "import torch, diffusers; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT_DIR/gpu_info.txt" || true

# One process, results saved after every row (a run stopped by the time limit keeps what it measured). Budget on
# an H100 (estimated, unmeasured): building the SD3-Medium-sized pair on the CPU ~30 s; 18 eager cases, each
# >= 5 interleaved rounds (fp32 training at SD3-Medium size ~2 s a step: ~40 s; the rest ~5 s each) ~2 min;
# regional compile of the bf16 training step, 2 block variants (the last block's text stream is pre-only) x 2
# models ~1.5 min; memory, padding, pipelines ~1 min.
CASES=()
for config in tiny medium sd3-medium; do
  for dtype in fp32 bf16 autocast; do
    for pass in forward train; do CASES+=("$config:$dtype:$pass:eager"); done
  done
done
CASES+=("sd3-medium:bf16:forward:regional" "sd3-medium:bf16:train:regional")
PARTS=${PARTS:-"sd3 flux"}
if [[ " $PARTS " == *" sd3 "* ]]; then
  timeout 290 "$PYTHON" benchmarks/suite.py --device cuda --target-s 2 --cases "${CASES[@]}" \
    --memory medium sd3-medium --padding sd3-medium --steps 28 --json "$OUT_DIR/gpu.json" 2>&1 \
    | tee "$OUT_DIR/gpu.log" || echo "stopped early (exit ${PIPESTATUS[0]}): partial results in $OUT_DIR/gpu.json"
fi

# Part 3, FLUX-style, transformer rows only (the pipeline, memory and padding sections are part 1's). Measured on
# an H200, 2026-11-30: flux-tiny and flux-medium ~45 s, flux-wide ~80 s with building its pair. flux-wide runs
# with PyTorch's cuDNN attention kernel off for both models: there diffusers' FluxTransformer2DModel hits an
# illegal memory access in the bf16 / autocast training step's attention backward (torch 2.11.0+cu130; ours runs),
# which ends the process.
if [[ " $PARTS " == *" flux "* ]]; then
  for config in ${FLUX_CONFIGS:-flux-tiny:flux-medium flux-wide}; do
    FLUX_CASES=()
    for name in ${config//:/ }; do
      for dtype in fp32 bf16 autocast; do
        for pass in forward train; do FLUX_CASES+=("$name:$dtype:$pass:eager"); done
      done
    done
    extra=(); [[ $config == flux-wide ]] && extra=(--no-cudnn-attention)
    json="$OUT_DIR/gpu_${config//:/_}.json"
    timeout 150 "$PYTHON" benchmarks/bench_transformer.py --device cuda --target-s 2 --cases "${FLUX_CASES[@]}" \
      ${extra[@]+"${extra[@]}"} --memory --padding --json "$json" 2>&1 \
      | tee -a "$OUT_DIR/gpu_flux.log" || echo "stopped early (exit ${PIPESTATUS[0]}): partial results in $json"
  done
fi

"$PYTHON" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("gpu.json", "gpu_flux-tiny_flux-medium.json", "gpu_flux-wide.json"):
    path = out / name
    if not path.exists():
        print(f"{name}: missing (that part did not finish)")
        continue
    result = json.loads(path.read_text())
    for row in result["rows"]:
        if row["config"] in ("sd3-medium", "flux-wide") and row["pass_"] == "train" and row["dtype"] in ("bf16", "autocast"):
            print(f"MFU {row['case']}: ours {row['ours_peak_share']:.1%}, {row.get('reference', 'SD3')} "
                  f"{row['sd3_peak_share']:.1%} of the "
                  f"measured bf16 matmul peak {row['peak_gflops'] / 1e3:.0f} TFLOP/s (ours {row['ours_gflops'] / 1e3:.0f} "
                  f"TFLOP/s; ratio of times ours/diffusers {row['ratio']:.3f})")
EOF

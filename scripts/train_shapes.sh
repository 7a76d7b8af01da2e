#!/usr/bin/env bash
# Reproduces the shipped pipeline pipelines/mmdit-shapes from nothing, on a CPU:
#   1. 20,000 Shapes images with captions          (mmdit-diffusers dataset)
#   2. the VAE, trained on them                      (mmdit-diffusers vae)
#   3. the text encoders (CLIP, T5), trained contrastively on the images, then frozen (mmdit-diffusers text-encoders)
#   4. the base pipeline: tokenizers, text encoders, VAE, a zero-initialised transformer (mmdit-diffusers base)
#   5. the transformer, trained with rectified flow  (mmdit-diffusers train, configs/train_shapes.yaml), in
#      two DDP processes of one thread each (both cores of a 2-core CPU)
#   6. the result in fp16 under pipelines/mmdit-shapes (mmdit-diffusers export; its model card and samples kept),
#      then `mmdit-diffusers evaluate` on it
# Every step writes into build/shapes/ and is skipped when its output exists (delete it to redo a step).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# `accelerate launch` runs a module: `-m mmdit_diffusers.train` is `mmdit-diffusers train`.
# without a GPU, accelerate joins the processes of `launch --multi_gpu` (DDP over gloo) only with this set
export ACCELERATE_USE_CPU=1

cli=.venv/bin/mmdit-diffusers
out=build/shapes
mkdir -p "$out"
[ -d "$out/data" ] || $cli dataset "$out/data" --num_images 20000 --seed 0
# the VAE in two stages: 32 x 32 crops (cheap), then whole images at a lower learning rate (sharp colours);
# one process on both threads
[ -d "$out/vae-crops" ] || OMP_NUM_THREADS=2 $cli vae --train_data_dir "$out/data" --output_dir "$out/vae-crops" \
    --max_train_steps 1200 --train_batch_size 32 --crop_size 32 --block_out_channels 16 32 64
[ -d "$out/vae" ] || OMP_NUM_THREADS=2 $cli vae --init_from "$out/vae-crops" --train_data_dir "$out/data" \
    --output_dir "$out/vae" --max_train_steps 800 --train_batch_size 16 --crop_size 64 --learning_rate 5e-4
# both threads for one process (the contrastive batch of 256 images and ~500 captions)
[ -d "$out/text-encoders" ] || OMP_NUM_THREADS=2 $cli text-encoders --train_data_dir "$out/data" \
    --output_dir "$out/text-encoders"
[ -d "$out/base" ] || $cli base --text_encoders "$out/text-encoders" --vae "$out/vae" \
    --output_dir "$out/base"
[ -f "$out/transformer/model_index.json" ] || .venv/bin/accelerate launch --multi_gpu --num_processes 2 \
    --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m mmdit_diffusers.train --config configs/train_shapes.yaml --resume_from_checkpoint latest
$cli export "$out/transformer" pipelines/mmdit-shapes --overwrite
$cli evaluate --json "$out/scores.json" --grid "$out/evaluate-grid.png" --overwrite

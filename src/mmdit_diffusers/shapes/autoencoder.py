"""Train a small `AutoencoderKL` on the images of a dataset folder (the Shapes VAE), single process, CPU friendly.

    mmdit-diffusers vae --train_data_dir DATA --output_dir OUT [--max_train_steps N]

Loss: mean squared reconstruction error + `kl_weight` * KL(q(z|x) || N(0, I)). At the end the latent
statistics of the training images set the VAE config's `shift_factor` (mean) and `scaling_factor`
(1 / std), so that pipelines feed the transformer latents of zero mean and unit variance, as SD3.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from ..files import atomic_directory
from ..training.data import load_image_folder


def load_images(folder: str | os.PathLike, resolution: int) -> torch.Tensor:
    """The images of a dataset folder (imagefolder layout with metadata.jsonl, read by the library's
    `load_image_folder`) as one [N, 3, R, R] tensor in [-1, 1]."""
    source = load_image_folder(str(folder), verify=False)  # every image is opened below anyway
    arrays = [np.asarray(source.image(i).convert("RGB").resize((resolution, resolution), Image.BICUBIC))
              for i in range(len(source))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def random_crops(images: torch.Tensor, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random images, each cut to a random `size` x `size` window: the autoencoder is convolutional, so
    training on crops teaches the same maps for a fraction of the compute."""
    picks = torch.randint(len(images), (count,), generator=generator).tolist()
    offsets = torch.randint(images.shape[-1] - size + 1, (count, 2), generator=generator).tolist()
    return torch.stack([images[i, :, y : y + size, x : x + size] for i, (y, x) in zip(picks, offsets)])


def build_autoencoder(latent_channels: int, block_out_channels: tuple[int, ...], resolution: int) -> AutoencoderKL:
    """Each block after the first halves the side: 3 blocks turn 64 x 64 images into 16 x 16 latents."""
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, min(block_out_channels)),
        sample_size=resolution,
    )


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(mean, std) of the posterior means over the images."""
    latents = torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])
    return latents.mean().item(), latents.std().item()


def train_autoencoder(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    images = load_images(args.train_data_dir, args.resolution)
    if args.init_from:
        vae = AutoencoderKL.from_pretrained(args.init_from)
    else:
        vae = build_autoencoder(args.latent_channels, tuple(args.block_out_channels), args.resolution)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.max_train_steps, eta_min=args.learning_rate * 0.05)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.max_train_steps + 1):
        batch = random_crops(images, args.train_batch_size, args.crop_size or args.resolution, generator)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = torch.nn.functional.mse_loss(reconstruction, batch)
        loss = mse + args.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.max_train_steps:
            print(f"step {step}/{args.max_train_steps} mse {mse.item():.5f} ({time.perf_counter() - start:.0f}s)", flush=True)

    vae.eval()
    mean, std = latent_statistics(vae, images[: args.statistics_images])
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    with atomic_directory(args.output_dir) as staging:
        vae.save_pretrained(staging)
    print(f"saved {args.output_dir} (shift_factor {mean:.4f}, scaling_factor {1 / std:.4f})")
    return Path(args.output_dir)

"""Train a small `AutoencoderKL` on a folder of images (the Shapes VAE), single process, CPU friendly.

    python -m mmdit_diffusers.training.autoencoder --train_data_dir DATA --output_dir OUT [--max_train_steps N]

Loss: mean squared reconstruction error + `kl_weight` * KL(q(z|x) || N(0, I)). At the end the latent
statistics of the training images set the VAE config's `shift_factor` (mean) and `scaling_factor`
(1 / std), so that pipelines feed the transformer latents of zero mean and unit variance, as SD3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_images(folder: str | os.PathLike, resolution: int) -> torch.Tensor:
    """All images of a folder as one [N, 3, R, R] tensor in [-1, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--train_data_dir {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--train_data_dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for path in files:
        try:
            image = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        except OSError as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        arrays.append(np.asarray(image))
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
    out = Path(args.output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent if out.parent.exists() else None))
    vae.save_pretrained(staging)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), out)
    print(f"saved {out} (shift_factor {mean:.4f}, scaling_factor {1 / std:.4f})")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mmdit_diffusers.training.autoencoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_data_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--init_from", default=None, help="continue training this AutoencoderKL folder")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--latent_channels", type=int, default=4)
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--crop_size", type=int, default=32, help="train on random crops of this side (0: whole images)")
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_train_steps", type=int, default=1500)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument("--statistics_images", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("resolution", "latent_channels", "train_batch_size", "max_train_steps", "statistics_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    factor = 2 ** (len(args.block_out_channels) - 1)
    if args.crop_size and (args.crop_size > args.resolution or args.crop_size % factor):
        parser.error(f"--crop_size {args.crop_size} must be at most --resolution and divisible by {factor}")
    if args.resolution % 2 ** (len(args.block_out_channels) - 1):
        parser.error(f"--resolution {args.resolution} is not divisible by the VAE's downsampling factor "
                     f"{2 ** (len(args.block_out_channels) - 1)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_autoencoder(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

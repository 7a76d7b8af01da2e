"""The Shapes pipeline's tokenizers and text encoders: built from the caption vocabulary, trained on the Shapes
world, then frozen.

    mmdit-diffusers text-encoders --train_data_dir DATA --output_dir OUT [--max_train_steps 1000]

SD3's CLIP and T5 come to the transformer knowing the world; random text encoders do not, and a transformer
trained on top of them learns the caption as a bag of words (colours and relation direction move its loss by
~0.1%, `mmdit-diffusers probe`). So our small encoders learn the Shapes world first:

1. CLIP, contrastively (CLIP's objective): a small image tower (a CNN on the images at 32 x 32, used only here) and
   CLIP's pooled `text_embeds` embed a batch of image-caption pairs; InfoNCE in both directions, every copy of the
   image's caption a positive. Hard negatives (`hard_negatives`) join every batch: the opposite relation, the two
   objects swapped, the colours swapped, the other count word; random captions rarely differ from the true one
   in only these ways.
2. T5, distilled from CLIP: its masked mean state (through a linear head used only here) learns to pick each
   training caption's CLIP embedding among all of them (InfoNCE over the ~850 training captions, text only).
   (Training T5 contrastively beside CLIP, on the same image tower, held CLIP back: 71% instead of 95% on the
   opposite relation after 750 steps.)

OUT holds `tokenizer/`, `text_encoder/`, `tokenizer_3/`, `text_encoder_3/` in the standard formats (what
`mmdit-diffusers base --text_encoders OUT` reads) and `hard_negatives.json`: for fresh
relation and counting images, how often each encoder ranks the true caption above each of its hard negatives.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from ..files import atomic_directory
from ..training.data import load_image_folder
from .render import sample_example
from .tokenizers import build_clip_tokenizer, build_t5_tokenizer
from .world import COLOURS, COUNT_WORDS, OPPOSITE, RELATIONS, SHAPES, parse_caption

TEXT_WIDTH = 64  # both encoders' width: the transformer's txt_dim and cond_dim
CLIP_TOKENS = 16  # captions are at most 9 words
T5_TOKENS = 16
TOWER_RESOLUTION = 32  # the image tower sees the 64 x 64 images at this size
OTHER_COUNT = {"two": "three", "three": "two"}


def caption_vocabulary() -> list[str]:
    words = ["a", *COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), *COUNT_WORDS]
    words += [w for relation in RELATIONS for w in relation.split()]
    return sorted(set(words))


def hard_negatives(caption: str) -> dict[str, str]:
    """Captions that differ from `caption` only in what a bag of words cannot see, by kind of difference."""
    scene = parse_caption(caption)
    if scene.relation is not None:
        a, b = scene.objects
        negatives = {"opposite relation": f"a {a} {OPPOSITE[scene.relation]} a {b}",
                     "swapped objects": f"a {b} {scene.relation} a {a}"}
        if a.colour != b.colour and a.shape != b.shape:
            negatives["swapped colours"] = f"a {b.colour} {a.shape} {scene.relation} a {a.colour} {b.shape}"
        return negatives
    word, rest = caption.split(" ", 1)
    return {"other count": f"{OTHER_COUNT[word]} {rest}"} if word in OTHER_COUNT else {}


def training_negatives(caption: str) -> list[str]:
    """The hard negatives CLIP trains with: all but held-out compositions, which stay unseen, also as negatives."""
    return [n for n in hard_negatives(caption).values() if parse_caption(n).category != "heldout"]


def build_tokenizers() -> tuple[CLIPTokenizer, T5TokenizerFast]:
    """CLIP (BPE) and T5 (Unigram) tokenizers in which every caption word is one token."""
    with tempfile.TemporaryDirectory() as tmp:
        words = caption_vocabulary()
        clip = CLIPTokenizer.from_pretrained(build_clip_tokenizer(words, f"{tmp}/clip", model_max_length=CLIP_TOKENS))
        t5 = T5TokenizerFast.from_pretrained(build_t5_tokenizer(words, f"{tmp}/t5", model_max_length=T5_TOKENS))
    return clip, t5


def build_text_encoders(clip_tokenizer, t5_tokenizer, seed: int) -> tuple[CLIPTextModelWithProjection, T5EncoderModel]:
    """A 2-layer CLIP text tower with projection and a 2-layer T5 encoder, both TEXT_WIDTH wide, randomly initialised."""
    torch.manual_seed(seed)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=TEXT_WIDTH, max_position_embeddings=CLIP_TOKENS,
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.eos_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=TEXT_WIDTH, d_kv=16, d_ff=4 * TEXT_WIDTH, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False,
    ))
    return clip, t5


class ContrastiveTowers(nn.Module):
    """The text encoders, an image tower and T5's pooling head; every embedding L2-normalised, TEXT_WIDTH wide."""

    def __init__(self, clip: CLIPTextModelWithProjection, t5: T5EncoderModel, clip_tokenizer, t5_tokenizer):
        super().__init__()
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.image = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.Flatten(),
            nn.Linear(128 * (TOWER_RESOLUTION // 8) ** 2, 256), nn.GELU(), nn.Linear(256, TEXT_WIDTH),
        )
        self.t5_head = nn.Linear(TEXT_WIDTH, TEXT_WIDTH)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(pixels), dim=-1)

    def embed_clip(self, captions: list[str]) -> torch.Tensor:
        """CLIP's pooled text_embeds, tokenized as the pipeline tokenizes."""
        ids = self.clip_tokenizer(captions, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                                  return_tensors="pt").input_ids
        return F.normalize(self.clip(ids).text_embeds, dim=-1)

    def embed_t5(self, captions: list[str]) -> torch.Tensor:
        """T5's mean state over the caption's tokens (the pipeline masks padding too), through t5_head."""
        tokens = self.t5_tokenizer(captions, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                   return_tensors="pt")
        states = self.t5(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        mask = tokens.attention_mask.unsqueeze(-1).to(states.dtype)
        return F.normalize(self.t5_head((states * mask).sum(1) / mask.sum(1)), dim=-1)


def contrastive_loss(image_z, text_z, positives, log_temperature) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per row.

    image_z [B, D] and text_z [C, D] (the batch's captions first, then the hard negatives); positives [B, C] bool,
    True where caption j describes image i. Images choose among all C captions; the B batch captions choose among the
    B images."""
    logits = log_temperature.exp().clamp(max=100.0) * image_z @ text_z.T
    batch = image_z.shape[0]

    def nll_of_positives(scores, mask):
        return -(scores.log_softmax(-1).masked_fill(~mask, -torch.inf).logsumexp(-1)).mean()

    return nll_of_positives(logits, positives) + nll_of_positives(logits[:, :batch].T, positives[:, :batch].T)


def load_images(train_data_dir: Path) -> tuple[torch.Tensor, list[str]]:
    """The dataset's images at TOWER_RESOLUTION in [-1, 1] and their captions (imagefolder layout with
    metadata.jsonl, read by the library's `load_image_folder`; every problem an `InputError` naming the file)."""
    source = load_image_folder(str(train_data_dir), verify=False)  # every image is opened below anyway
    captions = [source.caption(i) for i in range(len(source))]
    for caption in set(captions):
        parse_caption(caption)  # ValueError naming the caption if it is not a Shapes caption
    pixels = np.stack([_small(source.image(i)) for i in range(len(source))])
    return _to_tensor(pixels), captions


def _small(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((TOWER_RESOLUTION, TOWER_RESOLUTION), Image.BILINEAR))


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_text_encoders(
    train_data_dir: str | Path,
    output_dir: str | Path,
    max_train_steps: int = 1000,
    train_batch_size: int = 256,
    learning_rate: float = 2e-3,
    lr_warmup_steps: int = 100,
    t5_distillation_steps: int = 300,
    seed: int = 0,
    log_every: int = 100,
) -> Path:
    """Train CLIP contrastively, distil T5 from it (module docstring) and save both, frozen, with their tokenizers.

    The folder appears only when complete (written next to it, then renamed)."""
    if max_train_steps < 1:
        raise ValueError(f"max_train_steps must be positive, got {max_train_steps}")
    if train_batch_size < 2:
        raise ValueError(f"train_batch_size must be at least 2 (the other images are the negatives), got {train_batch_size}")
    if t5_distillation_steps < 1:
        raise ValueError(f"t5_distillation_steps must be positive, got {t5_distillation_steps}")
    train_data_dir, output_dir = Path(train_data_dir), Path(output_dir)
    images, captions = load_images(train_data_dir)
    clip_tokenizer, t5_tokenizer = build_tokenizers()
    towers = ContrastiveTowers(*build_text_encoders(clip_tokenizer, t5_tokenizer, seed), clip_tokenizer, t5_tokenizer)
    rng = np.random.default_rng(seed)
    negatives = {caption: training_negatives(caption) for caption in set(captions)}

    def clip_step():
        index = rng.integers(len(captions), size=train_batch_size)
        batch = [captions[i] for i in index]
        candidates = batch + [n for caption in batch for n in negatives[caption]]
        positives = torch.tensor([[c == d for d in candidates] for c in batch])
        return contrastive_loss(towers.embed_images(images[index]), towers.embed_clip(candidates), positives,
                                towers.log_temperature)

    clip_parameters = [*towers.clip.parameters(), *towers.image.parameters(), towers.log_temperature]
    _optimize("CLIP", clip_step, clip_parameters, max_train_steps, learning_rate, lr_warmup_steps, log_every)

    known = sorted(set(captions))  # the training captions
    with torch.no_grad():
        targets = towers.embed_clip(known)
    identity = torch.eye(len(known), dtype=torch.bool)
    distillation_temperature = torch.tensor(math.log(1 / 0.05))

    def t5_step():
        return contrastive_loss(targets, towers.embed_t5(known), identity, distillation_temperature)

    t5_parameters = [*towers.t5.parameters(), *towers.t5_head.parameters()]
    _optimize("T5", t5_step, t5_parameters, t5_distillation_steps, learning_rate, lr_warmup_steps // 4, log_every)

    accuracy = hard_negative_accuracy(towers, num_images=600, seed=seed + 1)
    print(json.dumps(accuracy, indent=1), flush=True)
    return _save(towers, accuracy, output_dir)


def _optimize(name, loss_fn, parameters, steps, learning_rate, warmup_steps, log_every) -> None:
    """AdamW, linear warm-up then cosine decay to zero."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup_steps, 1))
                                                 * 0.5 * (1 + math.cos(math.pi * step / steps)))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"{name} step {step}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s", flush=True)


@torch.no_grad()
def hard_negative_accuracy(towers: ContrastiveTowers, num_images: int, seed: int) -> dict[str, dict[str, float]]:
    """{encoder: {kind of negative: share of fresh images whose true caption scores above that negative}}."""
    towers.eval()
    rng = np.random.default_rng(seed)
    examples = [sample_example(rng, category) for category in ("relation", "counting") for _ in range(num_images // 2)]
    image_z = towers.embed_images(_to_tensor(np.stack([_small(image) for image, _ in examples])))
    kinds = sorted({kind for _, caption in examples for kind in hard_negatives(caption)})
    accuracy = {}
    for name, embed in (("text_encoder", towers.embed_clip), ("text_encoder_3", towers.embed_t5)):
        true_score = (image_z * embed([caption for _, caption in examples])).sum(-1)
        accuracy[name] = {}
        for kind in kinds:
            chosen = [i for i, (_, caption) in enumerate(examples) if kind in hard_negatives(caption)]
            other_z = embed([hard_negatives(examples[i][1])[kind] for i in chosen])
            wins = true_score[chosen] > (image_z[chosen] * other_z).sum(-1)
            accuracy[name][kind] = round(wins.float().mean().item(), 4)
    towers.train()
    return accuracy


def _save(towers: ContrastiveTowers, accuracy: dict, output_dir: Path) -> Path:
    with atomic_directory(output_dir) as staging:
        towers.clip_tokenizer.save_pretrained(staging / "tokenizer")
        towers.t5_tokenizer.save_pretrained(staging / "tokenizer_3")
        for name, model in (("text_encoder", towers.clip), ("text_encoder_3", towers.t5)):
            model.eval().requires_grad_(False).save_pretrained(staging / name)
        (staging / "hard_negatives.json").write_text(json.dumps(accuracy, indent=1) + "\n")
    return output_dir

"""The untrained Shapes pipeline that `mmdit_diffusers.train` starts from.

    python -m mmdit_diffusers.shapes.base_pipeline --vae VAE_DIR --output_dir OUT [--seed 0]

- tokenizers: built from the caption vocabulary (`caption_vocabulary()`), saved as CLIP (BPE) and T5 (Unigram)
  tokenizers, so every caption word is one token;
- text encoders: a small `CLIPTextModelWithProjection` and `T5EncoderModel`, randomly initialised from `seed` and
  kept frozen, except that CLIP's first layer has its residual branches (attention output and second MLP
  projection) set to zero. The pipeline reads CLIP's penultimate hidden states, which are therefore exactly
  token embedding + position embedding: every caption word keeps its identity *and its place*, which the
  transformer needs to bind a colour to the shape after it and to tell "A left of B" from "B left of A". (Fully
  random layers bury both under a mix of the whole caption: the state of the first colour word of two captions
  that differ only there had cosine similarity 0.77. T5 has no absolute positions, so its random outputs are a
  bag of words.) CLIP's last layer stays random and mixes the caption into the pooled vector;
- vae: the `AutoencoderKL` trained on Shapes images (`python -m mmdit_diffusers.training.autoencoder`);
- transformer: a fresh, zero-initialised `MMDiTTransformer2DModel` (`SHAPES_TRANSFORMER`), trained with text masks;
- scheduler: `FlowMatchEulerDiscreteScheduler(shift=1.0)` (no resolution shift at 16 x 16 latents).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from ..models import MMDiTTransformer2DModel
from ..text_tokenizers import build_clip_tokenizer, build_t5_tokenizer
from .world import COLOURS, COUNT_WORDS, RELATIONS, SHAPES

TEXT_WIDTH = 64  # both encoders' width: the transformer's txt_dim and cond_dim
CLIP_TOKENS = 16  # captions are at most 9 words
T5_TOKENS = 16
SHAPES_TRANSFORMER = dict(hidden_size=128, depth=4, num_heads=4, mlp_ratio=4, patch_size=2, qk_norm="rms_norm")


def caption_vocabulary() -> list[str]:
    words = ["a", *COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), *COUNT_WORDS]
    words += [w for relation in RELATIONS for w in relation.split()]
    return sorted(set(words))


def build_text_encoders(vocab_clip: int, vocab_t5: int, bos: int, eos: int, seed: int):
    torch.manual_seed(seed)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_clip, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=TEXT_WIDTH, max_position_embeddings=CLIP_TOKENS, bos_token_id=bos,
        eos_token_id=eos, pad_token_id=eos,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab_t5, d_model=TEXT_WIDTH, d_kv=16, d_ff=4 * TEXT_WIDTH, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False,
    ))
    first = clip.text_model.encoder.layers[0]
    with torch.no_grad():
        for branch_end in (first.self_attn.out_proj, first.mlp.fc2):
            branch_end.weight.zero_()
            branch_end.bias.zero_()
    return clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)


def build_base_pipeline(vae_dir: str | Path, output_dir: str | Path, seed: int = 0) -> Path:
    from ..pipelines import MMDiTPipeline

    vae = AutoencoderKL.from_pretrained(vae_dir)
    with tempfile.TemporaryDirectory() as tmp:
        words = caption_vocabulary()
        clip_tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer(words, f"{tmp}/clip", model_max_length=CLIP_TOKENS))
        t5_tok = T5TokenizerFast.from_pretrained(build_t5_tokenizer(words, f"{tmp}/t5", model_max_length=T5_TOKENS))
    clip, t5 = build_text_encoders(len(clip_tok), len(t5_tok), clip_tok.bos_token_id, clip_tok.eos_token_id, seed)
    latent_side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    patch = SHAPES_TRANSFORMER["patch_size"]
    torch.manual_seed(seed)
    transformer = MMDiTTransformer2DModel(
        **SHAPES_TRANSFORMER,
        img_dim=vae.config.latent_channels * patch**2,
        txt_dim=TEXT_WIDTH,
        cond_dim=TEXT_WIDTH,
        img_tokens=(latent_side // patch) ** 2,
        txt_tokens=CLIP_TOKENS + T5_TOKENS,
        in_channels=vae.config.latent_channels,
        use_text_attention_mask=True,
    )
    pipe = MMDiTPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=clip, tokenizer=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok,
    )
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    pipe.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmdit_diffusers.shapes.base_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, help="folder of the trained AutoencoderKL")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (Path(args.vae) / "config.json").is_file():
        print(f"error: --vae {args.vae}: no config.json; train the VAE first", file=sys.stderr)
        return 2
    print(build_base_pipeline(args.vae, args.output_dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Recolour one shape of a generated Shapes picture, by inpainting and by img2img, and check it with the scorer.

    python examples/inpaint_shapes.py                # writes docs/inpaint-example.png (seed 0)
    python examples/inpaint_shapes.py --seeds 8      # also: how many of seeds 0-7 the scorer passes

The shipped Shapes pipeline draws "a red circle left of a blue square"; the square's box (found by the scorer's
detector, 3 px wider) is the mask; inpainting redraws it from noise (strength 1.0) and img2img redraws the whole
picture at strength 0.6, both prompted "a red circle left of a green square".
"""

import argparse

import torch
from PIL import Image, ImageDraw

from mmdit_diffusers import MMDiTImg2ImgPipeline, MMDiTInpaintPipeline, MMDiTPipeline
from mmdit_diffusers.shapes import scorer
from mmdit_diffusers.shapes.shipped import SHIPPED_PIPELINE

SOURCE, TARGET = "a red circle left of a blue square", "a red circle left of a green square"


def square_mask(image: Image.Image, pad: int = 3) -> Image.Image:
    x0, y0, x1, y1 = next(o.bbox for o in scorer.detect_objects(image) if o.shape == "square")
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle([x0 - pad, y0 - pad, x1 - 1 + pad, y1 - 1 + pad], fill=255)
    return mask


def side_by_side(panels: list[tuple[str, Image.Image]], scale: int = 3) -> Image.Image:
    side, gap, text = 64 * scale, 6, 14
    sheet = Image.new("RGB", (len(panels) * (side + gap) - gap, side + text), "white")
    for i, (label, image) in enumerate(panels):
        sheet.paste(image.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (i * (side + gap), 0))
        ImageDraw.Draw(sheet).text((i * (side + gap) + 2, side + 1), label, fill="black")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default="docs/inpaint-example.png")
    args = parser.parse_args()

    text_to_image = MMDiTPipeline.from_pretrained(SHIPPED_PIPELINE)
    inpaint, img2img = MMDiTInpaintPipeline.from_pipe(text_to_image), MMDiTImg2ImgPipeline.from_pipe(text_to_image)
    for pipe in (text_to_image, inpaint, img2img):
        pipe.set_progress_bar_config(disable=True)
    passed = {"source": 0, "inpaint": 0, "img2img": 0}
    for seed in range(args.seeds):
        def seeded():
            return torch.Generator().manual_seed(seed)

        source = text_to_image(SOURCE, generator=seeded()).images[0]
        passed["source"] += scorer.score(source, SOURCE)
        if not scorer.score(source, SOURCE):
            continue  # no square to recolour
        mask = square_mask(source)
        redrawn = inpaint(TARGET, image=source, mask_image=mask, strength=1.0, generator=seeded()).images[0]
        redone = img2img(TARGET, image=source, strength=0.6, generator=seeded()).images[0]
        for name, image in (("inpaint", redrawn), ("img2img", redone)):
            judgement = scorer.judge(image, TARGET)
            passed[name] += judgement.passed
            print(f"seed {seed} {name}: {'pass' if judgement.passed else 'fail'} ({judgement.reason})")
        if seed == 0:
            panels = [(SOURCE[2:], source), ("mask", mask), ("inpaint, strength 1", redrawn), ("img2img, 0.6", redone)]
            side_by_side(panels).save(args.out)
            print(f"wrote {args.out}")
    print(f"scorer passes over {args.seeds} seeds: source {passed['source']} ('{SOURCE}'), then '{TARGET}': "
          f"inpaint {passed['inpaint']}, img2img {passed['img2img']}")


if __name__ == "__main__":
    main()

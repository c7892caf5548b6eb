"""Make sample inputs for the thumbnails example: a folder of generated images, one corrupt file,
and one that makes the decoder hang, plus ``inputs.txt`` listing them all (one path a line).

    python prepare.py OUT_DIR [--count 40]
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

FORMATS = [("JPEG", ".jpg", "RGB"), ("PNG", ".png", "RGBA"), ("GIF", ".gif", "P"), ("BMP", ".bmp", "RGB")]
CORRUPT = "broken.jpg"
HANGS = "stuck.jpg"


def sample_image(rng: random.Random, number: int) -> Image.Image:
    """A gradient with a few shapes and the image's number: varied sizes and colours, easy to tell apart."""
    width, height = rng.randint(160, 1200), rng.randint(160, 900)
    top, bottom = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    image = ImageOps.colorize(Image.linear_gradient("L").resize((width, height)), top, bottom)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randint(20, width // 2 + 20), y0 + rng.randint(20, height // 2 + 20))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    draw.text((10, 10), f"#{number}", fill=(255, 255, 255))
    return image


def prepare(out: Path, count: int = 40, seed: int = 5) -> Path:
    """Write ``count`` images, the two bad inputs and ``inputs.txt`` under ``out``; return the list's path."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for number in range(count):
        fmt, suffix, mode = FORMATS[number % len(FORMATS)]
        path = images / f"img_{number:03d}{suffix}"
        image = sample_image(rng, number)
        # GIF: an adaptive palette, as an image editor would save it (convert("P") would dither).
        (image.quantize(128) if mode == "P" else image.convert(mode)).save(path, fmt)
        paths.append(path)

    # Not an image at all, whatever its name says: the decoder raises.
    corrupt = images / CORRUPT
    corrupt.write_bytes(rng.randbytes(4096))
    # A named pipe: opening it blocks until someone writes, which nobody will. Like a file on a
    # dead network share, only the per-input timeout can get a worker out of it.
    hangs = images / HANGS
    hangs.unlink(missing_ok=True)
    os.mkfifo(hangs)
    paths[count // 3:count // 3] = [corrupt]
    paths[2 * count // 3:2 * count // 3] = [hangs]

    listing = out / "inputs.txt"
    listing.write_text("".join(f"{path.resolve()}\n" for path in paths), encoding="utf-8")
    return listing


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("out", type=Path, help="folder to write images/ and inputs.txt into")
    cli.add_argument("--count", type=int, default=40, help="how many good images (default 40)")
    args = cli.parse_args()
    listing = prepare(args.out, args.count)
    print(f"prepared {args.count} images + 2 bad inputs, listed in {listing}")


if __name__ == "__main__":
    main()

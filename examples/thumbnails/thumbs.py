"""Make one thumbnail: the function ``forkio map`` runs over every input.

    forkio map examples/thumbnails/thumbs.py:make_thumbnail --input inputs.txt --timeout 5 --output out.jsonl

Thumbnails go to ``$THUMBS_DIR`` (default ``./thumbs``), as JPEG, at most 160 x 160.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

SIZE = (160, 160)


def make_thumbnail(path: str) -> dict[str, Any]:
    """Write a thumbnail of the image at ``path``; return where it went and both sizes."""
    source = Path(path)
    out_dir = Path(os.environ.get("THUMBS_DIR", "thumbs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        original_size = image.size
        image.draft("RGB", SIZE)  # JPEG: decode at a reduced scale, much faster for big photos
        thumb = ImageOps.exif_transpose(image)  # photos from phones are often stored sideways
        thumb.thumbnail(SIZE)  # keeps the aspect ratio
    if thumb.mode != "RGB":
        # Flatten transparency onto white: JPEG has no alpha, and black would look like a bug.
        rgba = thumb.convert("RGBA")
        thumb = Image.new("RGB", rgba.size, "white")
        thumb.paste(rgba, mask=rgba.getchannel("A"))
    target = out_dir / f"{source.name}.thumb.jpg"  # the full name: a.png and a.jpg must not collide
    thumb.save(target, "JPEG", quality=85)
    return {"thumbnail": str(target.resolve()), "width": thumb.width, "height": thumb.height,
            "source_width": original_size[0], "source_height": original_size[1]}

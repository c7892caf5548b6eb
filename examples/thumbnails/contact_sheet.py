"""Build a contact-sheet PDF from ``forkio map``'s JSON lines: every thumbnail in a grid, with its
file name, and a last page listing the inputs that failed and why.

    python contact_sheet.py results.jsonl contact-sheet.pdf
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLUMNS, ROWS = 4, 5
CELL_W, CELL_H = 200, 190  # a 160 px thumbnail, its caption and some air
MARGIN, HEADER = 25, 40
PAGE = (2 * MARGIN + COLUMNS * CELL_W, 2 * MARGIN + HEADER + ROWS * CELL_H)
DPI = 100  # 850 x 1100 px: US Letter at 100 dpi
FAILURES_PER_PAGE = 22


@dataclass
class Sheet:
    """What went into the PDF."""

    pages: int = 0
    thumbnails: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The JSON lines, in input order (``forkio map`` writes them as they finish)."""
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return sorted(records, key=lambda record: record["index"])


def _new_page(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    page = Image.new("RGB", PAGE, "white")
    draw = ImageDraw.Draw(page)
    draw.text((MARGIN, MARGIN), title, fill="black", font=_font(18))
    return page, draw


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def build(results: Path, pdf: Path) -> Sheet:
    """Lay the thumbnails out, ``COLUMNS`` x ``ROWS`` a page, and save all pages as one PDF."""
    records = read_results(results)
    done = [r for r in records if r["ok"]]
    sheet = Sheet(failures=[r for r in records if not r["ok"]])
    per_page = COLUMNS * ROWS
    page_count = max(1, -(-len(done) // per_page))
    pages: list[Image.Image] = []
    caption = _font(11)
    for first in range(0, max(1, len(done)), per_page):
        page, draw = _new_page(f"{results.name}: page {len(pages) + 1} of {page_count}, {len(done)} images")
        for slot, record in enumerate(done[first:first + per_page]):
            result = record["result"]
            x = MARGIN + (slot % COLUMNS) * CELL_W
            y = MARGIN + HEADER + (slot // COLUMNS) * CELL_H
            with Image.open(result["thumbnail"]) as thumb:
                # Centre each thumbnail in its 160 px box: they have different aspect ratios.
                page.paste(thumb, (x + (160 - thumb.width) // 2, y + (160 - thumb.height) // 2))
            label = f"{Path(record['input']).name}  {result['source_width']}x{result['source_height']}"
            draw.text((x, y + 165), label, fill="dimgray", font=caption)
            sheet.thumbnails += 1
        pages.append(page)
    for first in range(0, len(sheet.failures), FAILURES_PER_PAGE):
        page, draw = _new_page(f"{len(sheet.failures)} input(s) failed")
        y = MARGIN + HEADER
        for record in sheet.failures[first:first + FAILURES_PER_PAGE]:
            error = record["error"]
            draw.text((MARGIN, y), f"{record['input']}", fill="black", font=caption)
            draw.text((MARGIN + 20, y + 16), f"{error['kind']}: {error['type']}: {error['message']}"[:110],
                      fill="firebrick", font=caption)
            y += 44
        pages.append(page)
    pages[0].save(pdf, "PDF", save_all=True, append_images=pages[1:], resolution=DPI)
    sheet.pages = len(pages)
    return sheet


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("results", type=Path, help="forkio map's --output (JSON lines)")
    cli.add_argument("pdf", type=Path, help="the PDF to write")
    args = cli.parse_args()
    sheet = build(args.results, args.pdf)
    print(f"contact sheet: {sheet.thumbnails} thumbnails on {sheet.pages} page(s) -> {args.pdf}")
    for record in sheet.failures:
        error = record["error"]
        print(f"  failed ({error['kind']}): {record['input']}: {error['type']}: {error['message']}")


if __name__ == "__main__":
    main()

"""Contact sheets: rows of framed, captioned thumbnails in one PNG, for the eye to check what a search found.

``neighbors`` (queries and their nearest training images) and ``audit`` (duplicates side by side,
flagged labels with their nearest training images, outliers, odd files) draw with this one module.
Thumbnails are decoded by :func:`~featurekit.images.decode.decode_image` under the stores' recorded
policy, from files or tar members alike; an image that no longer decodes shows its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..errors import ImageDecodeError
from ..files import atomic_output
from .decode import DecodePolicy, ImageSource, decode_image

__all__ = ["LINE", "THUMB", "Cell", "SheetRow", "contact_sheet"]

THUMB = 112  # thumbnail side, pixels
LINE = 14  # one caption line, pixels
TOP = 26  # the title's band
MIN_WIDTH = 360  # room for the title
GAP = 14  # between groups of cells: a query and its neighbours, one pair and the next


@dataclass
class Cell:
    """One thumbnail: what to read (a path or a tar member), its caption lines, its frame colour."""

    source: ImageSource
    captions: list[str] = field(default_factory=list)
    frame: str = "grey"


@dataclass
class SheetRow:
    """A row of cells, with an optional line of text above it."""

    cells: list[Cell]
    note: str = ""


def contact_sheet(rows: Sequence[SheetRow], path: str | os.PathLike, title: str, policy: DecodePolicy | None = None,
                  gaps: Sequence[int] = (1,)) -> Path:
    """Write the PNG (atomically): ``title``, then each row's note and cells, with a gap after the cells
    counted in ``gaps`` (default: after the first, the query or the finding). Returns ``path``."""
    font = ImageFont.load_default()
    lines = max((len(cell.captions) for row in rows for cell in row.cells), default=0)
    columns = max((len(row.cells) for row in rows), default=1)
    cell_w, cell_h = THUMB + 10, THUMB + LINE * lines + 10
    height = TOP + sum(cell_h + (LINE if row.note else 0) for row in rows)
    width = columns * cell_w + GAP * sum(0 < gap < columns for gap in gaps)
    sheet = Image.new("RGB", (max(width, MIN_WIDTH), height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), _fit(draw, title, font, sheet.width - 12), fill="black", font=font)
    y = TOP
    for row in rows:
        if row.note:
            draw.text((6, y), _fit(draw, row.note, font, sheet.width - 12), fill="navy", font=font)
            y += LINE
        for column, cell in enumerate(row.cells):
            x = column * cell_w + GAP * sum(gap <= column for gap in gaps)
            _cell(sheet, draw, font, (x, y), cell, policy or DecodePolicy())
        y += cell_h
    path = Path(path)
    with atomic_output(path) as temporary:
        sheet.save(temporary, format="PNG")
    return path


def _cell(sheet: Image.Image, draw: ImageDraw.ImageDraw, font, corner: tuple[int, int], cell: Cell,
          policy: DecodePolicy) -> None:
    x, y = corner
    draw.rectangle([x + 1, y + 1, x + THUMB + 8, y + THUMB + 8], outline=cell.frame, width=3)
    try:
        thumb = ImageOps.contain(decode_image(cell.source, policy), (THUMB, THUMB))
        sheet.paste(thumb, (x + 5 + (THUMB - thumb.width) // 2, y + 5 + (THUMB - thumb.height) // 2))
    except ImageDecodeError as error:
        draw.text((x + 8, y + THUMB // 2), _fit(draw, error.reason, font, THUMB - 6), fill="grey", font=font)
    for line, text in enumerate(cell.captions):
        draw.text((x + 4, y + THUMB + 11 + 13 * line), _fit(draw, text, font, THUMB + 4), fill="black", font=font)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."

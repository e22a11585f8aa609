"""DreamBooth's built-in demo subject: one particular star that the shapes data never shows.

The shapes scenes paint every object in one flat colour. The demo subject is a large two-tone star, its left half
blue and its right half yellow, so neither the base model `t2i` nor its captions know it: "a star" never looks
like this, and no colour word describes it. (A finer texture, a checkerboard or stripes, would be more distinctive,
but the shipped f=4 autoencoder turns it into a flat brown blur: the base can only learn what its autoencoder
reconstructs, and two halves survive.) Four images place it in different cells of the shapes grid
on different backgrounds, each with a caption in the shapes grammar where the identifier stands in for size and
colour ("a sks star at the top left on a gray background"), so a fine-tuned model can be asked for the same star
elsewhere ("a sks star at the bottom right on a blue background").

Everything is drawn by code (deterministic: no files ship), at any size; `write_demo_subject` puts the PNGs and
their .txt captions in a folder, which is what `pakhsh dreambooth --subject demo` trains on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pakhsh.data.builtin.shapes import _GRID, _POSITION_PHRASES, COLORS, POSITIONS, SHAPES, shape_polygon

DEMO_NAME = "demo"  # `--subject demo`
DEMO_CLASS = "star"
# (grid position, background colour) of the four subject images
DEMO_PLACES: tuple[tuple[str, str], ...] = (
    ("top left", "gray"),
    ("center", "green"),
    ("bottom left", "purple"),
    ("right", "white"),
)
LEFT, RIGHT = (30, 60, 230), (250, 210, 30)  # blue, yellow
RADIUS = 0.2  # of the image side: a little larger than the shapes data's "large" (0.17)


def demo_caption(token: str, place: tuple[str, str]) -> str:
    """"a sks star at the top left on a gray background": the shapes grammar, the token in place of size and colour."""
    position, background = place
    article = "an" if background[0] in "aeiou" else "a"
    return f"a {token} {DEMO_CLASS} {_POSITION_PHRASES[POSITIONS.index(position)]} on {article} {background} background"


def render_subject(position: str, background: str, image_size: int = 64, jitter: tuple[float, float, float] = (0, 0, 0),
                   supersample: int = 4) -> Image.Image:
    """The two-tone star at a grid position on a flat background, antialiased like the shapes scenes. `jitter`
    (dx, dy, dr) moves the centre by fractions of the image side and scales the radius by (1 + dr)."""
    if position not in POSITIONS:
        raise ValueError(f"position {position!r} is not one of {', '.join(POSITIONS)}")
    if background not in COLORS:
        raise ValueError(f"background {background!r} is not one of {', '.join(COLORS)}")
    ss, big = supersample, image_size * supersample
    row, col = divmod(POSITIONS.index(position), 3)
    cx, cy = (_GRID[col] + jitter[0]) * image_size, (_GRID[row] + jitter[1]) * image_size
    poly = shape_polygon(SHAPES.index(DEMO_CLASS), cx, cy, RADIUS * (1 + jitter[2]) * image_size)
    assert poly is not None
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in (poly * ss - 0.5).tolist()], fill=255)
    right = (np.arange(big) + 0.5) / ss >= cx  # the halves split at the star's centre line
    texture = Image.fromarray(np.where(right[None, :, None], np.uint8(RIGHT), np.uint8(LEFT)).repeat(big, 0))
    canvas = Image.new("RGB", (big, big), COLORS[background])
    canvas.paste(texture, (0, 0), mask)
    return canvas.reduce(ss) if ss > 1 else canvas


def demo_subject(token: str = "sks", image_size: int = 64) -> list[tuple[Image.Image, str]]:
    """The four (image, caption) pairs of the demo subject; the jitter is fixed, so every call draws the same."""
    rng = np.random.default_rng(2023)
    out = []
    for place in DEMO_PLACES:
        dx, dy, dr = rng.uniform(-1, 1, 3) * np.array([0.02, 0.02, 0.08])
        out.append((render_subject(*place, image_size, (float(dx), float(dy), float(dr))), demo_caption(token, place)))
    return out


def write_demo_subject(folder: str | Path, token: str = "sks", image_size: int = 64) -> Path:
    """Write the demo subject as a captioned image folder (subject_0.png + subject_0.txt, ...); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(demo_subject(token, image_size)):
        image.save(folder / f"subject_{i}.png")
        (folder / f"subject_{i}.txt").write_text(text + "\n")
    return folder

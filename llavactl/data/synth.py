"""The synthetic "shapes" data set: coloured shapes on coloured backgrounds, in LLaVA format.

Every answer (the shape, its colour, the background colour, where it sits) can only be known by
looking at the image, so a model that learns it has learned to use its vision tower. The same
seed, count and size give the same files byte for byte.

Every record asks the shape's colour, and either asks for a description (which names the shape,
both colours and the place) or asks the shape, in random order. The background's colour and the
place are only in descriptions, never asked alone: the background is the image's dominant colour,
which a model reads long before it can tell the figure from the ground, and when it was asked as
often as the shape's colour, the `tiny` profile's models answered the background's colour to
"What colour is the shape?" (65-75% of answers) and did not get past it within their minute.

``builtin:shapes`` is generated on first use into the cache (:func:`shapes_dataset`), under a folder
named by its parameters, and written to a temporary folder renamed into place so that an interrupted
or concurrent run never leaves half a data set.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llavactl.data.cache import cache_root
from llavactl.errors import DataError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DEFAULT_COUNT = 600
DEFAULT_IMAGE_SIZE = 64
RECORDS_FILE = "shapes.json"


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    centre: tuple[float, float]  # fractions of the image size
    radius: float  # fraction of the image size

    @property
    def place(self) -> str:
        x, y = self.centre
        vertical = "top" if y < 0.4 else "bottom" if y > 0.6 else "middle"
        horizontal = "left" if x < 0.4 else "right" if x > 0.6 else "centre"
        if vertical == "middle" and horizontal == "centre":
            return "in the centre"
        if vertical == "middle":
            return f"on the {horizontal}"
        if horizontal == "centre":
            return f"at the {vertical}"
        return f"at the {vertical} {horizontal}"


def _scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(sorted(COLOURS), 2)
    radius = rng.uniform(0.15, 0.3)
    centre = (rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius))
    return Scene(rng.choice(SHAPES), colour, background, centre, radius)


def _draw(scene: Scene, size: int, path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = scene.centre[0] * size, scene.centre[1] * size, scene.radius * size
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    img.save(path, format="PNG", optimize=False)


def _conversation(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    colour = ("What colour is the shape?", f"{scene.colour.capitalize()}.")
    if rng.random() < 0.5:
        prompt = rng.choice(["Describe the image.", "What do you see?", "Write a short caption for the image."])
        other = (prompt, f"A {scene.colour} {scene.shape} on a {scene.background} background, {scene.place}.")
    else:
        other = ("What shape is in the image?", f"A {scene.shape}.")
    pairs = rng.sample([colour, other], 2)
    turns: list[dict[str, str]] = []
    for k, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def write_shapes(
    out_dir: Path,
    n: int = DEFAULT_COUNT,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` records and their PNG images under ``out_dir``; return the records file.

    ``out_dir`` must be new or empty unless ``overwrite``: its ``shapes.json`` and ``images/NNNNNN.png``
    would replace files of the same names, and other files would sit among the data set's.
    """
    check_out_dir(out_dir, overwrite)
    rng = random.Random(seed)
    try:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"{out_dir} cannot be made a folder ({e.strerror or e}: {e.filename})",
            fix="give a folder path where you can write",
        ) from None
    records = []
    for i in range(n):
        scene = _scene(rng)
        name = f"images/{i:06d}.png"
        _draw(scene, image_size, out_dir / name)
        records.append({"id": f"shapes-{i:06d}", "image": name, "conversations": _conversation(scene, rng)})
    path = out_dir / RECORDS_FILE
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(
            f"{out_dir} is a file, not a folder", fix="give a new or empty folder to write the data set into"
        )
    if overwrite or not out_dir.is_dir():
        return
    present = sorted(p.name for p in out_dir.iterdir())
    if present:
        shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        raise DataError(
            f"{out_dir} is not empty (it holds {shown}); the data set would be written among those files",
            fix="give a new or empty folder, or add --force to write over files of the same names",
        )


def shapes_dataset(seed: int, n: int = DEFAULT_COUNT, image_size: int = DEFAULT_IMAGE_SIZE) -> Path:
    """The cached shapes records file for these parameters, generated when absent."""
    key = hashlib.sha256(f"shapes-v3 n={n} seed={seed} size={image_size}".encode()).hexdigest()[:16]
    final = cache_root() / "shapes" / key
    records = final / RECORDS_FILE
    if records.is_file():
        return records
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        write_shapes(tmp, n=n, seed=seed, image_size=image_size)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished the same data set first; its copy is identical.
            if not records.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return records

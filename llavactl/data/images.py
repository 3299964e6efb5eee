"""Images: read any common file as RGB, and turn it into the vision tower's normalized input.

:class:`ImageSpec` is what a tower needs (size, patch, mean, std); ``model`` builds it from a
tower config. The fast path works on uint8 tensors: pad to a square with the mean colour (LLaVA
1.5's ``expand2square``) or stretch, resize with antialiased bicubic (torch's uint8 kernel, the
filter PIL uses, which ``CLIPImageProcessor`` calls), then normalize with one multiply and one
subtract per channel.
"""

from __future__ import annotations

import functools
import io
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from llavactl.config.schema import MAX_IMAGE_ASPECT_RATIO, MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from llavactl.config.schema import DataConfig

AspectRatio = Literal["pad", "resize"]


@dataclass(frozen=True)
class ImageSpec:
    """What the vision tower takes: a ``size`` x ``size`` image cut into ``patch_size`` patches."""

    size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_tokens(self) -> int:
        """Image tokens per image in ``input_ids``: one per patch (the CLS token is dropped)."""
        return (self.size // self.patch_size) ** 2

    @property
    def fill(self) -> tuple[int, int, int]:
        """The padding colour: the mean as LLaVA computes it, ``int(m * 255)`` (CLIP: 122,116,104)."""
        r, g, b = (int(m * 255) for m in self.mean)
        return r, g, b


class ImageFileError(Exception):
    """An image that cannot be used; ``code`` is ``missing_image``, ``corrupt_image``,
    ``image_too_large`` or ``image_aspect_ratio``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageLimits:
    """The largest image accepted, judged from its header before any pixel is decoded.

    ``max_pixels`` bounds the decoded image (3 bytes a pixel); ``max_aspect_ratio`` bounds the
    square that ``pad`` makes of it (3 x pixels x ratio bytes), and the share of the tower's
    input that is padding rather than picture.
    """

    max_pixels: int = MAX_IMAGE_PIXELS
    max_aspect_ratio: float = MAX_IMAGE_ASPECT_RATIO

    @classmethod
    def of(cls, data: DataConfig) -> ImageLimits:
        """The limits a profile's ``data`` section sets."""
        return cls(data.max_image_pixels, data.max_image_aspect_ratio)

    def check(self, path: Path, width: int, height: int) -> None:
        """Raise ``image_too_large`` or ``image_aspect_ratio`` for a size over the limits."""
        if width < 1 or height < 1:
            raise ImageFileError("corrupt_image", f"{describe(path)} is {width}x{height} pixels")
        pixels = width * height
        if pixels > self.max_pixels:
            raise ImageFileError(
                "image_too_large",
                f"{describe(path)} declares {width}x{height} = {pixels:,} pixels ({_gib(3 * pixels)} decoded), "
                f"over data.max_image_pixels={self.max_pixels:,}; raise it to accept such images",
            )
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            raise ImageFileError(
                "image_aspect_ratio",
                f"{describe(path)} is {width}x{height}, an aspect ratio of {ratio:.4g}, over "
                f"data.max_image_aspect_ratio={self.max_aspect_ratio:g}; crop or split it, or raise the limit",
            )


DEFAULT_LIMITS = ImageLimits()


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def describe(path: Path) -> str:
    """How messages name an image: ``image file PATH``, or where in a shard it is embedded."""
    from llavactl.data.parquet import describe_ref, parse_ref

    ref = parse_ref(path)
    return f"image file {path}" if ref is None else describe_ref(*ref)


def exists(path: Path) -> bool:
    """Whether the image is there to read: a file, or an image embedded in a shard (a record names
    only the embedded images its row holds)."""
    from llavactl.data.parquet import parse_ref

    ref = parse_ref(path)
    return path.is_file() if ref is None else ref[0].is_file()


def _open_header(path: Path, limits: ImageLimits) -> Image.Image:
    """``Image.open`` (it reads the header only), with PIL's decompression-bomb guard in our terms.

    PIL refuses, in ``open`` and in some formats' frame reads, images over twice its process-wide
    ``MAX_IMAGE_PIXELS`` and warns above it; our own limit, checked by the caller from the header,
    is the one that decides. PIL's stays as a backstop for sizes that only a later frame declares;
    it is raised to a profile's limit when that is higher, and never lowered.
    """
    from PIL import Image, UnidentifiedImageError

    from llavactl.data.parquet import embedded_bytes, parse_ref

    if Image.MAX_IMAGE_PIXELS is not None and limits.max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
    ref = parse_ref(path)
    if ref is None:
        require_file(path)
    with warnings.catch_warnings():
        # Above PIL's limit but within twice it: our limit, checked next, decides; no stray warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            # An image embedded in a Parquet/Arrow shard is read from there; FileNotFoundError when gone.
            return Image.open(path if ref is None else io.BytesIO(embedded_bytes(*ref)))
        except UnidentifiedImageError:
            # PIL's own words name the path again, or an in-memory buffer's address.
            raise UnidentifiedImageError("its bytes are no image format PIL reads") from None


def require_file(path: Path) -> None:
    """FileNotFoundError when ``path`` is gone; :class:`ImageFileError` when it is not a regular file
    (a named pipe would block the reader for ever, a device such as /dev/zero never ends)."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"))
        kind = next((name for test, name in kinds if test(mode)), "a device or socket")
        raise ImageFileError("corrupt_image", f"{describe(path)} is {kind}, not an image file")


def _bomb_error(path: Path, exc: Exception, limits: ImageLimits) -> ImageFileError:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    declared = f"{int(found.group(1)):,} pixels" if found else "more pixels than PIL decodes"
    return ImageFileError(
        "image_too_large",
        f"{describe(path)} declares {declared}, over data.max_image_pixels={limits.max_pixels:,} "
        "(a possible decompression bomb)",
    )


def open_rgb(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode ``path`` (a file, or an image embedded in a shard: :mod:`llavactl.data.parquet`) fully
    as an upright 8-bit RGB image, once its header is within ``limits``.

    EXIF orientation is applied; palette, grey and CMYK images are converted; transparency is
    composited over white (as transformers' ``convert_to_rgb`` does, so transparent pixels do
    not turn into whatever colour they happen to store); 16-bit images are scaled to 8 bits
    rather than clipped.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with _open_header(path, limits) as img:
            limits.check(path, *img.size)
            img.load()
            # In place: without an orientation tag this is a no-op instead of a full copy.
            ImageOps.exif_transpose(img, in_place=True)
            upright = img
    except FileNotFoundError:
        raise ImageFileError("missing_image", f"{describe(path)} does not exist") from None
    except Image.DecompressionBombError as e:
        raise _bomb_error(path, e, limits) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageFileError("corrupt_image", f"{describe(path)} cannot be decoded: {e}") from None
    return _to_rgb(upright)


def _to_rgb(img: Image.Image) -> Image.Image:
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        wide = np.asarray(img, dtype=np.int64)
        img = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def probe(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """Check that ``path`` exists and has a readable image header within ``limits``; return
    (width, height).

    Reads the header only (no pixel decoding): what ``data check`` does without ``--decode``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with _open_header(path, limits) as img:
            width, height = img.size
    except FileNotFoundError:
        raise ImageFileError("missing_image", f"{describe(path)} does not exist") from None
    except Image.DecompressionBombError as e:
        raise _bomb_error(path, e, limits) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageFileError("corrupt_image", f"{describe(path)} has no readable image header: {e}") from None
    limits.check(path, width, height)
    return width, height


def to_tensor(img: Image.Image, spec: ImageSpec, aspect_ratio: AspectRatio) -> torch.Tensor:
    """An RGB image as the tower's input: Float[3, size, size], normalized with the spec's mean/std."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    # Pad in numpy rather than with PIL: converting a pasted PIL square to an array costs more
    # than the resize itself (6 ms against 1 ms for a 1000 px image).
    rgb = np.asarray(img, dtype=np.uint8)
    height, width = rgb.shape[:2]
    if aspect_ratio == "pad" and height != width:
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        square = np.empty((side, side, 3), dtype=np.uint8)
        # Fill only the margins, a whole row at a time: broadcasting the 3-value colour over
        # every pixel is five times slower than the resize.
        row = np.tile(np.array(spec.fill, dtype=np.uint8), (side, 1))
        square[:top] = row
        square[top + height :] = row
        square[top : top + height, :left] = row[:left]
        square[top : top + height, left + width :] = row[left + width :]
        square[top : top + height, left : left + width] = rgb
        rgb = square
    elif not rgb.flags.writeable:
        rgb = rgb.copy()  # torch tensors need writable memory
    # Height-width-channel uint8 viewed as channels-last NCHW: the layout of torch's vectorized
    # uint8 resize kernel.
    pixels = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    resized = F.interpolate(pixels, size=(spec.size, spec.size), mode="bicubic", antialias=True, align_corners=False)
    # Normalize in numpy on the channel-first result, (x / 255 - mean) / std as one multiply and
    # one subtract over whole channels (long inner loops). Torch's elementwise ops would pay
    # OpenMP start-up costs that dominate at this size; numpy on channels-last data (an inner
    # loop of 3) followed by a transposing copy is five times slower.
    scale, shift = _normalization(spec)
    out = resized[0].numpy().astype(np.float32)
    out *= scale
    out -= shift
    return torch.from_numpy(out)


@functools.cache
def _normalization(spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) with x * scale - shift = (x / 255 - mean) / std, shaped [3, 1, 1]."""
    import numpy as np

    scale = np.array([1 / (255 * s) for s in spec.std], dtype=np.float32).reshape(3, 1, 1)
    shift = np.array([m / s for m, s in zip(spec.mean, spec.std, strict=True)], dtype=np.float32).reshape(3, 1, 1)
    return scale, shift


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: centre the image on a square of ``fill`` (offsets round down)."""
    from PIL import Image

    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def load_image(
    path: Path, spec: ImageSpec, aspect_ratio: AspectRatio, limits: ImageLimits = DEFAULT_LIMITS
) -> torch.Tensor:
    """Read ``path`` and return the tower's input tensor (see :func:`open_rgb`, :func:`to_tensor`)."""
    return to_tensor(open_rgb(path, limits), spec, aspect_ratio)

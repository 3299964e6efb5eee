"""Images/s of llavactl's image fast path against transformers' CLIPImageProcessor, in one run.

Both sides do what LLaVA-1.5 training does per image at 336 px: decode, convert to RGB, pad to a
square with the mean colour, resize, normalize. Torch runs single-threaded, as it does inside a
DataLoader worker. Figures are given with and without decoding, because the JPEG/PNG decode
(the same PIL call on both sides) bounds the end-to-end speed-up.

    python benchmarks/image_pipeline.py [--quick] [--images DIR]

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from llavactl.data.images import ImageSpec, expand_to_square, load_image, open_rgb, to_tensor

DEFAULT_IMAGES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llava_reference" / "images"
CLIP_336 = ImageSpec(336, 14, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def rate(fn: Callable[[int], object], count: int, seconds: float) -> float:
    """Calls per second of ``fn(i)`` over indices cycling through ``count`` items for ~``seconds``."""
    for i in range(count):  # warm-up
        fn(i)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(done % count)
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 10 seconds in all")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    decoded = [open_rgb(f) for f in files]
    seconds = 2.0 if args.quick else 10.0

    def reference(i: int) -> object:
        img = Image.open(files[i]).convert("RGB")
        return processor(expand_to_square(img, CLIP_336.fill), return_tensors="pt")["pixel_values"]

    def reference_decoded(i: int) -> object:
        return processor(expand_to_square(decoded[i], CLIP_336.fill), return_tensors="pt")["pixel_values"]

    figures = {
        "images": len(files),
        "processor": type(processor).__name__,
        "clip_processor_images_per_s": rate(reference, len(files), seconds),
        "llavactl_images_per_s": rate(lambda i: load_image(files[i], CLIP_336, "pad"), len(files), seconds),
        "clip_processor_predecoded_images_per_s": rate(reference_decoded, len(files), seconds),
        "llavactl_predecoded_images_per_s": rate(lambda i: to_tensor(decoded[i], CLIP_336, "pad"), len(files), seconds),
        "decode_only_images_per_s": rate(lambda i: open_rgb(files[i]), len(files), seconds),
    }
    figures["speedup"] = figures["llavactl_images_per_s"] / figures["clip_processor_images_per_s"]
    figures["speedup_predecoded"] = (
        figures["llavactl_predecoded_images_per_s"] / figures["clip_processor_predecoded_images_per_s"]
    )
    for key, value in figures.items():
        print(f"{key:>40}: {value:.2f}" if isinstance(value, float) else f"{key:>40}: {value}")
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()

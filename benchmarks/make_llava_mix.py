"""Write a data set shaped like LLaVA-1.5's `llava_v1_5_mix665k.json`, for the data-scale benchmarks.

665,298 records in the real mix's proportions (LLaVA-1.5 paper, Table 7): LLaVA-Instruct's
conversations, detailed descriptions and complex reasoning, VQAv2, GQA, OKVQA, OCR-VQA, A-OKVQA
(multiple choice), TextCaps, RefCOCO (boxes), Visual Genome, and ShareGPT's text-only chats. Each
source has the real shape of turns: short VQA answers over several turns behind LLaVA's "Answer the
question using a single word or phrase." suffix, long descriptions, box coordinates, options with
letters, long multi-turn text. The words are drawn from small vocabularies with a seeded RNG, so
the same seed gives the same file byte for byte, and lengths follow the source (the tokenizer sees
text of the real sizes, not its content). Images live under the real folders (`coco/train2017`,
`gqa/images`, `ocr_vqa/images`, `textvqa/train_images`, `vg/VG_100K`, `vg/VG_100K_2`); every path
exists, as a hard link to one of a few small generated JPEGs (at most 60,000 links each: ext4
allows 65,000). The JSON list is written with indent 2, as the real file is: about 1 GB in full.

    python benchmarks/make_llava_mix.py OUT_DIR [--fraction 0.1] [--seed 0] [--quick]

`--fraction 0.1` writes the 10% subset (every source scaled). The last line of stdout is one JSON
object: records, text-only records, bytes, seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any

FULL = 665_298
SHORT_SUFFIX = "Answer the question using a single word or phrase."
# (source, records in the real mix, image folder or None for text-only)
SOURCES: list[tuple[str, int, str | None]] = [
    ("llava_conversation", 57_669, "coco/train2017"),
    ("llava_detail", 23_240, "coco/train2017"),
    ("llava_reasoning", 76_643, "coco/train2017"),
    ("vqav2", 82_783, "coco/train2017"),
    ("okvqa", 8_998, "coco/train2017"),
    ("aokvqa", 66_160, "coco/train2017"),
    ("refcoco", 48_447, "coco/train2017"),
    ("gqa", 72_140, "gqa/images"),
    ("ocrvqa", 80_000, "ocr_vqa/images"),
    ("textcaps", 21_953, "textvqa/train_images"),
    ("vg", 86_417, "vg/VG_100K"),
    ("sharegpt", 40_688, None),
]
assert sum(n for _, n, _ in SOURCES) == 665_138  # + 160 VG_100K_2 records below
VG2 = 160
LINKS_PER_FILE = 60_000
NOUNS = [
    "man",
    "woman",
    "child",
    "dog",
    "cat",
    "bus",
    "car",
    "train",
    "table",
    "chair",
    "plate",
    "bowl",
    "cup",
    "bottle",
    "sign",
    "street",
    "building",
    "tree",
    "sky",
    "bicycle",
    "motorcycle",
    "horse",
    "boat",
    "kite",
    "umbrella",
    "bench",
    "clock",
    "laptop",
    "phone",
    "book",
    "window",
    "door",
    "wall",
    "shirt",
    "hat",
    "bag",
]
ADJECTIVES = [
    "red",
    "blue",
    "green",
    "white",
    "black",
    "yellow",
    "large",
    "small",
    "wooden",
    "metal",
    "old",
    "young",
    "bright",
    "dark",
    "open",
    "empty",
]
VERBS = [
    "holding",
    "sitting",
    "standing",
    "riding",
    "walking",
    "looking",
    "carrying",
    "eating",
    "parked",
    "lying",
    "playing",
    "wearing",
]
WORDS = [
    "the",
    "a",
    "of",
    "in",
    "on",
    "with",
    "and",
    "to",
    "is",
    "are",
    "there",
    "this",
    "that",
    "it",
    "its",
    "for",
    "as",
    "at",
    "by",
    "from",
    "while",
    "near",
    "behind",
    "next",
    "which",
    "some",
    "several",
    "many",
    "one",
    "two",
    "three",
    "scene",
    "image",
    "picture",
    "shows",
    "appears",
    "likely",
    "because",
    "might",
    "could",
]


def _sentence(rng: random.Random, words: int) -> str:
    parts = []
    for k in range(words):
        pool = (NOUNS, ADJECTIVES, VERBS, WORDS, WORDS)[k % 5]
        parts.append(rng.choice(pool))
    text = " ".join(parts)
    return text[0].upper() + text[1:] + "."


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng, rng.randint(8, 22)) for _ in range(sentences))


def _question(rng: random.Random) -> str:
    return f"What is the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} in the image?"


def _short(rng: random.Random) -> str:
    return rng.choice([*NOUNS, *ADJECTIVES, "Yes", "No", "2", "3"]).capitalize()


def _turns(source: str, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs of one record of ``source``; the image marker is added by the caller."""
    if source == "llava_conversation":
        return [(_question(rng), _paragraph(rng, rng.randint(1, 5))) for _ in range(rng.randint(2, 5))]
    if source == "llava_detail":
        return [("Describe the following image.", _paragraph(rng, rng.randint(6, 11)))]
    if source == "llava_reasoning":
        return [(_question(rng) + " " + _sentence(rng, 10), _paragraph(rng, rng.randint(5, 10)))]
    if source in ("vqav2", "gqa", "okvqa", "ocrvqa"):
        count = {"vqav2": (3, 9), "gqa": (4, 13), "okvqa": (1, 2), "ocrvqa": (3, 7)}[source]
        pairs = [(_question(rng), _short(rng)) for _ in range(rng.randint(*count))]
        pairs[0] = (f"{pairs[0][0]}\n{SHORT_SUFFIX}", pairs[0][1])
        return pairs
    if source == "aokvqa":
        options = "\n".join(f"{letter}. {rng.choice(NOUNS)}" for letter in "ABCD")
        return [(f"{_question(rng)}\n{options}\nAnswer with the option's letter from the given choices directly.", "B")]
    if source == "textcaps":
        return [("Provide a one-sentence caption for the provided image.", _sentence(rng, rng.randint(8, 16)))]
    if source == "refcoco":
        pairs = []
        for _ in range(rng.randint(2, 6)):
            box = sorted(round(rng.random(), 2) for _ in range(4))
            pairs.append(
                (
                    "Please provide the bounding box coordinate of the region this sentence describes: "
                    f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)}.",
                    f"[{box[0]:.2f}, {box[1]:.2f}, {box[2]:.2f}, {box[3]:.2f}]",
                )
            )
        return pairs
    if source == "vg":
        return [
            (
                "Please provide a short description for this region: "
                f"[{rng.random():.2f}, {rng.random():.2f}, {rng.random():.2f}, {rng.random():.2f}]",
                _sentence(rng, rng.randint(3, 8)),
            )
            for _ in range(rng.randint(3, 8))
        ]
    # ShareGPT: long text-only conversations.
    return [
        (_paragraph(rng, rng.randint(1, 4)), _paragraph(rng, rng.randint(10, 32))) for _ in range(rng.randint(1, 4))
    ]


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (64, 48), tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


def plan(fraction: float) -> list[tuple[str, int, str | None]]:
    """Records per source for ``fraction`` of the mix (every source scaled, at least one record)."""
    sources = [*SOURCES[:-2], ("vg2", VG2, "vg/VG_100K_2"), *SOURCES[-2:]]
    return [(name, max(1, round(n * fraction)), folder) for name, n, folder in sources]


def generate(out_dir: Path, *, fraction: float, seed: int) -> dict[str, Any]:
    """Write ``llava_v1_5_mix665k.json`` and the image folders under ``out_dir``; return figures."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    blobs = out_dir / ".jpegs"
    blobs.mkdir(exist_ok=True)
    links: dict[str, int] = {}  # how many links each base JPEG has
    made_dirs: set[str] = set()
    records: list[dict[str, Any]] = []
    text_only = 0
    for name, count, folder in plan(fraction):
        source = "vg" if name == "vg2" else name
        for k in range(count):
            pairs = _turns(source, rng)
            conversations = []
            for i, (question, answer) in enumerate(pairs):
                human = f"<image>\n{question}" if i == 0 and folder is not None else question
                conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
            record: dict[str, Any] = {"id": f"{name}-{k:06d}"}
            if folder is None:
                text_only += 1
            else:
                image = f"{folder}/{name}_{k:06d}.jpg"
                record["image"] = image
                _link(out_dir, image, blobs, links, made_dirs, seed)
            record["conversations"] = conversations
            records.append(record)
    random.Random(seed + 1).shuffle(records)  # the real file interleaves its sources
    path = out_dir / "llava_v1_5_mix665k.json"
    with path.open("w", encoding="utf-8") as f:
        json.dump(records, f, indent=2, ensure_ascii=False)
    return {
        "records": len(records),
        "text_only": text_only,
        "with_image": len(records) - text_only,
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - start, 1),
        "path": str(path),
    }


def _link(out_dir: Path, image: str, blobs: Path, links: dict[str, int], made_dirs: set[str], seed: int) -> None:
    """``out_dir/image`` as a hard link to a base JPEG with room for more links."""
    folder = image.rsplit("/", 1)[0]
    if folder not in made_dirs:
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        made_dirs.add(folder)
    base = next((b for b, n in links.items() if n < LINKS_PER_FILE), None)
    if base is None:
        base = str(blobs / f"{len(links):03d}.jpg")
        Path(base).write_bytes(_jpeg(seed * 1000 + len(links)))
        links[base] = 0
    target = out_dir / image
    if not target.exists():
        os.link(base, target)
    links[base] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the 665,298 records (0.1: the 10%% set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="0.5%% of the mix (about 3,300 records), in seconds")
    args = parser.parse_args()
    fraction = 0.005 if args.quick else args.fraction
    if not 0 < fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    figures = generate(args.out_dir, fraction=fraction, seed=args.seed)
    print(
        f"{figures['records']:,} records ({figures['text_only']:,} text-only), {figures['bytes'] / 1e9:.2f} GB, "
        f"{figures['seconds']} s: {figures['path']}"
    )
    print(json.dumps({"benchmark": "make_llava_mix", "fraction": fraction, **figures}))


if __name__ == "__main__":
    main()

"""Evaluation on held-out records: loss and perplexity, and on the synthetic shapes data the share
of generated answers that name the right colour and the right shape.

The held-out records are ``data.eval_data_path`` (images relative to ``data.image_folder``, or to
the file's folder). A shapes record's ground truth is read from its own answers (its caption, or
its answers to the shape and colour questions), so any file written by `llavactl data synth`
works, not only the builtin set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llavactl.data import synth
from llavactl.data.dataset import Collator, LlavaDataset, build_dataset, take_skipped
from llavactl.data.source import open_source
from llavactl.errors import ConfigError, DataError
from llavactl.train.loss import summed_token_loss, supervised_token_count

if TYPE_CHECKING:
    from llavactl.config.schema import DataConfig
    from llavactl.data.records import Record
    from llavactl.train.generate import Predictor

# The questions of the shapes data set (`llavactl.data.synth`), asked as the model saw them.
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is in the image?"
_CAPTION = re.compile(r"^A (\w+) (\w+) on a \w+ background")
_COLOUR_WORD = re.compile(r"\b(" + "|".join(synth.COLOURS) + r")\b", re.IGNORECASE)
_SHAPE_WORD = re.compile(r"\b(" + "|".join(synth.SHAPES) + r")\b", re.IGNORECASE)
SHAPES_ID_PREFIX = "shapes-"


def held_out_dataset(data: DataConfig, predictor: Predictor, seed: int) -> LlavaDataset:
    """The records of ``data.eval_data_path``, prepared as in training."""
    if data.eval_data_path is None:
        raise ConfigError(
            "data.eval_data_path is not set, so there are no held-out records to evaluate on.",
            fix="add `data.eval_data_path=PATH` (a LLaVA JSON/JSONL file, or `builtin:shapes-eval` for shapes)",
        )
    held_out = data.model_copy(update={"data_path": data.eval_data_path})
    try:
        return build_dataset(
            open_source(held_out, seed), held_out, predictor.tokenizer, predictor.image_token_id, predictor.image_spec
        )
    except DataError as exc:
        # The data layer names the key it reads records from; here that is data.eval_data_path.
        raise DataError(
            exc.message.replace("data.data_path", "data.eval_data_path"),
            fix=exc.fix.replace("data.data_path", "data.eval_data_path") if exc.fix else None,
        ) from exc


@dataclass(frozen=True)
class Score:
    correct: int
    asked: int

    @property
    def share(self) -> float | None:
        return self.correct / self.asked if self.asked else None

    def as_json(self) -> dict[str, Any]:
        return {"correct": self.correct, "asked": self.asked, "share": self.share}


@dataclass(frozen=True)
class EvalReport:
    records: int
    skipped: int
    supervised_tokens: int
    loss: float
    colour: Score | None  # None when the held-out data is not shapes data
    shape: Score | None

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def as_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "skipped": self.skipped,
            "supervised_tokens": self.supervised_tokens,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "colour": self.colour.as_json() if self.colour else None,
            "shape": self.shape.as_json() if self.shape else None,
        }


def held_out_loss(predictor: Predictor, dataset: LlavaDataset, batch_size: int) -> tuple[float, int, int]:
    """Mean next-token loss over every supervised token; also the token and skipped-record counts."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(predictor.tokenizer.pad_token_id))
    predictor.model.eval()
    total, tokens, skipped = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            skipped += len(take_skipped(batch, dataset.data.on_error))
            if "input_ids" not in batch:
                continue
            total += float(summed_token_loss(predictor.model, batch))
            tokens += supervised_token_count(batch)
    if not tokens:
        raise DataError(
            f"none of the {len(dataset)} held-out records could be scored: {skipped} were skipped as bad and the "
            "rest supervise no token",
            fix="run `llavactl data check` on `data.eval_data_path`, and fix or drop the bad records",
        )
    return total / tokens, tokens, skipped


def shapes_truth(record: Record) -> tuple[str | None, str | None]:
    """The (colour, shape) of a shapes record's figure, as far as its answers tell; (None, None) otherwise."""
    if not str(record.id).startswith(SHAPES_ID_PREFIX):
        return None, None
    colour = shape = None
    body = [t for t in record.turns if t.role != "system"]
    for question, answer in zip(body[::2], body[1::2], strict=True):
        if caption := _CAPTION.match(answer.text):
            colour, shape = caption.group(1), caption.group(2)
        elif question.text.endswith(COLOUR_QUESTION):
            colour = answer.text.rstrip(".").lower()
        elif question.text.endswith(SHAPE_QUESTION):
            shape = answer.text.removeprefix("A ").rstrip(".")
    return colour, shape


def first_named(pattern: re.Pattern[str], answer: str) -> str | None:
    """The first colour or shape word (``pattern``) in ``answer``, lower-cased."""
    match = pattern.search(answer)
    return match.group(1).lower() if match else None


def shapes_scores(predictor: Predictor, dataset: LlavaDataset, max_new_tokens: int = 12) -> tuple[Score, Score] | None:
    """Ask every shapes record with a known colour (shape) for it; count answers whose first colour
    (shape) word is the right one. None when no record is a shapes record."""
    truths = [(record, shapes_truth(record)) for record in dataset.records() if record.images]
    scores = []
    for k, (question, pattern) in enumerate(((COLOUR_QUESTION, _COLOUR_WORD), (SHAPE_QUESTION, _SHAPE_WORD))):
        known = [(dataset.image_folder / record.images[0], truth[k]) for record, truth in truths if truth[k]]
        answers = predictor.answer_all([image for image, _ in known], question, max_new_tokens=max_new_tokens)
        correct = sum(first_named(pattern, answer) == truth for answer, (_, truth) in zip(answers, known, strict=True))
        scores.append(Score(correct, len(known)))
    if not any(score.asked for score in scores):
        return None
    return scores[0], scores[1]


def evaluate(predictor: Predictor, data: DataConfig, *, seed: int, batch_size: int) -> EvalReport:
    """Loss and perplexity on ``data.eval_data_path``, and shapes accuracy where it is shapes data."""
    dataset = held_out_dataset(data, predictor, seed)
    loss, tokens, skipped = held_out_loss(predictor, dataset, batch_size)
    scores = shapes_scores(predictor, dataset)
    colour, shape = scores if scores is not None else (None, None)
    return EvalReport(len(dataset), skipped, tokens, loss, colour, shape)

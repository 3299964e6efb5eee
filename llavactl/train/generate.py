"""Asking a trained model about an image: prompts under the profile's template, and generation.

The prompt is made by the training data's own code (`llavactl.data.templates`): a one-turn record
with an empty reply is rendered, and the segments before the reply are the prompt, so a question
is asked exactly as the model saw questions in training. An exported folder carries the same
templates as Jinja (:func:`llavactl.data.templates.chat_template`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavactl.data.images import ImageLimits, load_image
from llavactl.data.records import IMAGE_MARKER, Record, Turn
from llavactl.data.templates import Segment, encoder_for, end_of_turn_token, render
from llavactl.errors import DataError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from llavactl.config.schema import DataConfig
    from llavactl.data.images import ImageSpec

def stop_token_ids(template: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a reply under ``template``: the tokenizer's EOS and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = end_of_turn_token(template)
    if end is not None and end in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(end))
    return ids


def prompt_segments(question: str, num_images: int, template: str, tokenizer: Any = None) -> list[Segment]:
    """The segments that ask ``question`` about ``num_images`` images, up to where the reply starts."""
    text = (IMAGE_MARKER + "\n") * num_images + question
    turns = (Turn("human", text.strip()), Turn("gpt", ""))
    images = tuple(f"image-{k}" for k in range(num_images))
    segments = render(Record(0, None, images, turns, raw={}), template, tokenizer)
    first_reply = next(k for k, s in enumerate(segments) if s.supervised)
    return segments[:first_reply]


@dataclass(frozen=True)
class Prediction:
    text: str
    new_tokens: int
    prompt_tokens: int


@dataclass(frozen=True)
class Predictor:
    """A model ready to answer: the LLaVA model (or its peft wrapper), its tokenizer and image spec,
    and the data settings (template, aspect ratio) that it was trained with."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    image_token_id: int
    image_spec: ImageSpec
    data: DataConfig

    def prompt_ids(self, question: str, num_images: int) -> list[int]:
        template = self.data.conversation_template
        encoder = encoder_for(self.tokenizer, self.image_token_id, self.image_spec.num_tokens, template)
        return encoder.encode(prompt_segments(question, num_images, template, self.tokenizer)).input_ids

    def pixels(self, image: Path) -> torch.Tensor:
        limits = ImageLimits.of(self.data)
        return load_image(image, self.image_spec, self.data.image_aspect_ratio, limits).unsqueeze(0)

    def predict(
        self,
        image: Path | None,
        question: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        streamer: Any = None,
    ) -> Prediction:
        """Answer ``question`` about ``image`` (greedy at temperature 0), streaming tokens to ``streamer``.

        A prompt longer than the model's positions is refused; the answer is cut where they end."""
        ids = self.prompt_ids(question, 1 if image is not None else 0)
        positions = self.max_positions()
        if positions is not None:
            if len(ids) >= positions:
                raise DataError(
                    f"--prompt: the prompt is {len(ids):,} tokens (the image's {self.image_spec.num_tokens} "
                    f"included), and the model takes at most {positions:,} positions, answer included.",
                    fix="ask a shorter question",
                )
            max_new_tokens = min(max_new_tokens, positions - len(ids))
        pixels = self.pixels(image) if image is not None else None
        new = self._generate(ids, 1, pixels, max_new_tokens, temperature, streamer)[0]
        return Prediction(text=self._decode(new), new_tokens=len(new), prompt_tokens=len(ids))

    def max_positions(self) -> int | None:
        """The most tokens the LLM takes (its position embeddings), when its config says."""
        config = getattr(self.model, "config", None)
        return getattr(getattr(config, "text_config", config), "max_position_embeddings", None)

    def answer_all(self, images: list[Path], question: str, *, max_new_tokens: int, batch_size: int = 32) -> list[str]:
        """Greedy answers to the same ``question`` about each image, generated a batch at a time.

        The prompts are the same but for the pixels, so a batch needs no padding.
        """
        import torch

        ids = self.prompt_ids(question, 1)
        answers: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = torch.cat([self.pixels(image) for image in chunk])
            answers += [self._decode(new) for new in self._generate(ids, len(chunk), pixels, max_new_tokens, 0.0)]
        return answers

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _generate(
        self,
        ids: list[int],
        copies: int,
        pixels: torch.Tensor | None,
        max_new_tokens: int,
        temperature: float,
        streamer: Any = None,
    ) -> list[list[int]]:
        """The new token ids of ``copies`` generations from the prompt ``ids`` (one image each)."""
        import torch

        input_ids = torch.tensor([ids] * copies, dtype=torch.long)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if pixels is not None:
            inputs["pixel_values"] = pixels.to(next(self.model.parameters()).dtype)
        template = self.data.conversation_template
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if template == "plain":
            # Stage-1 captions end with a newline, not with EOS.
            sampling.update(stop_strings=["\n"], tokenizer=self.tokenizer)
        with torch.no_grad():
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_token_ids(template, self.tokenizer),
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                **sampling,
            )
        return output[:, len(ids) :].tolist()

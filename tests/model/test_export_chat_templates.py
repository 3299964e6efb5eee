"""The exported Jinja chat templates render conversations exactly as llavactl's training templates do."""

from __future__ import annotations

import copy

import pytest
from helpers import REFERENCE, image_id, llama_tokenizer

from llavactl.data.records import Record, Turn
from llavactl.data.templates import chat_template, prompt_text, render
from llavactl.model.builtin import tokenizer as builtin_tokenizer
from llavactl.train.generate import prompt_segments, stop_token_ids

TEMPLATES = ["vicuna_v1", "llama_2", "llama_3", "chatml"]


def as_messages(turns: list[Turn], *, image: bool) -> list[dict]:
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = []
    for k, turn in enumerate(turns):
        content: object = turn.text
        if turn.role == "human" and image and k <= 1:
            content = [{"type": "image"}, {"type": "text", "text": turn.text}]
        messages.append({"role": roles[turn.role], "content": content})
    return messages


def rendered(template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    tokenizer = builtin_tokenizer()
    tokenizer.chat_template = chat_template(template, tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("system", [None, "Answer briefly."])
@pytest.mark.parametrize("template", TEMPLATES)
def test_two_turn_conversation_renders_like_the_training_template(template: str, system: str | None) -> None:
    turns = [
        Turn("human", "What shape is it?"),
        Turn("gpt", "A circle."),
        Turn("human", "Colour?"),
        Turn("gpt", "Red."),
    ]
    turns = ([Turn("system", system)] if system else []) + turns
    marked = [Turn(t.role, "<image>\n" + t.text) if t.text == "What shape is it?" else t for t in turns]
    record = Record(0, "r", ("a.png",), tuple(marked), raw={})
    expected = prompt_text(render(record, template))
    assert rendered(template, as_messages(turns, image=True)) == expected


@pytest.mark.parametrize("template", TEMPLATES)
def test_generation_prompt_is_the_prompt_llavactl_generates_from(template: str) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    expected = prompt_text(prompt_segments("Describe the image.", 1, template))
    assert rendered(template, messages, generation_prompt=True) == expected


def test_plain_template_renders_image_then_caption_and_newline() -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "ignored"}]},
        {"role": "assistant", "content": "A red circle."},
    ]
    record = Record(0, "r", ("a.png",), (Turn("human", "<image>\nignored"), Turn("gpt", "A red circle.")), raw={})
    assert rendered("plain", messages) == prompt_text(render(record, "plain")) == "<image>A red circle.\n"


def test_vicuna_generation_prompt_ends_where_the_reply_starts() -> None:
    prompt = prompt_text(prompt_segments("What colour is the shape?", 1, "vicuna_v1"))
    assert prompt.endswith(" USER: <image>\nWhat colour is the shape? ASSISTANT:")


def test_replies_stop_at_eos_or_the_templates_end_of_turn_token() -> None:
    tokenizer = builtin_tokenizer()
    assert stop_token_ids("vicuna_v1", tokenizer) == [tokenizer.eos_token_id]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert stop_token_ids("chatml", tokenizer) == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]


REAL_TEMPLATES = ["plain", "vicuna_v1", "llama_2", "llama_3", "chatml"]
# What a Llama-3 or ChatML tokenizer has as special tokens; the 32k Llama tokenizer gets them added.
TEMPLATE_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


def _real_records() -> list[Record]:
    from llavactl.data.json_index import read_raw_records
    from llavactl.data.records import Problem, iter_records

    raws, _ = read_raw_records(REFERENCE / "llava_real_samples.json")
    return [parsed for _, parsed in iter_records(raws) if not isinstance(parsed, Problem)]


def _messages(record: Record, template: str) -> list[dict]:
    """The record as chat messages a transformers user would write: placed `<image>` markers in the
    text (as LLaVA places them), or for `plain`, image parts (its template writes only those)."""
    from llavactl.data.templates import place_images

    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages: list[dict] = []
    for turn in place_images(record):
        content: object = turn.text
        if template == "plain" and turn.role == "human":
            content = [{"type": "image"}] * len(record.images) + [{"type": "text", "text": turn.text}]
        messages.append({"role": roles[turn.role], "content": content})
    return messages


@pytest.mark.parametrize("template", REAL_TEMPLATES)
def test_the_exported_template_renders_the_token_ids_training_trains_on_for_every_real_record(template: str) -> None:
    from llavactl.data.records import RecordProblem
    from llavactl.data.templates import encoder_for

    tok = copy.deepcopy(llama_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *TEMPLATE_TOKENS]})
    tok.chat_template = chat_template(template, tok)
    encoder = encoder_for(tok, image_id(tok), 1, template)
    compared = 0
    for record in _real_records():
        try:
            training = encoder.encode(render(record, template, tok)).input_ids
        except RecordProblem:  # `plain` takes one exchange, as LLaVA's stage 1
            assert template == "plain"
            continue
        text = tok.apply_chat_template(_messages(record, template), tokenize=False)
        # The templates leave BOS to the tokenizer, as Llama's own do; training starts with it.
        assert [tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids] == training, (record.id, text)
        compared += 1
    assert compared >= (3 if template == "plain" else 8)

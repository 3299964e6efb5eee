"""The exported Jinja chat templates render conversations exactly as llavactl's training templates do."""

from __future__ import annotations

import pytest

from llavactl.data.records import Record, Turn
from llavactl.data.templates import prompt_text, render
from llavactl.model.builtin import tokenizer as builtin_tokenizer
from llavactl.train.generate import chat_template, prompt_segments, stop_token_ids

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

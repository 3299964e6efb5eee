"""Templates: LLaVA prompt parity, segment-wise ids equal to whole-prompt ids, and exact masks."""

from __future__ import annotations

import json

import pytest
from helpers import REFERENCE, byte_tokenizer, image_id, llama_tokenizer, record
from hypothesis import given, settings
from hypothesis import strategies as st

from llavactl.data.json_index import load_records
from llavactl.data.records import RawRecord, RecordProblem, parse_record
from llavactl.data.templates import (
    IGNORE_INDEX,
    Segment,
    SegmentEncoder,
    encoder_for,
    place_images,
    prepare,
    prompt_text,
    render,
)

REFERENCE_KEYS = {"plain": "plain", "vicuna_v1": "v1", "llama_2": "llama_2"}
EXPECTED = {
    str(e["id"]): e["prompts"]
    for e in json.loads((REFERENCE / "expected_prompts_llava_conversation_py.json").read_text())["train_prompts"]
}
RECORDS = load_records(REFERENCE / "llava_real_samples.json")
CASES = [(r, t) for r in RECORDS for t, key in REFERENCE_KEYS.items() if EXPECTED[str(r.id)].get(key) is not None]


def make(*turns: tuple[str, str], image: object = None) -> object:
    return parse_record(RawRecord(0, 1, record(*turns, image=image)))


def expand(ids: list[int], image_token: int, n: int) -> list[int]:
    return [x for i in ids for x in ([i] * n if i == image_token else [i])]


def test_every_reference_prompt_is_covered() -> None:
    # 10 records x 3 templates, less `plain` on the three records LLaVA's stage 1 cannot render.
    assert len(CASES) == 27


@pytest.mark.parametrize(("rec", "template"), CASES, ids=[f"{r.id}-{t}" for r, t in CASES])
def test_prompt_string_equals_llava_conversation_py(rec: object, template: str) -> None:
    assert prompt_text(render(rec, template)) == EXPECTED[str(rec.id)][REFERENCE_KEYS[template]]


@pytest.mark.parametrize(("rec", "template"), CASES, ids=[f"{r.id}-{t}" for r, t in CASES])
def test_segment_ids_equal_whole_prompt_ids_on_llama_tokenizer(rec: object, template: str) -> None:
    tok = llama_tokenizer()
    encoded = SegmentEncoder(tok, image_id(tok), 5).encode(render(rec, template))
    prompt = EXPECTED[str(rec.id)][REFERENCE_KEYS[template]]
    whole = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
    assert encoded.input_ids == expand(whole, image_id(tok), 5)


def test_plain_is_undefined_for_multi_turn_records_as_in_llava() -> None:
    with pytest.raises(RecordProblem) as e:
        render(RECORDS[0], "plain")
    assert e.value.code == "bad_role"


def supervised_text(tok: object, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_vicuna_mask_supervises_reply_and_eos_only() -> None:
    tok = llama_tokenizer()
    enc = encoder_for(tok, image_id(tok), 4, "vicuna_v1")
    prepared = prepare(RECORDS[3], "vicuna_v1", enc, 4096)
    e = prepared.encoded
    assert supervised_text(tok, e.input_ids, e.labels) == "Yes</s> No</s>"
    assert e.input_ids[0] == tok.bos_token_id and e.labels[0] == IGNORE_INDEX
    image_positions = [k for k, t in enumerate(e.input_ids) if t == image_id(tok)]
    assert len(image_positions) == 4 and all(e.labels[k] == IGNORE_INDEX for k in image_positions)


def test_llama_2_mask_supervises_reply_and_eos_not_inner_bos() -> None:
    tok = llama_tokenizer()
    e = prepare(RECORDS[3], "llama_2", encoder_for(tok, image_id(tok), 4, "llama_2"), 4096).encoded
    assert supervised_text(tok, e.input_ids, e.labels) == "Yes </s> No </s>"
    assert e.input_ids.count(tok.bos_token_id) == 2  # the leading BOS and the one opening round 2


def test_plain_masks_only_bos_and_image() -> None:
    tok = llama_tokenizer()
    e = prepare(RECORDS[2], "plain", encoder_for(tok, image_id(tok), 3, "plain"), 4096).encoded
    masked = [t for t, label in zip(e.input_ids, e.labels, strict=True) if label == IGNORE_INDEX]
    assert masked == [tok.bos_token_id] + [image_id(tok)] * 3
    assert supervised_text(tok, e.input_ids, e.labels) == (
        "select luxury furniture 3 - inch gel memory foam mattress topper\n"
    )


def test_image_marker_moves_to_front_of_first_human_turn() -> None:
    rec = make(("human", "Summarize.\n<image>"), ("gpt", "a"), image="x.png")
    assert place_images(rec)[0].text == "<image>\nSummarize."


def test_record_with_image_but_no_marker_gets_one() -> None:
    rec = make(("human", "What is it?"), ("gpt", "a cat"), image="x.png")
    assert prompt_text(render(rec, "vicuna_v1")).count("USER: <image>\nWhat is it?") == 1


def test_multi_image_markers_stay_interleaved() -> None:
    rec = make(("human", "<image> left, <image> right?"), ("gpt", "b"), image=["a.png", "b.png"])
    assert place_images(rec)[0].text == "<image> left, <image> right?"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "chatml",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nq<|im_end|>\n"
            "<|im_start|>assistant\na<|im_end|>\n",
        ),
        (
            "llama_3",
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\n<image>\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na<|eot_id|>",
        ),
    ],
)
def test_chatml_and_llama_3_render_and_supervise_reply_with_end_of_turn(template: str, expected: str) -> None:
    rec = make(("system", "Be brief."), ("human", "<image>\nq"), ("gpt", "a"), image="x.png")
    segments = render(rec, template)
    assert prompt_text(segments) == expected
    end = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
    assert "".join(s.text for s in segments if s.supervised) == "a" + end


def test_tokenizer_template_masks_by_growing_prefixes() -> None:
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        segments = render(make(("human", "q"), ("gpt", "a"), ("human", "q2"), ("gpt", "b")), "tokenizer", tok)
    finally:
        tok.chat_template = None
    assert [(s.text, s.supervised) for s in segments] == [
        ("<user>q</user>", False),
        ("<assistant>", False),
        ("a</assistant>", True),
        ("<user>q2</user>", False),
        ("<assistant>", False),
        ("b</assistant>", True),
    ]


def test_truncation_that_cuts_all_supervision_is_empty_supervision() -> None:
    tok = byte_tokenizer()
    rec = make(("human", "<image>\n" + "q" * 200), ("gpt", "a"), image="x.png")
    with pytest.raises(RecordProblem) as e:
        prepare(rec, "vicuna_v1", encoder_for(tok, image_id(tok), 16, "vicuna_v1"), 300)
    assert e.value.code == "empty_supervision"


def test_truncation_inside_image_tokens_is_too_long() -> None:
    tok = byte_tokenizer()
    rec = make(("human", "<image>\nq"), ("gpt", "a"), image="x.png")
    with pytest.raises(RecordProblem) as e:
        prepare(rec, "vicuna_v1", encoder_for(tok, image_id(tok), 576, "vicuna_v1"), 300)
    assert e.value.code == "too_long"


texts = st.text(alphabet=st.sampled_from(list("ab cXY.,?\n \u00e9\u4e2d1")), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(texts, texts), min_size=1, max_size=3),
    template=st.sampled_from(["vicuna_v1", "llama_2", "llama_3", "chatml", "plain"]),
    spm=st.booleans(),
    with_image=st.booleans(),
)
def test_supervised_tokens_never_fall_in_masked_segments(
    pairs: list[tuple[str, str]], template: str, spm: bool, with_image: bool
) -> None:
    if template == "plain":
        pairs = pairs[:1]
    turns = [t for q, a in pairs for t in (("human", q), ("gpt", a))]
    rec = make(*turns, image="x.png" if with_image else None)
    tok = llama_tokenizer() if spm else byte_tokenizer()
    segments = render(rec, template)
    encoder = SegmentEncoder(tok, image_id(tok), 3)
    encoded = encoder.encode(segments)
    # Encode each segment alone in place: its label span must follow its own flag exactly.
    position = 1 if tok.bos_token_id is not None else 0
    for k in range(len(segments)):
        length = len(encoder.encode(segments[: k + 1]).input_ids) - position
        span = encoded.labels[position : position + length]
        supervised = segments[k].supervised and segments[k].kind != "image"
        assert all((label != IGNORE_INDEX) == supervised for label in span), segments[k]
        position += length
    assert position == len(encoded.input_ids)


def test_segment_kinds_expand_images_and_specials() -> None:
    tok = byte_tokenizer()
    segments = [Segment("text", "hi"), Segment("image"), Segment("text", " yo", True), Segment("eos", supervised=True)]
    e = SegmentEncoder(tok, image_id(tok), 2).encode(segments)
    assert e.input_ids[-3:] == [*tok(" yo", add_special_tokens=False)["input_ids"], tok.eos_token_id][-3:]
    assert e.input_ids.count(image_id(tok)) == 2

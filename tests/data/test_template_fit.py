"""The profile's template against its tokenizer: control tokens, the tokenizer's own chat template,
and what `data check` and doctor say of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import byte_tokenizer_folder, llama_tokenizer, profile, run_cli, spm_folder

from llavactl.data.records import Record, Turn
from llavactl.data.template_fit import chat_template_difference, template_fit
from llavactl.data.templates import chat_template
from llavactl.model.sources import load_tokenizer

CHATML = ("<|im_start|>", "<|im_end|>")
LLAMA_3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
RECORD = Record(0, "r", ("a.png",), (Turn("human", "<image>\nWhat colour is it?"), Turn("gpt", "Red.")), raw={})


@pytest.mark.parametrize(("template", "strings"), [("llama_3", LLAMA_3), ("chatml", CHATML)])
def test_the_llama_2_tokenizer_cannot_speak_llama_3_or_chatml(template: str, strings: tuple[str, ...]) -> None:
    tok = llama_tokenizer()
    fit = template_fit(tok, template)
    assert not fit.fits and [m.text for m in fit.misfits] == list(strings)
    # Each misfit carries the pieces the tokenizer really cuts the string into.
    for misfit in fit.misfits:
        assert misfit.pieces == tuple(tok.convert_ids_to_tokens(tok(misfit.text, add_special_tokens=False).input_ids))
        assert len(misfit.pieces) > 1
    assert fit.fitting == ("plain", "vicuna_v1", "llama_2")
    finding, fix = fit.finding("llama-2"), fit.fix()
    assert "`<|eot_id|>`" in finding or "`<|im_end|>`" in finding
    assert "'▁<', '|'" in finding  # how it is split, as the tokenizer's own pieces
    assert "`data.conversation_template=vicuna_v1`" in fix and "`plain`" in fix and "`llama_2`" in fix


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_2", "plain"])
def test_text_templates_fit_the_llama_2_tokenizer(template: str) -> None:
    assert template_fit(llama_tokenizer(), template).fits


def test_a_byte_tokenizer_speaks_the_templates_whose_specials_it_has(tmp_path: Path) -> None:
    chatml = load_tokenizer(str(byte_tokenizer_folder(tmp_path / "chatml", *CHATML)))
    llama_3 = load_tokenizer(str(byte_tokenizer_folder(tmp_path / "llama3", *LLAMA_3)))
    plain = load_tokenizer("builtin:tiny-llama")
    assert template_fit(chatml, "chatml").fits and not template_fit(chatml, "llama_3").fits
    assert template_fit(llama_3, "llama_3").fits and not template_fit(llama_3, "chatml").fits
    assert template_fit(chatml, "llama_3").fitting == ("plain", "vicuna_v1", "llama_2", "chatml")
    # Byte by byte: `<|im_start|>` is twelve one-byte pieces to the builtin tokenizer.
    [start, end] = template_fit(plain, "chatml").misfits
    assert start.text == "<|im_start|>" and len(start.pieces) == len("<|im_start|>")
    assert end.text == "<|im_end|>" and "".join(end.pieces) == "<|im_end|>"


def test_a_template_that_ends_replies_with_eos_needs_a_tokenizer_with_one(tmp_path: Path) -> None:
    tok = load_tokenizer(str(byte_tokenizer_folder(tmp_path / "t", *CHATML)))
    tok.eos_token = None
    fit = template_fit(tok, "vicuna_v1")
    assert [m.text for m in fit.misfits] == ["EOS"] and "has none" in fit.finding("t")
    assert "vicuna_v1" not in fit.fitting and "chatml" in fit.fitting  # chatml ends with <|im_end|>


def test_a_tokenizers_own_chat_template_is_compared_on_a_real_record(tmp_path: Path) -> None:
    folder = byte_tokenizer_folder(tmp_path / "own", *CHATML, chat_template=chat_template("chatml", None))
    tok = load_tokenizer(str(folder))
    assert chat_template_difference(tok, "chatml", RECORD) is None  # the same template: no word
    difference = chat_template_difference(tok, "vicuna_v1", RECORD)
    assert difference is not None and difference.record is RECORD and "=tokenizer" in difference.fix
    differs = difference.finding
    assert "`vicuna_v1`" in differs and "tokenizer's own chat template" in differs and "record 0" in differs
    assert "'A chat between" in differs and "'<|im_start|>user" in differs  # both sides, where they part
    assert chat_template_difference(tok, "plain", RECORD) is None  # stage 1 captions whatever the LLM's template
    assert template_fit(tok, "vicuna_v1").fitting[-1] == "tokenizer"
    assert "`data.conversation_template=tokenizer`" in template_fit(load_tokenizer(str(folder)), "llama_3").fix()


def test_data_check_fails_on_a_template_the_tokenizer_cannot_speak(shapes: Path, cache: Path) -> None:
    args = ["data", "check", "-p", "tiny", f"data.data_path={shapes}", f"model.tokenizer_name_or_path={spm_folder()}"]
    code, out, err = run_cli([*args, "data.conversation_template=llama_3"])
    assert code == 1, err
    text = " ".join((out + err).split())
    assert "template_tokens" in text and "`<|start_header_id|>`" in text and "`<|eot_id|>`" in text
    assert "1 error of the profile" in text
    assert "Fix: use a template this tokenizer can speak" in text and "data.conversation_template=vicuna_v1" in text
    code, out, _ = run_cli([*args, "data.conversation_template=chatml", "--json"])
    report = json.loads(out)
    [problem] = [p for p in report["problems"] if p["code"] == "template_tokens"]
    assert code == 1 and problem["index"] is None and problem["severity"] == "error"
    assert "<|im_start|>" in problem["message"] and "vicuna_v1" in problem["fix"]
    # The same data with a template it speaks: no problem of the profile.
    assert run_cli([*args, "data.conversation_template=vicuna_v1"])[0] == 0


def test_data_check_warns_when_the_tokenizers_own_chat_template_differs(
    shapes: Path, cache: Path, tmp_path: Path
) -> None:
    folder = byte_tokenizer_folder(tmp_path / "own", *CHATML, chat_template=chat_template("chatml", None))
    args = ["data", "check", "-p", "tiny", f"data.data_path={shapes}", f"model.tokenizer_name_or_path={folder}"]
    code, out, _ = run_cli([*args, "--json"])  # tiny's vicuna_v1 against the tokenizer's chatml
    [warning] = [p for p in json.loads(out)["problems"] if p["code"] == "chat_template"]
    assert code == 0 and warning["severity"] == "warning" and warning["index"] == 0
    assert "`vicuna_v1`" in warning["message"] and "data.conversation_template=tokenizer" in warning["fix"]
    code, out, _ = run_cli([*args, "data.conversation_template=chatml", "--json"])
    assert code == 0 and not [p for p in json.loads(out)["problems"] if p["code"] == "chat_template"]


def test_doctor_fails_and_names_the_string_its_pieces_and_the_templates_that_fit(shapes: Path) -> None:
    from llavactl.doctor import blocking_failures, checks_of
    from llavactl.resolve import resolve
    from llavactl.resolve.facts import probe

    facts = probe()
    loaded = profile("tiny", f"model.tokenizer_name_or_path={spm_folder()}", "data.conversation_template=chatml")
    rows = [r for r in checks_of(resolve(loaded, facts), facts) if r.check == "data.conversation_template"]
    [row] = rows
    assert row.status == "fail" and row in blocking_failures(rows)  # train stops before loading anything
    assert "`<|im_start|>`" in row.finding and "7 pieces" in row.finding and "`vicuna_v1`" in row.fix
    [ok] = [r for r in checks_of(resolve(profile("tiny"), facts), facts) if r.check == "data.conversation_template"]
    assert ok.status == "pass"


def test_doctor_warns_when_the_first_record_renders_otherwise_under_the_tokenizers_template(
    shapes: Path, tmp_path: Path
) -> None:
    from llavactl.doctor import checks_of
    from llavactl.resolve import resolve
    from llavactl.resolve.facts import probe

    folder = byte_tokenizer_folder(tmp_path / "own", *CHATML, chat_template=chat_template("chatml", None))
    facts = probe()
    loaded = profile("tiny", f"data.data_path={shapes}", f"model.tokenizer_name_or_path={folder}")
    [row] = [r for r in checks_of(resolve(loaded, facts), facts) if r.check == "data.conversation_template"]
    assert row.status == "warn" and "`vicuna_v1`" in row.finding and "=tokenizer" in row.fix


def test_a_tokenizer_without_the_eos_its_template_ends_replies_with_is_the_templates_error(
    shapes: Path, cache: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    folder = byte_tokenizer_folder(tmp_path / "noeos", *CHATML)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = None
    tok.save_pretrained(folder)
    args = ["-p", "tiny", f"data.data_path={shapes}", f"model.tokenizer_name_or_path={folder}"]
    code, out, err = run_cli(["data", "check", *args])  # vicuna_v1 ends each reply with the EOS
    text = " ".join((out + err).split())
    assert code == 1 and "template_tokens" in text and "an EOS token to end each reply" in text, text
    assert "data.conversation_template=chatml" in text  # the template whose end of turn it has, first
    code, out, err = run_cli(["doctor", *args])
    text = " ".join((out + err).split())
    assert code == 1 and "fail data.conversation_template" in text and "Internal error" not in text


def test_a_chat_template_that_raises_is_named_and_never_recommended(shapes: Path, cache: Path, tmp_path: Path) -> None:
    folder = byte_tokenizer_folder(tmp_path / "div", *CHATML, chat_template="{{ (1 / 0) }}")
    args = ["-p", "tiny", f"data.data_path={shapes}", f"model.tokenizer_name_or_path={folder}"]
    code, out, _ = run_cli(["data", "check", *args, "data.conversation_template=chatml", "--json"])
    [warning] = [p for p in json.loads(out)["problems"] if p["code"] == "chat_template"]
    assert code == 0 and "cannot render record 0" in warning["message"]
    assert warning["fix"].startswith("keep `data.conversation_template=chatml`")
    fix = template_fit(load_tokenizer(str(folder)), "llama_3").fix()
    assert "`tokenizer`" not in fix and "e.g. `data.conversation_template=chatml`" in fix


def test_a_tokenizer_that_splits_its_own_specials_is_told_so(tmp_path: Path) -> None:
    tok = load_tokenizer(str(byte_tokenizer_folder(tmp_path / "split", *CHATML)))
    tok.split_special_tokens = True
    fit = template_fit(tok, "chatml")
    assert not fit.fits and "reads as text (its `split_special_tokens` is on)" in fit.finding("t")
    assert "split_special_tokens: false" in fit.fix()

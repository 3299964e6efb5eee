"""Does the profile's conversation template fit its tokenizer? The check `data check` and doctor share.

A template's control strings (`<|im_start|>`, `<|start_header_id|>`, `<|eot_id|>`: ``control_tokens``
of :class:`~llavactl.data.templates.TurnTemplate`) must each be one token of the tokenizer: one
that is not is cut into text pieces, trained as text, and the reply never ends with a real end of
turn (LLaVA's trackers' "tokenization mismatch", models answering with template text). Its other
text (`USER:`, `[INST]`, `<<SYS>>`) is text to any tokenizer, and a template that ends a reply with
the tokenizer's EOS needs the tokenizer to have one.

When the tokenizer carries its own chat template, the LLM may have been tuned with it: the
profile's template is rendered beside it on a real record, and a difference is a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from llavactl.data.records import Record
from llavactl.data.templates import TEMPLATES, prompt_text, render, turn_template
from llavactl.errors import DataError

TEMPLATE_TOKENS = "template_tokens"  # data check's code (an error of the profile, not of a record)
CHAT_TEMPLATE = "chat_template"  # its warning code: the profile's template and the tokenizer's differ
_SHOWN_PIECES = 8
_SNIPPET = 24


@dataclass(frozen=True)
class Misfit:
    """A control string of the template that is not one token of the tokenizer."""

    text: str  # the string, or "EOS" when the tokenizer has no end-of-sequence token
    pieces: tuple[str, ...]  # how the tokenizer cuts it

    def said(self) -> str:
        if self.text == "EOS":
            return "an EOS token to end each reply (the tokenizer has none)"
        shown = ", ".join(repr(p) for p in self.pieces[:_SHOWN_PIECES])
        more = f", ... ({len(self.pieces)} in all)" if len(self.pieces) > _SHOWN_PIECES else ""
        return f"`{self.text}` (the tokenizer cuts it into {len(self.pieces)} pieces: {shown}{more})"


@dataclass(frozen=True)
class TemplateFit:
    """The template's misfits with this tokenizer, and the templates that do fit it."""

    template: str
    misfits: tuple[Misfit, ...]
    fitting: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return not self.misfits

    def finding(self, tokenizer_name: str) -> str:
        strings = "; ".join(m.said() for m in self.misfits)
        return (
            f"data.conversation_template `{self.template}` writes control tokens that the tokenizer "
            f"`{tokenizer_name}` does not have: {strings}. They would be trained as plain text pieces, and "
            "a reply would never end with a real end of turn"
        )

    def fix(self) -> str:
        names = ", ".join(f"`{name}`" for name in self.fitting)
        # The tokenizer's own template first, then a chat template, then stage 1's `plain`.
        best = sorted(self.fitting, key=lambda n: (n != "tokenizer", n == "plain"))[0]
        return (
            f"use a template this tokenizer can speak ({names}: e.g. `data.conversation_template={best}`), "
            "or the tokenizer that has these tokens (`model.tokenizer_name_or_path`: the LLM's own)"
        )


def _single_tokens(tokenizer: Any) -> set[int]:
    """Ids a string can be read as whole: special and added tokens."""
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return added | {int(i) for i in getattr(tokenizer, "all_special_ids", [])}


def misfits(tokenizer: Any, template: str, *, single: set[int] | None = None) -> tuple[Misfit, ...]:
    """The control strings of ``template`` that ``tokenizer`` does not read as one token."""
    turn = turn_template(template)
    if turn is None:  # `plain` writes no control string; `tokenizer` is the tokenizer's own
        return ()
    single = _single_tokens(tokenizer) if single is None else single
    out = []
    for text in turn.control_tokens:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not (len(ids) == 1 and ids[0] in single):
            out.append(Misfit(text, tuple(tokenizer.convert_ids_to_tokens(ids))))
    if turn.reply_eos and tokenizer.eos_token_id is None:
        out.append(Misfit("EOS", ()))
    return tuple(out)


def template_fit(tokenizer: Any, template: str) -> TemplateFit:
    """How ``template`` fits ``tokenizer``, and every template that fits it (in the schema's order)."""
    single = _single_tokens(tokenizer)

    def fits(name: str) -> bool:
        if name == "tokenizer":
            return bool(getattr(tokenizer, "chat_template", None))
        return not misfits(tokenizer, name, single=single)

    return TemplateFit(template, misfits(tokenizer, template, single=single), tuple(n for n in TEMPLATES if fits(n)))


def chat_template_difference(tokenizer: Any, template: str, record: Record) -> str | None:
    """Where the profile's ``template`` and the tokenizer's own chat template render ``record``
    differently (None when they agree, or when there is nothing to compare).

    The leading BOS is left aside: llavactl writes the tokenizer's own BOS first, where a chat
    template may or may not. `plain` (stage 1's captions) is LLaVA's choice whatever the LLM's
    chat template, and `tokenizer` is that template."""
    if template in ("plain", "tokenizer") or not getattr(tokenizer, "chat_template", None):
        return None
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    ours = prompt_text(render(record, template), bos=bos, eos=eos)
    try:
        theirs = prompt_text(render(record, "tokenizer", tokenizer), bos=bos, eos=eos)
    except (DataError, TemplateError, ValueError, TypeError, KeyError) as exc:  # the folder's template fails
        return f"the tokenizer's own chat template cannot render record {record.index} ({getattr(exc, 'message', exc)})"
    if bos:
        ours, theirs = ours.removeprefix(bos), theirs.removeprefix(bos)
    if ours == theirs:
        return None
    at = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    start = max(0, at - 8)
    return (
        f"data.conversation_template `{template}` and the tokenizer's own chat template render record "
        f"{record.index} differently from character {at}: {template} writes "
        f"{ours[start : at + _SNIPPET]!r}, the tokenizer's template {theirs[start : at + _SNIPPET]!r}. "
        "An LLM tuned with its own chat template learns a new one here"
    )


CHAT_TEMPLATE_FIX = (
    "`data.conversation_template=tokenizer` trains with the tokenizer's own template; keep this one if the "
    "LLM was not tuned with it"
)

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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from llavactl.data.records import Record, RecordProblem, Turn
from llavactl.data.templates import TEMPLATES, prompt_text, render, turn_template

TEMPLATE_TOKENS = "template_tokens"  # data check's code (an error of the profile, not of a record)
CHAT_TEMPLATE = "chat_template"  # its warning code: the profile's template and the tokenizer's differ
TEMPLATE_SAMPLE = 100  # the first records, of which the first the template renders is compared
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
        if self.text == "BOS":
            return "a BOS token before every exchange but the first (the tokenizer has none)"
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

    @property
    def unencodable(self) -> bool:
        """The tokenizer lacks the EOS or BOS the template writes: no record can be encoded."""
        return any(m.text in ("EOS", "BOS") for m in self.misfits)

    split_specials: bool = False  # the tokenizer has the tokens but reads them as text (split_special_tokens)

    def finding(self, tokenizer_name: str) -> str:
        strings = "; ".join(m.said() for m in self.misfits)
        has = "reads as text (its `split_special_tokens` is on)" if self.split_specials else "does not have"
        return (
            f"data.conversation_template `{self.template}` needs tokens that the tokenizer `{tokenizer_name}` "
            f"{has}: {strings}. Control strings would be trained as plain text pieces, and a reply would never "
            "end with a real end of turn"
        )

    def fix(self) -> str:
        if self.split_specials:
            return "set `split_special_tokens: false` in the tokenizer's tokenizer_config.json"
        # The tokenizer's own template first, then those whose control tokens it has, then text ones, then
        # stage 1's `plain`.
        ranked = sorted(
            self.fitting,
            key=lambda n: (n != "tokenizer", not _control_tokens(n), n == "plain"),
        )
        names = ", ".join(f"`{name}`" for name in ranked)
        return (
            f"use a template this tokenizer can speak ({names}: e.g. `data.conversation_template={ranked[0]}`), "
            "or the tokenizer that has these tokens (`model.tokenizer_name_or_path`: the LLM's own)"
        )


def _control_tokens(template: str) -> tuple[str, ...]:
    turn = turn_template(template)
    return turn.control_tokens if turn is not None else ()


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
    if turn.later_turn_bos and tokenizer.bos_token_id is None:
        out.append(Misfit("BOS", ()))
    return tuple(out)


def template_fit(tokenizer: Any, template: str) -> TemplateFit:
    """How ``template`` fits ``tokenizer``, and every template that fits it (in the schema's order)."""
    single = _single_tokens(tokenizer)

    def fits(name: str) -> bool:
        if name == "tokenizer":
            return renders(tokenizer)
        return not misfits(tokenizer, name, single=single)

    found = misfits(tokenizer, template, single=single)
    added = {getattr(t, "content", None) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    split = bool(getattr(tokenizer, "split_special_tokens", False)) and any(m.text in added for m in found)
    return TemplateFit(template, found, tuple(n for n in TEMPLATES if fits(n)), split)


_SAMPLE = Record(0, None, (), (Turn("human", "Hello?"), Turn("gpt", "Hello.")), raw={})


def renders(tokenizer: Any) -> bool:
    """Whether the tokenizer has a chat template that renders a plain exchange turn by turn."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        render(_SAMPLE, "tokenizer", tokenizer)
    except Exception:  # the folder's own code: any error means it does not render
        return False
    return True


@dataclass(frozen=True)
class Difference:
    """How the profile's template and the tokenizer's own chat template part on ``record``."""

    record: Record
    finding: str
    fix: str


def chat_template_difference(tokenizer: Any, template: str, record: Record) -> Difference | None:
    """Where the profile's ``template`` and the tokenizer's own chat template render ``record``
    differently, and the fix (None when they agree, or when there is nothing to compare); raises
    :class:`RecordProblem` when the profile's template cannot render the record.

    The leading BOS is left aside: llavactl writes the tokenizer's own BOS first, where a chat
    template may or may not. `plain` (stage 1's captions) is LLaVA's choice whatever the LLM's
    chat template, and `tokenizer` is that template."""
    if template in ("plain", "tokenizer") or not getattr(tokenizer, "chat_template", None):
        return None
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    ours = prompt_text(render(record, template), bos=bos, eos=eos)
    try:
        theirs = prompt_text(render(record, "tokenizer", tokenizer), bos=bos, eos=eos)
    except Exception as exc:  # a chat template is code from the model's folder: any error is its own
        why = getattr(exc, "message", exc)
        broken = f"the tokenizer's own chat template cannot render record {record.index} ({why})"
        keep = f"keep `data.conversation_template={template}`; the tokenizer's template is broken, not used"
        return Difference(record, broken, keep)
    if bos:
        ours, theirs = ours.removeprefix(bos), theirs.removeprefix(bos)
    if ours == theirs:
        return None
    at = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    start = max(0, at - 8)
    return Difference(
        record,
        f"data.conversation_template `{template}` and the tokenizer's own chat template render record "
        f"{record.index} differently from character {at}: {template} writes "
        f"{ours[start : at + _SNIPPET]!r}, the tokenizer's template {theirs[start : at + _SNIPPET]!r}. "
        "An LLM tuned with its own chat template learns a new one here",
        "`data.conversation_template=tokenizer` trains with the tokenizer's own template; keep this one if the "
        "LLM was not tuned with it",
    )


def first_difference(tokenizer: Any, template: str, records: Iterable[Record | object]) -> Difference | None:
    """:func:`chat_template_difference` on the first of ``records`` that the profile's template
    renders (a record that does not is its own problem); what `data check` and doctor compare."""
    for record in records:
        if not isinstance(record, Record):
            continue
        try:
            return chat_template_difference(tokenizer, template, record)
        except RecordProblem:
            continue
    return None

"""Conversation templates: render a record as segments, then token ids and labels.

A template turns a record's turns into a list of :class:`Segment` values, each either masked
(system text, user turns, role headers) or supervised (assistant replies and their end-of-turn
token). :class:`SegmentEncoder` tokenizes every segment on its own and concatenates the ids, so a
label is decided by the segment a token came from, never by searching a rendered string.

Leading spaces: a SentencePiece tokenizer (Llama) prepends a space to every string it encodes,
so encoding segments one by one would put a spurious ``▁`` at each boundary. The first text
segment is encoded as is (the model sees a prefixed first word too); every later segment is
encoded behind an anchor (a newline, a byte token that never merges with a neighbour) whose ids
are then dropped. The result equals encoding the whole prompt at once with a non-legacy
tokenizer (``legacy=False``: no space after special tokens), which a test asserts on the real
Llama tokenizer for every reference record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from llavactl.config.schema import Template
from llavactl.data.records import IMAGE_MARKER, Record, RecordProblem, Turn, check_image_markers
from llavactl.errors import DataError

IGNORE_INDEX = -100

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
    "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
    "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why "
    "instead of answering something not correct. If you don't know the answer to a question, please "
    "don't share false information."
)

TEMPLATES: tuple[str, ...] = get_args(Template)  # the schema's list, in its order


@dataclass(frozen=True)
class Segment:
    """A piece of the prompt. ``image`` expands to the tower's patch count; ``bos``/``eos`` are ids."""

    kind: Literal["text", "image", "bos", "eos"]
    text: str = ""
    supervised: bool = False


def place_images(record: Record) -> list[Turn]:
    """LLaVA's placement rule: one image's marker goes to the front of the first human turn.

    The marker is removed from wherever it was, the turn stripped, and ``<image>\\n`` put in
    front (LLaVA's ``preprocess_multimodal``); a record with an image but no marker gets one
    there. Several images keep their markers in place (interleaved text and images mean
    something), or, with no markers, get ``<image>\\n`` per image at that same front.
    """
    turns = list(record.turns)
    n = len(record.images)
    if n == 0 or (n > 1 and record.marker_count == n):
        return turns
    first_human = next(i for i, t in enumerate(turns) if t.role == "human")
    for i, t in enumerate(turns):
        if IMAGE_MARKER in t.text:
            turns[i] = Turn(t.role, t.text.replace(IMAGE_MARKER, "").strip())
    head = turns[first_human]
    turns[first_human] = Turn(head.role, ((IMAGE_MARKER + "\n") * n + head.text).strip())
    return turns


def render(record: Record, template: str, tokenizer: Any = None) -> list[Segment]:
    """The record as masked and supervised segments under ``template`` (images placed first)."""
    turns = place_images(record)
    system = turns[0].text if turns[0].role == "system" else None
    body = turns[1:] if system is not None else turns
    pairs = [(body[i].text, body[i + 1].text) for i in range(0, len(body), 2)]
    if template == "plain":
        return _plain(pairs, len(record.images))
    if template == "tokenizer":
        return _tokenizer_template(tokenizer, system, pairs)
    return conversation_template(template).segments(system, pairs)


def _text(text: str, supervised: bool = False) -> list[Segment]:
    """Text with ``<image>`` markers split out as image segments; empty pieces dropped."""
    out: list[Segment] = []
    for k, piece in enumerate(text.split(IMAGE_MARKER)):
        if k:
            out.append(Segment("image"))
        if piece:
            out.append(Segment("text", piece, supervised))
    return out


def _plain(pairs: list[tuple[str, str]], n_images: int) -> list[Segment]:
    # LLaVA stage 1 (preprocess_plain): the human text is dropped; image(s), caption, newline.
    if len(pairs) != 1:
        raise RecordProblem(
            "bad_role",
            f"the `plain` template takes one human/gpt exchange (LLaVA stage 1); this record has {len(pairs)}",
        )
    return [Segment("image")] * n_images + [Segment("text", pairs[0][1] + "\n", True)]


# --------------------------------------------------------------------------- turn templates
#
# Each conversation template is written once, as the pieces below. Training renders a record
# from them as masked and supervised segments; an export carries the Jinja chat template made
# from the same pieces, so that transformers users render exactly what the model was trained on.


@dataclass(frozen=True)
class TurnTemplate:
    """A chat template of user and assistant turns, with an optional system block.

    In ``system``, ``first_user``, ``user`` and ``reply`` the placeholders ``{system}``,
    ``{user}`` and ``{reply}`` stand for the texts. User turns (with the assistant's header) are
    masked; the reply, its end (``reply_eos``: the tokenizer's EOS) are supervised; ``after_reply``
    is masked again. ``system_when`` says when the system block is written: ``always`` (even for
    an empty system text), ``set`` (when the record has a system turn or there is a default),
    ``nonempty`` (when that text is not empty).
    """

    default_system: str | None
    system: str
    first_user: str
    user: str
    reply: str
    reply_eos: bool
    system_when: Literal["always", "set", "nonempty"]
    after_reply: str = ""
    later_turn_bos: bool = False  # the tokenizer's BOS before every exchange but the first (masked)
    end_of_turn: str | None = None  # a token that ends a reply other than the tokenizer's EOS
    # The strings it writes that must each be one (special) token of the tokenizer; the rest of its
    # text (`USER:`, `[INST]`, `<<SYS>>`) is text to any tokenizer (`data/template_fit.py` checks).
    control_tokens: tuple[str, ...] = ()

    def _system_block(self, system: str | None) -> str:
        write = {"always": True, "set": system is not None, "nonempty": bool(system)}[self.system_when]
        return self.system.replace("{system}", system or "") if write else ""

    def segments(self, system: str | None, pairs: list[tuple[str, str]]) -> list[Segment]:
        """A conversation as masked and supervised segments (training's side)."""
        system = self.default_system if system is None else system
        out: list[Segment] = []
        for k, (question, answer) in enumerate(pairs):
            if k and self.later_turn_bos:
                out.append(Segment("bos"))
            head = self.first_user.replace("{system}", self._system_block(system)) if k == 0 else self.user
            out += _text(head.replace("{user}", question))
            out += _text(self.reply.replace("{reply}", answer), True)
            if self.reply_eos:
                out.append(Segment("eos", supervised=True))
            out += _text(self.after_reply)
        return out

    def jinja(self) -> str:
        """The same template as a Jinja chat template (the export's side).

        A user message's content is a string (``<image>`` markers in place) or a list of
        ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts, images first as LLaVA
        places them, each written ``<image>\\n``."""
        condition = {"always": "true", "set": "system is not none", "nonempty": "system"}[self.system_when]
        block = f"{{%- if {condition} -%}}{_jinja_text(self.system, system='system')}{{%- endif -%}}"
        first = _jinja_text(self.first_user, user="content(m, '<image>\\n')", system=None, system_block=block)
        later = ("{{ bos_token }}" if self.later_turn_bos else "") + _jinja_text(
            self.user, user="content(m, '<image>\\n')"
        )
        reply = _jinja_text(self.reply, reply="content(m, '')") + ("{{ eos_token }}" if self.reply_eos else "")
        default = "none" if self.default_system is None else json.dumps(self.default_system, ensure_ascii=False)
        return (
            _JINJA_CONTENT
            + "{%- if messages and messages[0]['role'] == 'system' -%}"
            + "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            + f"{{%- else -%}}{{%- set system = {default} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
            + "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
            + f"{{%- if loop.first -%}}{first}{{%- else -%}}{later}{{%- endif -%}}"
            + f"{{%- elif m['role'] == 'assistant' -%}}{reply}{_jinja_text(self.after_reply)}"
            + "{%- endif -%}{%- endfor -%}"
        )


# A user message's content: its text, or its parts with every image first.
_JINJA_CONTENT = (
    "{%- macro content(m, image) -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}"
    "{%- for p in m['content'] if p['type'] == 'image' -%}{{ image }}{%- endfor -%}"
    "{%- for p in m['content'] if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)


def _jinja_text(
    pattern: str, *, system: str | None = None, system_block: str = "", user: str = "", reply: str = ""
) -> str:
    """``pattern`` as Jinja: literal text as string expressions, placeholders as the expressions given."""
    import re

    out = ""
    for piece in re.split(r"(\{system\}|\{user\}|\{reply\})", pattern):
        if piece == "{system}":
            out += f"{{{{ {system} }}}}" if system is not None else system_block
        elif piece == "{user}":
            out += f"{{{{ {user} }}}}"
        elif piece == "{reply}":
            out += f"{{{{ {reply} }}}}"
        elif piece:
            out += f"{{{{ {json.dumps(piece, ensure_ascii=False)} }}}}"
    return out


_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
_TURN_TEMPLATES = {
    # "{system} USER: {q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>" (conv_vicuna_v1).
    "vicuna_v1": TurnTemplate(
        VICUNA_SYSTEM,
        system="{system} ",
        first_user="{system}USER: {user} ASSISTANT:",
        user="USER: {user} ASSISTANT:",
        reply=" {reply}",
        reply_eos=True,
        system_when="always",
    ),
    # "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] {q} [/INST] {a} </s>".
    "llama_2": TurnTemplate(
        LLAMA_2_SYSTEM,
        system="<<SYS>>\n{system}\n<</SYS>>\n\n",
        first_user="[INST] {system}{user} [/INST]",
        user="[INST] {user} [/INST]",
        reply=" {reply} ",
        reply_eos=True,
        system_when="nonempty",
        later_turn_bos=True,
    ),
    "llama_3": TurnTemplate(
        None,
        system=_HEADER.format("system") + "{system}<|eot_id|>",
        first_user="{system}" + _HEADER.format("user") + "{user}<|eot_id|>" + _HEADER.format("assistant"),
        user=_HEADER.format("user") + "{user}<|eot_id|>" + _HEADER.format("assistant"),
        reply="{reply}<|eot_id|>",
        reply_eos=False,
        system_when="set",
        end_of_turn="<|eot_id|>",
        control_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "chatml": TurnTemplate(
        None,
        system="<|im_start|>system\n{system}<|im_end|>\n",
        first_user="{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
        user="<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
        reply="{reply}<|im_end|>",
        reply_eos=False,
        system_when="set",
        after_reply="\n",
        end_of_turn="<|im_end|>",
        control_tokens=("<|im_start|>", "<|im_end|>"),
    ),
}

# Stage 1's template as Jinja: each image's marker, then the caption and a newline; user text dropped.
_PLAIN_JINJA = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if m['content'] is not string -%}"
    "{%- for p in m['content'] if p['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for p in m['content'] if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def conversation_template(name: str) -> TurnTemplate:
    """The turn template ``name`` (every template but `plain` and `tokenizer`, which are written apart)."""
    try:
        return _TURN_TEMPLATES[name]
    except KeyError:
        raise DataError(
            f"unknown conversation template {name!r}",
            fix=f"set `data.conversation_template` to one of {', '.join(TEMPLATES)}",
        ) from None


def chat_template(template: str, tokenizer: Any) -> str:
    """The Jinja chat template that renders ``template`` as training does (for `tokenizer`: the
    tokenizer's own), for an exported folder."""
    if template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.conversation_template is `tokenizer`, but the tokenizer has no chat template to export.",
                fix="train with an explicit template, e.g. `data.conversation_template=vicuna_v1`",
            )
        return tokenizer.chat_template
    if template == "plain":
        return _PLAIN_JINJA
    return conversation_template(template).jinja()


def turn_template(name: str) -> TurnTemplate | None:
    """The turn template ``name``; None for `plain` and `tokenizer` (and a name that is none)."""
    return _TURN_TEMPLATES.get(name)


def end_of_turn_token(template: str) -> str | None:
    """The token that ends a reply under ``template`` where that is not the tokenizer's EOS."""
    turn = turn_template(template)
    return turn.end_of_turn if turn is not None else None


def _tokenizer_template(tokenizer: Any, system: str | None, pairs: list[tuple[str, str]]) -> list[Segment]:
    """Segments from the tokenizer's own chat template, found by rendering growing prefixes.

    Rendering the first k messages must give a prefix of rendering k+1 (true of the usual
    templates); the text each message adds is its segment, and an assistant message's header is
    what ``add_generation_prompt`` adds before it.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "`data.conversation_template: tokenizer` needs a tokenizer with a chat template, and this one has none",
            fix="pick an explicit template, e.g. `data.conversation_template=vicuna_v1`",
        )
    messages: list[dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]
    for question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def rendered(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    out: list[Segment] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            header = rendered(k, generation_prompt=True)
            _require_prefix(done, header)
            out += _text(header[len(done) :])
            done = header
        full = rendered(k + 1)
        _require_prefix(done, full)
        out += _text(full[len(done) :], supervised=message["role"] == "assistant")
        done = full
    return out


def _require_prefix(prefix: str, text: str) -> None:
    if not text.startswith(prefix):
        raise DataError(
            "the tokenizer's chat template renders a conversation differently once a turn is added, so "
            "turns cannot be masked one by one",
            fix="pick an explicit template, e.g. `data.conversation_template=vicuna_v1`",
        )


def prompt_text(segments: list[Segment], bos: str = "<s>", eos: str = "</s>") -> str:
    """The prompt as one string (images as ``<image>``), as LLaVA's ``get_prompt`` renders it."""
    pieces = {"image": IMAGE_MARKER, "bos": bos, "eos": eos}
    return "".join(s.text if s.kind == "text" else pieces[s.kind] for s in segments)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)  # counted in C: `data check` runs it on every record


class SegmentEncoder:
    """Token ids and labels for segments, with ``<image>`` expanded to ``num_image_tokens`` ids."""

    def __init__(self, tokenizer: Any, image_token_id: int, num_image_tokens: int, add_bos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.add_bos = add_bos
        # A tokenizer that encodes "a" and " a" alike prepends a space (SentencePiece's dummy prefix).
        self._prefixes_space = self._ids("a") == self._ids(" a")
        self._anchor_ids = {a: self._ids(a) for a in ("\n", "a")}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _special_id(self, kind: str) -> int:
        token_id = self.tokenizer.bos_token_id if kind == "bos" else self.tokenizer.eos_token_id
        if token_id is None:
            raise DataError(
                f"the template needs a {kind.upper()} token but the tokenizer has none",
                fix="use a template that fits this tokenizer: `llavactl data check` and doctor name them",
            )
        return token_id

    def encode(self, segments: list[Segment]) -> Encoded:
        bos_id = self.tokenizer.bos_token_id if self.add_bos else None
        ids: list[int] = [bos_id] if bos_id is not None else []
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        texts, anchors = self._texts_to_encode(segments)
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for seg in segments:
            if seg.kind == "text":
                piece, anchor = next(encoded), anchors.pop(0)
                if anchor is not None:
                    piece = self._drop_anchor(piece, anchor, seg.text)
            elif seg.kind == "image":
                piece = [self.image_token_id] * self.num_image_tokens
            else:
                piece = [self._special_id(seg.kind)]
            ids += piece
            supervised = seg.supervised and seg.kind != "image"
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        return Encoded(ids, labels)

    def _texts_to_encode(self, segments: list[Segment]) -> tuple[list[str], list[str | None]]:
        texts: list[str] = []
        anchors: list[str | None] = []
        at_start = True
        for seg in segments:
            if seg.kind == "text":
                # A newline anchor, or "a" before text that starts with one (newlines merge in BPE).
                anchor = None if at_start or not self._prefixes_space else ("a" if seg.text[0] == "\n" else "\n")
                texts.append(seg.text if anchor is None else anchor + seg.text)
                anchors.append(anchor)
            if seg.kind != "bos":
                at_start = False
        return texts, anchors

    def _drop_anchor(self, ids: list[int], anchor: str, text: str) -> list[int]:
        head = self._anchor_ids[anchor]
        if ids[: len(head)] != head:
            raise DataError(
                f"the tokenizer merges a template boundary with its neighbour ({text[:30]!r}), so segments "
                "cannot be tokenized one by one",
                fix="use a template made for this tokenizer, e.g. `data.conversation_template=tokenizer`",
            )
        return ids[len(head) :]


def truncate(encoded: Encoded, max_len: int, image_token_id: int) -> tuple[Encoded, int]:
    """Cut to ``max_len`` tokens; return the result and how many supervised tokens were cut.

    Cutting inside or before an image's tokens would leave the model fewer image positions than
    image features, so that raises ``too_long``.
    """
    if len(encoded.input_ids) <= max_len:
        return encoded, 0
    if image_token_id in encoded.input_ids[max_len:]:
        raise RecordProblem(
            "too_long",
            f"{len(encoded.input_ids)} tokens with image tokens, over data.max_seq_len={max_len}, and the cut "
            "falls in an image's tokens",
        )
    cut = Encoded(encoded.input_ids[:max_len], encoded.labels[:max_len])
    return cut, encoded.num_supervised - cut.num_supervised


@dataclass(frozen=True)
class Prepared:
    """A record as training ids: ``encoded`` is already cut to ``max_seq_len``."""

    encoded: Encoded
    full_length: int  # tokens before the cut, image tokens included
    supervised_cut: int  # supervised tokens lost to the cut


def encoder_for(tokenizer: Any, image_token_id: int, num_image_tokens: int, template: str) -> SegmentEncoder:
    """The encoder for ``template``: BOS first, except where the tokenizer's chat template writes it."""
    return SegmentEncoder(tokenizer, image_token_id, num_image_tokens, add_bos=template != "tokenizer")


def prepare(record: Record, template: str, encoder: SegmentEncoder, max_seq_len: int) -> Prepared:
    """Render, tokenize and cut one record; raise :class:`RecordProblem` when it cannot train.

    Problems: ``image_token_mismatch``, ``bad_role`` (a template that cannot render the turns),
    ``too_long`` (the cut would fall in image tokens) and ``empty_supervision`` (nothing left to
    learn from, after the cut included).
    """
    check_image_markers(record)
    full = encoder.encode(render(record, template, encoder.tokenizer))
    cut, lost = truncate(full, max_seq_len, encoder.image_token_id)
    if cut.num_supervised == 0:
        why = (
            f"all {lost} supervised tokens fall after data.max_seq_len={max_seq_len}"
            if lost
            else "no assistant tokens are supervised"
        )
        raise RecordProblem("empty_supervision", why)
    return Prepared(cut, len(full.input_ids), lost)

"""Conversation templates, prompt rendering and tokenization with visual placeholders.

Reproduces the original LLaVA-NeXT ("original mode", spec §0.3 D5-D7, §8) text side:

* ``vicuna_v1`` (Inst-IT Vicuna) and ``qwen_1_5`` (Inst-IT Qwen2) render byte-for-byte like
  ``llava/conversation.py``; ``plain`` is the stage-1 alignment format ``"<image>" + caption + "\\n"``.
* Token ids follow ``tokenizer_image_token``: the rendered prompt is split at every ``"<image>"``, each
  chunk is tokenized on its own (so a SentencePiece tokenizer gives every chunk its own dummy prefix
  ``"▁"``), a BOS is kept once at the very start if the tokenizer adds one, and every ``"<image>"``
  becomes one ``PLACEHOLDER_ID`` (-200). A later stage expands each placeholder into that image's
  visual tokens (labels -100).

Videos: like the original code, a video is one visual block marked by ``"<image>"``; there is no
separate video token (``VIDEO_TOKEN`` is an alias, kept so callers can say what they mean).

Label masking — deliberate differences from the original ``train.py`` (§8.4):

* Masks come from *where each token came from*, not from re-tokenizing rounds and counting. The
  conversation is rendered as a list of segments whose roles are known (header / user text / reply);
  each ``"<image>"``-delimited chunk is tokenized once, exactly like ``tokenizer_image_token`` (so ids
  equal the original's), and each token takes the role of the characters it covers (character
  offsets from the Rust tokenizer). A token is supervised iff it covers at least one reply character.
  This cannot drift out of step with the ids, so there is no "tokenization mismatch" case where the
  original silently masks a whole sample; its ``-2`` / ``-1`` legacy fudges are not needed.
  Tokenizing each segment separately and concatenating would give the same masks but *different ids*
  for SentencePiece (each segment would get a dummy prefix), breaking parity with the checkpoints.
* Supervised tokens are exactly each assistant reply plus its end token: ``</s>`` (vicuna_v1),
  ``<|im_end|>`` (qwen_1_5), ``"\\n"`` (plain). The original qwen preprocessing also supervises the
  ``<|im_start|>assistant\\n`` header, the trailing ``"\\n"`` and then unmasks ``"\\n"``,
  ``<|im_start|>`` and ``<|im_end|>`` everywhere (even inside user turns); we do not copy that quirk
  because it trains the model to predict user-side structure tokens.
* A tokenizer that adds EOS is not allowed to add it per chunk (the original would keep one EOS per
  chunk); chunks are tokenized without special tokens and only the BOS is added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from instit_jax.processing.errors import SampleError

IMAGE_TOKEN = "<image>"
# A video is one visual block; the original LLaVA-NeXT code marks it with "<image>" as well.
VIDEO_TOKEN = IMAGE_TOKEN
IGNORE_INDEX = -100
PLACEHOLDER_ID = -200

USER = "user"
ASSISTANT = "assistant"
# LLaVA data files use "human"/"gpt".
_ROLE_ALIASES = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT}

Turn = tuple[str, str]
Style = Literal["two", "chatml", "plain"]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """One conversation format (a subset of LLaVA's ``Conversation``).

    style "two": ``system sep USER: m sep ASSISTANT: a sep2 ...`` (Vicuna v1).
    style "chatml": ``system sep \\n role \\n m sep \\n ...`` with roles carrying ``<|im_start|>``.
    style "plain": the user turn reduces to its image placeholders, the reply is followed by ``sep``.
    """

    name: str
    style: Style
    system: str
    user_role: str
    assistant_role: str
    sep: str
    sep2: str
    stop_str: str
    # Strings that delimit turns; a message containing one would corrupt the structure.
    reserved: tuple[str, ...] = ()


VICUNA_V1 = ChatTemplate(
    name="vicuna_v1",
    style="two",
    # "user", not HF's "human" (spec D7).
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    user_role="USER",
    assistant_role="ASSISTANT",
    sep=" ",
    sep2="</s>",
    stop_str="</s>",
    reserved=("</s>",),
)

QWEN_1_5 = ChatTemplate(
    name="qwen_1_5",
    style="chatml",
    system="<|im_start|>system\nYou are a helpful assistant.",
    user_role="<|im_start|>user",
    assistant_role="<|im_start|>assistant",
    sep="<|im_end|>",
    sep2="",
    stop_str="<|im_end|>",
    reserved=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
)

PLAIN = ChatTemplate(
    name="plain",
    style="plain",
    system="",
    user_role="",
    assistant_role="",
    sep="\n",
    sep2="",
    stop_str="\n",
)

TEMPLATES: Mapping[str, ChatTemplate] = {t.name: t for t in (VICUNA_V1, QWEN_1_5, PLAIN)}


def get_template(name: str) -> ChatTemplate:
    """Template by its LLaVA name ("vicuna_v1", "qwen_1_5", "plain")."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedConversation:
    """ids with PLACEHOLDER_ID per image; labels = ids on supervised tokens, IGNORE_INDEX elsewhere."""

    ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L]
    num_placeholders: int


# ----------------------------------------------------------------------------- turn handling


def turns_from_llava(conversations: Iterable[Mapping[str, Any]], *, sample: str | None = None) -> list[Turn]:
    """LLaVA data format ``[{"from": "human", "value": ...}, ...]`` -> ``[(role, text), ...]``."""
    turns = []
    for k, message in enumerate(conversations):
        if not isinstance(message, Mapping) or "from" not in message or "value" not in message:
            raise SampleError(sample, f"turn {k} is not a {{'from', 'value'}} mapping: {message!r}")
        turns.append((message["from"], message["value"]))
    return turns


def normalize_image_placement(turns: Sequence[Turn]) -> list[Turn]:
    """LLaVA train.py rule: a turn with exactly one "<image>" not at its start gets it moved to the
    front as ``"<image>\\n" + rest.strip()``. Turns with several images are left alone."""
    out = []
    for role, text in turns:
        if isinstance(text, str) and text.count(IMAGE_TOKEN) == 1 and not text.startswith(IMAGE_TOKEN):
            text = (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
        out.append((role, text))
    return out


def _checked_turns(
    template: ChatTemplate, turns: Sequence[Turn], *, last_role: str, sample: str | None
) -> list[Turn]:
    """Canonical roles, or SampleError for anything the templates cannot render faithfully."""
    if len(turns) == 0:
        raise SampleError(sample, "empty conversation")
    out: list[Turn] = []
    for k, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2):
            raise SampleError(sample, f"turn {k} is not a (role, text) pair: {turn!r}")
        raw_role, text = turn
        role = _ROLE_ALIASES.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise SampleError(sample, f"turn {k} has unknown role {raw_role!r}")
        expected = USER if k % 2 == 0 else ASSISTANT
        if role != expected:
            raise SampleError(
                sample, f"turn {k} is {role!r} but {expected!r} was expected (turns alternate, user first)"
            )
        if not isinstance(text, str) or not text.strip():
            raise SampleError(sample, f"turn {k} ({role}) has no text")
        if role == ASSISTANT and IMAGE_TOKEN in text:
            raise SampleError(sample, f"turn {k}: {IMAGE_TOKEN!r} inside an assistant turn")
        for reserved in template.reserved:
            if reserved in text:
                raise SampleError(sample, f"turn {k} contains the template delimiter {reserved!r}")
        out.append((role, text))
    if out[-1][0] != last_role:
        raise SampleError(sample, f"conversation must end with a {last_role!r} turn, got {out[-1][0]!r}")
    if template.style == "plain":
        if len(out) != (1 if last_role == USER else 2):
            raise SampleError(sample, "the plain template takes one user turn (+ one reply)")
        if IMAGE_TOKEN not in out[0][1]:
            raise SampleError(sample, f"the plain template needs {IMAGE_TOKEN!r} in the user turn")
    return out


# ----------------------------------------------------------------------------- rendering

# (text, supervised)
_Segment = tuple[str, bool]


def _segments(template: ChatTemplate, turns: list[Turn], add_generation_prompt: bool) -> list[_Segment]:
    """The rendered prompt as pieces with known roles; "".join(texts) is the prompt string."""
    t = template
    segs: list[_Segment] = []
    if t.style == "two":
        segs.append((t.system + t.sep, False))
        for role, text in turns:
            if role == USER:
                segs.append((f"{t.user_role}: {text}{t.sep}", False))
            else:
                segs += [(f"{t.assistant_role}: ", False), (text + t.sep2, True)]
        if add_generation_prompt:
            segs.append((f"{t.assistant_role}:", False))  # no trailing space, as in the original
    elif t.style == "chatml":
        if t.system:
            segs.append((t.system + t.sep + "\n", False))
        for role, text in turns:
            if role == USER:
                segs.append((f"{t.user_role}\n{text}{t.sep}\n", False))
            else:
                segs += [(f"{t.assistant_role}\n", False), (text + t.sep, True), ("\n", False)]
        if add_generation_prompt:
            segs.append((f"{t.assistant_role}\n", False))
    elif t.style == "plain":
        # Original preprocess_plain replaces the user message by the image token(s) alone.
        for role, text in turns:
            if role == USER:
                segs.append((IMAGE_TOKEN * text.count(IMAGE_TOKEN), False))
            else:
                segs.append((text + t.sep, True))
    else:
        raise ValueError(f"template {t.name!r} has unknown style {t.style!r}")
    return segs


def render_prompt(
    template: ChatTemplate,
    turns: Sequence[Turn],
    *,
    add_generation_prompt: bool,
    sample: str | None = None,
) -> str:
    """The prompt string exactly as LLaVA's ``Conversation.get_prompt()`` builds it.

    add_generation_prompt=True: turns end with a user turn and an empty assistant slot is appended
    (generation); False: turns end with an assistant reply (training).
    """
    last_role = USER if add_generation_prompt else ASSISTANT
    checked = _checked_turns(template, turns, last_role=last_role, sample=sample)
    return "".join(text for text, _ in _segments(template, checked, add_generation_prompt))


# ----------------------------------------------------------------------------- tokenization


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer prepends one (Llama yes, Qwen no), like tokenizer_image_token's check."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("", add_special_tokens=True)["input_ids"]
    return bos if len(probe) > 0 and probe[0] == bos else None


def _encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise TypeError("prompt tokenization needs a Rust-backed (fast) tokenizer with offsets") from err
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if ids and all(e == 0 for _, e in offsets):
        raise TypeError("tokenizer returned no character offsets; masks cannot be derived")
    return ids, offsets


def _tokenize_segments(
    tokenizer: Any, segs: list[_Segment], *, with_labels: bool
) -> tuple[np.ndarray, np.ndarray | None, int]:
    text = "".join(s for s, _ in segs)
    supervised = np.zeros(len(text), dtype=bool)
    pos = 0
    for s, sup in segs:
        supervised[pos : pos + len(s)] = sup
        pos += len(s)

    ids: list[int] = []
    labels: list[int] = []
    bos = _bos_id(tokenizer)
    if bos is not None:
        ids.append(bos)
        labels.append(IGNORE_INDEX)

    chunks = text.split(IMAGE_TOKEN)
    start = 0  # character offset of the current chunk in `text`
    for k, chunk in enumerate(chunks):
        if k > 0:
            ids.append(PLACEHOLDER_ID)
            labels.append(IGNORE_INDEX)
            start += len(IMAGE_TOKEN)
        if chunk:
            chunk_ids, offsets = _encode_with_offsets(tokenizer, chunk)
            chunk_sup = supervised[start : start + len(chunk)]
            for tid, (s, e) in zip(chunk_ids, offsets):
                # Zero-width tokens (e.g. a dummy prefix) take the role of the next character.
                covered = chunk_sup[s : max(e, s + 1)]
                ids.append(tid)
                labels.append(tid if covered.any() else IGNORE_INDEX)
        start += len(chunk)

    ids_arr = np.asarray(ids, dtype=np.int32)
    labels_arr = np.asarray(labels, dtype=np.int32) if with_labels else None
    return ids_arr, labels_arr, len(chunks) - 1


def tokenize_conversation(
    tokenizer: Any,
    template: ChatTemplate,
    turns: Sequence[Turn],
    *,
    sample: str | None = None,
    move_image_to_front: bool = True,
) -> TokenizedConversation:
    """Training ids and labels for a complete conversation (user first, assistant last).

    tokenizer: a transformers fast tokenizer (callable, offsets, ``bos_token_id``).
    move_image_to_front: apply ``normalize_image_placement`` first (LLaVA training behaviour).
    """
    if move_image_to_front:
        turns = normalize_image_placement(turns)
    checked = _checked_turns(template, turns, last_role=ASSISTANT, sample=sample)
    ids, labels, n = _tokenize_segments(tokenizer, _segments(template, checked, False), with_labels=True)
    ids.setflags(write=False)
    labels.setflags(write=False)
    return TokenizedConversation(ids=ids, labels=labels, num_placeholders=n)


def tokenize_prompt(
    tokenizer: Any,
    template: ChatTemplate,
    turns: Sequence[Turn],
    *,
    sample: str | None = None,
    move_image_to_front: bool = False,
) -> np.ndarray:
    """Generation ids (int32, ending with the assistant header) for turns that end with a user turn.

    Equals ``tokenizer_image_token(conv.get_prompt(), tokenizer, -200)`` of the original. Image
    placement is left as given by default: Inst-IT inference writes ``"<image>\\n" + text`` itself.
    """
    if move_image_to_front:
        turns = normalize_image_placement(turns)
    checked = _checked_turns(template, turns, last_role=USER, sample=sample)
    ids, _, _ = _tokenize_segments(tokenizer, _segments(template, checked, True), with_labels=False)
    return ids


def stop_token_ids(tokenizer: Any, template: ChatTemplate) -> tuple[int, ...]:
    """Token ids any of which ends generation: the template's stop string and the tokenizer's EOS.

    The original stops on ``tok(stop_str)`` (KeywordsStoppingCriteria) and on the generation EOS;
    with these templates both are single tokens (Vicuna ``</s>`` = 2, Qwen ``<|im_end|>`` = 151645).
    """
    stop = tokenizer(template.stop_str, add_special_tokens=False)["input_ids"]
    if len(stop) != 1:
        raise ValueError(
            f"stop string {template.stop_str!r} of template {template.name!r} is {len(stop)} tokens "
            f"({stop}) with this tokenizer; single-token stops only"
        )
    ids = [int(stop[0])]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and int(eos) not in ids:
        ids.append(int(eos))
    return tuple(ids)

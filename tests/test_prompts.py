"""Prompt rendering and tokenization vs the original LLaVA-NeXT strings and tokenizer_image_token."""

from __future__ import annotations

import numpy as np
import pytest

from instit_jax.processing.errors import SampleError
from instit_jax.processing.prompts import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    PLACEHOLDER_ID,
    PLAIN,
    QWEN_1_5,
    VICUNA_V1,
    get_template,
    normalize_image_placement,
    render_prompt,
    stop_token_ids,
    tokenize_conversation,
    tokenize_prompt,
    turns_from_llava,
)
from tokenizers_for_tests import llama_like_tokenizer, qwen2_tiktoken_encoding, qwen2_tokenizer

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QUESTION = "What is shown in the image?"
REPLY = "A cat sitting on a red mat."
QUESTION2 = "What color is the mat?"
REPLY2 = "The mat is red."
TWO_ROUNDS = [
    ("user", "<image>\n" + QUESTION),
    ("assistant", REPLY),
    ("user", QUESTION2),
    ("assistant", REPLY2),
]


def original_tokenizer_image_token(prompt: str, tok) -> list[int]:
    """Spec §8.3, written from the original's description (add_special_tokens=True per chunk)."""
    chunks = [tok(c)["input_ids"] for c in prompt.split(IMAGE_TOKEN)]
    out, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        out, offset = [chunks[0][0]], 1
    for k, chunk in enumerate(chunks):
        if k > 0:
            out.append(PLACEHOLDER_ID)
        out.extend(chunk[offset:])
    return out


def decode_with_images(tok, ids) -> str:
    """Decode keeping special tokens, re-inserting "<image>" for each placeholder."""
    ids = [int(i) for i in ids]
    pieces, run = [], []
    for i in ids:
        if i == PLACEHOLDER_ID:
            pieces.append(tok.decode(run, skip_special_tokens=False))
            pieces.append(IMAGE_TOKEN)
            run = []
        else:
            run.append(i)
    pieces.append(tok.decode(run, skip_special_tokens=False))
    return "".join(pieces)


def supervised_runs(conv) -> list[list[int]]:
    """Maximal runs of supervised tokens, as id lists."""
    runs, current = [], []
    for i, label in zip(conv.ids.tolist(), conv.labels.tolist()):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    if current:
        runs.append(current)
    return runs


# ----------------------------------------------------------------------------- templates


def test_get_template():
    assert get_template("vicuna_v1") is VICUNA_V1
    assert get_template("qwen_1_5") is QWEN_1_5
    assert get_template("plain") is PLAIN
    with pytest.raises(KeyError):
        get_template("llava_llama_3")


def test_vicuna_render_one_turn_generation():
    text = "<image>\nBased on the image, answer.\nThe best answer is: "
    prompt = render_prompt(VICUNA_V1, [("user", text)], add_generation_prompt=True)
    assert prompt == VICUNA_SYSTEM + " USER: " + text + " ASSISTANT:"
    assert "curious user" in prompt and "human" not in prompt  # spec D7


def test_vicuna_render_multi_turn():
    prompt = render_prompt(VICUNA_V1, TWO_ROUNDS, add_generation_prompt=False)
    assert prompt == (
        f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT: {REPLY}</s>"
        f"USER: {QUESTION2} ASSISTANT: {REPLY2}</s>"
    )
    gen = render_prompt(VICUNA_V1, TWO_ROUNDS[:3], add_generation_prompt=True)
    assert gen == (
        f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT: {REPLY}</s>USER: {QUESTION2} ASSISTANT:"
    )


def test_qwen_render_exact():
    one = render_prompt(QWEN_1_5, [("human", "<image>\nDescribe it.")], add_generation_prompt=True)
    assert one == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"
    )
    full = render_prompt(QWEN_1_5, TWO_ROUNDS, add_generation_prompt=False)
    assert full == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{REPLY}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION2}<|im_end|>\n<|im_start|>assistant\n{REPLY2}<|im_end|>\n"
    )


def test_llava_roles_and_format():
    data = [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]
    turns = turns_from_llava(data)
    assert turns == [("human", "<image>\nHi"), ("gpt", "Hello")]
    assert render_prompt(QWEN_1_5, turns, add_generation_prompt=False) == render_prompt(
        QWEN_1_5, [("user", "<image>\nHi"), ("assistant", "Hello")], add_generation_prompt=False
    )
    with pytest.raises(SampleError, match="s-7"):
        turns_from_llava([{"value": "x"}], sample="s-7")


def test_normalize_image_placement():
    turns = [("user", "What is this?  <image> "), ("assistant", "A cat.")]
    assert normalize_image_placement(turns)[0] == ("user", "<image>\nWhat is this?")
    two = [("user", "<image> and <image> differ how?")]
    assert normalize_image_placement(two) == two
    at_start = [("user", "<image>What?")]
    assert normalize_image_placement(at_start) == at_start


# ----------------------------------------------------------------------------- Qwen2 (real vocabulary)


def test_qwen_tokenizer_vocabulary():
    tok = qwen2_tokenizer()
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok("\n", add_special_tokens=False)["input_ids"] == [198]
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [151645]
    assert tok.bos_token_id is None
    # The converted fast tokenizer agrees with tiktoken on the same ranks and regex.
    enc = qwen2_tiktoken_encoding()
    text = render_prompt(QWEN_1_5, TWO_ROUNDS, add_generation_prompt=False) + " 12345 don't  x\n\n y"
    assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode(text, allowed_special="all")


def test_qwen_prompt_ids():
    tok = qwen2_tokenizer()
    turns = [("user", "<image>\n" + QUESTION)]
    ids = tokenize_prompt(tok, QWEN_1_5, turns)
    rendered = render_prompt(QWEN_1_5, turns, add_generation_prompt=True)
    assert ids.dtype == np.int32
    assert ids.tolist() == original_tokenizer_image_token(rendered, tok)
    assert decode_with_images(tok, ids) == rendered
    # system block, then "<|im_start|>user\n", placeholder; ends with "<|im_start|>assistant\n".
    assert ids[:3].tolist() == [151644, 8948, 198]
    assert ids.tolist().count(PLACEHOLDER_ID) == 1
    assert ids[-3:].tolist() == [151644, 77091, 198]


def test_qwen_conversation_labels():
    tok = qwen2_tokenizer()
    conv = tokenize_conversation(tok, QWEN_1_5, TWO_ROUNDS, sample="q-1")
    rendered = render_prompt(QWEN_1_5, TWO_ROUNDS, add_generation_prompt=False)
    assert conv.num_placeholders == 1
    assert conv.ids.dtype == np.int32 and conv.labels.dtype == np.int32
    assert conv.ids.tolist() == original_tokenizer_image_token(rendered, tok)
    assert decode_with_images(tok, conv.ids) == rendered

    # Oracle: the same conversation built from separately tokenized pieces with known roles.
    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    pieces = [
        (enc("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"), False),
        ([PLACEHOLDER_ID], False),
        (enc(f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"), False),
        (enc(REPLY) + [151645], True),
        (enc(f"\n<|im_start|>user\n{QUESTION2}<|im_end|>\n<|im_start|>assistant\n"), False),
        (enc(REPLY2) + [151645], True),
        (enc("\n"), False),
    ]
    expected_ids = [i for ids, _ in pieces for i in ids]
    expected_labels = [i if sup else IGNORE_INDEX for ids, sup in pieces for i in ids]
    assert conv.ids.tolist() == expected_ids
    assert conv.labels.tolist() == expected_labels
    assert supervised_runs(conv) == [enc(REPLY) + [151645], enc(REPLY2) + [151645]]
    assert tok.decode(supervised_runs(conv)[0]) == REPLY + "<|im_end|>"


def test_qwen_reply_straddling_header_newline_is_supervised():
    # "\n" (end of the assistant header) + "\n..." (reply) merge into one token "\n\n";
    # the token covers reply text, so it is supervised and ids still equal whole-chunk tokenization.
    tok = qwen2_tokenizer()
    turns = [("user", "<image>\nHi"), ("assistant", "\nYes.")]
    conv = tokenize_conversation(tok, QWEN_1_5, turns)
    rendered = render_prompt(QWEN_1_5, turns, add_generation_prompt=False)
    assert conv.ids.tolist() == original_tokenizer_image_token(rendered, tok)
    assert tok.decode(supervised_runs(conv)[0]) == "\n\nYes.<|im_end|>"


def test_qwen_stop_tokens():
    tok = qwen2_tokenizer()
    assert stop_token_ids(tok, QWEN_1_5) == (151645,)
    assert QWEN_1_5.stop_str == "<|im_end|>"


# ----------------------------------------------------------------------------- Vicuna (Llama-style)


def test_llama_like_tokenizer_behaves_like_sentencepiece():
    tok = llama_like_tokenizer()
    ids = tok("\nBased")["input_ids"]
    assert ids[0] == 1
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["▁", "<0x0A>"]  # dummy prefix, byte fallback


def test_vicuna_prompt_chunkwise_tokenization():
    tok = llama_like_tokenizer()
    turns = [("user", "<image>\nBased on the image, select the best answer.")]
    ids = tokenize_prompt(tok, VICUNA_V1, turns).tolist()
    rendered = render_prompt(VICUNA_V1, turns, add_generation_prompt=True)
    assert ids == original_tokenizer_image_token(rendered, tok)
    assert ids[0] == 1 and ids.count(1) == 1  # a single BOS at the start
    head, tail = rendered.split(IMAGE_TOKEN)
    k = ids.index(PLACEHOLDER_ID)
    assert ids[1:k] == tok(head, add_special_tokens=False)["input_ids"]
    # The chunk after the image is tokenized alone: its own dummy "▁", then <0x0A> for "\n".
    assert ids[k + 1 :] == tok(tail, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[k + 1 : k + 3]) == ["▁", "<0x0A>"]
    assert tok.decode(ids[k + 1 :]).endswith("ASSISTANT:")


def test_vicuna_multi_image_single_bos():
    tok = llama_like_tokenizer()
    turns = [("user", "<image>\n<image>\nCompare the images.")]
    ids = tokenize_prompt(tok, VICUNA_V1, turns).tolist()
    rendered = render_prompt(VICUNA_V1, turns, add_generation_prompt=True)
    assert ids == original_tokenizer_image_token(rendered, tok)
    assert ids.count(PLACEHOLDER_ID) == 2 and ids.count(1) == 1


def test_vicuna_conversation_labels():
    tok = llama_like_tokenizer()
    conv = tokenize_conversation(tok, VICUNA_V1, TWO_ROUNDS, sample="v-1")
    rendered = render_prompt(VICUNA_V1, TWO_ROUNDS, add_generation_prompt=False)
    assert conv.ids.tolist() == original_tokenizer_image_token(rendered, tok)
    assert conv.num_placeholders == 1
    assert conv.labels[0] == IGNORE_INDEX  # BOS
    assert conv.labels[conv.ids.tolist().index(PLACEHOLDER_ID)] == IGNORE_INDEX

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    # Supervised = exactly each reply ("▁A", ...) and its </s>; everything else masked.
    assert supervised_runs(conv) == [enc(REPLY) + [2], enc(REPLY2) + [2]]
    assert int((conv.labels != IGNORE_INDEX).sum()) == len(enc(REPLY)) + len(enc(REPLY2)) + 2


def test_vicuna_stop_tokens():
    assert stop_token_ids(llama_like_tokenizer(), VICUNA_V1) == (2,)


def test_training_normalizes_image_position_by_default():
    tok = llama_like_tokenizer()
    turns = [("user", QUESTION + " <image>"), ("assistant", REPLY)]
    moved = tokenize_conversation(tok, VICUNA_V1, turns)
    expected = tokenize_conversation(tok, VICUNA_V1, [("user", "<image>\n" + QUESTION), ("assistant", REPLY)])
    assert moved.ids.tolist() == expected.ids.tolist()
    kept = tokenize_conversation(tok, VICUNA_V1, turns, move_image_to_front=False)
    rendered = render_prompt(VICUNA_V1, turns, add_generation_prompt=False)
    assert kept.ids.tolist() == original_tokenizer_image_token(rendered, tok)
    assert kept.ids.tolist().index(PLACEHOLDER_ID) > moved.ids.tolist().index(PLACEHOLDER_ID)


def test_plain_template():
    tok = llama_like_tokenizer()
    turns = [("user", "<image>\nDescribe the photo briefly."), ("assistant", "A photo of two dogs.")]
    assert render_prompt(PLAIN, turns, add_generation_prompt=False) == "<image>A photo of two dogs.\n"
    conv = tokenize_conversation(tok, PLAIN, turns)
    assert conv.ids[:2].tolist() == [1, PLACEHOLDER_ID]
    caption = tok("A photo of two dogs.\n", add_special_tokens=False)["input_ids"]
    assert conv.ids[2:].tolist() == caption
    assert conv.labels[:2].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert conv.labels[2:].tolist() == caption


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "turns, problem",
    [
        ([], "empty conversation"),
        ([("assistant", "Hi"), ("user", "<image>\nQ")], "'user' was expected"),
        ([("user", "<image>\nQ"), ("user", "Q2")], "'assistant' was expected"),
        ([("user", "<image>\nQ"), ("assistant", "A"), ("user", "Q2")], "end with a 'assistant'"),
        ([("user", "<image>\nQ"), ("assistant", "see <image>")], "inside an assistant turn"),
        ([("user", "<image>\nQ"), ("robot", "A")], "unknown role"),
        ([("user", "<image>\nQ"), ("assistant", "   ")], "no text"),
        ([("user", "<image>\nQ"), ("assistant", "A</s>")], "delimiter"),
    ],
)
def test_bad_training_input_names_sample(turns, problem):
    with pytest.raises(SampleError, match=problem) as info:
        tokenize_conversation(llama_like_tokenizer(), VICUNA_V1, turns, sample="clip_0042")
    assert info.value.sample == "clip_0042"
    assert "clip_0042" in str(info.value)


def test_bad_generation_input_names_sample():
    turns = [("user", "<image>\nQ"), ("assistant", "A")]
    with pytest.raises(SampleError, match="img_7.*end with a 'user'"):
        tokenize_prompt(qwen2_tokenizer(), QWEN_1_5, turns, sample="img_7")
    with pytest.raises(SampleError, match="img_8.*delimiter"):
        render_prompt(QWEN_1_5, [("user", "hi <|im_end|>")], add_generation_prompt=True, sample="img_8")
    with pytest.raises(SampleError, match="img_9.*needs '<image>'"):
        render_prompt(PLAIN, [("user", "no image"), ("assistant", "x")], add_generation_prompt=False, sample="img_9")

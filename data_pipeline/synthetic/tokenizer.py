"""A small Llama-like BPE tokenizer trained on the world's own text (``tokenizers``), deterministic.

Layout: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3, ``<image>``=4, then the printable-ASCII
alphabet (plus ``"\\n"`` and ``"▁"``), then learned merges up to ``vocab_size``. Like Llama it turns
spaces into ``"▁"`` with a dummy prefix on the first piece, prepends ``<s>`` and has ``</s>`` as one
token (EOS and the ``vicuna_v1`` stop string). Unlike Llama it splits every digit and every bracket /
punctuation mark into its own piece, so ``[12]`` is ``▁[ 1 2 ]`` and ``<3>`` is ``▁< 3 >``: ids and
timestamps read the same way wherever they appear. Any ASCII text round-trips exactly
(``decode(encode(x)) == x``); other characters become ``<unk>``.

Determinism: the corpus is an ordered list and the BPE trainer breaks count ties by the pair itself,
so the same text gives the same ``tokenizer.json`` in any process (checked by the tests).
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK, BOS, EOS, PAD, IMAGE = SPECIAL_TOKENS
SPACE = "▁"
# Each match is one pre-token: a word (with its leading space), a single digit or a single other char.
PIECE_PATTERN = SPACE + r"?[A-Za-z]+|" + SPACE + r"?[0-9]|" + SPACE + r"?[^" + SPACE + r"A-Za-z0-9]|" + SPACE
ALPHABET = tuple(chr(c) for c in range(32, 127)) + ("\n", SPACE)


def _backend(vocab_size: int, corpus: Iterable[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False),
        pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=list(ALPHABET), show_progress=False)
    tok.train_from_iterator(_without_specials(corpus), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def _without_specials(corpus: Iterable[str]) -> Iterable[str]:
    """Special tokens are matched whole at encode time; BPE must not learn merges across them."""
    for line in corpus:
        pieces = [line]
        for special in SPECIAL_TOKENS:
            pieces = [p for piece in pieces for p in piece.split(special)]
        yield from (p for p in pieces if p)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A transformers fast tokenizer (bos ``<s>`` added, eos ``</s>``, pad ``<pad>``, ``<image>``)."""
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + len(ALPHABET):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the specials plus the "
                         f"{len(ALPHABET)}-character alphabet")
    backend = _backend(vocab_size, corpus)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                  pad_token=PAD, extra_special_tokens=[IMAGE],
                                  clean_up_tokenization_spaces=False)
    for k, token in enumerate(SPECIAL_TOKENS):
        if tok.convert_tokens_to_ids(token) != k:
            raise AssertionError(f"special token {token!r} should have id {k}")
    return tok


def save_tokenizer(tok, path: str) -> None:
    tok.save_pretrained(path)


def tokenizer_info(tok) -> dict:
    """The ids a model config must match (recorded in the world manifest)."""
    return {
        "vocab_size": len(tok),
        "unk_token_id": tok.unk_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "image_token_id": tok.convert_tokens_to_ids(IMAGE),
    }

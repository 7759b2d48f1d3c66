"""Load the text tokenizer that goes with a model: an HF tokenizer directory or a bare tokenizer.json."""

from __future__ import annotations

import os
from typing import Any

TOKENIZER_JSON = "tokenizer.json"


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A transformers fast tokenizer (callable, offsets, bos/eos ids) from local files only.

    ``path`` is a directory written by ``save_pretrained`` (or holding a tokenizer.json), or a
    tokenizer.json file. Nothing is downloaded.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".json"):
            raise ValueError(f"{path}: expected a tokenizer directory or a tokenizer.json file")
        return PreTrainedTokenizerFast(tokenizer_file=path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        bare = os.path.join(path, TOKENIZER_JSON)
        if not os.path.isfile(bare):
            raise ValueError(f"{path}: no loadable tokenizer ({err})") from err
        tok = PreTrainedTokenizerFast(tokenizer_file=bare)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path}: a fast tokenizer is needed (offsets are used for label masks)")
    return tok

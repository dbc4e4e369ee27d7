"""The course's shared text corpus: about 220k tokens of varied English, written by SmolLM2-135M-Instruct.

Later chapters (tuned lens, sparse autoencoders, memorisation, fine-tuning) need a few hundred thousand
tokens of ordinary text, offline. `data/corpus.jsonl.gz` holds them: one document per line, as
{"id", "topic", "genre", "text"}. It is model-generated (see data/README.md): fine for collecting
activations, not a source of facts.

    from utils.corpus import load_corpus, corpus_texts, corpus_token_batches
    docs = load_corpus()                                   # list of dicts
    tokens = corpus_token_batches(model, n_sequences=64, seq_len=128)   # [64, 128] LongTensor, BOS first
"""

from __future__ import annotations

import functools
import gzip
import json
import random
from pathlib import Path

import torch

CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "corpus.jsonl.gz"
MISSING_MESSAGE = "data/corpus.jsonl.gz is missing: regenerate with python scripts/make_corpus.py"


@functools.lru_cache(maxsize=1)
def _read_corpus() -> tuple[dict, ...]:
    if not CORPUS_PATH.is_file():
        raise ValueError(f"{MISSING_MESSAGE} (looked for {CORPUS_PATH}).")
    with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as file:
        return tuple(json.loads(line) for line in file if line.strip())


def load_corpus() -> list[dict]:
    """All documents, in file order, as dicts with keys "id", "topic", "genre" and "text".

    The file is read once and cached; each call returns a fresh list of fresh dicts, so changing them is safe.
    """
    return [dict(document) for document in _read_corpus()]


def corpus_texts() -> list[str]:
    """The documents' texts, in file order."""
    return [document["text"] for document in _read_corpus()]


def _tokenizer_of(model_or_tokenizer):
    """A TransformerLens bridge (or HookedTransformer) carries its tokenizer as `.tokenizer`; a tokenizer is itself."""
    tokenizer = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(
            "corpus_token_batches needs a model with a `.tokenizer` (e.g. load_model()) or a HuggingFace tokenizer, "
            f"got {type(model_or_tokenizer).__name__}."
        )
    return tokenizer


@functools.lru_cache(maxsize=4)
def _document_tokens(tokenizer) -> tuple[list[int], ...]:
    """Each document's token ids, without special tokens (cached per tokenizer: tokenising takes a second)."""
    texts = corpus_texts()
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tuple(list(ids) for ids in encoded)


def corpus_token_batches(model_or_tokenizer, n_sequences: int, seq_len: int, seed: int = 0) -> torch.LongTensor:
    """`[n_sequences, seq_len]` token ids cut from the corpus, for collecting activations or training.

    The documents are shuffled with `seed`, joined with the tokenizer's EOS token between them, and cut into
    consecutive chunks of `seq_len - 1` tokens; each row is the BOS token followed by one chunk, so rows
    line up with `model.to_tokens(text)` (which also puts BOS first). Same seed, same tensor.
    Raises ValueError if the corpus holds fewer than `n_sequences * (seq_len - 1)` tokens.
    """
    if n_sequences < 1 or seq_len < 2:
        raise ValueError(f"Need n_sequences >= 1 and seq_len >= 2 (BOS plus at least one token); got {n_sequences}, {seq_len}.")
    tokenizer = _tokenizer_of(model_or_tokenizer)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no BOS or EOS token; corpus_token_batches needs both.")
    documents = list(_document_tokens(tokenizer))
    random.Random(seed).shuffle(documents)

    stream: list[int] = []
    for ids in documents:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    chunk = seq_len - 1
    needed = n_sequences * chunk
    if needed > len(stream):
        raise ValueError(
            f"The corpus holds {len(stream):,} tokens, but {n_sequences} sequences of {seq_len} tokens need {needed:,} "
            f"(BOS is added to each row). Ask for at most {len(stream) // chunk} sequences of this length, "
            f"or shorter sequences."
        )
    body = torch.tensor(stream[:needed], dtype=torch.long).view(n_sequences, chunk)
    bos = torch.full((n_sequences, 1), tokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)

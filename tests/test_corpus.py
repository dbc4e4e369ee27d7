"""The shared corpus (data/corpus.jsonl.gz) and its API in utils/corpus.py. Fast: uses the tokenizer only."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch

from utils import corpus

MIN_TOKENS = 200_000
MAX_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from utils import models

    folder = models._smollm2_cache_folder()
    if (folder / "tokenizer.json").is_file():  # the tokenizer alone loads in well under a second
        return AutoTokenizer.from_pretrained(folder)
    return models.load_hf_smollm2()[1]  # builds the cache first (about 20 s, once)


def test_file_is_committed_and_small():
    assert corpus.CORPUS_PATH.is_file(), corpus.MISSING_MESSAGE
    size = corpus.CORPUS_PATH.stat().st_size
    assert 0 < size <= MAX_BYTES, f"{corpus.CORPUS_PATH} is {size / 1e6:.2f} MB; the limit is 5 MB"


def test_corpus_has_enough_tokens(tokenizer):
    n_tokens = sum(len(ids) for ids in corpus._document_tokens(tokenizer))
    assert n_tokens >= MIN_TOKENS, f"only {n_tokens} tokens"


def test_documents_are_well_formed_non_empty_and_unique():
    documents = corpus.load_corpus()
    assert len(documents) > 500
    for document in documents:
        assert set(document) == {"id", "topic", "genre", "text"}, document
        assert document["text"] == document["text"].strip() and len(document["text"]) > 50, document["id"]
    assert len({document["id"] for document in documents}) == len(documents), "duplicate ids"
    normalised = {" ".join(document["text"].lower().split()) for document in documents}
    assert len(normalised) == len(documents), "duplicate texts"
    assert corpus.corpus_texts() == [document["text"] for document in documents]


def test_load_corpus_returns_copies():
    first = corpus.load_corpus()
    first[0]["text"] = "changed"
    first.append({})
    second = corpus.load_corpus()
    assert second[0]["text"] != "changed" and len(second) == len(first) - 1


def test_corpus_is_diverse():
    documents = corpus.load_corpus()
    topics = collections.Counter(document["topic"] for document in documents)
    genres = collections.Counter(document["genre"] for document in documents)
    assert len(topics) >= 250, f"only {len(topics)} distinct topics"
    assert len(genres) >= 10, f"only {len(genres)} distinct genres: {sorted(genres)}"
    assert max(genres.values()) <= 0.2 * len(documents), f"one genre dominates: {genres.most_common(3)}"


def test_token_batches_shape_dtype_and_bos(tokenizer):
    tokens = corpus.corpus_token_batches(tokenizer, n_sequences=8, seq_len=64)
    assert tokens.shape == (8, 64)
    assert tokens.dtype == torch.long
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (tokens[:, 1:] != tokenizer.bos_token_id).all(), "BOS should only start a row"


def test_token_batches_are_consecutive_corpus_tokens(tokenizer):
    tokens = corpus.corpus_token_batches(tokenizer, n_sequences=40, seq_len=129, seed=3)
    stream = tokens[:, 1:].reshape(-1).tolist()  # rows, BOS removed, are consecutive pieces of one stream
    documents = {tuple(ids) for ids in corpus._document_tokens(tokenizer)}
    pieces = []
    current: list[int] = []
    for token in stream:
        if token == tokenizer.eos_token_id:
            pieces.append(tuple(current))
            current = []
        else:
            current.append(token)
    assert len(pieces) >= 5, "documents should be separated by the EOS token"
    assert all(piece in documents for piece in pieces), "complete pieces between EOS tokens should be whole documents"


def test_token_batches_are_seeded(tokenizer):
    first = corpus.corpus_token_batches(tokenizer, n_sequences=4, seq_len=32, seed=0)
    again = corpus.corpus_token_batches(tokenizer, n_sequences=4, seq_len=32, seed=0)
    other = corpus.corpus_token_batches(tokenizer, n_sequences=4, seq_len=32, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_token_batches_accept_a_model_with_a_tokenizer(tokenizer):
    bridge_like = SimpleNamespace(tokenizer=tokenizer)  # what load_model() returns carries `.tokenizer`
    from_model = corpus.corpus_token_batches(bridge_like, n_sequences=2, seq_len=16, seed=5)
    assert torch.equal(from_model, corpus.corpus_token_batches(tokenizer, n_sequences=2, seq_len=16, seed=5))


def test_token_batches_refuse_more_than_the_corpus_holds(tokenizer):
    with pytest.raises(ValueError, match="corpus holds"):
        corpus.corpus_token_batches(tokenizer, n_sequences=10_000, seq_len=1024)
    with pytest.raises(ValueError):
        corpus.corpus_token_batches(tokenizer, n_sequences=4, seq_len=1)


def test_missing_file_gives_an_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CORPUS_PATH", tmp_path / "corpus.jsonl.gz")
    corpus._read_corpus.cache_clear()
    try:
        with pytest.raises(ValueError, match="regenerate with python scripts/make_corpus.py"):
            corpus.load_corpus()
    finally:
        monkeypatch.undo()
        corpus._read_corpus.cache_clear()

"""Toy models: seeded builds are reproducible, training lowers the loss, checkpoints round-trip."""

import pytest
import torch

from utils.toy import build_toy, load_toy, next_token_loss, save_toy, train

SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=20, n_ctx=16, attn_only=True, normalization_type=None)


def test_same_seed_same_model_different_seed_different_model():
    tokens = torch.randint(0, 20, (2, 10))
    assert torch.equal(build_toy(**SMALL, seed=0)(tokens), build_toy(**SMALL, seed=0)(tokens))
    assert not torch.equal(build_toy(**SMALL, seed=0)(tokens), build_toy(**SMALL, seed=1)(tokens))


def test_training_learns_a_repeated_sequence():
    model = build_toy(**SMALL, seed=0)
    generator = torch.Generator().manual_seed(0)

    def repeated(step):
        half = torch.randint(0, 20, (32, 6), generator=generator)
        return torch.cat([half, half], dim=1)

    log = train(model, repeated, steps=300, lr=3e-3, log_every=100)
    assert log[-1]["loss"] < log[0]["loss"] - 0.4
    assert [entry["step"] for entry in log] == [0, 100, 200, 299]


def test_training_works_with_gradients_turned_off_globally():
    model = build_toy(**SMALL, seed=0)
    torch.set_grad_enabled(False)
    try:
        log = train(model, [torch.randint(0, 20, (4, 8))], steps=2, log_every=1)
    finally:
        torch.set_grad_enabled(True)
    assert len(log) == 2  # without enable_grad inside train(), backward() raises here


def test_callback_values_are_logged():
    model = build_toy(**SMALL, seed=0)
    log = train(model, [torch.randint(0, 20, (4, 8))], steps=3, log_every=1, callback=lambda step, m: {"twice": 2 * step})
    assert [entry["twice"] for entry in log] == [0, 2, 4]


def test_mask_selects_targets():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = 10.0  # confident and right about position 1
    tokens = torch.tensor([[0, 1, 2]])
    only_first = next_token_loss(logits, tokens, mask=torch.tensor([[1, 0]]))
    assert only_first < 0.01 < next_token_loss(logits, tokens)


def test_checkpoint_round_trip(tmp_path):
    model = build_toy(n_layers=1, d_model=32, n_heads=2, d_vocab=20, n_ctx=16, seed=3)
    path = save_toy(model, tmp_path / "toy.pt", trained_by="tests")
    loaded = load_toy(path)
    tokens = torch.randint(0, 20, (2, 7))
    assert torch.equal(loaded(tokens), model(tokens))
    assert loaded.toy_metadata == {"trained_by": "tests"}


def test_missing_checkpoint_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="No toy model"):
        load_toy(tmp_path / "nope.pt")


def test_bad_shape_is_explained():
    with pytest.raises(ValueError, match="divisible"):
        build_toy(d_model=30, n_heads=4)

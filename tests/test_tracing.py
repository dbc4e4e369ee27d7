"""utils.tracing: causal tracing (ROME). The batched `trace` must agree with the plain one-run-per-restoration
`restore_and_prob`, and the small helpers must do what their docstrings say."""

from __future__ import annotations

import pytest
import torch

from utils import tracing

PROMPT, SUBJECT, ANSWER = "The Eiffel Tower is in the city of", "The Eiffel Tower", " Paris"


def test_subject_positions(model):
    assert tracing.subject_positions(model, PROMPT, SUBJECT) == [1, 2, 3, 4]
    assert tracing.subject_positions(model, "The capital of France is", "France") == [4]
    assert tracing.subject_positions(model, "Albert Einstein developed the theory of", "Albert Einstein") == [1, 2, 3]
    # a subject that starts inside a token still claims that token
    assert tracing.subject_positions(model, PROMPT, "Eiffel Tower") == [2, 3, 4]


def test_noise_is_seeded_and_has_the_requested_std():
    a = tracing.subject_noise(50, 4, 64, std=0.4, seed=3)
    assert a.shape == (50, 4, 64)
    assert torch.equal(a, tracing.subject_noise(50, 4, 64, std=0.4, seed=3))
    assert not torch.equal(a, tracing.subject_noise(50, 4, 64, std=0.4, seed=4))
    assert a.std().item() == pytest.approx(0.4, rel=0.05)


def test_add_subject_noise_touches_only_the_subject():
    embed = torch.randn(1, 6, 8)
    original = embed.clone()
    noise = torch.randn(3, 2, 8)
    noisy = tracing.add_subject_noise(embed, [2, 3], noise)
    assert noisy.shape == (3, 6, 8) and torch.equal(embed, original)
    assert torch.equal(noisy[:, [0, 1, 4, 5]], embed.expand(3, -1, -1)[:, [0, 1, 4, 5]])
    assert torch.allclose(noisy[:, [2, 3]] - embed[:, [2, 3]], noise)


def test_window_layers_and_hook_names():
    assert tracing.window_layers(10, 6, 30) == [7, 8, 9, 10, 11, 12]
    assert tracing.window_layers(0, 6, 30) == [0, 1, 2]
    assert tracing.window_layers(29, 6, 30) == [26, 27, 28, 29]
    assert tracing.window_layers(5, 1, 30) == [5]
    assert tracing.window_layers(20, 10, 48) == list(range(15, 25))
    assert tracing.hook_name("mlp", 3) == "blocks.3.hook_mlp_out"
    with pytest.raises(ValueError):
        tracing.hook_name("mlp_in", 3)


def test_normalised_effect_and_token_groups():
    restored = torch.tensor([0.1, 0.3, 0.5])
    assert torch.allclose(tracing.normalised_effect(restored, 0.1, 0.5), torch.tensor([0.0, 0.5, 1.0]))
    groups = tracing.token_groups([1, 2, 3], 8)
    assert groups == {"first subject token": [1], "middle subject tokens": [2], "last subject token": [3],
                      "first subsequent token": [4], "further tokens": [5, 6], "last token": [7]}
    groups = tracing.token_groups([4], 6)  # "The capital of France is"
    assert groups["first subject token"] == [] and groups["last subject token"] == [4]
    assert groups["first subsequent token"] == [] and groups["last token"] == [5]


def test_clean_and_corrupted_runs(model):
    tokens = model.to_tokens(PROMPT)
    answer = model.to_single_token(ANSWER)
    positions = tracing.subject_positions(model, PROMPT, SUBJECT)
    zero = torch.zeros(2, len(positions), model.cfg.d_model)
    runs = tracing.clean_and_corrupted(model, tokens, positions, zero, answer)
    p = model(tokens)[0, -1].softmax(-1)[answer].item()
    assert runs.p_clean == pytest.approx(p, abs=1e-4)
    assert torch.allclose(runs.p_corrupted, torch.tensor([p, p]), atol=1e-4)  # zero noise = clean
    noise = tracing.subject_noise(2, len(positions), model.cfg.d_model, tracing.noise_std(model), seed=0)
    runs = tracing.clean_and_corrupted(model, tokens, positions, noise, answer)
    assert (runs.p_corrupted < runs.p_clean).all()
    assert runs.corrupted_pre.shape == (model.cfg.n_layers + 1, 2, tokens.shape[1], model.cfg.d_model)


@pytest.mark.parametrize("kind", tracing.KINDS)
def test_batched_trace_matches_one_run_per_restoration(model, kind):
    tokens = model.to_tokens(PROMPT)
    answer = model.to_single_token(ANSWER)
    positions = tracing.subject_positions(model, PROMPT, SUBJECT)
    noise = tracing.subject_noise(2, len(positions), model.cfg.d_model, tracing.noise_std(model), seed=1)
    layers = [0, 13, model.cfg.n_layers - 1]
    restore = [positions[-1], tokens.shape[1] - 1]
    result = tracing.trace(model, tokens, positions, noise, answer, kind=kind, window=6, restore_positions=restore,
                           layers=layers)
    assert result.restored.shape == (model.cfg.n_layers, 2) and result.positions == restore
    names = {tracing.hook_name(k, layer) for k in tracing.KINDS for layer in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names or name == "hook_embed")
    noisy = tracing.add_subject_noise(cache["hook_embed"], positions, noise)
    for layer in layers:
        restored_layers = [layer] if kind == "resid" else tracing.window_layers(layer, 6, model.cfg.n_layers)
        clean = {tracing.hook_name(kind, l): cache[tracing.hook_name(kind, l)] for l in restored_layers}
        for column, position in enumerate(restore):
            plain = tracing.restore_and_prob(model, tokens, noisy, clean, position, answer).mean()
            assert result.restored[layer, column].item() == pytest.approx(plain.item(), abs=1e-4)
    assert torch.isnan(result.restored[1]).all()  # layers not asked for stay NaN
    # restoring the last hidden state at the last token gives back the clean run exactly
    if kind == "resid":
        assert result.restored[-1, -1].item() == pytest.approx(result.p_clean, abs=1e-4)
    # no hooks are left behind: a plain run gives the clean probability again
    assert model(tokens)[0, -1].softmax(-1)[answer].item() == pytest.approx(result.p_clean, abs=1e-4)

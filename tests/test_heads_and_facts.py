"""Shared helpers for the circuits chapters: head detectors (utils.heads) and factual-recall prompts (utils.facts)."""

import pytest
import torch

from utils import facts, heads

HALF = 5


def _one_hot_pattern(key_of_query) -> torch.Tensor:
    """[batch=1, heads=1, pos, pos] pattern in which query i attends only to key key_of_query(i) (clamped to 0..i)."""
    n_pos = 2 * HALF + 1
    pattern = torch.zeros(1, 1, n_pos, n_pos)
    for query in range(n_pos):
        pattern[0, 0, query, min(max(key_of_query(query), 0), query)] = 1.0
    return pattern


def test_repeated_random_tokens_layout_and_seed():
    tokens = heads.repeated_random_tokens(n_batch=3, half_len=HALF, low=10, high=50, bos=1, seed=0)
    assert tokens.shape == (3, 1 + 2 * HALF) and (tokens[:, 0] == 1).all()
    assert torch.equal(tokens[:, 1:HALF + 1], tokens[:, HALF + 1:])
    assert ((tokens[:, 1:] >= 10) & (tokens[:, 1:] < 50)).all()
    assert torch.equal(tokens, heads.repeated_random_tokens(3, HALF, 10, 50, bos=1, seed=0))
    assert not torch.equal(tokens, heads.repeated_random_tokens(3, HALF, 10, 50, bos=1, seed=1))
    assert heads.repeated_random_tokens(2, HALF, 10, 50, bos=None).shape == (2, 2 * HALF)


def test_each_detector_scores_its_own_head_one_and_the_others_low():
    previous = _one_hot_pattern(lambda i: i - 1)
    duplicate = _one_hot_pattern(lambda i: i - HALF)
    induction = _one_hot_pattern(lambda i: i - HALF + 1)
    assert heads.previous_token_scores(previous).item() == pytest.approx(1.0)
    assert heads.duplicate_token_scores(duplicate, HALF).item() == pytest.approx(1.0)
    assert heads.induction_scores(induction, HALF).item() == pytest.approx(1.0)
    assert heads.induction_scores(previous, HALF).item() == pytest.approx(0.0)
    assert heads.induction_scores(duplicate, HALF).item() == pytest.approx(0.0)
    assert heads.duplicate_token_scores(induction, HALF).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 \\* half_len \\+ 1"):
        heads.induction_scores(induction, HALF + 1)


def test_repeat_losses_and_composition_score():
    tokens = heads.repeated_random_tokens(n_batch=2, half_len=HALF, low=0, high=8, bos=None, seed=0)
    tokens = torch.cat([torch.zeros(2, 1, dtype=torch.long), tokens], dim=1)  # a BOS column of 0s
    perfect = torch.full((2, tokens.shape[1], 8), -30.0)
    perfect[:, :-1].scatter_(-1, tokens[:, 1:, None], 30.0)  # every next token predicted with certainty
    first, second = heads.repeat_losses(perfect, tokens, HALF)
    assert first < 1e-6 and second < 1e-6
    uniform = torch.zeros(2, tokens.shape[1], 8)
    assert heads.repeat_losses(uniform, tokens, HALF) == pytest.approx((torch.log(torch.tensor(8.0)).item(),) * 2)
    a = torch.randn(4, 4)
    assert heads.composition_score(a, torch.linalg.inv(a)).item() == pytest.approx(
        2.0 / (a.norm() * torch.linalg.inv(a).norm()).item(), rel=1e-4)  # ||I||_F = 2 for 4x4
    assert heads.composition_score(torch.diag(torch.tensor([1.0, 1, 0, 0])),
                                   torch.diag(torch.tensor([0.0, 0, 1, 1]))).item() == pytest.approx(0.0)


def test_a_fact_must_contain_its_subject_once_and_answer_with_a_space():
    with pytest.raises(ValueError, match="exactly once"):
        facts.Fact("Paris", "The capital of France is", " Paris", "capital")
    with pytest.raises(ValueError, match="start with a space"):
        facts.Fact("France", "The capital of France is", "Paris", "capital")
    assert len({fact.prompt for fact in facts.FACTS}) == len(facts.FACTS), "duplicate prompts"


def test_known_facts_keeps_only_what_the_model_gets_right():
    from utils.models import load_model

    model = load_model()
    wrong = facts.Fact("France", "The capital of France is the city of", " Berlin", "capital")
    right = facts.Fact("Eiffel Tower", "The Eiffel Tower is in the city of", " Paris", "landmark")
    multi = facts.Fact("Eiffel Tower", "The Eiffel Tower was designed by Gustave", " Eiffelwhatever", "x")
    known = facts.known_facts(model, [wrong, right, multi])
    assert [k.fact for k in known] == [right]
    assert known[0].answer_token == model.to_single_token(" Paris") and 0 < known[0].probability <= 1


# the toy, reverse-engineered (utils.heads, chapter 02 sections 3-5) --------------------------------------------

def test_induction_toy_is_the_shipped_toy_with_folded_norms():
    from utils.toy import shipped_toy

    folded, raw = heads.induction_toy(), shipped_toy("toy_induction.pt")
    tokens = heads.repeated_random_tokens(2, 10, 1, 500, bos=0, seed=3)
    with torch.no_grad():
        assert torch.allclose(folded(tokens).log_softmax(-1), raw(tokens).log_softmax(-1), atol=1e-3)
    assert folded.toy_metadata["lr"] == 3e-3 and folded.toy_metadata["steps"] == 1000


def test_decomposition_sums_to_the_real_scores():
    toy = heads.induction_toy()
    tokens = heads.repeated_random_tokens(2, 8, 1, 500, bos=0, seed=4)
    names = ["hook_embed", "hook_pos_embed", "blocks.0.attn.hook_z", "blocks.1.ln1.hook_scale", "blocks.1.attn.hook_q",
             "blocks.1.attn.hook_k"]
    with torch.no_grad():
        _, cache = toy.run_with_cache(tokens, names_filter=lambda name: name in names)
        parts = heads.decompose_attention_scores({n: cache[n] for n in names[:4]}, toy.W_O[0], toy.b_O[0],
                                                 toy.W_Q[1, 3], toy.b_Q[1, 3], toy.W_K[1, 3], toy.b_K[1, 3])
    q, k = cache["blocks.1.attn.hook_q"][:, :, 3], cache["blocks.1.attn.hook_k"][:, :, 3]
    assert parts.shape[:2] == (len(heads.attention_sources(8)),) * 2
    assert torch.allclose(parts.sum((0, 1)), q @ k.transpose(-1, -2) / 4, atol=1e-3)


def test_positional_pattern_is_causal_and_normalised():
    toy = heads.induction_toy()
    with torch.no_grad():
        pattern = heads.positional_qk_pattern(toy.W_pos, toy.W_Q[0], toy.b_Q[0], toy.W_K[0], toy.b_K[0])
    assert pattern.shape == (8, 64, 64)
    assert torch.allclose(pattern.sum(-1), torch.ones(8, 64), atol=1e-5) and (pattern.triu(1) == 0).all()


def test_ablation_clean_run_matches_repeat_losses_and_ablation_hurts():
    from utils.toy import shipped_toy

    toy = shipped_toy("toy_induction.pt")
    tokens = heads.repeated_random_tokens(8, 12, 1, 500, bos=0, seed=5)
    clean = heads.ablated_repeat_losses(toy, tokens, 12, [])
    with torch.no_grad():
        expected = heads.repeat_losses(toy(tokens), tokens, 12)
    assert torch.allclose(clean.mean(0), torch.tensor(expected), atol=1e-4)
    ablated = heads.ablated_repeat_losses(toy, tokens, 12, [(1, h) for h in range(8)])
    assert ablated[:, 1].mean() > clean[:, 1].mean() + 3  # no induction heads: the second copy is not predicted


def test_full_ov_circuit_sums_heads():
    g = torch.Generator().manual_seed(0)
    W_E, W_U = torch.randn(5, 4, generator=g), torch.randn(4, 5, generator=g)
    W_V, W_O = torch.randn(2, 4, 2, generator=g), torch.randn(2, 2, 4, generator=g)
    one = [heads.full_ov_circuit(W_E, W_V[[h]], W_O[[h]], W_U) for h in range(2)]
    assert torch.allclose(heads.full_ov_circuit(W_E, W_V, W_O, W_U), one[0] + one[1], atol=1e-5)


def test_train_toy_logs_and_learns():
    import functools

    model = heads.fresh_toy(0)
    batches = functools.partial(heads.toy_induction_batch, batch=8, n_ctx=24, d_vocab=40, min_len=4)
    log = heads.train_toy(model, batches, 30, 1e-2, log_every=10, callback=heads.loss_probe)
    assert [entry["step"] for entry in log] == [0, 10, 20, 29]
    assert "held_out_loss" in log[0] and log[-1]["loss"] < log[0]["loss"]

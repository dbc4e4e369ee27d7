"""utils.circuits: the weights reproduce the model's own activations (GQA layout included), the residual stream's
pieces add up, direct logit attribution sums to the logit difference, and the cheap factored computations agree
with the expensive direct ones."""

import pytest
import torch

from utils import circuits
from utils.ioi import logit_diff, make_ioi_dataset


def test_expand_kv_heads_groups_consecutive_query_heads():
    W = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2)
    expanded = circuits.expand_kv_heads(W, 9)
    assert expanded.shape == (9, 2, 2)
    assert expanded[:, 0, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [circuits.kv_group(h, 9, 3) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError):
        circuits.expand_kv_heads(torch.zeros(4, 2, 2), 9)


def test_head_weights_shapes(model):
    W = circuits.head_weights(model)
    L, H, d, e = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head
    for name in ("W_Q", "W_K", "W_V"):
        assert W[name].shape == (L, H, d, e), name
    assert W["W_O"].shape == (L, H, e, d)
    # query heads 0, 1, 2 share key/value head 0
    assert torch.equal(W["W_V"][4, 0], W["W_V"][4, 2]) and not torch.equal(W["W_V"][4, 2], W["W_V"][4, 3])


@pytest.mark.parametrize("layer", [0, 17, 29])
def test_weights_reproduce_hook_z_and_attn_out(model, layer):
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    prefix = f"blocks.{layer}."
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.startswith(prefix))
    z = circuits.z_from_weights(cache[prefix + "attn.hook_pattern"], cache[prefix + "ln1.hook_out"], model.W_V[layer])
    assert torch.allclose(z, cache[prefix + "attn.hook_z"], atol=1e-4)
    results = circuits.head_results(z, model.W_O[layer])
    assert torch.allclose(results.sum(2), cache[prefix + "hook_attn_out"], atol=1e-4)
    # the wrong GQA layout (tiling instead of grouping) does not reproduce hook_z
    tiled = model.W_V[layer].repeat(3, 1, 1)
    values = torch.einsum("bpd,hde->bphe", cache[prefix + "ln1.hook_out"], tiled)
    wrong = torch.einsum("bhqk,bkhe->bqhe", cache[prefix + "attn.hook_pattern"], values)
    assert not torch.allclose(wrong, cache[prefix + "attn.hook_z"], atol=1e-2)


def test_residual_components_and_dla_sum_to_logit_diff(model):
    data = make_ioi_dataset(model, n_prompts=3, seed=5)
    n_layers = model.cfg.n_layers
    with torch.no_grad():
        logits, cache = model.run_with_cache(data.tokens, names_filter=circuits.component_filter(n_layers))
    parts = circuits.residual_components(cache, n_layers)
    assert parts.shape == (2 * n_layers + 1, 3, model.cfg.d_model)
    assert len(circuits.component_labels(n_layers)) == parts.shape[0]
    final = cache[f"blocks.{n_layers - 1}.hook_resid_post"][:, -1]
    assert torch.allclose(parts.sum(0), final, atol=1e-3)
    direction = model.W_U[:, data.io_tokens] - model.W_U[:, data.s_tokens]
    dla = circuits.direct_logit_attribution(parts, final, direction)
    assert dla.shape == (2 * n_layers + 1, 3)
    assert torch.allclose(dla.sum(0), logit_diff(logits, data), atol=1e-3)


def test_neuron_direct_effects_sum_to_mlp_rows(model):
    torch.manual_seed(0)
    L, b, n, d = 2, 3, 5, 4
    post, W_out = torch.randn(L, b, n), torch.randn(L, n, d)
    final, direction = torch.randn(b, d), torch.randn(d, b)
    per_neuron = circuits.neuron_direct_effects(post, W_out, final, direction)
    mlp_out = torch.einsum("lbn,lnd->lbd", post, W_out)
    assert torch.allclose(per_neuron.sum(1), circuits.direct_logit_attribution(mlp_out, final, direction), atol=1e-5)


def test_factored_svd_matches_product():
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 20, 4, generator=generator), torch.randn(2, 4, 15, generator=generator)
    U, S, Vh = circuits.factored_svd(A, B)
    assert U.shape == (2, 20, 4) and S.shape == (2, 4) and Vh.shape == (2, 4, 15)
    assert torch.allclose(U @ torch.diag_embed(S) @ Vh, A @ B, atol=1e-4)
    assert torch.allclose(S, torch.linalg.svdvals(A @ B)[..., :4], atol=1e-4)
    assert torch.allclose(U.transpose(-1, -2) @ U, torch.eye(4).expand(2, 4, 4), atol=1e-5)


def test_cheap_eigenvalues_match_full_circuit():
    generator = torch.Generator().manual_seed(1)
    V, d, e = 30, 8, 3
    W_E, W_U = torch.randn(V, d, generator=generator), torch.randn(d, V, generator=generator)
    W_V, W_O = torch.randn(d, e, generator=generator), torch.randn(e, d, generator=generator)
    cheap = circuits.ov_eigenvalues(W_V, W_O, W_U @ W_E)
    full = torch.linalg.eigvals(W_E @ W_V @ W_O @ W_U)
    full = full[full.abs().argsort(descending=True)][:e]
    assert torch.allclose(cheap.abs().sort().values, full.abs().sort().values, atol=1e-3)
    assert torch.allclose(circuits.copying_score(cheap), circuits.copying_score(full), atol=1e-4)


def test_copying_score_extremes_and_top_heads():
    assert circuits.copying_score(torch.tensor([1.0, 2.0, 3.0]).to(torch.complex64)).item() == pytest.approx(1.0)
    assert circuits.copying_score(torch.tensor([-1.0, -2.0]).to(torch.complex64)).item() == pytest.approx(-1.0)
    assert circuits.copying_score(torch.tensor([1j, -1j])).item() == pytest.approx(0.0)
    scores = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.0, 0.3]])
    assert circuits.top_heads(scores, 2) == [(0, 1), (1, 0)]
    assert circuits.top_heads(scores, 1, largest=False) == [(1, 1)]


def test_toy_induction_heads_copy():
    from utils.toy import load_toy

    toy = load_toy("data/toy_induction.pt")
    scores = circuits.copying_score(circuits.ov_eigenvalues(toy.W_V, toy.W_O, toy.W_U @ toy.W_E))
    assert scores.shape == (2, 8)
    assert (scores[1] > 0.9).all(), scores


def test_attention_from_weights_reproduces_the_toy():
    from utils.heads import induction_toy, repeated_random_tokens

    toy = induction_toy()
    tokens = repeated_random_tokens(2, 6, 1, 500, bos=0, seed=0)
    with torch.no_grad():
        _, cache = toy.run_with_cache(tokens)
    for layer in range(2):
        pattern, z = circuits.attention_from_weights(cache[f"blocks.{layer}.ln1.hook_out"], toy.W_Q[layer],
                                                     toy.b_Q[layer], toy.W_K[layer], toy.b_K[layer], toy.W_V[layer],
                                                     toy.b_V[layer])
        assert torch.allclose(pattern, cache[f"blocks.{layer}.attn.hook_pattern"], atol=1e-5)
        assert torch.allclose(z, cache[f"blocks.{layer}.attn.hook_z"], atol=1e-4)


def test_composed_qk_circuit_finds_the_previous_token():
    from utils.heads import induction_toy

    toy = induction_toy()
    with torch.no_grad():
        circuit = circuits.composed_qk_circuit(toy.W_E, toy.W_V[0, [2, 4]], toy.W_O[0, [2, 4]], toy.W_Q[1, 4],
                                               toy.W_K[1, 4])
    hits = (circuit[1:, 1:].argmax(-1) == torch.arange(499)).float().mean()
    assert hits > 0.5  # far above chance (1/499)
    assert (circuits.diagonal_ranks(circuit) >= 0).all()


def test_head_roles_rule():
    effect = torch.tensor([[0.5, -0.5, 0.5, 0.05]])
    pattern = torch.zeros(1, 4, 4, 4)  # one prompt, IO at 1, S1 at 2, S2 at 3, END = 3
    pattern[0, 0, -1, 1] = pattern[0, 1, -1, 1] = pattern[0, 2, -1, 3] = pattern[0, 3, -1, 1] = 1.0
    roles = circuits.head_roles(effect, [pattern], {"IO": torch.tensor([1]), "S1": torch.tensor([2]),
                                                    "S2": torch.tensor([3])}, 0.1)
    assert roles == {"name movers": [(0, 0)], "negative name movers": [(0, 1)], "S2 writers": [(0, 2)]}

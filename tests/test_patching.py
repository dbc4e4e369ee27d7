"""utils.patching: the batched patches agree with one-at-a-time patches, the end points of the metric are right,
the gradients are the metric's gradients, and path patching with nothing to deliver changes nothing."""

import pytest
import torch

from utils import ablation, patching
from utils.ioi import logit_diff, make_ioi_dataset
from utils.models import load_model


@pytest.fixture(scope="module")
def setup():
    model = load_model()
    data = make_ioi_dataset(model, n_prompts=4, seed=3)
    corrupted = data.corrupted(model)
    readout = ablation.ioi_readout(model, data.io_tokens, data.s_tokens)
    with torch.no_grad():
        clean_ld = logit_diff(model(data.tokens), data)
        corrupted_ld = logit_diff(model(corrupted.tokens), corrupted)
    clean_resid = patching.stacked_acts(model, data.tokens, "blocks.{layer}.hook_resid_pre")
    corrupted_resid = patching.stacked_acts(model, corrupted.tokens, "blocks.{layer}.hook_resid_pre")
    return model, data, corrupted, readout, clean_ld, corrupted_ld, clean_resid, corrupted_resid


def test_normalised_metric_end_points():
    assert patching.normalised_metric(torch.tensor([3.0, 1.0, 2.0]), 3.0, 1.0).tolist() == [1.0, 0.0, 0.5]


def test_resid_patch_at_s2_in_layer_0_restores_clean_and_elsewhere_nothing(setup):
    model, data, corrupted, readout, clean_ld, corrupted_ld, clean_resid, corrupted_resid = setup
    s2 = int(data.positions["S2"][0])
    grid = patching.patch_resid_grid(model, corrupted_resid, clean_resid, [1, s2], readout, layers=[0])
    assert grid.shape == (1, 2, len(data))
    torch.testing.assert_close(grid[0, 0], corrupted_ld, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(grid[0, 1], clean_ld, atol=1e-3, rtol=1e-3)


def test_batched_head_patch_matches_one_head_at_a_time(setup):
    model, data, corrupted, readout, clean_ld, corrupted_ld, clean_resid, corrupted_resid = setup
    layer = 20
    clean_z = patching.stacked_acts(model, data.tokens, "blocks.{layer}.attn.hook_z")
    grid = patching.patch_every_head(model, corrupted_resid, clean_z, readout, layers=[layer])
    assert grid.shape == (1, model.cfg.n_heads, len(data))
    for head in (0, 5):
        def hook(z, hook, head=head):
            z[:, :, head] = clean_z[layer][:, :, head]
            return z

        final = ablation.final_resid(model, corrupted.tokens, [(f"blocks.{layer}.attn.hook_z", hook)])
        torch.testing.assert_close(grid[0, head], readout(final), atol=1e-3, rtol=1e-3)


def test_acts_and_grads_match_a_finite_difference(setup):
    model, data, corrupted, readout, *_ = setup
    metric = lambda final: readout(final).mean()
    z, grad = patching.acts_and_grads(model, corrupted.tokens, metric)
    assert z.shape == grad.shape == (model.cfg.n_layers, len(data), data.tokens.shape[1], model.cfg.n_heads,
                                     model.cfg.d_head)
    layer, head = 23, 0
    direction = torch.zeros_like(z[layer])
    direction[:, -1, head] = grad[layer][:, -1, head] / grad[layer][:, -1, head].norm()
    eps = 1e-2

    def shifted(sign):
        def hook(act, hook):
            return act + sign * eps * direction
        return metric(ablation.final_resid(model, corrupted.tokens, [(f"blocks.{layer}.attn.hook_z", hook)]))

    finite = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(finite.item() - (grad[layer] * direction).sum().item()) < 0.02 * abs(finite.item()) + 1e-3


def test_attribution_scores_sum_over_prompts():
    clean, corrupted, grad = torch.ones(2, 3, 4, 5, 6), torch.zeros(2, 3, 4, 5, 6), torch.full((2, 3, 4, 5, 6), 0.5)
    assert torch.equal(patching.attribution_scores(clean, corrupted, grad), torch.full((2, 5), 3 * 4 * 6 * 0.5))


def test_path_patch_with_nothing_to_deliver_is_the_corrupted_run(setup):
    model, data, corrupted, readout, clean_ld, corrupted_ld, clean_resid, corrupted_resid = setup
    clean_z = patching.stacked_acts(model, data.tokens, "blocks.{layer}.attn.hook_z")
    corrupted_z = patching.stacked_acts(model, corrupted.tokens, "blocks.{layer}.attn.hook_z")
    end = data.tokens.shape[1] - 1
    # a sender in a layer after the receiver cannot reach its queries; a zero delta delivers nothing
    out = patching.path_patch_to_queries(model, corrupted_resid, clean_z, corrupted_z, [(25, 0), (10, 1)],
                                         [(23, 0), (23, 3)], readout, query_position=end,
                                         delta_fn=lambda c, k, W, h: torch.zeros(*c.shape[:2], W.shape[-1]))
    torch.testing.assert_close(out, corrupted_ld.expand(2, -1), atol=1e-3, rtol=1e-3)
    out = patching.path_patch_to_queries(model, corrupted_resid, clean_z, corrupted_z, [(25, 0), (20, 0)],
                                         [(23, 0), (23, 3)], readout, query_position=end)
    torch.testing.assert_close(out[0], corrupted_ld, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(out[1], corrupted_ld, atol=1e-3)


def test_end_attention_pairs_each_prompt_with_its_key():
    pattern = torch.zeros(2, 3, 4, 4)
    pattern[0, :, -1, 1] = 1.0
    pattern[1, :, -1, 2] = 0.5
    assert patching.end_attention(pattern, torch.tensor([1, 2])).tolist() == [0.75, 0.75, 0.75]


def test_acts_and_grads_work_on_compatibility_aliases(setup):
    model, data, corrupted, readout, clean_ld, corrupted_ld, clean_resid, corrupted_resid = setup
    resid, grad = patching.acts_and_grads(model, corrupted.tokens, lambda final: readout(final).mean(),
                                          "blocks.{layer}.hook_resid_pre")
    torch.testing.assert_close(resid, corrupted_resid)
    assert grad.shape == resid.shape and grad[0].abs().sum() > 0

"""utils.patching: the batched patches agree with one-at-a-time patches, the end points of the metric are right,
attribution agrees with patching where the model is linear, path patching with nothing to deliver changes
nothing, and a circuit of every head is the whole model."""

from functools import partial

import pytest
import torch

from utils import ablation, patching
from utils.ioi import logit_diff, make_ioi_dataset
from utils.models import load_model


@pytest.fixture(scope="module")
def setup():
    model = load_model()
    data = make_ioi_dataset(model, n_prompts=4, seed=3)
    abc = data.abc(model)
    readout = partial(patching.logit_diff_readout,
                      direction=ablation.logit_diff_direction(model, data.io_tokens, data.s_tokens))
    with torch.no_grad():
        clean_ld = logit_diff(model(data.tokens), data)
        abc_ld = logit_diff(model(abc.tokens), abc)
    return model, data, abc, readout, clean_ld, abc_ld


def test_normalised_metric_end_points():
    assert patching.normalised_metric(torch.tensor([3.0, 1.0, 2.0]), 3.0, 1.0).tolist() == [1.0, 0.0, 0.5]


def test_readout_matches_the_logits(setup):
    model, data, abc, readout, clean_ld, abc_ld = setup
    final = ablation.final_resid(model, data.tokens)
    torch.testing.assert_close(readout(final), clean_ld, atol=2e-3, rtol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(patching.ioi_logit_diff(model(data.tokens), data.io_tokens, data.s_tokens),
                                   clean_ld)


def test_resid_patch_at_a_position_both_runs_share_changes_nothing(setup):
    model, data, abc, readout, clean_ld, abc_ld = setup
    positions = torch.stack([data.positions["END"], data.positions["S2"]])
    grid = patching.patch_resid_grid(model, data.tokens, abc.tokens, readout, positions, layers=[0, 29])
    assert grid.shape == (2, 2, len(data))
    torch.testing.assert_close(grid[0, 0], abc_ld, atol=2e-3, rtol=1e-3)  # END is the same token in both runs
    assert not torch.allclose(grid[0, 1], abc_ld, atol=1e-2)  # S2 in layer 0 does matter


def test_batched_position_patch_matches_one_at_a_time(setup):
    model, data, abc, readout, *_ = setup
    layer = 12
    positions = torch.stack([data.positions["IO"], data.positions["S2"]])
    grid = patching.patch_resid_grid(model, data.tokens, abc.tokens, readout, positions, layers=[layer])
    clean_resid = patching.stacked_acts(model, data.tokens, "blocks.{layer}.hook_resid_pre")[layer]
    rows = torch.arange(len(data))
    for i in range(2):
        def hook(act, hook, i=i):
            act[rows, positions[i]] = clean_resid[rows, positions[i]]
            return act

        final = ablation.final_resid(model, abc.tokens, [(f"blocks.{layer}.hook_resid_pre", hook)])
        torch.testing.assert_close(grid[0, i], readout(final), atol=2e-3, rtol=1e-3)


def test_batched_head_patch_matches_one_head_at_a_time(setup):
    model, data, abc, readout, *_ = setup
    layer = 20
    clean_z = patching.stacked_acts(model, data.tokens, "blocks.{layer}.attn.hook_z")
    grid = patching.patch_head_grid(model, data.tokens, abc.tokens, readout, layers=[layer])
    assert grid.shape == (1, model.cfg.n_heads, len(data))
    for head in (0, 5):
        def hook(z, hook, head=head):
            z[:, :, head] = clean_z[layer][:, :, head]
            return z

        final = ablation.final_resid(model, abc.tokens, [(f"blocks.{layer}.attn.hook_z", hook)])
        torch.testing.assert_close(grid[0, head], readout(final), atol=2e-3, rtol=1e-3)


def test_attribution_matches_patching_for_the_last_layer(setup):
    model, data, abc, readout, *_ = setup
    attribution = patching.attribution_patch_heads(model, data.tokens, abc.tokens, readout)
    assert attribution.shape == (model.cfg.n_layers, model.cfg.n_heads)
    exact = patching.patch_head_grid(model, data.tokens, abc.tokens, readout, layers=[29])[0].mean(-1)
    exact = exact - readout(ablation.final_resid(model, abc.tokens)).mean()
    # only the final norm stands between a last-layer head and the logits: the linear estimate is close
    assert (attribution[29] - exact).abs().max() < 0.15 * exact.abs().max() + 0.02


def test_path_patch_with_no_sender_or_a_later_sender_is_the_clean_run(setup):
    model, data, abc, readout, clean_ld, abc_ld = setup
    out = patching.path_patch(model, data.tokens, abc.tokens, [], [(20, 0)], "q", readout)
    torch.testing.assert_close(out, clean_ld, atol=2e-3, rtol=1e-3)
    out = patching.path_patch(model, data.tokens, abc.tokens, [(25, 3)], [(20, 0)], "q", readout)
    torch.testing.assert_close(out, clean_ld, atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="receiver_input"):
        patching.path_patch(model, data.tokens, abc.tokens, [], [(20, 0)], "z", readout)


def test_path_patch_from_a_strong_head_to_the_next_layers_queries_moves_the_clean_run(setup):
    model, data, abc, readout, clean_ld, abc_ld = setup
    out = patching.path_patch(model, data.tokens, abc.tokens, [(23, 3)], [(24, h) for h in range(9)], "q", readout)
    assert out.shape == clean_ld.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, clean_ld, atol=1e-2)


def test_circuit_of_every_head_is_the_model_and_of_no_head_is_the_ablation(setup):
    model, data, abc, readout, clean_ld, abc_ld = setup
    z, _ = ablation.head_z(model, data.tokens)
    means = patching.template_means(z, data.template_ids)
    every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    torch.testing.assert_close(patching.circuit_logit_diff(model, data.tokens, every, means, readout), clean_ld,
                               atol=2e-3, rtol=1e-3)
    # replacing every head by its own value changes nothing
    torch.testing.assert_close(patching.circuit_logit_diff(model, data.tokens, [], z, readout), clean_ld,
                               atol=2e-3, rtol=1e-3)


def test_template_means_average_within_groups():
    z = torch.arange(2 * 4 * 1 * 1 * 1, dtype=torch.float32).view(2, 4, 1, 1, 1)
    out = patching.template_means(z, torch.tensor([0, 1, 0, 1]))
    assert out[0, :, 0, 0, 0].tolist() == [1.0, 2.0, 1.0, 2.0]
    assert out[1, :, 0, 0, 0].tolist() == [5.0, 6.0, 5.0, 6.0]


def test_end_attention_pairs_each_prompt_with_its_key():
    pattern = torch.zeros(2, 3, 4, 4)
    pattern[0, :, -1, 1] = 1.0
    pattern[1, :, -1, 2] = 0.5
    assert patching.end_attention(pattern, torch.tensor([1, 2])).tolist() == [0.75, 0.75, 0.75]

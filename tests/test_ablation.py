"""utils.ablation: the batched every-head ablation agrees with one-head-at-a-time runs, and direct effects add up."""

import pytest
import torch

from utils import ablation
from utils.ioi import logit_diff, make_ioi_dataset


def test_batched_ablation_matches_single_runs(model):
    data = make_ioi_dataset(model, n_prompts=2, seed=3, templates_per_order=1)
    z, final = ablation.head_z(model, data.tokens)
    readout = ablation.ioi_readout(model, data.io_tokens, data.s_tokens)
    assert torch.allclose(readout(final), logit_diff(model(data.tokens), data), atol=1e-3)
    mean = z.mean(1, keepdim=True)
    grid = ablation.ablate_every_head(model, data.tokens, mean, readout, layers=[27])
    assert grid.shape == (1, model.cfg.n_heads, 2)
    for head in (0, 5):
        hook = ablation.mean_ablation_hook(z[27], head)
        with torch.no_grad():
            logits = model.run_with_hooks(data.tokens, fwd_hooks=[(ablation.z_name(27), hook)])
        assert torch.allclose(grid[0, head], logit_diff(logits, data), atol=1e-3)
    model.reset_hooks()


def test_direct_effects_sum_to_attention_share(model):
    data = make_ioi_dataset(model, n_prompts=2, seed=4)
    z, final = ablation.head_z(model, data.tokens)
    every = ablation.all_direct_effects(model, z, final, data.io_tokens, data.s_tokens)
    one = ablation.head_direct_effect(model, z[12], final, 12, 4, data.io_tokens, data.s_tokens)
    assert torch.allclose(every[12, 4], one, atol=1e-4)


def test_several_kinds_in_one_pass_match_single_runs_and_the_model_is_restored(model):
    data = make_ioi_dataset(model, n_prompts=2, seed=5, templates_per_order=1)
    donors = make_ioi_dataset(model, n_prompts=2, seed=6, templates_per_order=1)
    z, final = ablation.head_z(model, data.tokens)
    z_donor, _ = ablation.head_z(model, donors.tokens)
    readout = ablation.ioi_readout(model, data.io_tokens, data.s_tokens)
    kinds = {"zero": torch.zeros_like(z[:, :1]), "resample": z_donor}
    grids = ablation.ablate_every_head(model, data.tokens, kinds, readout, layers=[0, 14])
    assert set(grids) == {"zero", "resample"} and grids["zero"].shape == (2, model.cfg.n_heads, 2)
    for (row, layer), head in [((0, 0), 2), ((1, 14), 7)]:
        hooks = {"zero": ablation.mean_ablation_hook(torch.zeros_like(z[layer, :1]), head),
                 "resample": ablation.resample_ablation_hook(z_donor[layer], head)}
        for kind, hook in hooks.items():
            with torch.no_grad():
                logits = model.run_with_hooks(data.tokens, fwd_hooks=[(ablation.z_name(layer), hook)])
            model.reset_hooks()
            assert torch.allclose(grids[kind][row, head], logit_diff(logits, data), atol=1e-3), (kind, layer, head)
    # the skipped blocks are restored: a plain run afterwards is the clean run
    assert torch.allclose(ablation.final_resid(model, data.tokens), final, atol=1e-3)
    assert all("forward" not in vars(block.original_component) for block in model.blocks)


def test_skipping_early_blocks_gives_the_same_final_residual(model):
    data = make_ioi_dataset(model, n_prompts=2, seed=7)
    resid = ablation.resid_pre(model, data.tokens)
    _, final = ablation.head_z(model, data.tokens)
    for layer in (1, 29):
        assert torch.allclose(ablation.final_resid(model, resid[layer], start_at_layer=layer), final, atol=1e-3)
    assert torch.allclose(ablation.final_resid(model, data.tokens), final, atol=1e-3)


def test_repeat_loss_readout_matches_repeat_losses(model):
    from utils.heads import repeat_losses, repeated_random_tokens

    bos = int(model.to_tokens("a")[0, 0])
    tokens = repeated_random_tokens(2, 6, low=100, high=model.cfg.d_vocab, bos=bos, seed=0)
    with torch.no_grad():
        logits = model(tokens)
    _, final = ablation.head_z(model, tokens)
    per_row = ablation.repeat_loss_readout(model, tokens, 6)(final[None])  # extra leading dim, as in the grids
    assert per_row.shape == (1, 2)
    assert abs(per_row.mean().item() - repeat_losses(logits, tokens, 6)[1]) < 1e-3

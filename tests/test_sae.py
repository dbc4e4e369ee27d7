"""utils.sae and utils.dashboards: the SAE's maths, its training, SAELens's on-disk layout, the shipped SAE and
its data files."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from utils import dashboards, sae
from utils.checks.ch08 import random_sae, synthetic_activations


@pytest.fixture(scope="module")
def model():
    from utils.models import load_model

    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    yield load_model()
    torch.set_grad_enabled(previous)


def test_topk_keeps_k_and_relus():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-3.0, -2.0, -1.0, 4.0]])
    out = sae.topk_activation(pre, 2)
    assert torch.equal(out, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 4.0]]))


def test_sparse_topk_loss_matches_dense_loss_and_gradients():
    x = torch.randn(64, 12)
    dense = {name: t.clone().requires_grad_(True) for name, t in random_sae(12, 40, 0).items()}
    sparse = {name: t.clone().requires_grad_(True) for name, t in random_sae(12, 40, 0).items()}
    with torch.enable_grad():
        sae.sae_loss(x, dense, "topk", 5, 0.0)["loss"].backward()
        sae._topk_sparse_loss(x, sparse, 5, 0, None, 0.0)["loss"].backward()
    for name in dense:
        assert torch.allclose(dense[name].grad, sparse[name].grad, atol=1e-5), name


def test_auxk_runs_when_latents_are_dead():
    x = torch.randn(32, 8)
    params = {name: t.clone().requires_grad_(True) for name, t in random_sae(8, 24, 1).items()}
    dead = torch.zeros(24, dtype=torch.bool)
    dead[:10] = True
    with torch.enable_grad():
        out = sae._topk_sparse_loss(x, params, 3, 4, dead, 1 / 32)
        out["loss"].backward()
    assert float(out["aux"]) > 0 and params["W_enc"].grad[:, :10].abs().sum() > 0


@pytest.mark.parametrize("architecture, k, l1", [("topk", 3, 0.0), ("standard", None, 1.0)])
def test_training_recovers_planted_features(architecture, k, l1):
    data = synthetic_activations(4096, 16, 32, 3, 0)
    held = synthetic_activations(1024, 16, 32, 3, 0, sample_seed=9)
    params = sae.train_sae(data, 48, architecture, k, l1, 400, 128, 3e-3, 0)
    recon, acts = sae.sae_forward(held, params, architecture, k)
    assert float(sae.fraction_variance_explained(held, recon)) > 0.8
    assert torch.allclose(params["W_dec"].norm(dim=-1), torch.ones(48), atol=1e-4)
    again = sae.train_sae(data, 48, architecture, k, l1, 400, 128, 3e-3, 0)
    assert all(torch.equal(params[name], again[name]) for name in params)


def test_metrics_on_known_values():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    assert float(sae.fraction_variance_explained(x, x)) == 1.0
    assert float(sae.fraction_variance_explained(x, x.mean(0).expand_as(x))) == pytest.approx(0.0)
    stats = sae.latent_statistics(torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]]), 0.6)
    assert stats["l0"] == 1.5 and stats["n_dead"] == 1 and stats["n_dense"] == 1
    assert sae.ce_loss_recovered(2.0, 3.0, 6.0) == 0.75


def test_clamp_sets_the_latent_and_keeps_the_rest():
    params = random_sae(10, 24, 3, unit_decoder=True)
    resid = torch.randn(5, 10)
    clamped = sae.clamp_latent(resid, params, "standard", None, 4, 2.5)
    delta = clamped - resid
    direction = params["W_dec"][4] / params["W_dec"][4].norm()
    assert torch.allclose(delta, (delta @ direction)[:, None] * direction, atol=1e-5)  # moved along W_dec[4] only


def test_saelens_layout_round_trip(tmp_path):
    params = random_sae(6, 20, 4)
    cfg = sae.sae_lens_cfg(6, 20, "topk", 3, "blocks.2.hook_resid_post", "some/model", 64)
    sae.save_sae(tmp_path, params, cfg, firing_rate=torch.full((20,), 0.01))
    assert {p.name for p in tmp_path.iterdir()} == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    loaded, loaded_cfg = sae.load_sae(tmp_path)
    assert loaded_cfg == cfg and all(torch.equal(loaded[name], params[name]) for name in params)
    assert torch.allclose(sae.load_firing_rate(tmp_path), torch.full((20,), 0.01))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {name: tuple(t.shape) for name, t in state.items()} == {"W_enc": (6, 20), "b_enc": (20,),
                                                                 "W_dec": (20, 6), "b_dec": (6,)}


def test_saelens_cfg_has_the_keys_saelens_reads():
    cfg = sae.sae_lens_cfg(576, 4608, "topk", 32, "blocks.15.hook_resid_post", "m", 128)
    assert {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
            "reshape_activations", "metadata", "architecture", "k", "rescale_acts_by_decoder_norm"} <= set(cfg)
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_post" and cfg["metadata"]["sae_lens_version"] >= "6"
    standard = sae.sae_lens_cfg(576, 4608, "standard", None, "h", "m", 128)
    assert standard["architecture"] == "standard" and "k" not in standard


def test_save_rejects_wrong_shapes(tmp_path):
    params = random_sae(6, 20, 4)
    params["W_dec"] = params["W_dec"].T
    with pytest.raises(ValueError, match="W_dec"):
        sae.save_sae(tmp_path, params, sae.sae_lens_cfg(6, 20, "topk", 3, "h", "m", 8))


def test_shipped_sae_is_small_and_well_formed():
    folder = sae.SHIPPED_SAE
    size = sum(path.stat().st_size for path in folder.iterdir())
    assert size < 12e6, f"{size / 1e6:.1f} MB"
    params, cfg = sae.load_sae(folder)
    assert cfg["d_in"] == 576 and cfg["d_sae"] == 4608 and cfg["k"] == 32
    assert cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_post"
    assert params["W_enc"].dtype == torch.float32 and params["W_enc"].shape == (576, 4608)
    log = json.loads((folder / "training_log.json").read_text())
    assert log["activations_seen"] > 1_000_000 and log["seed"] == 0


def test_human_text_file_is_small_prose():
    with gzip.open(sae.HUMAN_TEXT, "rt", encoding="utf-8") as file:
        documents = [json.loads(line) for line in file]
    assert sae.HUMAN_TEXT.stat().st_size < 3e6
    assert len(documents) > 100 and all(doc["source"].startswith("python-3.11-docs/") for doc in documents)
    text = documents[0]["text"]
    assert ":func:`" not in text and "``" not in text and ".. " not in text[:2]


def test_dashboard_statistics_clips_windows():
    acts = torch.zeros(2, 10)
    acts[0, 1], acts[1, 9] = 5.0, 3.0
    tokens = torch.arange(20).view(2, 10)
    stats = dashboards.dashboard_statistics(acts, tokens, torch.ones(4), torch.eye(4, 6), 5, 2, 4)
    assert stats["contexts"] == [[0, 1, 2, 3], [17, 18, 19]] and stats["highlight"] == [1, 2]
    assert stats["firing_rate"] == pytest.approx(0.1) and float(stats["histogram"].sum()) == 2


def test_collect_residuals_matches_the_cache(model):
    tokens = model.to_tokens(["The cat sat on the mat", "A dog ran in the park"])
    collected = sae.collect_residuals(model, tokens, 15, batch_size=1)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.15.hook_resid_post")
    # One prompt at a time vs both in a batch: the same numbers up to float summation order (residuals reach ~10).
    assert torch.allclose(collected, cache["blocks.15.hook_resid_post"][:, 1:], atol=1e-3, rtol=1e-4)


def test_text_split_is_deterministic_and_disjoint(model):
    train, held = sae.sae_text_split(model, "python_docs")
    train_again, held_again = sae.sae_text_split(model, "python_docs")
    assert torch.equal(held, held_again) and train.shape[1] == 128
    assert (train[:, 0] == model.tokenizer.bos_token_id).all()
    assert not {tuple(row) for row in held[:20].tolist()} & {tuple(row) for row in train.tolist()}


def test_spliced_clean_loss_is_the_model_loss(model):
    tokens = model.to_tokens(["The cat sat on the mat and looked at the bird"])
    expected = model(tokens, return_type="loss")
    got = sae.spliced_loss(model, tokens, "blocks.3.hook_resid_post", None, None, None, "clean")
    assert float(got) == pytest.approx(float(expected), abs=1e-4)


def test_clamped_generation_changes_text_and_leaves_no_hooks(model):
    tokens = model.to_tokens(["The weather today is"])
    params = random_sae(576, 16, 0, unit_decoder=True)
    plain = sae.generate_clamped(model, tokens, "blocks.15.hook_resid_post", params, "topk", 2, None, None, 4)
    steered = sae.generate_clamped(model, tokens, "blocks.15.hook_resid_post", params, "topk", 2, 3, 200.0, 4)
    assert plain.shape == steered.shape == (1, tokens.shape[1] + 4) and not torch.equal(plain, steered)
    assert not any(hook_point._forward_hooks for hook_point in model.hook_dict.values())

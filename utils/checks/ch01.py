"""Checks for chapter 01 — The logit lens (and where it breaks).

References come from `utils.lens` (the course's own lens code, reused by later chapters). Every check runs the
learner's answer on small inputs and, when it is wrong, compares it with the usual mistakes to say which one.
"""

from __future__ import annotations

import math

import torch

from utils import lens as _lens
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_number, expect_tensor, hidden_generator
from utils.models import model_for_checks

VISIBLE_PROMPTS = ["The Eiffel Tower is in the city of", "One, two, three, four,"]
HIDDEN_PROMPTS = ["Water boils at a temperature of one hundred degrees", "She opened the door and saw a"]

# Exercise 1.5: the layer from which the logit lens's mean KL to the final output stays below this (nats).
SETTLING_THRESHOLD = 1.0


def _prompts(hidden: bool) -> list[str]:
    return VISIBLE_PROMPTS + (HIDDEN_PROMPTS if hidden else [])


def _run(model, prompt: str):
    tokens = model.to_tokens(prompt)
    _, cache = model.run_with_cache(tokens, names_filter=_lens.resid_filter)
    return tokens, cache


def _close(got, expected, atol: float = 1e-3, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.to("cpu", torch.float32),
                          atol=atol, rtol=rtol)


def _stack_with_mid(cache, n_layers: int) -> torch.Tensor:
    rows = [cache["blocks.0.hook_resid_pre"]]
    for layer in range(n_layers):
        rows += [cache[f"blocks.{layer}.hook_resid_mid"], cache[f"blocks.{layer}.hook_resid_post"]]
    return torch.stack(rows)


def _diagnose_lens_shape(got: torch.Tensor, expected: torch.Tensor, n_layers: int, what: str) -> None:
    """Raise a specific CheckFailed when `got` has the wrong shape (expected [n_layers + 1, batch, pos, d_vocab])."""
    shape, want = tuple(got.shape), tuple(expected.shape)
    if shape == want:
        return
    if got.ndim == 4 and shape[1:] == want[1:]:
        if shape[0] == n_layers:
            if _close(got, expected[1:]):
                raise CheckFailed(f"{what}: {n_layers} rows instead of {n_layers + 1}: you are missing the embedding "
                                  f"row (layer 0 = blocks.0.hook_resid_pre, before any block).")
            if _close(got, expected[:-1]):
                raise CheckFailed(f"{what}: {n_layers} rows instead of {n_layers + 1}: you are missing the last "
                                  f"block's output (blocks.{n_layers - 1}.hook_resid_post, the model's own output).")
            raise CheckFailed(f"{what}: {n_layers} rows instead of {n_layers + 1}: off by one layer. Use the "
                              f"embedding output plus the resid_post of every block.")
        if shape[0] in (2 * n_layers, 2 * n_layers + 1):
            raise CheckFailed(f"{what}: {shape[0]} rows instead of {n_layers + 1}: it looks like you included "
                              f"resid_mid (the stream between attention and MLP). Keep only the embedding output "
                              f"and each block's resid_post.")
        raise CheckFailed(f"{what}: expected {n_layers + 1} layer rows (embedding + one per block), got {shape[0]}.")
    if sorted(shape) == sorted(want):
        raise CheckFailed(f"{what}: expected shape {want} = [layer, batch, pos, d_vocab], got {shape}: the axes are "
                          f"in the wrong order (stack the layers on a new first axis, torch.stack(..., dim=0)).")
    if shape and shape[-1] != want[-1]:
        raise CheckFailed(f"{what}: the last axis has size {shape[-1]}, expected d_vocab = {want[-1]}: return "
                          f"logits over the vocabulary (apply the unembedding), not residual vectors.")
    raise CheckFailed(f"{what}: expected shape {want} = [layer, batch, pos, d_vocab], got {shape}.")


def _check_lens(answer, hidden: bool, reference, diagnose) -> str:
    """The loop both lens checks share: run `answer(model, cache)` on every prompt, compare with `reference`, and
    let `diagnose(model, cache, got, expected, what)` name the mistake before the generic comparison."""
    model = model_for_checks()
    n_layers = model.cfg.n_layers
    prompts = _prompts(hidden)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            _, cache = _run(model, prompt)
            what = f"prompt {i} ({prompt!r})"
            got = answer(model, cache)
            expected = reference(model, cache)
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"{what}: expected a torch.Tensor of logits, got {type(got).__name__}.")
            _diagnose_lens_shape(got, expected, n_layers, what)
            if _close(got, expected):
                continue
            diagnose(model, cache, got, expected, what)
    return f"{len(prompts)} prompts"


# ---------------------------------------------------------------------------------------------------------
# 1.1 — the logit lens by hand
# ---------------------------------------------------------------------------------------------------------


def _logit_lens_mistakes(model, cache, got, expected, what) -> None:
    n_layers = model.cfg.n_layers
    stack = _lens.resid_stack(cache, n_layers)
    if _close(got, model.unembed(stack)):
        raise CheckFailed(f"{what}: your logits are the unembedding of the raw residual stream. You forgot "
                          f"the final norm: apply model.ln_final to each layer's residual before unembedding.")
    if _close(got, _lens.linearised_logit_lens(model, cache)):
        raise CheckFailed(f"{what}: you divided every layer by the final layer's norm scale (the cached "
                          f"ln_final scale). The logit lens recomputes the norm for each layer's own residual.")
    if _close(got, expected.log_softmax(-1)) or _close(got, expected.softmax(-1), atol=1e-6):
        raise CheckFailed(f"{what}: you returned log-probabilities or probabilities; return the logits "
                          f"(ln_final then the unembedding, no softmax).")
    if _close(got[1:], model.unembed(model.ln_final(torch.stack(
            [cache[f"blocks.{layer}.hook_resid_mid"] for layer in range(n_layers)])))):
        raise CheckFailed(f"{what}: your rows 1..{n_layers} are read from resid_mid (after attention, before "
                          f"the MLP). Use each block's resid_post.")
    expect_tensor(got, expected, what, atol=1e-3,
                  hint="row 0 is the embedding output, row l the output of block l-1; apply model.ln_final, "
                       "then model.unembed.")


@exercise("01", "1.1", "logit_lens", "The logit lens by hand", points=2, reference=_lens.logit_lens)
def logit_lens(answer, hidden):
    expect_callable(answer, "logit_lens")
    return _check_lens(answer, hidden, _lens.logit_lens, _logit_lens_mistakes)

# ---------------------------------------------------------------------------------------------------------
# 1.2 — rank of the true next token
# ---------------------------------------------------------------------------------------------------------


@exercise("01", "1.2", "next_token_ranks", "Rank of the true next token at every layer",
          reference=_lens.next_token_ranks)
def next_token_ranks(answer, hidden):
    expect_callable(answer, "next_token_ranks")
    model = model_for_checks()
    cases = []
    with torch.no_grad():
        for prompt in _prompts(hidden):
            tokens, cache = _run(model, prompt)
            cases.append((prompt, _lens.logit_lens(model, cache)[:, 0], tokens[0]))
        if hidden:
            generator = torch.Generator().manual_seed(1)
            cases.append(("random logits", torch.randn(4, 6, 50, generator=generator),
                          torch.randint(0, 50, (6,), generator=generator)))
    for i, (name, logits, tokens) in enumerate(cases):
        what = f"case {i} ({name!r})"
        got = answer(logits.clone(), tokens.clone())
        expected = _lens.next_token_ranks(logits, tokens)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor of ranks, got {type(got).__name__}.")
        n_pos = logits.shape[1]
        if tuple(got.shape) == (logits.shape[0], n_pos):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. The last "
                              f"position has no next token to rank: return pos - 1 = {n_pos - 1} columns, position p "
                              f"scored on tokens[p + 1].")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [layer, pos - 1], got "
                              f"{tuple(got.shape)}.")
        if got.dtype.is_floating_point:
            got = got.round()
        got = got.long().cpu()
        if torch.equal(got, expected):
            continue
        if torch.equal(got, expected - 1):
            raise CheckFailed(f"{what}: your ranks are one lower than expected everywhere: they start at 0. Use "
                              f"rank 1 for the top prediction (so that log10(rank) = 0 there).")
        own = logits[:, :-1].gather(-1, tokens[:-1].view(1, -1, 1).expand(logits.shape[0], -1, 1))
        same_position = (logits[:, :-1] > own).sum(-1) + 1  # position p scored on its own token tokens[p]
        if torch.equal(got, same_position) or torch.equal(got, same_position - 1):
            raise CheckFailed(f"{what}: you ranked each position's own input token. The prediction at position p is "
                              f"about the next token, tokens[p + 1].")
        from_bottom = logits.shape[-1] + 1 - expected
        if torch.equal(got, from_bottom) or torch.equal(got, from_bottom - 1):
            raise CheckFailed(f"{what}: your ranks count from the least likely token. Sort in descending order "
                              f"(rank 1 = the largest logit).")
        wrong = (got != expected).nonzero()[0].tolist()
        raise CheckFailed(f"{what}: rank at [layer {wrong[0]}, position {wrong[1]}] is {got[tuple(wrong)].item()}, "
                          f"expected {expected[tuple(wrong)].item()}.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 1.3 — KL(final || lens)
# ---------------------------------------------------------------------------------------------------------


def _kl_cases(hidden: bool):
    generator = torch.Generator().manual_seed(0)
    final = 3 * torch.randn(5, 40, generator=generator)
    lens = torch.randn(3, 5, 40, generator=generator) * torch.tensor([0.5, 2.0, 6.0]).view(3, 1, 1)
    cases = [("random logits, final [5, 40], lens [3, 5, 40]", final, lens)]
    model = model_for_checks()
    with torch.no_grad():
        _, cache = _run(model, VISIBLE_PROMPTS[0])
        logits = _lens.logit_lens(model, cache)[:, 0]
        cases.append(("logit lens of prompt 0, final [pos, d_vocab], lens [layer, pos, d_vocab]",
                      logits[-1], logits[::5]))
        if hidden:
            cases.append(("identical distributions", final, final + 7.0))
            _, cache = _run(model, HIDDEN_PROMPTS[0])
            logits = _lens.logit_lens(model, cache)[:, 0]
            cases.append(("logit lens of a hidden prompt", logits[-1], logits[2::7]))
    return cases


@exercise("01", "1.3", "kl_from_final", "KL divergence from the final output", points=2,
          reference=_lens.kl_from_final)
def kl_from_final(answer, hidden):
    expect_callable(answer, "kl_from_final")
    cases = _kl_cases(hidden)
    for i, (name, final, lens) in enumerate(cases):
        what = f"case {i} ({name})"
        got = answer(final.clone(), lens.clone())
        expected = _lens.kl_from_final(final, lens)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} (the vocabulary axis summed away, the "
                              f"others kept and broadcast), got {tuple(got.shape)}. Sum over the last axis only.")
        got = got.detach().float().cpu()
        if _close(got, expected, atol=1e-4, rtol=1e-3):
            continue
        if _close(got, _lens.kl_from_final(lens, final.expand_as(lens)), atol=1e-4, rtol=1e-3):
            raise CheckFailed(f"{what}: you computed KL(lens || final). We want KL(final || lens): the expectation "
                              f"is taken under the final distribution, sum_v p_final(v) (log p_final(v) - log "
                              f"p_lens(v)).")
        if _close(got, expected / math.log(2), atol=1e-4, rtol=1e-3):
            raise CheckFailed(f"{what}: your values are in bits (log base 2). Use natural logarithms (nats).")
        if _close(got, expected / final.shape[-1], atol=1e-6, rtol=1e-3):
            raise CheckFailed(f"{what}: you averaged over the vocabulary; a KL divergence sums over it.")
        raw = (final.softmax(-1) * (final - lens)).sum(-1)
        if _close(got, raw, atol=1e-4, rtol=1e-3):
            raise CheckFailed(f"{what}: you used raw logits as log-probabilities. Apply log_softmax to both "
                              f"inputs first (logits are only defined up to a constant).")
        expect_tensor(got, expected, what, atol=1e-4, rtol=1e-3,
                      hint="log_softmax both inputs, then sum p_final * (log p_final - log p_lens) over the last axis.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 1.4 — the mean KL per layer over a corpus, in chunks of tokens
# ---------------------------------------------------------------------------------------------------------


def _resid_cases(hidden: bool) -> list[tuple[str, torch.Tensor, int]]:
    """(name, resid [n_rows, n_tokens, d_model], chunk): residual streams of the check prompts (BOS dropped), with
    chunk sizes that do not divide the number of tokens, so the last chunk is shorter than the others."""
    model = model_for_checks()
    with torch.no_grad():
        streams = [_lens.collect_resid(model, model.to_tokens(prompt), progress=False) for prompt in VISIBLE_PROMPTS]
        resid = torch.cat(streams, dim=1)[::3]  # rows 0, 3, ..., 30: the functions take any stack of rows
        cases = [(f"the visible prompts ({resid.shape[1]} tokens, every third row), chunk 4", resid, 4),
                 (f"the visible prompts ({resid.shape[1]} tokens, every third row), one chunk", resid, 1000)]
        if hidden:
            hidden_streams = [_lens.collect_resid(model, model.to_tokens(prompt), progress=False)
                              for prompt in HIDDEN_PROMPTS]
            hidden_resid = torch.cat(hidden_streams, dim=1)[::3]
            generator = hidden_generator(11)
            noisy = hidden_resid * (1 + 0.3 * torch.rand(hidden_resid.shape[0], 1, 1, generator=generator))
            chunk = int(torch.randint(2, 6, (1,), generator=generator))
            cases.append((f"hidden prompts, rescaled rows, chunk {chunk}", noisy, chunk))
    return cases


def _chunk_blocks(resid: torch.Tensor, chunk: int):
    return [resid[:, start:start + chunk] for start in range(0, resid.shape[1], chunk)]


def _mean_kl_variant(model, resid, chunk, norm="own", reverse=False, mean_of_chunks=False) -> torch.Tensor:
    """The reference with one mistake switched on, to name it."""
    eps = _lens._norm_eps(model)
    per_chunk = []
    for block in _chunk_blocks(resid, chunk):
        final = _lens.unembed(model, block[-1] / _lens.rms(block[-1], eps))
        rows = []
        for layer in range(block.shape[0]):
            h = block[layer]
            scaled = {"own": h / _lens.rms(h, eps), "none": h, "final": h / _lens.rms(block[-1], eps)}[norm]
            logits = _lens.unembed(model, scaled)
            kl = _lens.kl_from_final(logits, final) if reverse else _lens.kl_from_final(final, logits)
            rows.append(kl.double())
        per_chunk.append(torch.stack(rows))  # [n_rows, tokens in chunk]
    if mean_of_chunks:
        return torch.stack([values.mean(1) for values in per_chunk]).mean(0).float()
    return torch.cat(per_chunk, dim=1).mean(1).float()


def _expect_per_row(got, expected, what: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor of mean KLs, got {type(got).__name__}.")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [n_rows] (one mean over tokens per "
                          f"row of resid), got {tuple(got.shape)}. Average over the token axis only.")
    return got.detach().float().cpu()


@exercise("01", "1.4", "mean_kl_per_layer", "The mean KL per layer over a corpus", points=3,
          reference=_lens.mean_logit_lens_kl)
def mean_kl_per_layer(answer, hidden):
    expect_callable(answer, "mean_kl_per_layer")
    model = model_for_checks()
    cases = _resid_cases(hidden)
    with torch.no_grad():
        for name, resid, chunk in cases:
            what = f"mean_kl_per_layer on {name}"
            expected = _lens.mean_logit_lens_kl(model, resid, chunk)
            got = _expect_per_row(answer(model, resid.clone(), chunk), expected, what)
            if _close(got, expected, atol=1e-3, rtol=1e-3):
                continue
            mistakes = [
                (dict(norm="none"), "you unembedded the raw residual streams: apply the final norm (divide each "
                                    "vector by its own RMS, as model.ln_final does) before model.unembed."),
                (dict(norm="final"), "you divided every row by the final row's RMS: that is the frozen-scale lens "
                                     "of section 4. The logit lens normalises each vector by its own RMS."),
                (dict(reverse=True), "you computed KL(lens || final). We want KL(final || lens), the expectation "
                                     "under the model's final distribution."),
                (dict(mean_of_chunks=True), "you averaged the per-chunk means, which overweights the last, shorter "
                                            "chunk. Sum the KLs over all tokens, then divide by the number of tokens."),
            ]
            for settings, message in mistakes:
                if _close(got, _mean_kl_variant(model, resid, chunk, **settings), atol=1e-3, rtol=1e-3):
                    raise CheckFailed(f"{what}: {message}")
            expect_tensor(got, expected, what, atol=1e-3, rtol=1e-3,
                          hint="for each chunk: final logits from the last row, then each row's logit lens, "
                               "KL summed over tokens; divide the totals by the number of tokens.")
    return f"{len(cases)} stacks of residual streams"

# ---------------------------------------------------------------------------------------------------------
# 1.5 — where do the predictions settle?
# ---------------------------------------------------------------------------------------------------------


def settling_layer_from(mean_kl: torch.Tensor, threshold: float = SETTLING_THRESHOLD) -> int:
    """The first layer from which every later layer's mean KL is below `threshold`."""
    above = (mean_kl >= threshold).nonzero()
    return 0 if len(above) == 0 else int(above[-1]) + 1


def _reference_mean_kl(n_sequences: int) -> torch.Tensor:
    """The logit lens's mean KL per layer on the first `n_sequences` held-out rows the chapter uses."""
    from utils.corpus import corpus_token_batches

    model = model_for_checks()
    tokens = corpus_token_batches(model, n_sequences=N_SEQUENCES, seq_len=SEQ_LEN, seed=CORPUS_SEED)
    held_out = tokens[N_TRAIN_SEQUENCES:N_TRAIN_SEQUENCES + n_sequences]
    resid = _lens.collect_resid(model, held_out, progress=False)
    return _lens.mean_kl_per_layer(model, resid, lambda h, layer: _lens.unembed(model, h / _lens.rms(h)),
                                   progress=False)


# The chapter's corpus split (the notebook uses the same numbers).
CORPUS_SEED = 0
N_SEQUENCES = 112
SEQ_LEN = 64
N_TRAIN_SEQUENCES = 96


def _settling_cases(hidden: bool) -> list[tuple[str, torch.Tensor, float]]:
    """KL curves with a known answer: one that dips below the threshold and comes back up, one that is below it
    everywhere, one that never gets below it before the last row, and (hidden) random ones."""
    cases = [
        ("a curve that dips below 1 at layer 2, rises again, and stays below from layer 5",
         torch.tensor([9.0, 3.0, 0.8, 1.5, 2.0, 0.9, 0.4, 0.2, 0.0]), 1.0),
        ("a curve below the threshold everywhere", torch.tensor([0.3, 0.2, 0.1, 0.0]), 0.5),
        ("a curve that reaches the threshold exactly at layer 4", torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0]), 1.0),
    ]
    if hidden:
        generator = hidden_generator(14)
        for index in range(3):
            n = int(torch.randint(6, 32, (1,), generator=generator))
            curve = torch.rand(n, generator=generator) * 4 * torch.linspace(1.0, 0.0, n)
            cases.append((f"a random curve of {n} layers", curve, 0.5 + index * 0.5))
    return cases


@exercise("01", "1.5", "settling_layer", "Where do the predictions settle?", reference=settling_layer_from)
def settling_layer(answer, hidden):
    expect_callable(answer, "settling_layer")
    cases = _settling_cases(hidden)
    for name, curve, threshold in cases:
        what = f"settling_layer on {name} (threshold {threshold:g})"
        got = answer(curve.clone(), threshold)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, int) or isinstance(got, bool):
            raise CheckFailed(f"{what}: expected an int (a layer index), got {type(got).__name__}.")
        expected = settling_layer_from(curve, threshold)
        if got == expected:
            continue
        below = (curve < threshold).nonzero()
        if len(below) and got == int(below[0]):
            raise CheckFailed(f"{what}: {got} is the first layer below the threshold, but a later layer goes back "
                              f"above it. We want the layer from which the KL *stays* below (expected {expected}).")
        strictly_above = (curve > threshold).nonzero()
        with_equal = 0 if len(strictly_above) == 0 else int(strictly_above[-1]) + 1
        if got == with_equal:
            raise CheckFailed(f"{what}: got {got}, expected {expected}. A layer whose KL equals the threshold is not "
                              f"below it: compare with <, not <=.")
        raise CheckFailed(f"{what}: got {got}, expected {expected} (the first layer l such that every layer from l "
                          f"on is below the threshold).")
    return f"{len(cases)} KL curves"

# ---------------------------------------------------------------------------------------------------------
# 1.6 — a translator in closed form
# ---------------------------------------------------------------------------------------------------------


def _regression_case(n: int, d: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator) * torch.linspace(0.5, 3.0, d) + torch.linspace(-2.0, 4.0, d)
    true_weight = torch.eye(d) + 0.3 * torch.randn(d, d, generator=generator)
    y = x @ true_weight + torch.linspace(1.0, -1.0, d) + 0.5 * torch.randn(n, d, generator=generator)
    return x, y


@exercise("01", "1.6", "fit_translator", "A tuned-lens translator in closed form", points=2,
          reference=_lens.fit_translator)
def fit_translator(answer, hidden):
    expect_callable(answer, "fit_translator")
    cases = [(200, 6, 0.0, 0), (200, 6, 50.0, 1)]
    if hidden:
        cases += [(10, 12, 3.0, 2), (500, 16, 200.0, 3)]
    for i, (n, d, ridge, seed) in enumerate(cases):
        x, y = _regression_case(n, d, seed)
        what = f"case {i} (n={n}, d={d}, ridge={ridge:g})"
        got = answer(x.clone(), y.clone(), ridge)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{what}: return a pair (weight, bias), got {type(got).__name__}.")
        weight, bias = got
        expected_weight, expected_bias = _lens.fit_translator(x, y, ridge)
        for name, value, ref in (("weight", weight, expected_weight), ("bias", bias, expected_bias)):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ref.shape):
                expect_tensor(value, ref, f"{what}, {name}")
        weight, bias = weight.detach().double(), bias.detach().double()
        if _close(weight, expected_weight, atol=1e-3, rtol=1e-3) and _close(bias, expected_bias, atol=1e-3, rtol=1e-3):
            continue
        if _close(weight.T, expected_weight, atol=1e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: your weight is the transpose of the reference. We use row vectors: "
                              f"translated = x @ weight + bias, so weight[i, j] maps input dim i to output dim j.")
        xd, yd = x.double(), y.double()
        xc, yc = xd - xd.mean(0), yd - yd.mean(0)
        eye = torch.eye(d, dtype=torch.float64)
        towards_zero = torch.linalg.solve(xc.T @ xc + ridge * eye, xc.T @ yc)
        if ridge > 0 and _close(weight, towards_zero, atol=1e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: your ridge pulls the weight towards zero. The penalty is ridge * |W - I|^2: "
                              f"add ridge * I to the right-hand side as well, (Xc^T Xc + ridge I) W = Xc^T Yc + ridge I.")
        uncentred = torch.linalg.solve(xd.T @ xd + ridge * eye, xd.T @ yd + ridge * eye)
        if _close(weight, uncentred, atol=1e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: your weight was fitted without an intercept (x and y not centred). Centre "
                              f"both on their means, solve for the weight, then bias = mean(y) - mean(x) @ weight.")
        augmented = torch.cat([xd, torch.ones(n, 1, dtype=torch.float64)], 1)
        target_aug = torch.cat([eye, torch.zeros(1, d, dtype=torch.float64)], 0)
        solution = torch.linalg.solve(augmented.T @ augmented + ridge * torch.eye(d + 1, dtype=torch.float64),
                                      augmented.T @ yd + ridge * target_aug)
        if ridge > 0 and _close(weight, solution[:d], atol=1e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: you penalised the bias too (a column of ones inside the ridge). Only the "
                              f"weight is pulled towards the identity; centre x and y instead.")
        if _close(weight, expected_weight, atol=1e-3, rtol=1e-3):
            expect_tensor(bias.float(), expected_bias, f"{what}, bias", atol=1e-3, rtol=1e-3,
                          hint="bias = mean(y) - mean(x) @ weight.")
        expect_tensor(weight.float(), expected_weight, f"{what}, weight", atol=1e-3, rtol=1e-3,
                      hint="weight = solve(Xc^T Xc + ridge I, Xc^T Yc + ridge I) with Xc, Yc centred.")
    return f"{len(cases)} regressions"


# ---------------------------------------------------------------------------------------------------------
# 1.7 — the tuned lens trained on the KL (Belrose et al.'s objective)
# ---------------------------------------------------------------------------------------------------------


def _train_variant(model, h, h_final, weight, bias, steps, lr, batch_size, reverse=False, norm=True,
                   cycle=True, loss_sum=False):
    """The reference training loop with one mistake switched on, to name it."""
    eps = _lens._norm_eps(model)
    w_u, b_u = model.W_U.detach(), model.b_U.detach()
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    torch.set_grad_enabled(True)  # the caller restores its own setting (see train_translator_kl below)
    for step in range(steps):
        start = (step * batch_size) % h.shape[0] if cycle else 0
        x, y = h[start:start + batch_size], h_final[start:start + batch_size]
        with torch.no_grad():
            log_p = ((y / _lens.rms(y, eps)) @ w_u + b_u).log_softmax(-1)
        translated = x @ weight + bias
        scaled = translated / _lens.rms(translated, eps) if norm else translated
        log_q = (scaled @ w_u + b_u).log_softmax(-1)
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1) if reverse else (log_p.exp() * (log_p - log_q)).sum(-1)
        loss = per_token.sum() if loss_sum else per_token.mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return weight.detach(), bias.detach()


def _train_cases(hidden: bool):
    """(name, layer, steps, lr, batch_size, init seed): few tokens, batches that wrap around the data."""
    cases = [("layer 10, 4 steps of 6 tokens", 10, 4, 1e-2, 6, 0), ("layer 20, 3 steps of 5 tokens", 20, 3, 3e-3, 5, 1)]
    if hidden:
        generator = hidden_generator(17)
        layer = int(torch.randint(1, 29, (1,), generator=generator))
        batch = int(torch.randint(3, 9, (1,), generator=generator))
        cases.append((f"layer {layer}, 5 steps of {batch} tokens", layer, 5, 5e-3, batch, 2))
    return cases


@exercise("01", "1.7", "train_translator_kl", "A tuned lens trained on the KL", points=3,
          reference=_lens.train_translator_kl)
def train_translator_kl(answer, hidden):
    expect_callable(answer, "train_translator_kl")
    model = model_for_checks()
    with torch.no_grad():
        resid = torch.cat([_lens.collect_resid(model, model.to_tokens(prompt), progress=False)
                           for prompt in VISIBLE_PROMPTS], dim=1)
    cases = _train_cases(hidden)
    d = resid.shape[-1]
    previous = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(True)  # training needs gradients, whatever the caller had set
        return _check_training(answer, model, resid, cases, d)
    finally:
        torch.set_grad_enabled(previous)


def _check_training(answer, model, resid, cases, d) -> str:
    for name, layer, steps, lr, batch_size, seed in cases:
        what = f"train_translator_kl on {name} (lr {lr:g})"
        generator = torch.Generator().manual_seed(seed)
        weight0 = torch.eye(d) + 0.01 * torch.randn(d, d, generator=generator)
        bias0 = 0.1 * torch.randn(d, generator=generator)
        h, h_final = resid[layer], resid[-1]
        got = answer(model, h.clone(), h_final.clone(), weight0.clone(), bias0.clone(), steps, lr, batch_size)
        model.zero_grad(set_to_none=True)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{what}: return a pair (weight, bias), got {type(got).__name__}.")
        expected = _lens.train_translator_kl(model, h, h_final, weight0, bias0, steps, lr, batch_size)
        for label, value, ref in zip(("weight", "bias"), got, expected):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ref.shape):
                expect_tensor(value, ref, f"{what}, {label}")
        weight, bias = (value.detach().float().cpu() for value in got)
        tolerance = dict(atol=0.05 * lr, rtol=1e-3)

        def same(pair) -> bool:
            return _close(weight, pair[0], **tolerance) and _close(bias, pair[1], **tolerance)

        if same(expected):
            continue
        if same((weight0, bias0)):
            raise CheckFailed(f"{what}: the translator came back unchanged: no optimiser step reached it (did you "
                              f"call loss.backward() and optimiser.step() on tensors that require grad?).")
        mistakes = [
            (dict(reverse=True), "you minimised KL(lens || final). Belrose et al. minimise KL(final || lens): "
                                 "sum p_final * (log p_final - log p_lens)."),
            (dict(norm=False), "you unembedded the translated vector without the final norm: divide it by its own "
                               "RMS first (the tuned lens is unembed(ln_final(h W + b)))."),
            (dict(cycle=False), "every step used the same first batch. Step s should use the tokens starting at "
                                "(s * batch_size) % n_tokens."),
            (dict(loss_sum=True), "your loss sums the KL over tokens; average it (Adam is nearly scale-free, but "
                                  "not exactly, and the mean is the objective)."),
        ]
        for settings, message in mistakes:
            if same(_train_variant(model, h, h_final, weight0, bias0, steps, lr, batch_size, **settings)):
                raise CheckFailed(f"{what}: {message}")
        if same(_train_variant(model, h, h_final, weight0, bias0, steps - 1, lr, batch_size)):
            raise CheckFailed(f"{what}: one Adam step too few: take exactly `steps` steps.")
        expect_tensor(weight, expected[0], f"{what}, weight", **tolerance,
                      hint="Adam on [weight, bias] only (model frozen), KL(final || tuned lens) averaged over the "
                           "batch, step s on tokens (s * batch_size) % n_tokens onwards.")
        expect_tensor(bias, expected[1], f"{what}, bias", **tolerance)
    return f"{len(cases)} training runs"

# ---------------------------------------------------------------------------------------------------------
# 1.8 — the linearised lens
# ---------------------------------------------------------------------------------------------------------


def _linearised_mistakes(model, cache, got, expected, what) -> None:
    n_layers = model.cfg.n_layers
    stack = _lens.resid_stack(cache, n_layers)
    if _close(got, _lens.logit_lens(model, cache)):
        raise CheckFailed(f"{what}: this is the exact logit lens: you recomputed each layer's own norm scale. "
                          f"Divide every layer by the scale of the *final* residual stream instead.")
    if _close(got, model.unembed(stack)):
        raise CheckFailed(f"{what}: you did not divide by any scale. Divide every layer's residual by the "
                          f"final layer's RMS, then unembed.")
    if _close(got, model.unembed(stack * _lens.rms(stack[-1]))):
        raise CheckFailed(f"{what}: you multiplied by the final scale; RMSNorm divides by it.")
    if _close(got, model.unembed(stack / _lens.rms(stack[0]))):
        raise CheckFailed(f"{what}: you used the embedding's scale (layer 0) for every layer; freeze the "
                          f"scale of the final residual stream (blocks.{n_layers - 1}.hook_resid_post).")
    expect_tensor(got, expected, what, atol=1e-3, hint="logits = unembed(h_l / rms(h_final)) for every layer l.")


@exercise("01", "1.8", "linearised_logit_lens", "Freezing the final norm's scale", points=2,
          reference=_lens.linearised_logit_lens)
def linearised_logit_lens(answer, hidden):
    expect_callable(answer, "linearised_logit_lens")
    return _check_lens(answer, hidden, _lens.linearised_logit_lens, _linearised_mistakes)


# ---------------------------------------------------------------------------------------------------------
# 1.9 — the linearisation error per layer
# ---------------------------------------------------------------------------------------------------------


def _linerr_variant(model, resid, chunk, reverse=False, against_final=False, inverse=False) -> torch.Tensor:
    eps = _lens._norm_eps(model)
    totals = torch.zeros(resid.shape[0], dtype=torch.float64)
    for block in _chunk_blocks(resid, chunk):
        final_scale = _lens.rms(block[-1], eps)
        final = _lens.unembed(model, block[-1] / final_scale)
        for layer in range(block.shape[0]):
            h = block[layer]
            exact = _lens.unembed(model, h / _lens.rms(h, eps))
            frozen = _lens.unembed(model, h * final_scale / _lens.rms(h, eps) ** 2 if inverse else h / final_scale)
            if against_final:
                kl = _lens.kl_from_final(final, frozen)
            else:
                kl = _lens.kl_from_final(frozen, exact) if reverse else _lens.kl_from_final(exact, frozen)
            totals[layer] += kl.double().sum()
    return (totals / resid.shape[1]).float()


@exercise("01", "1.9", "linearisation_error", "The linearisation error per layer", points=3,
          reference=_lens.linearisation_error)
def linearisation_error(answer, hidden):
    expect_callable(answer, "linearisation_error")
    model = model_for_checks()
    cases = _resid_cases(hidden)
    with torch.no_grad():
        for name, resid, chunk in cases:
            what = f"linearisation_error on {name}"
            expected = _lens.linearisation_error(model, resid, chunk)
            got = _expect_per_row(answer(model, resid.clone(), chunk), expected, what)
            if _close(got, expected, atol=1e-3, rtol=1e-3):
                continue
            if float(got.abs().max()) < 1e-6:
                raise CheckFailed(f"{what}: every row is 0: your frozen lens recomputes each row's own scale. "
                                  f"Divide each row by the RMS of the *last* row (the final residual stream).")
            mistakes = [
                (dict(reverse=True), "you computed KL(frozen || exact). We measure the error from the exact lens: "
                                     "KL(exact lens || frozen lens)."),
                (dict(against_final=True), "you compared the frozen lens with the model's final output; the "
                                           "linearisation error compares it with the exact logit lens at the same row."),
                (dict(inverse=True), "your frozen lens scales the wrong way: it is unembed(h_l / rms(h_final)), "
                                     "i.e. the exact logits times rms(h_l) / rms(h_final)."),
            ]
            for settings, message in mistakes:
                if _close(got, _linerr_variant(model, resid, chunk, **settings), atol=1e-3, rtol=1e-3):
                    raise CheckFailed(f"{what}: {message}")
            if _close(got, _mean_kl_variant(model, resid, chunk, mean_of_chunks=False, norm="final"), atol=1e-3,
                      rtol=1e-3):
                raise CheckFailed(f"{what}: this is KL(final || frozen lens); compare the frozen lens with the exact "
                                  f"logit lens of the same row instead.")
            expect_tensor(got, expected, what, atol=1e-3, rtol=1e-3,
                          hint="per chunk: exact = unembed of each row over its own RMS, frozen = over the last "
                               "row's RMS; sum KL(exact || frozen) over tokens, divide by the number of tokens.")
    return f"{len(cases)} stacks of residual streams"

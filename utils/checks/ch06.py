"""Checks for chapter 06 — Reading the weights.

References come from `utils.circuits`. Every check runs the learner's function on small synthetic tensors whose
right answer is known (no model is loaded, so the checks take milliseconds), and compares a wrong answer with the
usual mistakes (tiling instead of grouping key/value heads, forgetting the embedding row or the final norm's scale,
taking eigenvalues of the wrong product) to say which one it is.
"""

from __future__ import annotations

import torch

from utils import circuits as _circuits
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor
from utils.lens import rms as _rms


def _close(got, expected, atol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    if got.is_complex() or expected.is_complex():
        return torch.allclose(got.detach().to(torch.complex64), expected.to(torch.complex64), atol=atol, rtol=1e-4)
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.to(torch.float32), atol=atol, rtol=1e-4)


def _expect_shape(got, shape: tuple, what: str, hint: str = "") -> None:
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor of shape {shape}, got {type(got).__name__}.")
    if tuple(got.shape) != tuple(shape):
        raise CheckFailed(f"{what}: expected shape {tuple(shape)}, got {tuple(got.shape)}.{' ' + hint if hint else ''}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# 6.1 — grouped key/value heads
# ---------------------------------------------------------------------------------------------------------


@exercise("06", "6.1", "expand_kv_heads", "One key/value weight per query head")
def expand_kv_heads(answer, hidden):
    expect_callable(answer, "expand_kv_heads")
    cases = [((3, 5, 4), 9, 0), ((2, 3, 6, 2), 6, 1)]  # (W shape with the kv axis at -3, n_heads, seed)
    if hidden:
        cases += [((4, 4, 3), 4, 2), ((1, 2, 3, 3), 8, 3)]
    for shape, n_heads, seed in cases:
        W = torch.randn(*shape, generator=_gen(seed))
        what = f"W of shape {shape} (n_kv_heads = {shape[-3]}), n_heads = {n_heads}"
        got = answer(W.clone(), n_heads)
        expected = _circuits.expand_kv_heads(W, n_heads)
        _expect_shape(got, tuple(expected.shape), what, "Repeat along the key/value-head axis (the third from the "
                      "end) up to n_heads.")
        if _close(got, expected):
            continue
        n_kv = shape[-3]
        if _close(got, W.repeat(*([1] * (W.ndim - 3)), n_heads // n_kv, 1, 1)):
            raise CheckFailed(f"{what}: you tiled the key/value heads (0, 1, 2, 0, 1, 2, ...). Query heads that share a "
                              f"key/value head are consecutive: head h reads h // (n_heads // n_kv_heads), so the "
                              f"order is 0, 0, 0, 1, 1, 1, ... (repeat_interleave).")
        expect_tensor(got, expected, what, hint="query head h gets key/value head h // (n_heads // n_kv_heads).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.2 — hook_z from the weights
# ---------------------------------------------------------------------------------------------------------


def _pattern(n_batch: int, n_heads: int, n_pos: int, generator) -> torch.Tensor:
    scores = 2.0 * torch.randn(n_batch, n_heads, n_pos, n_pos, generator=generator)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@exercise("06", "6.2", "z_from_weights", "hook_z from the weights", points=2)
def z_from_weights(answer, hidden):
    expect_callable(answer, "z_from_weights")
    cases = [(2, 6, 3, 5, 8, 4, 0), (1, 4, 2, 7, 6, 3, 1)]  # batch, heads, kv heads, pos, d_model, d_head, seed
    if hidden:
        cases += [(3, 3, 3, 4, 5, 2, 2), (2, 9, 3, 6, 12, 4, 3)]
    for n_batch, n_heads, n_kv, n_pos, d_model, d_head, seed in cases:
        generator = _gen(seed)
        pattern = _pattern(n_batch, n_heads, n_pos, generator)
        normalized = torch.randn(n_batch, n_pos, d_model, generator=generator)
        W_V = torch.randn(n_kv, d_model, d_head, generator=generator)
        what = f"{n_heads} query heads sharing {n_kv} key/value heads (batch {n_batch}, {n_pos} positions)"
        got = answer(pattern.clone(), normalized.clone(), W_V.clone())
        expected = _circuits.z_from_weights(pattern, normalized, W_V)
        _expect_shape(got, tuple(expected.shape), what, "hook_z is [batch, pos, n_heads, d_head], one slice per "
                      "*query* head (expand W_V first).")
        if _close(got, expected):
            continue
        values_tiled = torch.einsum("bpd,hde->bphe", normalized, W_V.repeat(n_heads // n_kv, 1, 1))
        if n_kv < n_heads and _close(got, torch.einsum("bhqk,bkhe->bqhe", pattern, values_tiled)):
            raise CheckFailed(f"{what}: you tiled W_V (0, 1, 2, 0, 1, 2, ...); consecutive query heads share a "
                              f"key/value head (repeat_interleave).")
        values = torch.einsum("bpd,hde->bphe", normalized, _circuits.expand_kv_heads(W_V, n_heads))
        if _close(got, torch.einsum("bhkq,bkhe->bqhe", pattern, values)):
            raise CheckFailed(f"{what}: you swapped the query and key axes of the pattern. pattern[b, h, q, k] is how "
                              f"much query q attends to key k: z[b, q, h] = sum_k pattern[b, h, q, k] v[b, k, h].")
        expect_tensor(got, expected, what, hint="v = normalized @ W_V (per query head), then z[q] = sum over keys k "
                      "of pattern[q, k] * v[k].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.3 — the residual stream as a sum
# ---------------------------------------------------------------------------------------------------------


def _fake_cache(n_layers: int, n_batch: int, n_pos: int, d_model: int, seed: int) -> dict:
    generator = _gen(seed)
    cache = {"blocks.0.hook_resid_pre": torch.randn(n_batch, n_pos, d_model, generator=generator)}
    for layer in range(n_layers):
        for part in ("attn", "mlp"):
            cache[f"blocks.{layer}.hook_{part}_out"] = torch.randn(n_batch, n_pos, d_model, generator=generator)
        # decoys: other hooks a learner might use by mistake
        cache[f"blocks.{layer}.hook_resid_post"] = torch.randn(n_batch, n_pos, d_model, generator=generator)
        cache[f"blocks.{layer}.hook_resid_mid"] = torch.randn(n_batch, n_pos, d_model, generator=generator)
    return cache


@exercise("06", "6.3", "residual_components", "The residual stream as a sum")
def residual_components(answer, hidden):
    expect_callable(answer, "residual_components")
    cases = [(2, 3, 5, 4, -1, 0), (3, 2, 4, 6, 2, 1)]  # layers, batch, pos, d_model, pos index, seed
    if hidden:
        cases += [(1, 1, 3, 5, 0, 2), (4, 2, 6, 3, -2, 3)]
    for n_layers, n_batch, n_pos, d_model, pos, seed in cases:
        cache = _fake_cache(n_layers, n_batch, n_pos, d_model, seed)
        what = f"a cache with {n_layers} layers, position {pos}"
        got = answer(dict(cache), n_layers, pos)
        expected = _circuits.residual_components(cache, n_layers, pos)
        if isinstance(got, torch.Tensor) and got.ndim == 4:
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}: keep only "
                              f"position `pos` of each activation ([:, pos]).")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (2 * n_layers, n_batch, d_model):
            raise CheckFailed(f"{what}: {2 * n_layers} rows instead of {2 * n_layers + 1}: the first row is the "
                              f"embedding (blocks.0.hook_resid_pre), what the residual stream holds before any block.")
        _expect_shape(got, tuple(expected.shape), what, "One row per piece: the embedding, then attn_out and "
                      "mlp_out of every layer.")
        if _close(got, expected):
            continue
        blocked = torch.cat([expected[:1], expected[1::2], expected[2::2]])
        if _close(got, blocked):
            raise CheckFailed(f"{what}: your rows are all attention outputs, then all MLP outputs. Put them in the "
                              f"order they are added: embed, 0_attn, 0_mlp, 1_attn, 1_mlp, ...")
        if _close(got[1:], torch.stack([cache[f"blocks.{layer}.hook_{name}"][:, pos] for layer in range(n_layers)
                                        for name in ("resid_mid", "resid_post")])):
            raise CheckFailed(f"{what}: you used resid_mid / resid_post, which are running totals. The pieces are "
                              f"what each sublayer *adds*: hook_attn_out and hook_mlp_out.")
        expect_tensor(got, expected, what, hint="rows: blocks.0.hook_resid_pre, then blocks.{l}.hook_attn_out, "
                      "blocks.{l}.hook_mlp_out for each layer l, each at [:, pos].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.4 — direct logit attribution
# ---------------------------------------------------------------------------------------------------------


@exercise("06", "6.4", "direct_logit_attribution", "Direct logit attribution", points=2)
def direct_logit_attribution(answer, hidden):
    expect_callable(answer, "direct_logit_attribution")
    cases = [((5,), 3, 8, 0), ((2, 4), 2, 6, 1)]  # leading component shape, batch, d_model, seed
    if hidden:
        cases += [((7,), 1, 5, 2), ((3,), 4, 10, 3)]
    for lead, n_batch, d_model, seed in cases:
        generator = _gen(seed)
        components = torch.randn(*lead, n_batch, d_model, generator=generator)
        final = 3.0 * torch.randn(n_batch, d_model, generator=generator)
        direction = torch.randn(d_model, n_batch, generator=generator)
        what = f"components {tuple(components.shape)}, direction {tuple(direction.shape)}"
        got = answer(components.clone(), final.clone(), direction.clone())
        expected = _circuits.direct_logit_attribution(components, final, direction)
        _expect_shape(got, tuple(expected.shape), what, "One number per component and prompt: don't sum or average "
                      "over the batch.")
        if _close(got, expected):
            continue
        if _close(got, (components * direction.T).sum(-1)):
            raise CheckFailed(f"{what}: you left out the final norm. Divide each component by the final residual's "
                              f"root mean square (rms(final_resid), frozen: the same scale for every component).")
        if _close(got, ((components / _rms(components)) * direction.T).sum(-1)):
            raise CheckFailed(f"{what}: you normalised each component by its own rms. The norm divides the *sum* "
                              f"(the final residual) once, so every piece is divided by rms(final_resid); that keeps "
                              f"the pieces summing to the total.")
        if _close(got, -expected):
            raise CheckFailed(f"{what}: wrong sign.")
        expect_tensor(got, expected, what, hint="(components / rms(final_resid)) . direction[:, b] for prompt b.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.5 — factored SVD
# ---------------------------------------------------------------------------------------------------------


@exercise("06", "6.5", "factored_svd", "SVD of a low-rank product without forming it", points=2)
def factored_svd(answer, hidden):
    expect_callable(answer, "factored_svd")
    cases = [((), 12, 3, 10, 0), ((2,), 9, 4, 15, 1)]  # batch shape, m, r, n, seed
    if hidden:
        cases += [((3, 2), 7, 2, 7, 2), ((), 40, 5, 30, 3)]
    for lead, m, r, n, seed in cases:
        generator = _gen(seed)
        A = torch.randn(*lead, m, r, generator=generator)
        B = torch.randn(*lead, r, n, generator=generator)
        what = f"A {tuple(A.shape)} @ B {tuple(B.shape)}"
        got = answer(A.clone(), B.clone())
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise CheckFailed(f"{what}: return the triple (U, S, Vh), got {type(got).__name__}.")
        U, S, Vh = got
        expected_S = torch.linalg.svdvals(A @ B)[..., :r]
        if isinstance(U, torch.Tensor) and tuple(U.shape) == (*lead, m, m):
            raise CheckFailed(f"{what}: U is square {tuple(U.shape)}: return the thin SVD, U [..., m, r] with "
                              f"r = {r} columns (the product has rank at most r).")
        _expect_shape(U, (*lead, m, r), what + ", U", "U has one column per factor dimension r.")
        _expect_shape(S, (*lead, r), what + ", S")
        _expect_shape(Vh, (*lead, r, n), what + ", Vh", "Vh has one row per factor dimension r.")
        eye = torch.eye(r).expand(*lead, r, r)
        if not _close(U.transpose(-1, -2) @ U, eye, atol=1e-3):
            raise CheckFailed(f"{what}: the columns of U are not orthonormal (U^T U != I). Orthonormalise A's columns "
                              f"(QR) before taking the SVD of the small core.")
        if not _close(Vh @ Vh.transpose(-1, -2), eye, atol=1e-3):
            raise CheckFailed(f"{what}: the rows of Vh are not orthonormal (Vh Vh^T != I). Orthonormalise B's rows "
                              f"(QR of B^T).")
        if not (S[..., :-1] >= S[..., 1:] - 1e-5).all():
            raise CheckFailed(f"{what}: singular values must be in descending order.")
        expect_tensor(S, expected_S, what + ", singular values", atol=1e-3, rtol=1e-3,
                      hint="the singular values of the small core R_A @ R_B^T are those of A @ B.")
        expect_tensor(U @ torch.diag_embed(S) @ Vh, A @ B, what + ", U diag(S) Vh vs A @ B", atol=1e-3, rtol=1e-3,
                      hint="rotate the core's singular vectors back: U = Q_A @ U_core, Vh = Vh_core @ Q_B^T.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.6 — copying score
# ---------------------------------------------------------------------------------------------------------


@exercise("06", "6.6", "copying_score", "The eigenvalue copying score")
def copying_score(answer, hidden):
    expect_callable(answer, "copying_score")
    generator = _gen(0)
    mixed = torch.complex(torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator))
    cases = [("positive reals [1, 2, 3]", torch.tensor([1.0, 2.0, 3.0]).to(torch.complex64)),
             ("random complex [4, 6]", mixed),
             ("mostly negative with a conjugate pair", torch.tensor([-3.0 + 0j, -1.0 + 0j, 0.5 + 2j, 0.5 - 2j]))]
    if hidden:
        cases += [("random complex [2, 3, 5]", torch.complex(torch.randn(2, 3, 5, generator=generator),
                                                            torch.randn(2, 3, 5, generator=generator))),
                  ("pure imaginary pair", torch.tensor([1j, -1j]))]
    for what, eigenvalues in cases:
        got = answer(eigenvalues.clone())
        expected = _circuits.copying_score(eigenvalues)
        _expect_shape(got, tuple(expected.shape), what, "One score per matrix: reduce over the last axis only.")
        if got.is_complex():
            raise CheckFailed(f"{what}: the score is a real number; take the real part of the eigenvalues.")
        if _close(got, expected, atol=1e-5):
            continue
        real = eigenvalues.real
        if _close(got, real.abs().sum(-1) / eigenvalues.abs().sum(-1), atol=1e-5):
            raise CheckFailed(f"{what}: you took |Re lambda| in the numerator, so a suppressing head scores like a "
                              f"copying one. Sum the signed real parts.")
        if _close(got, real.sum(-1) / real.abs().sum(-1), atol=1e-5):
            raise CheckFailed(f"{what}: you divided by sum |Re lambda|; divide by sum |lambda| (the modulus), so "
                              f"eigenvalues with a large imaginary part (rotations, not copying) lower the score.")
        expect_tensor(got, expected, what, atol=1e-5, hint="sum(Re lambda) / sum(|lambda|) over the last axis.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.7 — eigenvalues of the full OV circuit, cheaply
# ---------------------------------------------------------------------------------------------------------


def _same_spectrum(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-3) -> bool:
    """Equal as multisets, up to order (compares sorted moduli, real parts and |imaginary parts|)."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    got = got.detach().to(torch.complex64)
    expected = expected.to(torch.complex64)
    for f in (torch.abs, lambda x: x.real, lambda x: x.imag.abs()):
        if not torch.allclose(f(got).sort(-1).values, f(expected).sort(-1).values, atol=atol, rtol=1e-3):
            return False
    return True


@exercise("06", "6.7", "ov_eigenvalues", "Eigenvalues of the full OV circuit, cheaply", points=2)
def ov_eigenvalues(answer, hidden):
    expect_callable(answer, "ov_eigenvalues")
    cases = [((), 20, 6, 2, 0), ((3,), 30, 8, 3, 1)]  # head batch, d_vocab, d_model, d_head, seed
    if hidden:
        cases += [((2, 2), 15, 5, 2, 2), ((), 50, 10, 4, 3)]
    for lead, d_vocab, d_model, d_head, seed in cases:
        generator = _gen(seed)
        W_E = torch.randn(d_vocab, d_model, generator=generator)
        W_U = torch.randn(d_model, d_vocab, generator=generator)
        W_V = torch.randn(*lead, d_model, d_head, generator=generator)
        W_O = torch.randn(*lead, d_head, d_model, generator=generator)
        W_UE = W_U @ W_E
        what = f"heads {lead or '(one)'}, d_model {d_model}, d_head {d_head}"
        got = answer(W_V.clone(), W_O.clone(), W_UE.clone())
        expected = _circuits.ov_eigenvalues(W_V, W_O, W_UE)
        if isinstance(got, torch.Tensor) and got.shape[-1:] == (d_model,):
            raise CheckFailed(f"{what}: you returned {d_model} eigenvalues (a d_model x d_model product). Multiply in "
                              f"the order W_O @ W_UE @ W_V to get the d_head x d_head matrix with the same nonzero "
                              f"eigenvalues.")
        _expect_shape(got, tuple(expected.shape), what, "d_head eigenvalues per head.")
        if not got.is_complex():
            raise CheckFailed(f"{what}: eigenvalues of a non-symmetric matrix are complex: use torch.linalg.eigvals "
                              f"(not eigvalsh, and keep the imaginary parts).")
        if _same_spectrum(got, expected):
            continue
        if _same_spectrum(got, torch.linalg.eigvals(W_O @ W_V)):
            raise CheckFailed(f"{what}: those are the eigenvalues of W_OV alone. The copying score reads the circuit "
                              f"from tokens to logits: include W_UE = W_U @ W_E between W_O and W_V.")
        if _same_spectrum(got, torch.linalg.eigvals(W_O @ W_UE.transpose(-1, -2) @ W_V)):
            raise CheckFailed(f"{what}: you used W_UE transposed (W_E^T W_U^T); the argument is already W_U @ W_E.")
        full = torch.linalg.eigvals(W_E @ W_V @ W_O @ W_U)
        order = full.abs().argsort(dim=-1, descending=True)[..., :d_head]
        raise CheckFailed(f"{what}: your eigenvalues differ from the nonzero eigenvalues of W_E W_V W_O W_U (largest "
                          f"moduli {[round(v, 3) for v in full.gather(-1, order).abs().flatten()[:d_head].tolist()]}). Compute "
                          f"eigvals(W_O @ W_UE @ W_V).")
    return f"{len(cases)} cases"

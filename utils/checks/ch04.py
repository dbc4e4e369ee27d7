"""Checks for chapter 04 — Activation patching, path patching, attribution patching and the IOI circuit.

References come from `utils.patching` (later chapters import the same functions). The hooks and the small pieces
are checked on synthetic tensors whose right answer is known; the grids, path patching, attribution patching and
the circuit run on SmolLM2 with a few IOI prompts and their ABC versions (hidden cases: other prompts, other
layers and heads, drawn afresh by each grading run). When an answer is wrong, each check compares it with the
usual mistakes (wrong sign, wrong direction of the patch, wrong block layout, heads not frozen, gradients cut at
each head, ...) to say which one it is.
"""

from __future__ import annotations

from functools import partial

import torch

from utils import ablation as _ablation
from utils import patching as _patching
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor, hidden_generator
from utils.models import model_for_checks


def _close(got, expected, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.to("cpu", torch.float32),
                          atol=atol, rtol=rtol)


def _shape(got, expected, what: str, hint: str) -> None:
    if got is None:
        raise CheckFailed(f"{what}: your function returned None. Return the tensor.")
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}")


def _draw(salt: int, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=hidden_generator(salt)))


def _ioi(n_prompts: int, seed: int):
    """SmolLM2, `n_prompts` IOI prompts, their ABC versions and the logit-difference readout."""
    from utils.ioi import make_ioi_dataset

    model = model_for_checks()
    data = make_ioi_dataset(model, n_prompts=n_prompts, seed=seed)
    abc = data.abc(model, seed=seed + 1)
    readout = partial(_patching.logit_diff_readout,
                      direction=_ablation.logit_diff_direction(model, data.io_tokens, data.s_tokens))
    return model, data, abc, readout


MODEL_TOL = dict(atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------------------
# 4.1 — the logit difference
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.1", "ioi_logit_diff", "The logit difference logit(IO) - logit(S)",
          reference=_patching.ioi_logit_diff)
def ioi_logit_diff(answer, hidden):
    expect_callable(answer, "ioi_logit_diff")
    cases = [(3, 5, 11, 0), (4, 2, 7, 1)]  # (batch, pos, vocab, seed)
    if hidden:
        cases += [(5, 6, 13, _draw(40, 2, 10**6)), (1, 3, 4, 2)]
    for batch, n_pos, vocab, seed in cases:
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(batch, n_pos, vocab, generator=generator)
        io = torch.randint(0, vocab, (batch,), generator=generator)
        s = (io + 1 + torch.randint(0, vocab - 1, (batch,), generator=generator)) % vocab
        what = f"logits [batch={batch}, pos={n_pos}, vocab={vocab}]"
        got = answer(logits.clone(), io.clone(), s.clone())
        expected = _patching.ioi_logit_diff(logits, io, s)
        if isinstance(got, torch.Tensor) and got.ndim == 2 and batch > 1:
            raise CheckFailed(f"{what}: shape {tuple(got.shape)}: `last[:, io_tokens]` pairs every prompt with every "
                              f"prompt's name. Index the prompt and its own token together: "
                              f"last[arange(batch), io_tokens].")
        if isinstance(got, torch.Tensor) and got.ndim == 0 and batch > 1:
            raise CheckFailed(f"{what}: you returned one number; return one logit difference per prompt, [batch].")
        _shape(got, expected, what, "One logit difference per prompt: [batch].")
        if _close(got, expected):
            continue
        rows = torch.arange(batch)
        if _close(got, -expected):
            raise CheckFailed(f"{what}: wrong sign: logit(IO) - logit(S), so that a model that prefers IO scores "
                              f"above 0.")
        if _close(got, logits[rows, 0, io] - logits[rows, 0, s]):
            raise CheckFailed(f"{what}: you read position 0. The model predicts the answer at the last position, -1.")
        if _close(got, logits[rows, -1, io]):
            raise CheckFailed(f"{what}: you returned logit(IO) alone; subtract logit(S).")
        expect_tensor(got, expected, what, hint="logits[arange(batch), -1, io] - logits[arange(batch), -1, s].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 4.2 — the normalised metric
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.2", "normalised_metric", "A metric from 0 (corrupted) to 1 (clean)",
          reference=_patching.normalised_metric)
def normalised_metric(answer, hidden):
    expect_callable(answer, "normalised_metric")
    generator = torch.Generator().manual_seed(0)
    cases = [(torch.tensor([3.5, 0.2, 1.85, -1.0]), 3.5, 0.2), (3 * torch.randn(2, 5, generator=generator), 2.0, -1.0)]
    if hidden:
        cases += [(torch.randn(30, 9, generator=generator), 4.2, -0.7), (torch.tensor(1.0), 1.5, 0.5)]
    for i, (value, clean, corrupted) in enumerate(cases):
        what = f"case {i} (clean = {clean}, corrupted = {corrupted}, values of shape {tuple(value.shape)})"
        got = answer(value.clone(), torch.tensor(clean), torch.tensor(corrupted))
        expected = _patching.normalised_metric(value, clean, corrupted)
        _shape(got, expected, what, "Keep the shape of `value`: the formula works elementwise.")
        if _close(got, expected):
            continue
        if _close(got, (value - clean) / (corrupted - clean)):
            raise CheckFailed(f"{what}: your scale is flipped: the clean run must score 1 and the corrupted run 0, "
                              f"i.e. (value - corrupted) / (clean - corrupted).")
        if _close(got, value / clean):
            raise CheckFailed(f"{what}: you divided by the clean value only. Subtract the corrupted baseline first, "
                              f"so that the corrupted run scores 0.")
        if _close(got, (value - corrupted) / clean):
            raise CheckFailed(f"{what}: divide by the gap (clean - corrupted), not by clean alone, so that the clean "
                              f"run scores exactly 1.")
        expect_tensor(got, expected, what, hint="(value - corrupted) / (clean - corrupted).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 4.3 — patch one position per copy (a position per prompt)
# ---------------------------------------------------------------------------------------------------------


def _position_cases(hidden: bool):
    cases = [(3, 6, 4, 2, 0), (2, 5, 3, 3, 1)]  # (batch, pos, d, n_copies, seed)
    if hidden:
        cases += [(4, 7, 3, 4, _draw(41, 2, 10**6)), (1, 4, 5, 2, 3)]
    for batch, n_pos, d, n_copies, seed in cases:
        generator = torch.Generator().manual_seed(seed)
        corrupted = torch.randn(batch, n_pos, d, generator=generator)
        clean = torch.randn(batch, n_pos, d, generator=generator)
        positions = torch.stack([torch.randperm(n_pos, generator=generator)[:batch] if batch <= n_pos else
                                 torch.randint(0, n_pos, (batch,), generator=generator) for _ in range(n_copies)])
        yield (f"batch={batch}, pos={n_pos}, positions={positions.tolist()}", corrupted.repeat(n_copies, 1, 1), clean,
               positions)


@exercise("04", "4.3", "patch_each_position", "Patch one position per prompt in each copy of the batch", points=2,
          reference=_patching.patch_each_position)
def patch_each_position(answer, hidden):
    expect_callable(answer, "patch_each_position")
    for what, act, clean, positions in _position_cases(hidden):
        got = answer(act.clone(), None, clean.clone(), positions.clone())
        expected = _patching.patch_each_position(act.clone(), None, clean, positions)
        _shape(got, expected, what, "Return the whole (patched) activation, [n_copies * batch, pos, d].")
        if _close(got, expected):
            continue
        batch, n_copies = clean.shape[0], positions.shape[0]
        if _close(got, act):
            raise CheckFailed(f"{what}: nothing was patched. Assign into the activation (act[rows, positions] = ...) "
                              f"and return it.")
        interleaved = act.clone()
        for i in range(n_copies):
            for b in range(batch):
                interleaved[b * n_copies + i, positions[i, b]] = clean[b, positions[i, b]]
        if _close(got, interleaved):
            raise CheckFailed(f"{what}: wrong row layout. The copies are stacked as blocks (act.repeat(n_copies, 1, "
                              f"1)): copy i is rows i * batch .. (i + 1) * batch, not every n_copies-th row.")
        first = act.clone()
        for i in range(n_copies):
            first[i * batch:(i + 1) * batch, positions[i, 0]] = clean[:, positions[i, 0]]
        if _close(got, first):
            raise CheckFailed(f"{what}: every prompt was patched at the first prompt's position. Each prompt has its "
                              f"own position, positions[i, b] (IO sits at 2 in ABBA prompts and at 4 in BABA ones).")
        crossed = act.clone()
        for i in range(n_copies):
            for b in range(batch):
                crossed[i * batch + b, positions[i]] = clean[b, positions[i]]
        if _close(got, crossed):
            raise CheckFailed(f"{what}: prompt b was patched at every prompt's position. Pair prompt b with its own "
                              f"position: act[i * batch + arange(batch), positions[i]].")
        expect_tensor(got, expected, what, hint="for copy i: rows = i * batch + arange(batch); "
                      "act[rows, positions[i]] = clean_act[arange(batch), positions[i]].")
    return "synthetic activations"


# ---------------------------------------------------------------------------------------------------------
# 4.4 — the residual-stream grid (layer x position), on SmolLM2
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.4", "patch_resid_grid", "Patch the residual stream, layer by layer and position by position",
          points=3, reference=_patching.patch_resid_grid)
def patch_resid_grid(answer, hidden):
    expect_callable(answer, "patch_resid_grid")
    seeds = [(2, 5, [0, 12, 22])] + ([(3, _draw(42, 100, 10**6), [_draw(43, 1, 29), 29])] if hidden else [])
    for n_prompts, seed, layers in seeds:
        model, data, abc, readout = _ioi(n_prompts, seed)
        positions = torch.stack([data.positions[role] for role in ("IO", "S2", "END")])
        what = f"{n_prompts} prompts, layers {layers}, positions IO / S2 / END"
        got = answer(model, data.tokens, abc.tokens, readout, positions.clone(), list(layers))
        model.reset_hooks()
        expected = _patching.patch_resid_grid(model, data.tokens, abc.tokens, readout, positions, layers)
        _shape(got, expected, what, "[len(layers), n_copies, batch]: one readout per layer, copy and prompt.")
        if _close(got, expected, **MODEL_TOL):
            continue
        if _close(got, _patching.patch_resid_grid(model, abc.tokens, data.tokens, readout, positions, layers),
                  **MODEL_TOL):
            raise CheckFailed(f"{what}: you patched the other way round (ABC activations into the clean run). Run "
                              f"the corrupted (ABC) prompts and copy in the clean activations.")
        abc_ld = readout(_ablation.final_resid(model, abc.tokens))
        if _close(got, abc_ld.expand_as(expected), **MODEL_TOL):
            raise CheckFailed(f"{what}: every entry is the unpatched ABC run. Did the hook modify and return the "
                              f"activation, on blocks.{{layer}}.hook_resid_pre?")
        later = [layer + 1 for layer in layers if layer + 1 < model.cfg.n_layers]
        if len(later) == len(layers) and _close(got, _patching.patch_resid_grid(model, data.tokens, abc.tokens,
                                                                                 readout, positions, later), **MODEL_TOL):
            raise CheckFailed(f"{what}: your layer l is the reference's layer l + 1: patch hook_resid_pre (the "
                              f"stream *entering* block l), not hook_resid_post.")
        expect_tensor(got, expected, what, **MODEL_TOL, hint="for each layer: the ABC run's resid_pre repeated "
                      "n_copies times, your patch_each_position hook, then the readout of the final residual.")
    return f"{len(seeds)} prompt sets"


# ---------------------------------------------------------------------------------------------------------
# 4.5 — patch one head per copy
# ---------------------------------------------------------------------------------------------------------


def _head_cases(hidden: bool):
    cases = [(2, 4, 3, 5, 0), (3, 3, 4, 2, 1)]  # (batch, pos, heads, d_head, seed)
    if hidden:
        cases += [(1, 5, 9, 3, 2), (4, 2, 2, 4, 3)]
    for batch, n_pos, n_heads, d_head, seed in cases:
        generator = torch.Generator().manual_seed(seed)
        corrupted = torch.randn(batch, n_pos, n_heads, d_head, generator=generator)
        clean = torch.randn(batch, n_pos, n_heads, d_head, generator=generator)
        yield f"batch={batch}, pos={n_pos}, n_heads={n_heads}", corrupted.repeat(n_heads, 1, 1, 1), clean


@exercise("04", "4.5", "patch_each_head", "Patch one head in each copy of the batch", points=2,
          reference=_patching.patch_each_head)
def patch_each_head(answer, hidden):
    expect_callable(answer, "patch_each_head")
    for what, z, clean in _head_cases(hidden):
        got = answer(z.clone(), None, clean.clone())
        expected = _patching.patch_each_head(z.clone(), None, clean)
        _shape(got, expected, what, "Return the whole (patched) hook_z, [n_heads * batch, pos, n_heads, d_head].")
        if _close(got, expected):
            continue
        batch, n_heads = clean.shape[0], clean.shape[2]
        if _close(got, z):
            raise CheckFailed(f"{what}: nothing was patched. Assign into z and return it.")
        if _close(got, clean.repeat(n_heads, 1, 1, 1)):
            raise CheckFailed(f"{what}: every head of every copy was patched, so every copy is the clean run. Copy h "
                              f"gets head h only.")
        interleaved = z.clone()
        for head in range(n_heads):
            interleaved[head::n_heads, :, head] = clean[:, :, head]
        if _close(got, interleaved):
            raise CheckFailed(f"{what}: wrong row layout. Copy h is the block of rows h * batch .. (h + 1) * batch "
                              f"(z.repeat(n_heads, ...)), not every n_heads-th row.")
        last_only = z.clone()
        for head in range(n_heads):
            last_only[head * batch:(head + 1) * batch, -1, head] = clean[:, -1, head]
        if _close(got, last_only):
            raise CheckFailed(f"{what}: you patched the last position only. Patch head h at every position.")
        expect_tensor(got, expected, what, hint="z[h*batch:(h+1)*batch, :, h] = clean_z[:, :, h].")
    return "synthetic hook_z"


# ---------------------------------------------------------------------------------------------------------
# 4.6 — the head grid, on SmolLM2
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.6", "patch_head_grid", "Patch every head's output", points=3,
          reference=_patching.patch_head_grid)
def patch_head_grid(answer, hidden):
    expect_callable(answer, "patch_head_grid")
    seeds = [(2, 7, [8, 20])] + ([(3, _draw(44, 100, 10**6), [_draw(45, 0, 28), 28])] if hidden else [])
    for n_prompts, seed, layers in seeds:
        model, data, abc, readout = _ioi(n_prompts, seed)
        what = f"{n_prompts} prompts, layers {layers}"
        got = answer(model, data.tokens, abc.tokens, readout, list(layers))
        model.reset_hooks()
        expected = _patching.patch_head_grid(model, data.tokens, abc.tokens, readout, layers)
        _shape(got, expected, what, "[len(layers), n_heads, batch]: one readout per layer, head and prompt.")
        if _close(got, expected, **MODEL_TOL):
            continue
        if _close(got, _patching.patch_head_grid(model, abc.tokens, data.tokens, readout, layers), **MODEL_TOL):
            raise CheckFailed(f"{what}: you patched the other way round (ABC activations into the clean run). Run "
                              f"the ABC prompts and copy in each head's clean output.")
        abc_ld = readout(_ablation.final_resid(model, abc.tokens))
        if _close(got, abc_ld.expand_as(expected), **MODEL_TOL):
            raise CheckFailed(f"{what}: every entry is the unpatched ABC run: the hook on blocks.{{layer}}.attn.hook_z "
                              f"changed nothing.")
        clean_z, _ = _ablation.head_z(model, data.tokens)

        def last_only(layer):
            def hook(z, hook):
                batch = data.tokens.shape[0]
                for head in range(model.cfg.n_heads):
                    z[head * batch:(head + 1) * batch, -1, head] = clean_z[layer][:, -1, head]
                return z
            return hook

        resid = _ablation.resid_pre(model, abc.tokens)
        rows = []
        for layer in layers:
            final = _ablation.final_resid(model, resid[layer].repeat(model.cfg.n_heads, 1, 1),
                                          [(_ablation.z_name(layer), last_only(layer))], start_at_layer=layer)
            rows.append(readout(final.view(model.cfg.n_heads, -1, *final.shape[1:])))
        if _close(got, torch.stack(rows), **MODEL_TOL):
            raise CheckFailed(f"{what}: you patched each head at the last position only. Patch head h's hook_z at "
                              f"every position (its output at S2 matters too).")
        expect_tensor(got, expected, what, **MODEL_TOL, hint="for each layer: the ABC run's resid_pre repeated n_heads "
                      "times, your patch_each_head hook on hook_z, then the readout.")
    return f"{len(seeds)} prompt sets"


# ---------------------------------------------------------------------------------------------------------
# 4.7 — attention from END to a name
# ---------------------------------------------------------------------------------------------------------


def _random_pattern(batch: int, n_heads: int, n_pos: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(batch, n_heads, n_pos, n_pos, generator=generator)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@exercise("04", "4.7", "end_attention", "How much does each head attend from END to a name?",
          reference=_patching.end_attention)
def end_attention(answer, hidden):
    expect_callable(answer, "end_attention")
    cases = [(3, 4, 6, [1, 3, 2], 0), (4, 2, 5, [2, 2, 4, 0], 1)]  # (batch, heads, pos, key positions, seed)
    if hidden:
        cases += [(1, 9, 7, [5], 2), (5, 3, 8, [1, 6, 3, 2, 7], 3)]
    for batch, n_heads, n_pos, keys, seed in cases:
        pattern = _random_pattern(batch, n_heads, n_pos, seed)
        key_positions = torch.tensor(keys)
        what = f"pattern [batch={batch}, heads={n_heads}, pos={n_pos}], key positions {keys}"
        got = answer(pattern.clone(), key_positions.clone())
        expected = _patching.end_attention(pattern, key_positions)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (batch, n_heads) and batch != n_heads:
            raise CheckFailed(f"{what}: you returned one value per prompt and head, shape {(batch, n_heads)}; "
                              f"average over the prompts to get [n_heads].")
        if isinstance(got, torch.Tensor) and got.ndim == 3:
            raise CheckFailed(f"{what}: shape {tuple(got.shape)}: `pattern[:, :, -1, key_positions]` pairs every "
                              f"prompt with every prompt's key. Index the batch and the key together: "
                              f"pattern[arange(batch), :, -1, key_positions].")
        _shape(got, expected, what, "One number per head: [n_heads].")
        if _close(got, expected):
            continue
        rows = torch.arange(batch)
        bos_query, swapped = pattern[rows, :, 0, key_positions].mean(0), pattern[rows, :, key_positions, -1].mean(0)
        if _close(got, bos_query) and _close(got, swapped):
            raise CheckFailed(f"{what}: your values are those of a query that cannot see the key (causal attention "
                              f"to a later position is 0): either you swapped query and key (pattern[b, h, query, "
                              f"key], query = END = -1) or you read the query at position 0 (BOS).")
        if _close(got, bos_query):
            raise CheckFailed(f"{what}: you read the query at position 0 (BOS). END is the last position, -1.")
        if _close(got, pattern[rows, :, key_positions, -1].mean(0)):
            raise CheckFailed(f"{what}: you swapped query and key. pattern[b, h, query, key]: the query is the last "
                              f"position (END), the key the name's position.")
        if _close(got, pattern[:, :, -1, key_positions].mean(dim=(0, 2))):
            raise CheckFailed(f"{what}: you averaged every prompt's attention to every prompt's key position. Pair "
                              f"prompt b with key_positions[b] only.")
        expect_tensor(got, expected, what, hint="pattern[arange(batch), :, -1, key_positions].mean(0).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 4.8 — path patching, on SmolLM2
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.8", "path_patch", "Path patching: sender -> receivers, everything else frozen", points=3,
          reference=_patching.path_patch)
def path_patch(answer, hidden):
    expect_callable(answer, "path_patch")
    cases = [(2, 9, [(20, 0)], [(23, 0), (23, 3)], "q"), (2, 9, [(8, 1), (17, 4)], [(19, 0), (20, 0)], "v")]
    if hidden:
        cases += [(3, _draw(46, 100, 10**6), [(_draw(47, 10, 21), _draw(48, 0, 9))], [(22, _draw(49, 0, 9)), (24, 4)],
                   "q"), (2, _draw(50, 100, 10**6), [(5, 6), (14, 3)], [(21, 1)], "k")]
    for n_prompts, seed, senders, receivers, receiver_input in cases:
        model, data, abc, readout = _ioi(n_prompts, seed)
        what = (f"senders {senders} -> receivers {receivers} ({receiver_input}), {n_prompts} prompts")
        got = answer(model, data.tokens, abc.tokens, [tuple(x) for x in senders], [tuple(x) for x in receivers],
                     receiver_input, readout)
        model.reset_hooks()
        args = (model, data.tokens, abc.tokens, senders, receivers, receiver_input, readout)
        expected = _patching.path_patch(*args)
        _shape(got, expected, what, "One readout per prompt: [batch].")
        if _close(got, expected, **MODEL_TOL):
            continue
        if _close(got, _patching._path_patch(*args, freeze_others=False), **MODEL_TOL):
            raise CheckFailed(f"{what}: in the run that records the receivers' inputs you did not freeze the other "
                              f"heads, so the sender's change also reached the receivers through heads in between. "
                              f"Set every non-sender head's hook_z to its clean value in that run.")
        if _close(got, _patching._path_patch(*args, only_receivers=False), **MODEL_TOL):
            raise CheckFailed(f"{what}: you patched every head of the receivers' hook_{receiver_input}, not only the "
                              f"receivers (index the head axis, dim 2).")
        sender_z = _ablation.head_z(model, abc.tokens)[0]

        def sender_hook(layer):
            def hook(z, hook):
                for sender_layer, head in senders:
                    if sender_layer == layer:
                        z[:, :, head] = sender_z[layer][:, :, head]
                return z
            return hook

        whole = readout(_ablation.final_resid(model, data.tokens, [(_ablation.z_name(layer), sender_hook(layer))
                                                                     for layer in {l for l, _ in senders}]))
        if _close(got, whole, **MODEL_TOL):
            raise CheckFailed(f"{what}: this is patching the senders' whole output (every path). Path patching "
                              f"delivers the change to the receivers' {receiver_input} only: record them in a frozen "
                              f"run, then patch just those into a fresh clean run.")
        if _close(got, readout(_ablation.final_resid(model, data.tokens)), **MODEL_TOL):
            raise CheckFailed(f"{what}: the result is the clean run: nothing reached the receivers. Record "
                              f"blocks.{{l}}.attn.hook_{receiver_input} in the frozen run (with the senders from the "
                              f"ABC run) and patch it into the final run.")
        expect_tensor(got, expected, what, **MODEL_TOL, hint="three runs: cache hook_z (clean and ABC); clean run with "
                      "senders from ABC and all other heads frozen, recording the receivers' inputs; clean run with "
                      "those inputs patched.")
    return f"{len(cases)} paths"


# ---------------------------------------------------------------------------------------------------------
# 4.9 — attribution patching, on SmolLM2
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.9", "attribution_patch_heads", "Attribution patching: every head from one backward pass",
          points=3, reference=_patching.attribution_patch_heads)
def attribution_patch_heads(answer, hidden):
    expect_callable(answer, "attribution_patch_heads")
    cases = [(2, 13)] + ([(3, _draw(51, 100, 10**6))] if hidden else [])
    for n_prompts, seed in cases:
        model, data, abc, readout = _ioi(n_prompts, seed)
        what = f"{n_prompts} prompts"
        got = answer(model, data.tokens, abc.tokens, readout)
        model.reset_hooks()
        expected = _patching.attribution_patch_heads(model, data.tokens, abc.tokens, readout)
        _shape(got, expected, what, "One estimate per head: [n_layers, n_heads].")
        if isinstance(got, torch.Tensor) and got.requires_grad:
            got = got.detach()
        tol = dict(atol=2e-3, rtol=5e-3)
        if _close(got, expected, **tol):
            continue
        if _close(got, -expected, **tol):
            raise CheckFailed(f"{what}: wrong sign. Patching moves z from the corrupted value to the clean one: "
                              f"(clean - corrupted) . gradient.")
        if _close(got, expected * n_prompts, **tol):
            raise CheckFailed(f"{what}: your estimates are {n_prompts}x too large: differentiate the *mean* readout "
                              f"over the prompts (the metric the grids average), not the sum.")
        if _close(got, expected / n_prompts, **tol):
            raise CheckFailed(f"{what}: your estimates are {n_prompts}x too small: sum the products over prompts (the "
                              f"gradient of the mean already carries the 1 / batch).")
        if _close(got, _patching._attribution(model, data.tokens, abc.tokens, readout, cut_at_each_head=True), **tol):
            raise CheckFailed(f"{what}: the gradients miss every path through later heads: you detached each hook_z "
                              f"(or made it a fresh leaf) so the graph is cut at each head. Keep the graph: add a zero "
                              f"leaf (z + leaf) or call z.retain_grad() on the activation itself.")
        expect_tensor(got, expected, what, **tol, hint="one forward on the ABC prompts keeping each hook_z's gradient, "
                      "backward from readout(final).mean(), then ((clean_z - abc_z) * grad).sum over batch, pos, d_head.")
    return f"{len(cases)} prompt sets"


# ---------------------------------------------------------------------------------------------------------
# 4.10 — template means
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.10", "template_means", "The mean of each head's output over prompts of the same template",
          reference=_patching.template_means)
def template_means(answer, hidden):
    expect_callable(answer, "template_means")
    cases = [(2, 5, 3, 2, 2, [0, 1, 0, 2, 2], 0), (3, 4, 2, 3, 1, [3, 3, 1, 3], 1)]
    if hidden:
        g = hidden_generator(52)
        cases += [(2, 7, 2, 4, 3, torch.randint(0, 3, (7,), generator=g).tolist(), _draw(53, 2, 10**6))]
    for n_layers, batch, n_pos, n_heads, d_head, groups, seed in cases:
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(n_layers, batch, n_pos, n_heads, d_head, generator=generator)
        groups = torch.tensor(groups)
        what = f"z of shape {tuple(z.shape)}, groups {groups.tolist()}"
        got = answer(z.clone(), groups.clone())
        expected = _patching.template_means(z, groups)
        _shape(got, expected, what, "The same shape as z: prompt b's entry is the mean over its group.")
        if _close(got, expected):
            continue
        if _close(got, z.mean(1, keepdim=True).expand_as(z)):
            raise CheckFailed(f"{what}: you averaged over every prompt. Average over the prompts of the same group "
                              f"(template) only.")
        if _close(got, z):
            raise CheckFailed(f"{what}: z came back unchanged.")
        expect_tensor(got, expected, what, hint="for each group g: out[:, groups == g] = z[:, groups == g].mean(1).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 4.11 — the circuit on its own (mean-ablating everything else)
# ---------------------------------------------------------------------------------------------------------


@exercise("04", "4.11", "circuit_logit_diff", "Run only the circuit: mean-ablate every other head", points=3,
          reference=_patching.circuit_logit_diff)
def circuit_logit_diff(answer, hidden):
    expect_callable(answer, "circuit_logit_diff")
    cases = [(2, 17, [(23, 3), (20, 0), (17, 4), (8, 1)], 1), (3, 18, [(23, 0), (24, 4), (29, 1)], 3)]
    if hidden:
        g = hidden_generator(54)
        heads = torch.randperm(270, generator=g)[:12].tolist()
        cases += [(3, _draw(55, 100, 10**6), [(h // 9, h % 9) for h in heads], 3)]
    for n_prompts, seed, circuit, mean_batch in cases:
        model, data, abc, readout = _ioi(n_prompts, seed)
        abc_z, _ = _ablation.head_z(model, abc.tokens)
        ablation_z = abc_z.mean(1, keepdim=True) if mean_batch == 1 else _patching.template_means(abc_z,
                                                                                                  data.template_ids)
        what = f"{len(circuit)} heads kept, {n_prompts} prompts, ablation_z {tuple(ablation_z.shape)}"
        got = answer(model, data.tokens, [tuple(x) for x in circuit], ablation_z.clone(), readout)
        model.reset_hooks()
        expected = _patching.circuit_logit_diff(model, data.tokens, circuit, ablation_z, readout)
        _shape(got, expected, what, "One readout per prompt: [batch].")
        if _close(got, expected, **MODEL_TOL):
            continue
        every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
        rest = [x for x in every if x not in set(circuit)]
        if _close(got, _patching.circuit_logit_diff(model, data.tokens, rest, ablation_z, readout), **MODEL_TOL):
            raise CheckFailed(f"{what}: you ablated the circuit's heads and kept the others. Keep the circuit; replace "
                              f"every head *outside* it.")
        if _close(got, _patching.circuit_logit_diff(model, data.tokens, circuit, torch.zeros_like(ablation_z),
                                                    readout), **MODEL_TOL):
            raise CheckFailed(f"{what}: you zero-ablated the other heads. Write `ablation_z` (the ABC means) into them.")
        if _close(got, readout(_ablation.final_resid(model, data.tokens)), **MODEL_TOL):
            raise CheckFailed(f"{what}: the result is the full model: no head was replaced.")
        expect_tensor(got, expected, what, **MODEL_TOL, hint="one run with a hook on every layer's hook_z writing "
                      "ablation_z[layer][:, :, h] into each head h outside the circuit.")
    return f"{len(cases)} circuits"

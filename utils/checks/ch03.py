"""Checks for chapter 03 — Ablation (zero, mean, resample) and self-repair.

References come from `utils.ablation` (reused by later chapters). Every check runs the learner's answer on small
inputs and, when it is wrong, compares it with the usual mistakes to say which one.

The hook exercises (3.2 - 3.4) return a hook function: the check calls it (in the grader it stays in the learner's
kernel and is called through a handle) on a tensor and reads what it returned, or, if it returned None, the
tensor it edited in place; it never looks inside the hook.
"""

from __future__ import annotations

import functools

import torch

from utils import ablation as _ablation
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor, hidden_generator
from utils.lens import rms
from utils.models import model_for_checks


def _close(got, expected, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.to("cpu", torch.float32),
                          atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------
# Shared data: a few IOI prompts on the offline model, with their hook_z, donors and directions (cached).
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _ioi(n_prompts: int, seed: int):
    from utils.ioi import make_ioi_dataset

    model = model_for_checks()
    data = make_ioi_dataset(model, n_prompts=n_prompts, seed=seed, templates_per_order=1)
    donors = make_ioi_dataset(model, n_prompts=n_prompts, seed=seed + 100, templates_per_order=1)
    z, final = _ablation.head_z(model, data.tokens)
    z_donor, _ = _ablation.head_z(model, donors.tokens)
    direction = _ablation.logit_diff_direction(model, data.io_tokens, data.s_tokens)
    return data, z, final, z_donor, direction


def _replacements(z: torch.Tensor, z_donor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"zero": torch.zeros_like(z[:, :1]), "mean": z_donor.mean(1, keepdim=True), "resample": z_donor}


# ---------------------------------------------------------------------------------------------------------
# 3.1 — the logit difference
# ---------------------------------------------------------------------------------------------------------


def _logit_cases(hidden: bool):
    generator = torch.Generator().manual_seed(0)
    cases = [("random logits [3, 5, 20]", torch.randn(3, 5, 20, generator=generator),
              torch.tensor([1, 4, 7]), torch.tensor([2, 9, 0]))]
    if hidden:
        g = hidden_generator(31)
        cases.append(("random logits [6, 9, 50]", 4 * torch.randn(6, 9, 50, generator=g),
                      torch.randint(0, 50, (6,), generator=g), torch.randint(0, 50, (6,), generator=g)))
    return cases


@exercise("03", "3.1", "logit_diff_metric", "The logit difference", reference=_ablation.logit_diff_metric)
def logit_diff_metric(answer, hidden):
    expect_callable(answer, "logit_diff_metric")
    cases = _logit_cases(hidden)
    for i, (name, logits, io, s) in enumerate(cases):
        what = f"case {i} ({name})"
        got = answer(logits.clone(), io.clone(), s.clone())
        expected = _ablation.logit_diff_metric(logits, io, s)
        if isinstance(got, torch.Tensor) and got.numel() == 1 and expected.numel() > 1:
            raise CheckFailed(f"{what}: you returned one number; return one logit difference per prompt, shape "
                              f"{tuple(expected.shape)} (average later).")
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [batch], got {tuple(got.shape)}. "
                              f"Index the last position and one IO and one S token per prompt (not every pair).")
        if _close(got, expected):
            continue
        if _close(got, -expected):
            raise CheckFailed(f"{what}: wrong sign: the metric is logit(IO) - logit(S), positive when the model "
                              f"prefers the indirect object.")
        if _close(got, _ablation.logit_diff_metric(logits[:, :1], io, s)):
            raise CheckFailed(f"{what}: you read position 0. The prediction of the answer is at the last position.")
        rows = torch.arange(len(io))
        if _close(got, logits.log_softmax(-1)[rows, -1, io]) or _close(got, logits[rows, -1, io]):
            raise CheckFailed(f"{what}: you returned the IO score alone; subtract the S logit.")
        expect_tensor(got, expected, what, hint="logits[i, -1, io_tokens[i]] - logits[i, -1, s_tokens[i]].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 3.2 - 3.4 — the ablation hooks
# ---------------------------------------------------------------------------------------------------------


def _z_cases(hidden: bool):
    """(name, z being ablated, reference / donor activations, head)."""
    generator = torch.Generator().manual_seed(1)
    cases = [("z [4, 6, 3, 5], head 1", torch.randn(4, 6, 3, 5, generator=generator),
              torch.randn(7, 6, 3, 5, generator=generator) + 2.0, 1),
             ("z [3, 5, 4, 2], head 3", torch.randn(3, 5, 4, 2, generator=generator),
              torch.randn(5, 5, 4, 2, generator=generator) - 1.0, 3)]
    if hidden:
        g = hidden_generator(32)
        for _ in range(2):
            batch, pos, d_head = (int(v) for v in torch.randint(2, 9, (3,), generator=g))
            n_heads = int(torch.randint(5, 10, (1,), generator=g))
            head = [h for h in range(n_heads) if h not in (1, 3)][int(torch.randint(0, n_heads - 2, (1,), generator=g))]
            n_ref = int(torch.randint(batch, 12, (1,), generator=g))
            cases.append((f"z [{batch}, {pos}, {n_heads}, {d_head}], head {head}",
                          torch.randn(batch, pos, n_heads, d_head, generator=g),
                          3 * torch.randn(n_ref, pos, n_heads, d_head, generator=g) + 1.0, head))
    return cases


def _hooked(hook, z: torch.Tensor, head: int, what: str) -> torch.Tensor:
    """Call the learner's hook on a copy of z and return head `head`'s new values, after the checks every hook
    exercise shares (a hook came back; the shape is kept; z changed; only head `head` changed)."""
    if not callable(hook):
        raise CheckFailed(f"{what}: expected your function to return a hook function, got {type(hook).__name__}. "
                          f"Define `def hook(z, hook): ...` inside it and return it (without calling it).")
    work = z.clone()
    out = hook(work, None)
    got = work if out is None else out
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(z.shape):
        raise CheckFailed(f"{what}: the hook must return hook_z with its shape {tuple(z.shape)} unchanged, got "
                          f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}.")
    if _close(got, z):
        raise CheckFailed(f"{what}: the hook left z unchanged. Assign into z[:, :, head] (and return z).")
    others = [h for h in range(z.shape[2]) if h != head]
    if not _close(got[:, :, others], z[:, :, others]):
        positions = [p for p in range(z.shape[1]) if p != head]
        if head < z.shape[1] and _close(got[:, positions], z[:, positions]):
            raise CheckFailed(f"{what}: you edited z[:, head], i.e. a position. hook_z is [batch, pos, head, "
                              f"d_head]: the head is axis 2, z[:, :, head].")
        raise CheckFailed(f"{what}: your hook changed heads other than head {head}. Only z[:, :, head] changes.")
    return got[:, :, head]


@exercise("03", "3.2", "zero_ablation_hook", "Zero ablation", reference=_ablation.zero_ablation_hook)
def zero_ablation_hook(answer, hidden):
    expect_callable(answer, "zero_ablation_hook")
    cases = _z_cases(hidden)
    for i, (name, z, _, head) in enumerate(cases):
        what = f"case {i} ({name})"
        mine = _hooked(answer(head), z, head, what)
        if _close(mine[:, :-1], z[:, :-1, head]):
            raise CheckFailed(f"{what}: only the last position was zeroed; ablate the head at every position.")
        expect_tensor(mine, torch.zeros_like(mine), what, hint="z[:, :, head] = 0 (every prompt, every position).")
    return f"{len(cases)} cases"


@exercise("03", "3.3", "mean_ablation_hook", "Mean ablation", points=2, reference=_ablation.mean_ablation_hook)
def mean_ablation_hook(answer, hidden):
    expect_callable(answer, "mean_ablation_hook")
    cases = _z_cases(hidden)
    for i, (name, z, reference, head) in enumerate(cases):
        what = f"case {i} ({name}, reference {tuple(reference.shape)})"
        mine = _hooked(answer(reference.clone(), head), z, head, what)
        expected = reference[:, :, head].mean(0).expand_as(mine)
        if _close(mine, expected):
            continue
        if _close(mine, torch.zeros_like(mine)):
            raise CheckFailed(f"{what}: you zeroed the head; mean ablation replaces it by its mean over the "
                              f"reference prompts.")
        if _close(mine, reference[:, :, head].mean((0, 1)).expand_as(mine)):
            raise CheckFailed(f"{what}: you averaged over positions too. This chapter's mean is per position: "
                              f"average over the reference prompts (axis 0) only.")
        if _close(mine, z[:, :, head].mean(0, keepdim=True).expand_as(mine)):
            raise CheckFailed(f"{what}: you averaged the activations being ablated; average `reference_z`, the "
                              f"reference prompts' activations.")
        if _close(mine, reference.mean((0, 2))[None].expand_as(mine)):
            raise CheckFailed(f"{what}: you averaged over the heads too; average head {head} over prompts only.")
        expect_tensor(mine, expected, what, hint="the mean of reference_z[:, :, head] over axis 0, at every position.")
    return f"{len(cases)} cases"


@exercise("03", "3.4", "resample_ablation_hook", "Resample ablation", points=2,
          reference=_ablation.resample_ablation_hook)
def resample_ablation_hook(answer, hidden):
    expect_callable(answer, "resample_ablation_hook")
    cases = [(name, z, donor[:z.shape[0]], head) for name, z, donor, head in _z_cases(hidden)]
    for i, (name, z, donor, head) in enumerate(cases):
        what = f"case {i} ({name}, donor {tuple(donor.shape)})"
        mine = _hooked(answer(donor.clone(), head), z, head, what)
        expected = donor[:, :, head]
        if _close(mine, expected):
            continue
        if _close(mine, donor[:, :, head].mean(0, keepdim=True).expand_as(mine)):
            raise CheckFailed(f"{what}: you used the donors' mean: that is mean ablation. Row i takes donor row i.")
        if _close(mine, donor[:1, :, head].expand_as(mine)):
            raise CheckFailed(f"{what}: every row got donor row 0. Row i takes donor_z[i].")
        if _close(mine, donor[:, :, head].roll(1, 0)) or _close(mine, donor[:, :, head].flip(0)):
            raise CheckFailed(f"{what}: the donor rows are shuffled. Row i takes donor_z[i] (the donors are "
                              f"already paired with the prompts).")
        expect_tensor(mine, expected, what, hint="row i of head `head` takes donor_z[i, :, head].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 3.5 — KL divergence at the last position
# ---------------------------------------------------------------------------------------------------------


@exercise("03", "3.5", "last_token_kl", "How far an ablation moves the output", reference=_ablation.last_token_kl)
def last_token_kl(answer, hidden):
    expect_callable(answer, "last_token_kl")
    generator = torch.Generator().manual_seed(5)
    shapes = [(3, 4, 11), (2, 3, 7)]
    if hidden:
        g = hidden_generator(35)
        shapes += [tuple(int(v) for v in torch.randint(2, 13, (3,), generator=g)) for _ in range(2)]
        generator = g
    for i, shape in enumerate(shapes):
        what = f"case {i} (logits {shape})"
        clean = 2 * torch.randn(*shape, generator=generator)
        ablated = clean + torch.randn(*shape, generator=generator)
        got = answer(clean.clone(), ablated.clone())
        expected = _ablation.last_token_kl(clean, ablated)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            raise CheckFailed(f"{what}: you returned one number; return one KL per prompt, shape [batch].")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected a tensor of shape {tuple(expected.shape)} = [batch] (the last "
                              f"position only), got {getattr(got, 'shape', type(got).__name__)}.")
        if _close(got, expected):
            continue
        if _close(got, _ablation.last_token_kl(ablated, clean)):
            raise CheckFailed(f"{what}: that is KL(ablated || clean). Weight by the clean distribution: "
                              f"sum p_clean * (log p_clean - log p_ablated).")
        p, q = clean[:, -1].softmax(-1), ablated[:, -1].softmax(-1)
        if _close(got, (clean[:, -1] * (clean[:, -1] - ablated[:, -1])).sum(-1)) or _close(
                got, (p * (clean[:, -1] - ablated[:, -1])).sum(-1)):
            raise CheckFailed(f"{what}: you used raw logits; take log_softmax first (logits are not "
                              f"log-probabilities).")
        if _close(got, (p * (p - q)).sum(-1)):
            raise CheckFailed(f"{what}: you subtracted probabilities; KL uses log-probabilities.")
        if _close(got, _ablation.last_token_kl(clean[:, :1], ablated[:, :1])):
            raise CheckFailed(f"{what}: you read position 0; use the last position.")
        expect_tensor(got, expected, what, hint="sum over the vocabulary of p_clean * (log p_clean - log p_ablated).")
    return f"{len(shapes)} cases"


# ---------------------------------------------------------------------------------------------------------
# 3.6 — the batched every-head sweep
# ---------------------------------------------------------------------------------------------------------


def _sweep_cases(hidden: bool):
    cases = [(2, 11, "mean", [1, 17, 28], False), (2, 11, "resample", [16, 23], True)]
    if hidden:
        g = hidden_generator(36)
        layers = (torch.randperm(28, generator=g)[:3] + 1).sort().values.tolist()
        kind = ["zero", "mean", "resample"][int(torch.randint(0, 3, (1,), generator=g))]
        cases.append((3, 12, kind, layers, bool(torch.randint(0, 2, (1,), generator=g))))
    return cases


def _all_heads_readout(model, tokens, replacement, layer, readout):
    """The readout with every head of `layer` ablated at once (the mistake of ablating the whole layer per copy)."""
    def hook(z, hook):
        z[:] = replacement[layer].to(z.dtype)
        return z

    return readout(_ablation.final_resid(model, tokens, [(_ablation.z_name(layer), hook)]))


def _clean_final_is_back(model, tokens, final, what):
    with torch.no_grad():
        now = _ablation.final_resid(model, tokens)
    if not _close(now, final, atol=1e-3, rtol=1e-3):
        model.reset_hooks()
        raise CheckFailed(f"{what}: after your function the model no longer gives its clean output: a hook was "
                          f"left on it. Remove hooks when you are done (model.reset_hooks(), or a try/finally).")


@exercise("03", "3.6", "ablate_every_head", "Ablate every head, batched", points=4,
          reference=_ablation.ablate_every_head)
def ablate_every_head(answer, hidden):
    expect_callable(answer, "ablate_every_head")
    model = model_for_checks()
    cases = _sweep_cases(hidden)
    for n, seed, kind, layers, give_resid in cases:
        data, z, final, z_donor, direction = _ioi(n, seed)
        replacement = _replacements(z, z_donor)[kind]
        readout = functools.partial(_ablation.last_position_logit_diff, direction=direction)
        what = f"{kind} ablation, {n} prompts, layers {layers}" + (", resid given" if give_resid else "")
        resid = _ablation.resid_pre(model, data.tokens) if give_resid else None
        got = answer(model, data.tokens.clone(), replacement.clone(), readout, layers=list(layers),
                     resid=None if resid is None else resid.clone())
        _clean_final_is_back(model, data.tokens, final, what)
        expected = _ablation.ablate_every_head(model, data.tokens, replacement, readout, layers=layers)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a tensor [len(layers), n_heads, batch], got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [len(layers), n_heads, batch] (one "
                              f"row per layer in `layers`, then the readout of copy h = head h), got "
                              f"{tuple(got.shape)}.")
        if _close(got, expected, atol=2e-3, rtol=1e-3):
            continue
        clean = readout(final)
        if _close(got, clean.expand_as(got), atol=2e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: every entry is the clean readout: your hook never changed the run. Hook "
                              f"blocks.{{layer}}.attn.hook_z and edit it in place (or return it).")
        all_heads = torch.stack([_all_heads_readout(model, data.tokens, replacement, layer, readout)
                                 for layer in layers])
        if _close(got, all_heads[:, None].expand_as(got), atol=2e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: every copy has all of the layer's heads ablated. Copy h (rows h * batch .. "
                              f"(h + 1) * batch) ablates head h only.")
        if _close(got, expected.transpose(1, 2).reshape(got.shape), atol=2e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: rows and copies are mixed up: `repeat` stacks whole copies of the batch "
                              f"(row h * batch + b is copy h, prompt b), so reshape the readout to [n_heads, batch] "
                              f"(not [batch, n_heads]), or match the hook's row ranges to your layout.")
        for shift in (-1, 1):
            shifted = [layer + shift for layer in layers]
            if all(0 <= layer < model.cfg.n_layers for layer in shifted):
                other = _ablation.ablate_every_head(model, data.tokens, replacement, readout, layers=shifted)
                if _close(got, other, atol=2e-3, rtol=1e-3):
                    raise CheckFailed(f"{what}: off by one layer: your row for layer l ablates layer l{shift:+d}. "
                                      f"Start at resid[l] (the stream entering block l) and hook layer l's hook_z.")
        if kind == "resample":
            first = _ablation.ablate_every_head(model, data.tokens, replacement[:, :1], readout, layers=layers)
            if _close(got, first, atol=2e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: every copy took donor row 0. The replacement has one row per prompt: "
                                  f"copy h, prompt b takes replacement[layer][b].")
        expect_tensor(got, expected, what, atol=2e-3, rtol=1e-3,
                      hint="row [i, h, b] = readout of prompt b with head h of layer layers[i] ablated.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 3.7 — several heads at once
# ---------------------------------------------------------------------------------------------------------


@exercise("03", "3.7", "ablate_heads", "Ablate several heads at once", points=2, reference=_ablation.ablate_heads)
def ablate_heads(answer, hidden):
    expect_callable(answer, "ablate_heads")
    model = model_for_checks()
    cases = [("mean", [(23, 3), (29, 1)]), ("resample", [(16, 0), (23, 0), (23, 3)])]
    if hidden:
        g = hidden_generator(37)
        layer = int(torch.randint(1, 29, (1,), generator=g))
        picks = torch.randperm(9, generator=g)[:3].tolist()
        cases.append(("zero", [(layer, picks[0]), (layer, picks[1]), (int(torch.randint(0, 30, (1,), generator=g)),
                                                                        picks[2])]))
    data, z, final, z_donor, _ = _ioi(2, 13)
    for kind, heads in cases:
        replacement = _replacements(z, z_donor)[kind]
        what = f"{kind} ablation of {', '.join(f'L{l}H{h}' for l, h in heads)}"
        got = answer(model, data.tokens.clone(), [list(pair) for pair in heads], replacement.clone())
        _clean_final_is_back(model, data.tokens, final, what)
        expected = _ablation.ablate_heads(model, data.tokens, heads, replacement)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected logits of shape {tuple(expected.shape)} = [batch, pos, d_vocab], "
                              f"got {getattr(got, 'shape', type(got).__name__)}.")
        if _close(got, expected, atol=2e-3, rtol=1e-3):
            continue
        for name, subset in [("only the first head", heads[:1]), ("only the last head", heads[-1:])]:
            if len(heads) > 1 and _close(got, _ablation.ablate_heads(model, data.tokens, subset, replacement),
                                         atol=2e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: you ablated {name}. Every head in the list must be ablated in the same "
                                  f"pass (one hook per layer, or one hook per head).")
        by_layer = {}
        for layer, head in heads:
            by_layer[layer] = head
        if len(by_layer) < len(heads) and _close(got, _ablation.ablate_heads(model, data.tokens, list(by_layer.items()),
                                                                            replacement), atol=2e-3, rtol=1e-3):
            raise CheckFailed(f"{what}: of two heads in the same layer only the last was ablated: a dict keyed by "
                              f"the hook name keeps one hook per layer. Collect the heads of each layer first.")
        expect_tensor(got, expected, what, atol=2e-3, rtol=1e-3,
                      hint="for each (layer, head), z[:, :, head] = replacement[layer][:, :, head] at that layer's hook_z.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 3.8 — direct effect of a head
# ---------------------------------------------------------------------------------------------------------


@exercise("03", "3.8", "head_direct_effect", "Direct effect of a head", points=2,
          reference=_ablation.head_direct_effect)
def head_direct_effect(answer, hidden):
    expect_callable(answer, "head_direct_effect")
    model = model_for_checks()
    data, z, final, _, direction = _ioi(4 if hidden else 2, 11)
    io, s = data.io_tokens, data.s_tokens
    cases = [(20, 3), (29, 0)]
    if hidden:
        g = hidden_generator(38)
        cases += [(int(torch.randint(0, 30, (1,), generator=g)), int(torch.randint(0, 9, (1,), generator=g)))
                  for _ in range(2)]
    with torch.no_grad():
        for layer, head in cases:
            what = f"L{layer}H{head}"
            got = answer(model, z[layer].clone(), final.clone(), layer, head, io.clone(), s.clone())
            expected = _ablation.head_direct_effect(model, z[layer], final, layer, head, io, s)
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
            if tuple(got.shape) != tuple(expected.shape):
                raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [batch] (one direct effect per "
                                  f"prompt, at the last position), got {tuple(got.shape)}.")
            if _close(got, expected, atol=1e-3, rtol=1e-3):
                continue
            out = z[layer][:, -1, head] @ model.W_O[layer, head]
            if _close(got, -expected, atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: wrong sign: project on W_U[:, IO] - W_U[:, S].")
            if _close(got, (out * direction.T).sum(-1), atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: you forgot the final norm: divide the head's output by the RMS of the "
                                  f"final residual stream (frozen at this run's value) before unembedding.")
            if _close(got, ((out / rms(out)) * direction.T).sum(-1), atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: you normalised the head's output by its own RMS. The final norm divides "
                                  f"the whole residual stream: use the RMS of `final` at the last position.")
            io_only = ((out / rms(final[:, -1])) * model.W_U[:, io].T).sum(-1)
            if _close(got, io_only, atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: you projected on the IO unembedding alone; subtract the S direction.")
            every = (z[layer][:, :, head] @ model.W_O[layer, head]) / rms(final)
            if _close(got, torch.einsum("bpm,mb->b", every, direction), atol=1e-3, rtol=1e-3):
                raise CheckFailed(f"{what}: you summed over every position; the metric reads the last position only.")
            expect_tensor(got, expected, what, atol=1e-3, rtol=1e-3,
                          hint="(z[:, -1, head] @ W_O[layer, head]) / rms(final[:, -1]) · (W_U[:, IO] - W_U[:, S]).")
    return f"{len(cases)} heads"


# ---------------------------------------------------------------------------------------------------------
# 3.9 — direct effects of every component of a run
# ---------------------------------------------------------------------------------------------------------

_DE_KEYS = ("embed", "heads", "mlps", "logit_diff")


def _expect_dict(got, expected, keys, what):
    if not isinstance(got, dict):
        raise CheckFailed(f"{what}: expected a dict with keys {list(keys)}, got {type(got).__name__}.")
    missing = [key for key in keys if key not in got]
    if missing:
        raise CheckFailed(f"{what}: your dict lacks the key(s) {missing}.")
    for key in keys:
        if not isinstance(got[key], torch.Tensor) or tuple(got[key].shape) != tuple(expected[key].shape):
            raise CheckFailed(f"{what}: got[{key!r}] should be a tensor of shape {tuple(expected[key].shape)}, got "
                              f"{getattr(got[key], 'shape', type(got[key]).__name__)}.")


@exercise("03", "3.9", "component_direct_effects", "Direct effects of every component", points=3,
          reference=_ablation.component_direct_effects)
def component_direct_effects(answer, hidden):
    expect_callable(answer, "component_direct_effects")
    model = model_for_checks()
    data, z, final, z_donor, direction = _ioi(2, 11)
    clean_scale = rms(final[:, -1])
    cases = [("clean run, own scale", None, [], None),
             ("L23H3 mean-ablated, clean scale", clean_scale, [(23, 3)], "mean")]
    if hidden:
        g = hidden_generator(39)
        pair = (int(torch.randint(5, 30, (1,), generator=g)), int(torch.randint(0, 9, (1,), generator=g)))
        cases.append((f"L{pair[0]}H{pair[1]} resample-ablated, clean scale", clean_scale, [pair], "resample"))
    for what, scale, heads, kind in cases:
        replacement = None if kind is None else _replacements(z, z_donor)[kind]
        got = answer(model, data.tokens.clone(), direction.clone(), scale=None if scale is None else scale.clone(),
                     heads=[list(pair) for pair in heads], replacement=None if replacement is None else replacement.clone())
        _clean_final_is_back(model, data.tokens, final, what)
        expected = _ablation.component_direct_effects(model, data.tokens, direction, scale=scale, heads=heads,
                                                      replacement=replacement)
        _expect_dict(got, expected, _DE_KEYS, what)
        tol = dict(atol=2e-3, rtol=1e-3)
        if not _close(got["logit_diff"], expected["logit_diff"], **tol):
            frozen = expected["embed"] + expected["heads"].sum((0, 1)) + expected["mlps"].sum(0)
            if scale is not None and _close(got["logit_diff"], frozen, **tol):
                raise CheckFailed(f"{what}: got['logit_diff'] used the frozen scale. It is the run's *real* logit "
                                  f"difference: divide its final residual by its own RMS.")
            expect_tensor(got["logit_diff"], expected["logit_diff"], f"{what}, 'logit_diff'", **tol,
                          hint="(final[:, -1] / rms(final[:, -1])) · direction, on the run with the heads ablated.")
        if not _close(got["heads"], expected["heads"], **tol):
            if scale is not None:
                own = _ablation.component_direct_effects(model, data.tokens, direction, heads=heads,
                                                         replacement=replacement)
                if _close(got["heads"], own["heads"], **tol):
                    raise CheckFailed(f"{what}: you divided by the run's own RMS; when `scale` is given, freeze the "
                                      f"norm at that scale.")
            if _close(got["heads"], expected["heads"] * expected["scale"][None, None, :, 0], **tol):
                raise CheckFailed(f"{what}: you forgot the final norm: divide each output by the scale.")
            if _close(got["heads"], -expected["heads"], **tol):
                raise CheckFailed(f"{what}: wrong sign; project on the direction W_U[:, IO] - W_U[:, S].")
            expect_tensor(got["heads"], expected["heads"], f"{what}, 'heads'", **tol,
                          hint="every head's output at the last position (z[:, -1] @ W_O), / scale, · direction.")
        for key in ("mlps", "embed"):
            if not _close(got[key], expected[key], **tol):
                expect_tensor(got[key], expected[key], f"{what}, {key!r}", **tol,
                              hint="mlps: blocks.{l}.hook_mlp_out; embed: blocks.0.hook_resid_pre (the stream before "
                                   "block 0); both at the last position, / scale, · direction.")
    return f"{len(cases)} runs"


# ---------------------------------------------------------------------------------------------------------
# 3.10 — self-repair
# ---------------------------------------------------------------------------------------------------------

_REPAIR_KEYS = ("total", "direct", "later_heads", "mlps", "norm")


@exercise("03", "3.10", "self_repair", "Self-repair: split a head's total effect", points=4,
          reference=_ablation.self_repair)
def self_repair(answer, hidden):
    expect_callable(answer, "self_repair")
    model = model_for_checks()
    data, z, final, z_donor, direction = _ioi(2, 11)
    cases = [(23, 3, "mean"), (16, 0, "resample")]
    if hidden:
        g = hidden_generator(40)
        cases.append((int(torch.randint(10, 29, (1,), generator=g)), int(torch.randint(0, 9, (1,), generator=g)),
                      "zero"))
    tol = dict(atol=2e-3, rtol=1e-3)
    for layer, head, kind in cases:
        what = f"{kind} ablation of L{layer}H{head}"
        replacement = _replacements(z, z_donor)[kind]
        got = answer(model, data.tokens.clone(), layer, head, replacement.clone(), direction.clone())
        _clean_final_is_back(model, data.tokens, final, what)
        expected = _ablation.self_repair(model, data.tokens, layer, head, replacement, direction)
        _expect_dict(got, expected, _REPAIR_KEYS, what)
        if all(_close(got[key], -expected[key], **tol) for key in _REPAIR_KEYS):
            raise CheckFailed(f"{what}: every part has the wrong sign. Report changes as ablated - clean (negative "
                              f"when the ablation lowers the logit difference).")
        if not _close(got["total"], expected["total"], **tol):
            if _close(got["total"], expected["total"] - expected["norm"], **tol):
                raise CheckFailed(f"{what}: your total used the frozen clean scale. 'total' is the real change in "
                                  f"logit difference: each run through its own final norm.")
            expect_tensor(got["total"], expected["total"], f"{what}, 'total'", **tol)
        if not _close(got["direct"], expected["direct"], **tol):
            expect_tensor(got["direct"], expected["direct"], f"{what}, 'direct'", **tol,
                          hint="the ablated head's own direct effect (ablated run) minus its clean one, both at the "
                               "clean scale.")
        if not _close(got["later_heads"], expected["later_heads"], **tol):
            with_own = expected["later_heads"] + expected["direct"]
            if _close(got["later_heads"], with_own, **tol):
                raise CheckFailed(f"{what}: 'later_heads' includes the ablated head itself. Sum the heads of layers "
                                  f"{layer + 1} and later.")
            expect_tensor(got["later_heads"], expected["later_heads"], f"{what}, 'later_heads'", **tol)
        if not _close(got["mlps"], expected["mlps"], **tol):
            clean = _ablation.component_direct_effects(model, data.tokens, direction)
            ablated = _ablation.component_direct_effects(model, data.tokens, direction, scale=clean["scale"],
                                                         heads=[(layer, head)], replacement=replacement)
            after = (ablated["mlps"] - clean["mlps"])[layer + 1:].sum(0)
            if _close(got["mlps"], after, **tol):
                raise CheckFailed(f"{what}: you left out MLP {layer}. It comes after the attention in block {layer}, so "
                                  f"it reads the ablated head: sum the MLPs of layers {layer} and later.")
            expect_tensor(got["mlps"], expected["mlps"], f"{what}, 'mlps'", **tol)
        if not _close(got["norm"], expected["norm"], **tol):
            if _close(got["norm"], torch.zeros_like(expected["norm"]), **tol):
                raise CheckFailed(f"{what}: your 'norm' is zero. It is what the frozen-scale parts miss: total - "
                                  f"(the change of all direct effects at the clean scale).")
            expect_tensor(got["norm"], expected["norm"], f"{what}, 'norm'", **tol)
    return f"{len(cases)} heads"

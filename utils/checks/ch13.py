"""Checks for chapter 13 — Grokking, progress measures and double descent.

References come from `utils.grokking`. Every check calls the learner's function on small cases (small p, random
arrays from seeded generators, the shipped p = 113 checkpoints) and, when the answer is wrong, compares it with
what the usual mistakes give to say which one it is.
"""

from __future__ import annotations

import math

import torch

from utils import grokking as _g
from utils.course.checking import CheckFailed, as_number, exercise, expect_callable, expect_tensor, hidden_generator


def _close(got, expected, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64),
                          atol=atol, rtol=rtol)


def _diagnose(got, what: str, mistakes: list[tuple[torch.Tensor, str]], atol: float = 1e-4) -> None:
    """Raise the message of the first mistake whose result `got` matches."""
    for wrong, message in mistakes:
        if _close(got, wrong, atol=atol):
            raise CheckFailed(f"{what}: {message}")


# ---------------------------------------------------------------------------------------------------------
# 13.1 — the data
# ---------------------------------------------------------------------------------------------------------


@exercise("13", "13.1", "modular_addition_split", "The data set and its train/test split", points=1,
          reference=_g.modular_addition_split)
def modular_addition_split(answer, hidden):
    expect_callable(answer, "modular_addition_split")
    cases = [(7, 0.3, 0), (10, 0.5, 3)]
    if hidden:
        g = hidden_generator(131)
        cases += [(int(torch.randint(11, 30, (1,), generator=g)), 0.25, int(torch.randint(0, 10**6, (1,), generator=g))),
                  (113, 0.3, 0)]
    for p, frac, seed in cases:
        what = f"p = {p}, frac_train = {frac}, seed = {seed}"
        got = answer(p, frac, seed)
        tokens, labels, train_idx, test_idx = _g.modular_addition_split(p, frac, seed)
        if not isinstance(got, (tuple, list)) or len(got) != 4:
            raise CheckFailed(f"{what}: return the tuple (tokens, labels, train_idx, test_idx).")
        g_tokens, g_labels, g_train, g_test = got
        for name, value in (("tokens", g_tokens), ("labels", g_labels), ("train_idx", g_train), ("test_idx", g_test)):
            if not isinstance(value, torch.Tensor):
                raise CheckFailed(f"{what}: {name} should be a tensor, got {type(value).__name__}.")
        if tuple(g_tokens.shape) != (p * p, 3):
            raise CheckFailed(f"{what}: tokens should have shape ({p * p}, 3) (every pair, 'a b ='), got "
                              f"{tuple(g_tokens.shape)}.")
        if not torch.equal(g_tokens[:, 2], tokens[:, 2]):
            raise CheckFailed(f"{what}: the third token should be '=', which is token p = {p} (the residues are "
                              f"0..p-1).")
        b_major = torch.stack([tokens[:, 1], tokens[:, 0], tokens[:, 2]], 1)
        if torch.equal(g_tokens, b_major):
            raise CheckFailed(f"{what}: your pairs are in b-major order; list them a-major (row a * p + b holds "
                              f"(a, b)), as the Fourier analysis later reshapes them to [p, p] indexed [a, b].")
        if not torch.equal(g_tokens, tokens):
            raise CheckFailed(f"{what}: tokens differ from (a, b, p) for all pairs in a-major order.")
        if torch.equal(g_labels, tokens[:, 0] + tokens[:, 1]):
            raise CheckFailed(f"{what}: labels are a + b; take them mod p.")
        if not torch.equal(g_labels, labels):
            raise CheckFailed(f"{what}: labels should be (a + b) mod p.")
        if g_train.numel() != train_idx.numel():
            hint = " (round frac_train * p * p, do not truncate)" if abs(g_train.numel() - train_idx.numel()) == 1 else ""
            raise CheckFailed(f"{what}: {g_train.numel()} training pairs, expected {train_idx.numel()}{hint}.")
        if not torch.equal(g_train.sort().values, g_train) or not torch.equal(g_test.sort().values, g_test):
            raise CheckFailed(f"{what}: return train_idx and test_idx sorted.")
        if set(g_train.tolist()) & set(g_test.tolist()):
            raise CheckFailed(f"{what}: some pairs are in both the training and the test set.")
        if not torch.equal(g_train, train_idx) or not torch.equal(g_test, test_idx):
            raise CheckFailed(f"{what}: a different split from the course's: draw one permutation with "
                              f"torch.randperm(p * p, generator=torch.Generator().manual_seed(seed)), the first "
                              f"round(frac_train * p * p) indices train.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 13.2 — the Fourier basis
# ---------------------------------------------------------------------------------------------------------


@exercise("13", "13.2", "fourier_basis", "The Fourier basis over Z_p", points=1, reference=_g.fourier_basis)
def fourier_basis(answer, hidden):
    expect_callable(answer, "fourier_basis")
    ps = [5, 7]
    if hidden:
        ps += [2 * int(torch.randint(5, 40, (1,), generator=hidden_generator(132))) + 1, 113]
    for p in ps:
        what = f"p = {p}"
        got = answer(p)
        expected = _g.fourier_basis(p)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (p, p):
            raise CheckFailed(f"{what}: expected a [{p}, {p}] tensor (one basis vector per row).")
        if _close(got, expected, atol=1e-5):
            continue
        norms = got.double().norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            raise CheckFailed(f"{what}: row norms are not 1 (row 1 has norm {norms[1].item():.3g}); normalise each "
                              f"basis vector, so the basis is orthonormal.")
        swapped = expected.clone()
        swapped[1::2], swapped[2::2] = expected[2::2], expected[1::2]
        x = torch.arange(p, dtype=torch.float64)
        no_two_pi = [torch.ones(p, dtype=torch.float64)]
        for k in range(1, (p - 1) // 2 + 1):
            no_two_pi += [torch.cos(k * x), torch.sin(k * x)]
        no_two_pi = torch.stack(no_two_pi)
        no_two_pi = no_two_pi / no_two_pi.norm(dim=1, keepdim=True)
        _diagnose(got, what, [(swapped, "rows 2k-1 and 2k are swapped: cos(2 pi k x / p) comes first, then sin."),
                              (no_two_pi, "the angles should be 2 pi k x / p, not k x.")], atol=1e-4)
        expect_tensor(got.float(), expected, what, atol=1e-5,
                      hint="row 0 constant, then cos and sin of 2 pi k x / p for k = 1..(p-1)/2, each unit norm.")
    return f"p in {ps}"


# ---------------------------------------------------------------------------------------------------------
# 13.3 — Fourier norms of the embedding
# ---------------------------------------------------------------------------------------------------------


@exercise("13", "13.3", "frequency_norms", "How much of the embedding each frequency holds", points=1,
          reference=_g.frequency_norms)
def frequency_norms(answer, hidden):
    expect_callable(answer, "frequency_norms")
    g = torch.Generator().manual_seed(133)
    cases = [(7, torch.randn(7, 4, generator=g)), (11, torch.randn(11, 6, generator=g))]
    W_sparse = _g.fourier_basis(13)[[3, 4, 9]].T @ torch.randn(3, 5, generator=g)  # frequencies 2 and 5 only
    cases.append((13, W_sparse))
    if hidden:
        hg = hidden_generator(133)
        cases += [(17, torch.randn(17, 9, generator=hg)), (113, torch.randn(113, 8, generator=hg))]
    for p, W in cases:
        basis = _g.fourier_basis(p)
        what = f"W of shape {tuple(W.shape)}"
        got = answer(W.clone(), basis.clone())
        expected = _g.frequency_norms(W, basis)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a tensor, got {type(got).__name__}.")
        if got.numel() == (p + 1) // 2:
            raise CheckFailed(f"{what}: {got.numel()} values; return one per frequency k = 1..(p-1)/2 "
                              f"({(p - 1) // 2}), leaving out the constant.")
        coefficients = basis @ W
        _diagnose(got, what, [
            (expected.pow(2), "these are squared norms; take the square root."),
            (coefficients[1::2].norm(dim=-1), "only the cosine part counted; add the sine coefficient of each "
                                              "frequency (rows 2k-1 and 2k)."),
            (coefficients[1::2].abs().sum(-1) + coefficients[2::2].abs().sum(-1),
             "use the Euclidean norm of the coefficients, not the sum of their absolute values.")])
        expect_tensor(got, expected, what, atol=1e-4,
                      hint="project W onto the basis (basis @ W), then combine rows 2k-1 and 2k.")
    return f"{len(cases)} matrices"


# ---------------------------------------------------------------------------------------------------------
# 13.4 — the neurons' activations
# ---------------------------------------------------------------------------------------------------------


@exercise("13", "13.4", "mlp_activations", "Read the neurons for every input", points=1,
          reference=_g.mlp_activations)
def mlp_activations(answer, hidden):
    expect_callable(answer, "mlp_activations")
    models = [(_g.random_grokking_model(7, 0), 7), (_g.random_grokking_model(11, 1), 11)]
    if hidden:
        models.append((_g.random_grokking_model(13, int(torch.randint(0, 1000, (1,), generator=hidden_generator(134)))),
                       13))
        models.append((_g.grokking_checkpoint(_g.shipped_epochs()[-1]), 113))
    for model, p in models:
        what = f"a model with p = {p}"
        got = answer(model, p)
        expected = _g.mlp_activations(model, p)
        if [name for name, point in model.hook_dict.items() if point.has_hooks()]:
            model.reset_hooks()
            raise CheckFailed(f"{what}: your function left hooks on the model; use run_with_cache (or remove them).")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} ([a, b, neuron]), got {shape}.")
        if _close(got, expected, atol=1e-4):
            continue
        tokens, _ = _g.modular_addition_data(p)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in ("blocks.0.mlp.hook_pre",
                                                                             "blocks.0.mlp.hook_post"))
        pre = cache["blocks.0.mlp.hook_pre"]
        post = cache["blocks.0.mlp.hook_post"]
        _diagnose(got, what, [
            (pre[:, -1].reshape(p, p, -1), "these are pre-activations (some are negative); read "
                                            "blocks.0.mlp.hook_post, after the ReLU."),
            (expected.transpose(0, 1), "your array is indexed [b, a]; the pairs are a-major, so reshape to [a, b]."),
            (post[:, 0].reshape(p, p, -1), "you read position 0 ('a'); the answer is read at the last position "
                                           "('=')."),
            (post[:, 1].reshape(p, p, -1), "you read position 1 ('b'); the answer is read at the last position "
                                           "('=').")])
        expect_tensor(got, expected, what, atol=1e-4, hint="blocks.0.mlp.hook_post at position -1, reshaped [p, p, d_mlp].")
    return f"{len(models)} models"


# ---------------------------------------------------------------------------------------------------------
# 13.5 — neurons as functions of one frequency
# ---------------------------------------------------------------------------------------------------------


def _single_frequency_acts(p: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n functions of (a, b), each a random mix of one frequency's terms plus a little noise."""
    basis = _g.fourier_basis(p).double()
    acts = torch.zeros(p, p, n, dtype=torch.float64)
    for i in range(n):
        k = int(torch.randint(1, (p - 1) // 2 + 1, (1,), generator=g))
        idx = [0, 2 * k - 1, 2 * k]
        coefficients = torch.randn(3, 3, generator=g, dtype=torch.float64)
        acts[:, :, i] = basis[idx].T @ coefficients @ basis[idx] + 0.05 * torch.randn(p, p, generator=g,
                                                                                      dtype=torch.float64)
    return acts.float() + 2.0


@exercise("13", "13.5", "frequency_variance_fractions", "How much of each neuron one frequency explains", points=3,
          reference=_g.frequency_variance_fractions)
def frequency_variance_fractions(answer, hidden):
    expect_callable(answer, "frequency_variance_fractions")
    g = torch.Generator().manual_seed(135)
    cases = [_single_frequency_acts(7, 4, g), torch.randn(7, 7, 3, generator=g) + 1.0, _single_frequency_acts(11, 6, g)]
    if hidden:
        hg = hidden_generator(135)
        cases += [_single_frequency_acts(13, 5, hg), torch.randn(9, 9, 4, generator=hg)]
    for acts in cases:
        p = acts.shape[0]
        basis = _g.fourier_basis(p)
        what = f"activations of shape {tuple(acts.shape)}"
        got = answer(acts.clone(), basis.clone())
        expected = _g.frequency_variance_fractions(acts, basis)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} ([frequency, neuron]), got {shape}.")
        if _close(got, expected, atol=1e-4):
            continue
        energy = torch.einsum("ia,jb,abn->ijn", basis, basis, acts).pow(2)
        total_with_mean = energy.sum((0, 1))
        total = total_with_mean - energy[0, 0]
        with_mean, only_products, only_a = [], [], []
        for k in range(1, (p - 1) // 2 + 1):
            idx = torch.tensor([0, 2 * k - 1, 2 * k])
            inside = energy[idx][:, idx].sum((0, 1)) - energy[0, 0]
            with_mean.append(inside / total_with_mean)
            only_products.append(energy[idx[1:]][:, idx[1:]].sum((0, 1)) / total)
            only_a.append(energy[idx[1:], 0].sum(0) / total)
        _diagnose(got, what, [
            (expected.T, "your array is [neuron, frequency]; return [frequency, neuron]."),
            (torch.stack(with_mean), "the total includes the mean (the constant-constant term); a neuron's variance "
                                     "leaves it out."),
            (torch.stack(only_products), "you kept only the products cos/sin(w a) x cos/sin(w b); the terms of one "
                                         "frequency include those with the constant on one side (e.g. cos(w a) "
                                         "alone)."),
            (torch.stack(only_a), "you counted only the terms in a; a frequency's terms are those of a 2-D Fourier "
                                  "transform over (a, b)")])
        expect_tensor(got, expected, what, atol=1e-4,
                      hint="2-D transform: einsum('ia,jb,abn->ijn', basis, basis, acts); square; sum the 3x3 block "
                           "of indices {0, 2k-1, 2k}, minus the [0, 0] term; divide by the total minus [0, 0].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 13.6 — the logits' key-frequency components
# ---------------------------------------------------------------------------------------------------------


@exercise("13", "13.6", "logit_frequency_components", "The logits along cos(w(a+b-c))", points=2,
          reference=_g.logit_frequency_components)
def logit_frequency_components(answer, hidden):
    expect_callable(answer, "logit_frequency_components")
    g = torch.Generator().manual_seed(136)
    cases = [(7, [1, 3]), (11, [2]), (11, [1, 4, 5])]
    if hidden:
        hg = hidden_generator(136)
        cases += [(13, sorted(torch.randperm(6, generator=hg)[:3].add(1).tolist())), (113, [14, 35])]
        g = hg
    for p, freqs in cases:
        labels = _g.modular_addition_data(p)[1]
        logits = torch.randn(p * p, p, generator=g) + 3 * torch.nn.functional.one_hot(labels, p)
        what = f"p = {p}, freqs = {freqs}"
        got = answer(logits.clone(), p, list(freqs))
        expected = _g.logit_frequency_components(logits, p, freqs)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (p * p, p):
            raise CheckFailed(f"{what}: expected a [{p * p}, {p}] tensor, the same shape as the logits.")
        if _close(got, expected, atol=1e-4):
            continue
        a = torch.arange(p).view(p, 1, 1)
        b = torch.arange(p).view(1, p, 1)
        c = torch.arange(p).view(1, 1, p)
        cube = logits.reshape(p, p, p).double()
        plus, unnormalised, cos_only = (torch.zeros_like(cube) for _ in range(3))
        for k in freqs:
            for sign_angle, target in ((a + b + c, plus), (a + b - c, unnormalised)):
                angle = 2 * math.pi * k * sign_angle.double() / p
                for direction in (torch.cos(angle), torch.sin(angle)):
                    scale = direction.pow(2).sum() if target is plus else 1.0
                    target += (cube * direction).sum() / scale * direction
            angle = 2 * math.pi * k * (a + b - c).double() / p
            cos_only += (cube * torch.cos(angle)).sum() / torch.cos(angle).pow(2).sum() * torch.cos(angle)
        _diagnose(got, what, [
            (plus.reshape(p * p, p), "you used a + b + c; the directions are cos and sin of w (a + b - c)."),
            (unnormalised.reshape(p * p, p), "the projection onto a direction d is (L . d) / (d . d) times d; you "
                                             "did not divide by d . d."),
            (cos_only.reshape(p * p, p), "you kept only the cosine directions; add the sine ones.")])
        expect_tensor(got, expected, what, atol=1e-4,
                      hint="for each k, project the [p, p, p] logits onto cos and onto sin of w_k (a + b - c).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 13.7 — restricted and excluded losses
# ---------------------------------------------------------------------------------------------------------


@exercise("13", "13.7", "progress_measures", "Restricted and excluded losses", points=2,
          reference=_g.progress_measures)
def progress_measures(answer, hidden):
    expect_callable(answer, "progress_measures")
    g = torch.Generator().manual_seed(137)
    cases = [(7, [1, 3], 0.4), (11, [2, 5], 0.3)]
    if hidden:
        g = hidden_generator(137)
        cases += [(13, [int(torch.randint(1, 7, (1,), generator=g))], 0.5)]
    keys = ("train_loss", "test_loss", "restricted_loss", "excluded_loss")
    for p, freqs, frac in cases:
        tokens, labels, train_idx, test_idx = _g.modular_addition_split(p, frac, 0)
        # logits that are partly the key frequencies' "clock" and partly noise, so every measure is distinct
        clock = _g.logit_frequency_components(4 * torch.nn.functional.one_hot(labels, p).float(), p, freqs)
        logits = clock + torch.randn(p * p, p, generator=g)
        what = f"p = {p}, key freqs {freqs}"
        got = answer(logits.clone(), labels.clone(), train_idx.clone(), test_idx.clone(), list(freqs))
        expected = _g.progress_measures(logits, labels, train_idx, test_idx, freqs)
        if not isinstance(got, dict) or not set(keys) <= set(got):
            raise CheckFailed(f"{what}: return a dict with the keys {keys}.")
        values = {key: as_number(got[key], f"{what}, '{key}'") for key in keys}
        key_part = _g.logit_frequency_components(logits, p, freqs).double()
        ce = _g._cross_entropy
        for key in keys:
            if abs(values[key] - expected[key]) <= 1e-4 * max(1.0, abs(expected[key])):
                continue
            near = lambda x: abs(values[key] - x) <= 1e-4 * max(1.0, abs(x))  # noqa: E731
            if key == "train_loss" and near(expected["test_loss"]) or key == "test_loss" and near(expected["train_loss"]):
                raise CheckFailed(f"{what}: train and test loss are swapped.")
            if key == "restricted_loss":
                if near(expected["excluded_loss"]) or near(ce(logits.double() - key_part, labels)):
                    raise CheckFailed(f"{what}: your restricted loss removes the key frequencies; it should keep "
                                      f"only them (and the excluded loss removes them).")
                if near(ce(key_part[train_idx], labels[train_idx])) or near(ce(key_part[test_idx], labels[test_idx])):
                    raise CheckFailed(f"{what}: the restricted loss is measured on all p*p pairs, not a subset.")
            if key == "excluded_loss":
                if near(ce(key_part[train_idx], labels[train_idx])):
                    raise CheckFailed(f"{what}: your excluded loss keeps only the key frequencies; it should remove "
                                      f"them.")
                if near(ce(logits.double() - key_part, labels)) or near(ce((logits.double() - key_part)[test_idx],
                                                                            labels[test_idx])):
                    raise CheckFailed(f"{what}: the excluded loss is measured on the training pairs only (it asks "
                                      f"whether the model still fits its training data without the circuit).")
            raise CheckFailed(f"{what}: '{key}' is {values[key]:.4g}, expected {expected[key]:.4g}.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 13.8 — the three phases
# ---------------------------------------------------------------------------------------------------------


def _phase_curves(g: torch.Generator, n: int = 120, every: int = 100) -> dict:
    """Synthetic curves with the shape of a grokking run and random phase boundaries t1 < t2 < t3: the test loss
    rises to a peak at t1, creeps down, falls fast from t2 and is tiny from t3; test accuracy jumps around t2."""
    t1, t2, t3 = sorted(torch.randperm(n - 12, generator=g)[:3].add(4).tolist())
    t2, t3 = t2 + 3, t3 + 6
    s = torch.arange(n).double()
    noise = 1 + 0.01 * torch.rand(n, generator=g, dtype=torch.float64)
    rise = 4.6 + 20 * (s / t1).clamp(max=1)
    test_loss = torch.where(s <= t1, rise, 24.6 - 0.02 * (s - t1))
    test_loss = torch.where(s >= t2, test_loss[t2] * torch.exp(-(s - t2) * 8 / (t3 - t2)), test_loss) * noise
    test_loss[t3:] = torch.minimum(test_loss[t3:], torch.tensor(0.009))
    test_acc = (0.02 + 0.98 * torch.sigmoid((s - t2 - 1) * 3)).clamp(max=1.0)
    train_loss = 4.6 * torch.exp(-s / max(1, t1 / 3))
    return {"epoch": (torch.arange(n) * every).tolist(), "train_loss": train_loss.tolist(),
            "test_loss": test_loss.tolist(), "test_acc": test_acc.tolist()}


@exercise("13", "13.8", "three_phases", "Read the three phases off the curves", points=2, reference=_g.three_phases)
def three_phases(answer, hidden):
    expect_callable(answer, "three_phases")
    g = torch.Generator().manual_seed(138)
    cases = [_phase_curves(g), _phase_curves(g, n=80, every=50)]
    run = _g.shipped_run()
    cases.append(_g.curves_from_log(run["log"]))
    if hidden:
        hg = hidden_generator(138)
        cases += [_phase_curves(hg), _phase_curves(hg, n=200, every=20)]
    for i, curves in enumerate(cases):
        what = f"curves {i} ({len(curves['epoch'])} points, every {curves['epoch'][1] - curves['epoch'][0]} epochs)"
        got = answer({k: list(v) for k, v in curves.items()})
        expected = _g.three_phases(curves)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise CheckFailed(f"{what}: return three epochs (end of memorisation, end of circuit formation, end of "
                              f"cleanup).")
        got = tuple(int(as_number(x, what)) for x in got)
        if got == expected:
            continue
        names = ("the end of memorisation", "the end of circuit formation", "the end of cleanup")
        for name, mine, ref in zip(names, got, expected):
            if mine != ref:
                index = curves["epoch"].index(ref)
                if mine == index:
                    raise CheckFailed(f"{what}: {name}: you returned the index {mine}; return the epoch, "
                                      f"curves['epoch'][i] = {ref}.")
                raise CheckFailed(f"{what}: {name} is epoch {ref}, you said {mine}. Memorisation ends at the "
                                  f"highest test loss; circuit formation at the first later epoch with test "
                                  f"accuracy >= 0.5; cleanup at the first epoch after that with test loss <= 0.01.")
    return f"{len(cases)} sets of curves"


# ---------------------------------------------------------------------------------------------------------
# 13.9 — the training loop
# ---------------------------------------------------------------------------------------------------------

_TRAIN_KEYS = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")


def _train_args(p, seed, fixed=None):
    return dict(p=p, frac_train=0.5, epochs=12, lr=1e-2, weight_decay=1.0, seed=seed, d_model=16, n_heads=2,
                d_mlp=32, fixed_embedding=fixed, log_every=4, stop_at_test_acc=None)


@exercise("13", "13.9", "train_modular", "The full-batch AdamW training loop", points=3,
          reference=_g.train_modular)
def train_modular(answer, hidden):
    expect_callable(answer, "train_modular")
    g = torch.Generator().manual_seed(139)
    cases = [_train_args(7, 0), _train_args(11, 1, fixed=torch.randn(12, 16, generator=g) * 0.3)]
    if hidden:
        hg = hidden_generator(139)
        cases += [_train_args(13, int(torch.randint(0, 1000, (1,), generator=hg))),
                  {**_train_args(9, 2), "stop_at_test_acc": 0.0}]
    for args in cases:
        what = f"p = {args['p']}, seed = {args['seed']}{', fixed embedding' if args['fixed_embedding'] is not None else ''}"
        call = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        got = answer(**call)
        expected = _g.train_modular(**args)
        if not isinstance(got, list) or not all(isinstance(row, dict) for row in got):
            raise CheckFailed(f"{what}: return the log, a list of dicts.")
        if [row.get("epoch") for row in got] != [row["epoch"] for row in expected]:
            raise CheckFailed(f"{what}: logged epochs {[row.get('epoch') for row in got]}, expected "
                              f"{[row['epoch'] for row in expected]} (log before the update of every "
                              f"log_every-th epoch, and at `epochs`; stop once test accuracy >= stop_at_test_acc).")
        embedding = got[-1].get("embedding")
        if not isinstance(embedding, torch.Tensor) or tuple(embedding.shape) != tuple(expected[-1]["embedding"].shape):
            raise CheckFailed(f"{what}: the last log entry should also hold 'embedding', the final token embedding "
                              f"[p+1, d_model] (the fixed one when fixed_embedding is given).")
        for row, ref in zip(got, expected):
            for key in _TRAIN_KEYS[1:]:
                value = as_number(row.get(key), f"{what}, epoch {row['epoch']}, '{key}'")
                if abs(value - ref[key]) > 2e-3 * max(1.0, abs(ref[key])):
                    raise CheckFailed(f"{what}: at epoch {row['epoch']} '{key}' is {value:.4g}, expected "
                                      f"{ref[key]:.4g}. {_training_diagnosis(got, args)}")
        if not _close(embedding, expected[-1]["embedding"], atol=2e-3, rtol=2e-3):
            raise CheckFailed(f"{what}: the final embedding differs from the reference's. With fixed_embedding it "
                              f"must stay exactly the given one.")
    return f"{len(cases)} short runs"


def _training_diagnosis(got: list[dict], args: dict) -> str:
    """Which usual mistake reproduces the learner's log."""
    variants = {
        "Weight decay seems missing: pass weight_decay to AdamW.": {"weight_decay": 0.0},
        "Your run looks like it trains with lr 1e-3 whatever `lr` says.": {"lr": 1e-3},
    }
    for message, change in variants.items():
        ref = _g.train_modular(**{**args, **change})
        if all(abs(row.get("train_loss", 0) - r["train_loss"]) < 2e-3 for row, r in zip(got, ref)):
            return message
    if args["fixed_embedding"] is not None:
        return ("With fixed_embedding, set the token embedding to it and leave it out of the optimiser (it must "
                "neither be trained nor decayed).")
    return ("Check: AdamW (not Adam) with betas (0.9, 0.98), full batch on the training pairs, loss at the last "
            "position, optimiser.zero_grad() each epoch, and logging before the update.")


# ---------------------------------------------------------------------------------------------------------
# 13.10 — min-norm least squares
# ---------------------------------------------------------------------------------------------------------


@exercise("13", "13.10", "min_norm_least_squares", "Minimum-norm least squares", points=1,
          reference=_g.min_norm_least_squares)
def min_norm_least_squares(answer, hidden):
    expect_callable(answer, "min_norm_least_squares")
    g = torch.Generator().manual_seed(1310)
    shapes = [(5, 12), (12, 5), (8, 8)]
    if hidden:
        g = hidden_generator(1310)
        shapes += [(int(torch.randint(3, 20, (1,), generator=g)), 30), (40, 7)]
    for n, d in shapes:
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = torch.randn(n, generator=g, dtype=torch.float64)
        what = f"X of shape ({n}, {d})"
        got = answer(X.clone(), y.clone())
        expected = _g.min_norm_least_squares(X, y)
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            raise CheckFailed(f"{what}: expected a weight vector of shape ({d},).")
        if _close(got, expected, atol=1e-6, rtol=1e-5):
            continue
        if torch.isnan(got).any() or torch.isinf(got).any():
            raise CheckFailed(f"{what}: NaN or inf; with fewer samples than features X^T X is singular. Use the "
                              f"pseudo-inverse (torch.linalg.pinv) or lstsq.")
        residual = (X @ got.double() - y).norm().item()
        if n <= d and residual < 1e-6:
            raise CheckFailed(f"{what}: your weights fit the data but are not the minimum-norm solution (norm "
                              f"{got.double().norm():.3g}, minimum {expected.norm():.3g}).")
        expect_tensor(got.double(), expected, what, atol=1e-6, hint="w = pinv(X) @ y.")
    return f"{len(shapes)} systems"


# ---------------------------------------------------------------------------------------------------------
# 13.11 — double descent in random-features regression
# ---------------------------------------------------------------------------------------------------------


def _regression_data(g, n_train, n_test, d):
    X_train = torch.randn(n_train, d, generator=g, dtype=torch.float64)
    X_test = torch.randn(n_test, d, generator=g, dtype=torch.float64)
    beta = torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y_train = X_train @ beta + 0.3 * torch.randn(n_train, generator=g, dtype=torch.float64)
    y_test = X_test @ beta + 0.3 * torch.randn(n_test, generator=g, dtype=torch.float64)
    return X_train, y_train, X_test, y_test


@exercise("13", "13.11", "random_features_risk", "Double descent in random-features regression", points=3,
          reference=_g.random_features_risk)
def random_features_risk(answer, hidden):
    expect_callable(answer, "random_features_risk")
    g = torch.Generator().manual_seed(1311)
    cases = [(_regression_data(g, 20, 50, 5), [4, 10, 20, 40], 0), (_regression_data(g, 15, 30, 3), [15, 3, 30], 7)]
    if hidden:
        hg = hidden_generator(1311)
        cases += [(_regression_data(hg, 25, 40, 6), [5, 24, 25, 26, 60], int(torch.randint(0, 10**6, (1,),
                                                                                          generator=hg)))]
    for (X_train, y_train, X_test, y_test), widths, seed in cases:
        what = f"{X_train.shape[0]} training points, widths {widths}, seed {seed}"
        got = answer(X_train.clone(), y_train.clone(), X_test.clone(), y_test.clone(), list(widths), seed)
        expected = _g.random_features_risk(X_train, y_train, X_test, y_test, widths, seed)
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            raise CheckFailed(f"{what}: expected a tensor of {len(widths)} test errors, one per width.")
        if _close(got, expected, atol=1e-6, rtol=1e-4):
            continue
        d = X_train.shape[1]
        W = torch.randn(d, max(widths), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / math.sqrt(d)
        variants = {"train": [], "no_relu": [], "fresh": []}
        fresh = torch.Generator().manual_seed(seed)
        for N in widths:
            f_tr, f_te = (X_train @ W[:, :N]).relu(), (X_test @ W[:, :N]).relu()
            w = torch.linalg.pinv(f_tr) @ y_train
            variants["train"].append((f_tr @ w - y_train).pow(2).mean())
            l_tr, l_te = X_train @ W[:, :N], X_test @ W[:, :N]
            variants["no_relu"].append((l_te @ (torch.linalg.pinv(l_tr) @ y_train) - y_test).pow(2).mean())
            Wf = torch.randn(d, N, generator=fresh, dtype=torch.float64) / math.sqrt(d)
            ff_tr, ff_te = (X_train @ Wf).relu(), (X_test @ Wf).relu()
            variants["fresh"].append((ff_te @ (torch.linalg.pinv(ff_tr) @ y_train) - y_test).pow(2).mean())
        _diagnose(got, what, [
            (torch.stack(variants["train"]), "these are training errors; report the error on the test points."),
            (torch.stack(variants["no_relu"]), "the features are relu(X @ W[:, :N]); you left out the ReLU."),
            (torch.stack(variants["fresh"]), "draw W once, of width max(n_features), and take its first N columns "
                                             "for each width (not a fresh draw per width).")], atol=1e-6)
        expect_tensor(got.double(), expected, what, atol=1e-6, rtol=1e-4,
                      hint="W = randn(d, max N, generator seeded, float64) / sqrt(d); features relu(X @ W[:, :N]); "
                           "min-norm fit on train; mean squared error on test.")
    return f"{len(cases)} sweeps"


# ---------------------------------------------------------------------------------------------------------
# 13.12 — a Fourier embedding
# ---------------------------------------------------------------------------------------------------------


@exercise("13", "13.12", "fourier_embedding", "An embedding made of the key frequencies", points=2,
          reference=_g.fourier_embedding)
def fourier_embedding(answer, hidden):
    expect_callable(answer, "fourier_embedding")
    g = torch.Generator().manual_seed(1312)
    cases = [(7, [1, 3], 5), (11, [2, 4, 5], 8)]
    if hidden:
        g = hidden_generator(1312)
        cases += [(13, [int(torch.randint(1, 7, (1,), generator=g))], 6), (113, [14, 35, 41], 16)]
    for p, freqs, d_model in cases:
        projection = torch.randn(2 * len(freqs), d_model, generator=g)
        eq_row = torch.randn(d_model, generator=g)
        what = f"p = {p}, freqs = {freqs}, d_model = {d_model}"
        got = answer(p, list(freqs), projection.clone(), eq_row.clone())
        expected = _g.fourier_embedding(p, freqs, projection, eq_row)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (p + 1, d_model):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckFailed(f"{what}: expected shape ({p + 1}, {d_model}): one row per residue and one for '=', "
                              f"got {shape}.")
        if _close(got, expected, atol=1e-4):
            continue
        a = torch.arange(p, dtype=torch.float64).unsqueeze(1)
        w = 2 * math.pi * torch.tensor(freqs, dtype=torch.float64) / p
        blocked = torch.cat([torch.cos(w * a), torch.sin(w * a)], dim=1).float() @ projection
        no_two_pi = torch.stack([torch.cos(torch.tensor(freqs) * a), torch.sin(torch.tensor(freqs) * a)],
                                -1).reshape(p, -1).float() @ projection
        _diagnose(got[:p], what, [
            (blocked, "the features interleave: cos(w_k0 a), sin(w_k0 a), cos(w_k1 a), ... (not all cosines first)."),
            (no_two_pi, "the angle is w_k a with w_k = 2 pi k / p.")])
        if not _close(got[p], eq_row):
            raise CheckFailed(f"{what}: the last row ('=') should be eq_row.")
        expect_tensor(got, expected, what, atol=1e-4)
    return f"{len(cases)} embeddings"

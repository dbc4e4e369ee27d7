"""Numbers that rest on a sample carry their sample size and a 95 % interval.

    ci = bootstrap_ci(per_prompt_effects)        # CI(mean=0.42, low=0.35, high=0.50, n=40)
    print(f"effect {ci}")                        # effect 0.42 [95% CI 0.35, 0.50; n = 40]
    spread = seed_spread(final_accuracy_per_seed) # the same, over seeds (t interval of the mean)

The bootstrap resamples the sample with replacement (2,000 times, a fixed seed, so a notebook prints the same
interval every run) and reports the 2.5th and 97.5th percentiles of the resampled statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class CI:
    mean: float  # the statistic on the whole sample (the mean, unless another statistic was asked for)
    low: float
    high: float
    n: int

    def format(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f} [95% CI {self.low:.{digits}f}, {self.high:.{digits}f}; n = {self.n}]"

    def __str__(self) -> str:
        return self.format()

    def excludes(self, value: float) -> bool:
        """Whether `value` lies outside the interval (e.g. 0: the effect is distinguishable from none)."""
        return value < self.low or value > self.high


def _as_tensor(values) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("an interval needs at least one value")
    if torch.isnan(values).any():
        raise ValueError("the sample contains NaN; drop or fix those values first")
    return values


def bootstrap_ci(values: Sequence[float] | torch.Tensor, statistic: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 n_boot: int = 2000, seed: int = 0) -> CI:
    """95 % percentile-bootstrap interval of `statistic` (default: the mean) over the sample `values`.

    statistic: maps a [n_boot, n] tensor of resamples to [n_boot] (e.g. `lambda x: x.median(-1).values`).
    """
    values = _as_tensor(values)
    statistic = statistic or (lambda sample: sample.mean(-1))
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, values.numel(), (n_boot, values.numel()), generator=generator)
    resampled = statistic(values[index])
    low, high = torch.quantile(resampled, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return CI(float(statistic(values[None])[0]), low, high, values.numel())


# two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (beyond 30, the normal's 1.96 is close)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def seed_spread(values: Sequence[float] | torch.Tensor) -> CI:
    """Mean over seeds (or runs) with a 95 % t interval; with few seeds a bootstrap would understate the spread."""
    values = _as_tensor(values)
    n = values.numel()
    mean = values.mean().item()
    if n == 1:
        return CI(mean, math.nan, math.nan, 1)
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * values.std().item() / math.sqrt(n)
    return CI(mean, mean - half, mean + half, n)

r"""95% intervals and paired tests for evaluation figures: the Wilson interval of a proportion, the
Student t interval of a mean, and the exact McNemar test of a change between two evaluations of
the same items.

Every figure an evaluation reports carries one of these: a rate of successes (a pass rate, a
reward accuracy) its Wilson interval, a mean over items (a margin, a loss) or over seeds its t
interval.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

__all__ = ["T975", "Z95", "mean_interval", "paired_change", "t_quantile_975", "wilson_interval"]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> Tuple[float, float]:
    r"""The Wilson score interval for a binomial proportion (default 95%, ``z = 1.96``):

    .. math:: \frac{\hat p + \frac{z^2}{2n} \pm z \sqrt{\frac{\hat p (1 - \hat p)}{n} + \frac{z^2}{4n^2}}}
              {1 + \frac{z^2}{n}}, \qquad \hat p = \text{successes} / n.

    Unlike the normal (Wald) interval it stays inside ``[0, 1]`` and is not degenerate at 0 or
    ``n`` successes (``wilson_interval(10, 32) == (0.1795..., 0.4857...)``;
    ``wilson_interval(100, 100)`` has lower end 0.963). Raises ``ValueError`` unless
    ``0 <= successes <= n`` and ``n > 0``.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # at 0 (n) successes the lower (upper) end is exactly 0 (1); rounding would leave 1 - 1e-16
    return (0.0 if successes == 0 else center - half), (1.0 if successes == n else center + half)


# The t distribution's 97.5% quantile by degrees of freedom (standard tables, 3 decimals).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    r"""The Student t distribution's 97.5% quantile for ``df >= 30`` degrees of freedom, by the
    Cornish-Fisher expansion around :math:`z = ` :data:`Z95` to order :math:`\nu^{-4}` (Abramowitz &
    Stegun 26.7.5):

    .. math:: t = z + \frac{g_1}{\nu} + \frac{g_2}{\nu^2} + \frac{g_3}{\nu^3} + \frac{g_4}{\nu^4},
              \quad g_1 = \tfrac{z^3 + z}{4},\ g_2 = \tfrac{5z^5 + 16z^3 + 3z}{96},\
              g_3 = \tfrac{3z^7 + 19z^5 + 17z^3 - 15z}{384},\
              g_4 = \tfrac{79z^9 + 776z^7 + 1482z^5 - 1920z^3 - 945z}{92160}.

    Its relative error is below 2e-8 from 30 degrees of freedom on (1.5e-8 at 30, 4e-11 at 100),
    so it extends :data:`T975` (3 decimals) exactly enough. Raises ``ValueError`` below 30, where
    the series converges too slowly (0.7% off at 2)."""
    if df < 30:
        raise ValueError(f"t_quantile_975 needs df >= 30 (the table T975 covers fewer), got {df}")
    z = Z95
    g = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
         (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
         (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))


def mean_interval(values: Sequence[float]) -> Tuple[float, float]:
    r"""``(mean, half-width)`` of the 95% Student t interval of the mean of ``values`` (e.g. one
    score per seed): :math:`t_{0.975, n-1}\, s / \sqrt{n}` with :math:`s` the sample standard
    deviation. The quantile comes from :data:`T975` up to 30 degrees of freedom and from
    :func:`t_quantile_975` beyond. The half-width is NaN for a single value. Raises
    ``ValueError`` for no values."""
    if not len(values):
        raise ValueError("mean_interval needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else t_quantile_975(n - 1)
    return mean, t * sd / math.sqrt(n)


def paired_change(before: Sequence[bool], after: Sequence[bool], alpha: float = 0.05) -> Dict[str, Any]:
    r"""Whether the prompt-level pass rate changed between two evaluations of the *same* tasks:
    the exact McNemar test (two-sided) on the per-prompt outcomes ``passed`` of
    :func:`sgpo_jax.eval.instructions.instruction_pass_rate`.

    Only the discordant prompts carry information: ``gained`` (failed before, passes after) and
    ``lost`` (the reverse). Under "no change" each of the ``m = gained + lost`` discordant
    prompts is a fair coin, so

    .. math:: p = \min\Big(1,\ 2 \sum_{i=0}^{\min(g, l)} \binom{m}{i} 2^{-m}\Big).

    Returns ``{"change", "gained", "lost", "p_value", "significant"}`` where ``change`` is
    ``(gained - lost) / n`` (the difference of the two pass rates) and ``significant`` is
    ``p_value < alpha``. A change that is not significant is within noise and must not be read as
    a gain or a loss. Raises ``ValueError`` if the lengths differ or are 0.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_change needs two equally long, non-empty outcome lists, got {len(before)} "
                         f"and {len(after)}")
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    m = gained + lost
    tail = sum(math.comb(m, i) for i in range(min(gained, lost) + 1)) / 2 ** m
    p_value = min(1.0, 2 * tail)
    return {"change": (gained - lost) / len(before), "gained": gained, "lost": lost, "p_value": p_value,
            "significant": p_value < alpha}

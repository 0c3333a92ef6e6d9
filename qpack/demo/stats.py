"""How sure an accuracy difference is: paired comparison of two classifiers on the same images.

Two files evaluated on the same test images disagree only on some of them: ``lost`` images
the reference got right and the variant wrong, ``gained`` the reverse. McNemar's exact test
asks whether ``lost`` and ``gained`` differ more than a fair coin over ``lost + gained``
flips would make them; the 95 % interval is the normal one for the mean paired difference
``d_i = right_variant_i - right_reference_i``. With 10,000 MNIST test images one image is
0.01 points; two files that differ on 40 images can be 0.1 points apart by chance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["PairedDifference", "mcnemar_exact_p", "paired_difference"]

#: a difference counts as outside the noise when McNemar's two-sided p is below this
ALPHA = 0.05
_Z95 = 1.959963984540054


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: ``2 * P(X <= min(lost, gained))``, X ~ Binomial(lost + gained, 1/2).

    Args:
        lost: images only the reference classifies right.
        gained: images only the variant classifies right.

    Returns:
        The p-value in (0, 1]; 1 when the two never disagree.
    """
    n = lost + gained
    if n == 0:
        return 1.0
    from scipy.stats import binom

    return float(min(1.0, 2.0 * binom.cdf(min(lost, gained), n, 0.5)))


@dataclass(frozen=True)
class PairedDifference:
    """A variant's accuracy against a reference's on the same images.

    Attributes:
        n: images.
        lost: right in the reference, wrong in the variant.
        gained: wrong in the reference, right in the variant.
        delta_pp: accuracy difference, variant minus reference, in percentage points.
        ci95_pp: 95 % interval of ``delta_pp`` (paired, normal approximation).
        p_value: McNemar's exact two-sided p.
        within_noise: ``p_value >= 0.05``: the data do not tell the two apart.
    """

    n: int
    lost: int
    gained: int
    delta_pp: float
    ci95_pp: tuple[float, float]
    p_value: float
    within_noise: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        d = asdict(self)
        d["ci95_pp"] = list(self.ci95_pp)
        return d

    def text(self) -> str:
        """E.g. ``-0.12 pp [-0.25, +0.01], p 0.09, noise``."""
        lo, hi = self.ci95_pp
        p = f"{self.p_value:.2g}" if self.p_value >= 1e-3 else "<0.001"
        return f"{self.delta_pp:+.2f} pp [{lo:+.2f}, {hi:+.2f}], p {p}" + (", noise" if self.within_noise else "")


def paired_difference(reference_right: np.ndarray, variant_right: np.ndarray) -> PairedDifference:
    """Compare two classifiers image by image (vectorised over the images).

    Args:
        reference_right: bool per image: the reference's prediction is right.
        variant_right: bool per image, same images, same order.

    Returns:
        The :class:`PairedDifference`.

    Raises:
        ValueError: the arrays differ in length or are empty.
    """
    a = np.asarray(reference_right, dtype=bool)
    b = np.asarray(variant_right, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected two equal-length 1-D arrays, got shapes {a.shape} and {b.shape}")
    n = int(a.size)
    lost = int(np.count_nonzero(a & ~b))
    gained = int(np.count_nonzero(~a & b))
    mean = (gained - lost) / n
    var = max((gained + lost) / n - mean * mean, 0.0)  # variance of d_i in {-1, 0, 1}
    half = _Z95 * math.sqrt(var / n)
    p = mcnemar_exact_p(lost, gained)
    return PairedDifference(
        n=n, lost=lost, gained=gained, delta_pp=100 * mean,
        ci95_pp=(100 * (mean - half), 100 * (mean + half)), p_value=p, within_noise=p >= ALPHA,
    )

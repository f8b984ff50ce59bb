"""Small numeric helpers: argument checks, a median, and least squares of a few unknowns solved by hand."""

from __future__ import annotations

import math

RIDGE = 1e-3
"""Ridge strength, relative to each unknown's own diagonal entry."""


def check_int(value: object, name: str, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_number(value: float, name: str) -> float:
    """``value`` as a float if it is finite and >= 0, else a ``ValueError`` naming ``name``."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def median(values: list[float]) -> float:
    """The upper median (0.0 of nothing)."""
    return sorted(values)[len(values) // 2] if values else 0.0


def ridge_nonnegative(
    a: list[list[float]], g: list[float], prior: list[float]
) -> tuple[list[int], list[float], list[list[float]], list[float]]:
    """Ridge-regularized, non-negative least squares on the normal equations ``a beta = g``.

    Features are scaled to a unit diagonal; the ridge pulls toward ``prior``.  A
    negative coefficient is not physical: its feature is dropped and the rest refitted.

    Returns:
        The active features, their scales, the scaled regularized matrix and the coefficients;
        all empty when nothing could be fitted (the caller then uses ``prior``).
    """
    active = [j for j in range(len(g)) if a[j][j] > 0]
    while active:
        d = [1.0 / math.sqrt(a[j][j]) for j in active]
        m = [[a[i][j] * d[p] * d[q] + RIDGE * (p == q) for q, j in enumerate(active)] for p, i in enumerate(active)]
        rhs = [g[i] * d[p] + RIDGE * prior[i] / d[p] for p, i in enumerate(active)]
        coef = [x * s for x, s in zip(gauss(m, rhs), d, strict=True)]
        if not all(math.isfinite(v) for v in coef):  # cannot happen with the ridge; stay safe anyway
            break
        worst = min(range(len(active)), key=coef.__getitem__)
        if coef[worst] >= 0:
            return active, d, m, coef
        active.pop(worst)
    return [], [], [], []


def gauss(m: list[list[float]], rhs: list[float]) -> list[float]:
    """Solve ``m x = rhs`` (small, regular) by Gaussian elimination with partial pivoting."""
    size = len(rhs)
    rows = [[*row, r] for row, r in zip(m, rhs, strict=True)]
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, size):
            factor = rows[r][col] / rows[col][col]
            for j in range(col, size + 1):
                rows[r][j] -= factor * rows[col][j]
    x = [0.0] * size
    for r in reversed(range(size)):
        x[r] = (rows[r][size] - sum(rows[r][j] * x[j] for j in range(r + 1, size))) / rows[r][r]
    return x

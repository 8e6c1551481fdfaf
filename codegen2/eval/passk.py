"""The unbiased pass@k estimator of the Codex paper (Chen et al. 2021), in its numerically stable product form.

pass@k = E_tasks[1 - C(n - c, k) / C(n, k)] for n samples of which c passed; the ratio of binomials is computed
as prod_{i = n - c + 1}^{n} (1 - k / i), which never overflows (C(200, 100) does not fit a float's mantissa).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def estimate(counts: Iterable[tuple[int, int]], ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over tasks given (n, c) per task, for each k that every task has enough samples for."""
    counts = list(counts)
    if not counts:
        return {}
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in ks if all(n >= k for n, _ in counts)}

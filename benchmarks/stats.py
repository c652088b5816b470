"""The one summary the benchmarks report: mean ± standard error of the mean, over images or photos."""

from __future__ import annotations

import numpy as np


def summary(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sem": float(v.std(ddof=1) / np.sqrt(len(v))), "n": int(len(v))}

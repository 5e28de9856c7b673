"""Temperature scaling (Guo et al. 2017): one positive scalar T fitted on validation logits.

Calibrated probabilities are ``softmax(logits / T)``; T leaves the argmax (so accuracy) alone.
T is chosen to minimise the validation NLL. With ``b = 1 / T`` the NLL is convex in ``b``
(a log-sum-exp of linear functions minus a linear one), so it is unimodal in ``log T`` and a
golden-section search over ``log T`` in ``[log 0.05, log 20]`` finds the bounded minimum without
gradients, line searches or randomness: the same logits always give the same T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

T_MIN = 0.05
T_MAX = 20.0
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...


def _nll(z: torch.Tensor, y: torch.Tensor, log_t: float) -> float:
    return float(F.cross_entropy(z * math.exp(-log_t), y))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, *, tol: float = 1e-6) -> float:
    """The temperature in ``[0.05, 20]`` minimising the NLL of ``softmax(logits / T)``.

    Fit it on the VALIDATION split and apply it to test logits and at serving time.
    """
    z = torch.as_tensor(logits).detach().cpu().double()
    y = torch.as_tensor(targets).detach().cpu().long()
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(
            f"expected logits (N, C) and targets (N,), got {tuple(z.shape)} and {tuple(y.shape)}"
        )
    if z.shape[0] == 0:
        raise ValueError("cannot fit a temperature on 0 samples")
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity")
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    a, b = hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo)
    fa, fb = _nll(z, y, a), _nll(z, y, b)
    while hi - lo > tol:
        if fa <= fb:  # minimum in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - _INV_PHI * (hi - lo)
            fa = _nll(z, y, a)
        else:  # minimum in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + _INV_PHI * (hi - lo)
            fb = _nll(z, y, b)
    # The search interval may not contain its own endpoints' values: compare them too, so an
    # optimum at the bound (e.g. perfectly separable logits -> T_MIN) is returned exactly.
    best = min((_nll(z, y, x), x) for x in (math.log(T_MIN), (lo + hi) / 2, math.log(T_MAX)))
    return float(min(max(math.exp(best[1]), T_MIN), T_MAX))

"""Evaluation metrics on held-out logits: accuracy, top-k, per-class P/R/F1, AUC, ECE, NLL.

Everything is computed on the CPU in float64 from the full ``(N, C)`` logits of a split, with
scikit-learn doing the counting. The result of :func:`classification_report` is a plain,
JSON-serialisable dict (see its docstring for the keys); ``report.py`` writes and prints it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

ECE_BINS = 15


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()  # bf16 has no numpy dtype
    return np.asarray(x)


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and ranges; return ``(logits float64 (N, C), targets int64 (N,))``."""
    z = _as_numpy(logits).astype(np.float64, copy=False)
    y = _as_numpy(targets)
    if z.ndim != 2:
        raise ValueError(f"expected logits of shape (N, C), got {tuple(z.shape)}")
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"targets of shape {tuple(y.shape)} do not match logits {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise ValueError("cannot evaluate an empty split (0 samples)")
    y = y.astype(np.int64, copy=False)
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"targets must lie in [0, {z.shape[1] - 1}], got [{y.min()}, {y.max()}]")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity")
    return z, y


def softmax_np(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (rows sum to 1)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` (natural log)."""
    z = torch.as_tensor(logits).detach().cpu().double()
    y = torch.as_tensor(targets).detach().cpu().long()
    return float(F.cross_entropy(z / temperature, y))


def expected_calibration_error(
    probs: torch.Tensor, targets: torch.Tensor, n_bins: int = ECE_BINS
) -> float:
    """Expected calibration error of the top-1 confidence (Guo et al. 2017).

    Confidences are put in ``n_bins`` equal-width bins ``(k/n, (k+1)/n]`` (the first bin also
    takes 0); ECE = sum over bins of ``|bin| / N * |accuracy(bin) - mean confidence(bin)|``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = _as_numpy(probs).astype(np.float64, copy=False)
    y = _as_numpy(targets).astype(np.int64, copy=False)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"expected probs (N, C) and targets (N,), got {p.shape} and {y.shape}")
    if p.shape[0] == 0:
        raise ValueError("cannot compute ECE of 0 samples")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # ceil(c * n) - 1 maps (k/n, (k+1)/n] to bin k; clip puts c == 0 into bin 0.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / p.shape[0])


def _topk(y: np.ndarray, probs: np.ndarray, topk: int) -> dict[str, Any] | None:
    num_classes = probs.shape[1]
    k = min(topk, num_classes - 1)
    if k <= 1:
        return None
    value = top_k_accuracy_score(y, probs, k=k, labels=np.arange(num_classes))
    return {"k": int(k), "value": float(value)}


def _roc_auc(y: np.ndarray, probs: np.ndarray) -> tuple[float | None, str | None]:
    """One-vs-rest macro ROC AUC, or ``(None, reason)`` where it is undefined."""
    num_classes = probs.shape[1]
    if num_classes < 2:
        return None, "ROC AUC needs at least two classes"
    missing = np.setdiff1d(np.arange(num_classes), y)
    if missing.size:
        shown = ", ".join(str(int(c)) for c in missing[:10]) + (" ..." if missing.size > 10 else "")
        return None, f"class index(es) {shown} absent from targets: one-vs-rest AUC is undefined"
    if num_classes == 2:
        return float(roc_auc_score(y, probs[:, 1])), None
    score = roc_auc_score(
        y, probs, multi_class="ovr", average="macro", labels=np.arange(num_classes)
    )
    return float(score), None


def _per_class(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    idx = np.arange(len(labels))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=idx, average=None, zero_division=0)
    per_class = [
        {
            "label": str(label),
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, label in enumerate(labels)
    ]
    averages = {}
    for average in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(
            y, pred, labels=idx, average=average, zero_division=0
        )
        averages[f"{average}_avg"] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    return {"per_class": per_class, **averages}


def classification_report(
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels: list[str],
    *,
    temperature: float = 1.0,
    topk: int = 5,
) -> dict[str, Any]:
    """All evaluation metrics of one split, as a JSON-serialisable dict.

    Keys: ``accuracy``; ``topk_accuracy`` (``{"k", "value"}`` with ``k = min(topk, C - 1)``,
    present only when ``k > 1``); ``per_class`` (``label, precision, recall, f1, support``);
    ``macro_avg`` and ``weighted_avg`` (``precision, recall, f1``); ``confusion_matrix`` (rows are
    true classes, columns predictions); ``roc_auc_ovr`` (macro one-vs-rest, ``None`` with
    ``roc_auc_ovr_reason`` when undefined); ``ece`` (15 bins) and ``nll`` of
    ``softmax(logits / temperature)``; ``temperature``; ``num_samples``.

    A class that is never predicted scores precision 0 (no warning).
    """
    z, y = _check_inputs(logits, targets)
    if len(labels) != z.shape[1]:
        raise ValueError(f"{len(labels)} labels given for logits with {z.shape[1]} classes")
    probs = softmax_np(z, temperature)
    pred = z.argmax(axis=1)
    report: dict[str, Any] = {"accuracy": float(accuracy_score(y, pred))}
    topk_acc = _topk(y, probs, topk)
    if topk_acc is not None:
        report["topk_accuracy"] = topk_acc
    report.update(_per_class(y, pred, labels))
    report["confusion_matrix"] = confusion_matrix(y, pred, labels=np.arange(len(labels))).tolist()
    auc, reason = _roc_auc(y, probs)
    report["roc_auc_ovr"] = auc
    if reason is not None:
        report["roc_auc_ovr_reason"] = reason
    report["ece"] = expected_calibration_error(probs, y, n_bins=ECE_BINS)
    report["nll"] = nll(torch.from_numpy(z), torch.from_numpy(y), temperature)
    report["temperature"] = float(temperature)
    report["num_samples"] = int(z.shape[0])
    return report

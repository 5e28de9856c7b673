"""Evaluation metrics, temperature scaling and the report, on examples whose answers are known."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from trainer.calibration import T_MAX, T_MIN, fit_temperature
from trainer.metrics import classification_report, expected_calibration_error
from trainer.report import render_report_table, write_report

LABELS = ["cat", "dog", "bird"]
# true:  0 0 0 | 1 1 1 | 2 2      confusion (rows = true):  [2 1 0]
# pred:  0 0 1 | 1 1 0 | 2 1                                [1 2 0]
#                                                            [0 1 1]
TARGETS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
PREDS = torch.tensor([0, 0, 1, 1, 1, 0, 2, 1])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_hot_logits(preds: torch.Tensor, num_classes: int, scale: float = 3.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(preds, num_classes).double() * scale


@pytest.fixture
def small_report() -> dict:
    return classification_report(one_hot_logits(PREDS, 3), TARGETS, LABELS)


def test_accuracy_per_class_and_confusion_matrix_are_exact(small_report: dict) -> None:
    r = small_report
    assert r["accuracy"] == pytest.approx(5 / 8)
    assert r["confusion_matrix"] == [[2, 1, 0], [1, 2, 0], [0, 1, 1]]
    assert r["num_samples"] == 8
    precision, recall = [2 / 3, 2 / 4, 1 / 1], [2 / 3, 2 / 3, 1 / 2]
    f1 = [2 * p * q / (p + q) for p, q in zip(precision, recall, strict=True)]  # 2/3, 4/7, 2/3
    support = [3, 3, 2]
    for row, label, p, q, f, s in zip(
        r["per_class"], LABELS, precision, recall, f1, support, strict=True
    ):
        assert row == {
            "label": label,
            "precision": pytest.approx(p),
            "recall": pytest.approx(q),
            "f1": pytest.approx(f),
            "support": s,
        }
    assert r["macro_avg"]["precision"] == pytest.approx(13 / 18)
    assert r["macro_avg"]["recall"] == pytest.approx(11 / 18)
    assert r["macro_avg"]["f1"] == pytest.approx((2 / 3 + 4 / 7 + 2 / 3) / 3)
    assert r["weighted_avg"]["f1"] == pytest.approx((3 * 2 / 3 + 3 * 4 / 7 + 2 * 2 / 3) / 8)
    assert r["weighted_avg"]["recall"] == pytest.approx(5 / 8)  # weighted recall == accuracy
    json.dumps(r, allow_nan=False)  # plain JSON types only


def test_low_precision_and_integer_inputs_give_the_same_report(small_report: dict) -> None:
    bf16 = classification_report(one_hot_logits(PREDS, 3).bfloat16(), TARGETS.int(), LABELS)
    assert bf16 == small_report


def test_never_predicted_class_scores_zero_without_warning() -> None:
    targets = torch.tensor([0, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1])  # class 2 is never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = classification_report(one_hot_logits(preds, 3), targets, LABELS)
    bird = r["per_class"][2]
    assert (bird["precision"], bird["recall"], bird["f1"], bird["support"]) == (0.0, 0.0, 0.0, 2)


def test_topk_accuracy_on_ranked_logits() -> None:
    # Each row ranks the classes 0 > 1 > 2 > 3; the target sits at rank 1, 2, 3 and 4.
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).repeat(4, 1)
    targets = torch.tensor([0, 1, 2, 3])
    labels = ["a", "b", "c", "d"]
    r = classification_report(logits, targets, labels)  # topk=5 -> k = min(5, 4 - 1) = 3
    assert r["accuracy"] == pytest.approx(1 / 4)
    assert r["topk_accuracy"] == {"k": 3, "value": pytest.approx(3 / 4)}
    r2 = classification_report(logits, targets, labels, topk=2)
    assert r2["topk_accuracy"] == {"k": 2, "value": pytest.approx(2 / 4)}
    binary = classification_report(logits[:, :2], torch.tensor([0, 1, 0, 1]), ["a", "b"])
    assert "topk_accuracy" not in binary  # k = min(5, 1) = 1 is plain accuracy


def test_ece_is_zero_for_confident_correct_predictions() -> None:
    targets = torch.tensor([0, 1, 2, 1, 0])
    probs = torch.nn.functional.one_hot(targets, 3).double()
    assert expected_calibration_error(probs, targets) == 0.0


def test_ece_on_a_two_bin_example() -> None:
    # Bin (0.5, 1]: confidence 0.9, one right one wrong -> |0.5 - 0.9| * 2/4 = 0.2
    # Bin [0, 0.5]: confidence 0.4, both right        -> |1.0 - 0.4| * 2/4 = 0.3
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.4, 0.3, 0.3], [0.3, 0.4, 0.3]])
    targets = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, targets, n_bins=2) == pytest.approx(0.5)


def _overconfident(n: int = 4000, num_classes: int = 10, factor: float = 5.0):
    """Targets drawn from softmax(true logits); the 'model' reports the true logits * factor."""
    gen = torch.Generator().manual_seed(1234)
    true_logits = torch.randn(n, num_classes, generator=gen, dtype=torch.float64) * 1.5
    targets = torch.multinomial(true_logits.softmax(dim=1), 1, generator=gen).squeeze(1)
    return true_logits * factor, targets


def test_temperature_scaling_recovers_overconfidence() -> None:
    logits, targets = _overconfident()
    val_logits, val_targets = logits[:2000], targets[:2000]
    test_logits, test_targets = logits[2000:], targets[2000:]
    temperature = fit_temperature(val_logits, val_targets)
    assert temperature == pytest.approx(5.0, rel=0.15)
    assert fit_temperature(val_logits, val_targets) == temperature  # deterministic
    labels = [str(i) for i in range(10)]
    before = classification_report(test_logits, test_targets, labels)
    after = classification_report(test_logits, test_targets, labels, temperature=temperature)
    assert after["ece"] < before["ece"]
    assert after["nll"] < before["nll"]
    assert after["accuracy"] == before["accuracy"]  # T > 0 keeps the argmax
    direct = expected_calibration_error((test_logits / temperature).softmax(1), test_targets)
    assert after["ece"] == pytest.approx(direct)


def test_temperature_is_clamped_to_bounds() -> None:
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    separable = one_hot_logits(targets, 3, scale=1.0)  # NLL keeps falling as T -> 0
    assert fit_temperature(separable, targets) == pytest.approx(T_MIN)
    uninformative = torch.zeros(6, 3)
    uninformative[:, 0] = 1e-3  # flat logits, mostly wrong: NLL keeps falling as T grows
    assert fit_temperature(uninformative, targets) == pytest.approx(T_MAX)


def test_roc_auc_perfect_separation_and_absent_class() -> None:
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    assert classification_report(one_hot_logits(targets, 3), targets, LABELS)["roc_auc_ovr"] == 1.0
    binary_targets = torch.tensor([0, 1, 1, 0])
    binary = classification_report(one_hot_logits(binary_targets, 2), binary_targets, ["n", "y"])
    assert binary["roc_auc_ovr"] == 1.0
    partial = torch.tensor([0, 1, 0, 1])  # "bird" never occurs
    r = classification_report(one_hot_logits(partial, 3), partial, LABELS)
    assert r["roc_auc_ovr"] is None
    assert "absent" in r["roc_auc_ovr_reason"]


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="labels"):
        classification_report(one_hot_logits(PREDS, 3), TARGETS, ["a", "b"])
    with pytest.raises(ValueError, match="targets"):
        classification_report(one_hot_logits(PREDS, 3), TARGETS + 1, LABELS)
    with pytest.raises(ValueError, match="empty"):
        classification_report(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), LABELS)


def _history() -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "train_acc": 1 - 0.5 / e,
            "val_loss": 2.2 / e,
            "val_acc": 1 - 0.6 / e,
            "lr": 0.1,
            "seconds": 1.5,
        }
        for e in range(1, 6)
    ]


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


def test_write_report_files(tmp_path, small_report: dict) -> None:
    history = _history()
    history[0]["val_loss"] = math.nan  # a diverged value must still give strict JSON
    path = write_report(
        tmp_path / "run",
        test_report=small_report,
        ece_before=0.2,
        ece_after=0.05,
        temperature=1.7,
        history=history,
        labels=LABELS,
        extra={"arch": "resnet20"},
    )
    assert path == tmp_path / "run" / "report.json"
    report = json.loads(path.read_text())
    for key in (
        "accuracy",
        "topk_accuracy",
        "per_class",
        "macro_avg",
        "weighted_avg",
        "confusion_matrix",
        "roc_auc_ovr",
        "ece",
        "nll",
        "num_samples",
        "labels",
        "history",
    ):
        assert key in report, key
    assert (report["temperature"], report["ece_before"], report["ece_after"]) == (1.7, 0.2, 0.05)
    assert report["history"][0]["val_loss"] is None
    assert report["arch"] == "resnet20"
    _assert_png(tmp_path / "run" / "confusion_matrix.png")
    _assert_png(tmp_path / "run" / "training_curves.png")
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_write_report_many_classes_and_no_history(tmp_path) -> None:
    n = 24  # above the annotation limit
    targets = torch.arange(n).repeat(3)
    labels = [f"class_{i}" for i in range(n)]
    r = classification_report(one_hot_logits(targets.roll(1), n), targets, labels)
    write_report(
        tmp_path,
        test_report=r,
        ece_before=0.1,
        ece_after=0.1,
        temperature=1.0,
        history=[],
        labels=labels,
    )
    _assert_png(tmp_path / "confusion_matrix.png")
    _assert_png(tmp_path / "training_curves.png")


def test_render_report_table_lists_labels_and_metrics(small_report: dict) -> None:
    report = {**small_report, "temperature": 1.7, "ece_before": 0.2, "ece_after": 0.05}
    text = render_report_table(report)
    for label in LABELS:
        assert label in text
    assert "accuracy" in text
    assert "62.50%" in text  # 5/8
    assert "ECE before" in text
    assert "ECE after" in text
    assert "macro avg" in text
    assert "weighted avg" in text
    assert "\x1b[" not in text  # plain text, no terminal colour codes
    assert "62.50%" in render_report_table(small_report)  # the bare test report prints too
    nested = render_report_table({"test": small_report, "ece_before": 0.2, "ece_after": 0.05})
    assert "62.50%" in nested
    assert "0.0500" in nested

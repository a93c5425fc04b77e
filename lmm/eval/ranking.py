"""Ranking metrics of scores against binary labels (pure Python; lmm does not depend on scikit-learn)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["auc_roc"]


def auc_roc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of ``scores`` for the positive class (``labels[i]`` true).

    Computed as the Mann-Whitney statistic: the probability that a random positive scores
    above a random negative, a tie counting one half (average ranks), which equals the
    trapezoidal area under the ROC curve through every distinct threshold (what
    ``sklearn.metrics.roc_auc_score``, used by vlm-evaluation's POPE scorer, returns).
    ``None`` when either class is absent (the area is undefined; scikit-learn raises).
    """
    if len(labels) != len(scores):
        raise ValueError(f"auc_roc: {len(labels)} labels but {len(scores)} scores")
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum = 0.0  # sum of the positives' 1-based ranks, tied scores sharing their mean rank
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        mean_rank = (start + end) / 2 + 1
        rank_sum += mean_rank * sum(1 for i in order[start : end + 1] if labels[i])
        start = end + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)

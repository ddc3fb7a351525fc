"""Agreement scores of a pseudo-label round (pure numpy, no I/O).

A case's *members* are the segmentations that vote on it: one per model when there are several models, or
one per mirror variant of a single model. Per organ the agreement is the mean pairwise Dice over members
(organs that no member predicts are skipped); the case's member score is the mean over its organs. With
a previous round, the new pseudo label is also compared with that round's (Dice per organ, mean = the
previous-round score). A case's score is the smaller of the two: it is kept only if the models agree
**and** its pseudo label is stable.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Dict, List, Optional, Sequence

import numpy as np

#: default minimum case score to keep a pseudo-labelled case (mean organ Dice between members); a priori,
#: not tuned: FLARE22's agreement filters keep cases whose models agree on nearly every organ
DEFAULT_THRESHOLD = 0.90


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> Dict[int, float]:
    """Dice of every label present in ``a`` or ``b`` (labels absent from both are left out)."""
    out = {}
    for lab in labels:
        ma, mb = a == lab, b == lab
        na, nb = int(ma.sum()), int(mb.sum())
        if na + nb:
            out[int(lab)] = 2.0 * int(np.logical_and(ma, mb).sum()) / (na + nb)
    return out


def member_agreement(members: Sequence[np.ndarray], labels: Sequence[int]) -> Dict[int, float]:
    """Per label: mean pairwise Dice over all pairs of members (a pair where the label is absent from both
    does not count). One member alone agrees with itself: every label it has scores 1."""
    if len(members) < 2:
        return {int(lab): 1.0 for lab in labels if (members[0] == lab).any()}
    sums: Dict[int, List[float]] = {}
    for a, b in combinations(members, 2):
        for lab, d in dice_per_label(a, b, labels).items():
            sums.setdefault(lab, []).append(d)
    return {lab: float(np.mean(v)) for lab, v in sorted(sums.items())}


def mean_or_none(per_label: Dict[int, float]) -> Optional[float]:
    return float(np.mean(list(per_label.values()))) if per_label else None


def case_score(members_score: Optional[float], previous_score: Optional[float]) -> float:
    """min(member agreement, agreement with the previous round); a case with no organ at all scores 0."""
    scores = [s for s in (members_score, previous_score) if s is not None]
    return min(scores) if scores else 0.0


def select_kept(scores: Dict[str, float], threshold: float = DEFAULT_THRESHOLD,
                keep: Optional[float] = None) -> List[str]:
    """Case ids to keep: score >= ``threshold``, or with ``keep`` (0 < keep <= 1) the best ``ceil(keep * n)``
    cases whatever their score (ties broken by case id, so the choice is deterministic)."""
    if keep is not None:
        ranked = sorted(scores, key=lambda c: (-scores[c], c))
        return sorted(ranked[: math.ceil(keep * len(ranked))])
    return sorted(c for c, s in scores.items() if s >= threshold)

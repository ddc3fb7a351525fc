"""What benchmarks/convergence.py (the runs) and benchmarks/convergence_report.py (the report) share: the arms, the
smallest organs, the task's name tag, per-site grouping and the commit. Both import it; neither imports the other's
definitions (convergence.py only calls the report stage), so there is no import cycle."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

#: the four organs with the smallest voxel fraction in the phantom (BENCHMARKS.md, data pipeline section)
SMALLEST = ("LAG", "RAG", "PSV", "Es")
LABELLED_FOLDS, ALL_LABELLED_FOLDS = (0, 1, 2), (3, 4, 5)


@dataclass(frozen=True)
class Arm:
    key: str
    name: str
    trainer: str
    all_labelled: bool = False
    skcdf: bool = True
    ablation: bool = False  # one run unless --ablation-runs says otherwise
    #: > 0: the students of round ``pseudo_rounds`` of ``skcdf_pseudolabel`` (their own dataset, see
    #: :func:`pseudo_chain`), trained with ``trainer`` on that round's student dataset
    pseudo_rounds: int = 0
    #: for a pseudo-labelling arm: the arm whose runs (folds 0-2, trained in the same work folder) teach round 1
    teacher: str = "a"
    #: for a pseudo-labelling arm: ``skcdf_pseudolabel --keep`` in every round (1.0: every case kept, no filter);
    #: None: the command's default threshold. With the teacher it names the arm's chain (:func:`chain_key`)
    keep: Optional[float] = None
    #: one of issue 39's candidate changes to SKCDF's integration: the report's candidates table lists it beside
    #: nnU-Net (a), the recipe (p), SKCDF with the reference's settings (v) and SKCDF's defaults (d)
    candidate: bool = False

    def folds(self, runs: int) -> Tuple[int, ...]:
        return (ALL_LABELLED_FOLDS if self.all_labelled else LABELLED_FOLDS)[:runs]


ARMS = {a.key: a for a in (
    Arm("a", "nnU-Net (labelled only)", "nnUNetTrainer_conv", skcdf=False),
    Arm("b", "SKCDF 0.2 defaults (constant head EMA)", "SKCDFTrainer_constantHeadEMA_conv"),
    Arm("c", "nnU-Net (all labelled)", "nnUNetTrainer_conv", all_labelled=True, skcdf=False),
    Arm("d", "SKCDF multiply mask", "SKCDFTrainer_multiplyMask_conv"),  # a main arm: the defaults since 0.4.0
    Arm("e1", "SKCDF w/o SKC", "SKCDFTrainer_noSKC_conv", ablation=True),
    Arm("e2", "SKCDF w/o ABC", "SKCDFTrainer_noABC_conv", ablation=True),
    Arm("f", "SKCDF per-head self mode", "SKCDFTrainer_perHeadSelf_conv", ablation=True),
    Arm("g", "SKCDF 0.3 defaults (head EMA step x lr/lr0)", "SKCDFTrainer_lrScaledHeadEMA_conv"),  # a main arm
    Arm("h", "SKCDF no head EMA", "SKCDFTrainer_noHeadEMA_conv", ablation=True),
    Arm("i", "SKCDF consistency weight w = 1", "SKCDFTrainer_cw1_conv", ablation=True),
    Arm("j", "SKCDF + strong intensity view for D_u", "SKCDFTrainer_strongView_conv", ablation=True),
    Arm("k", "SKCDF without the unlabelled loss (w = 0)", "SKCDFTrainer_cw0_conv", ablation=True),
    Arm("l", "SKCDF lambda ramp-up over 50 epochs", "SKCDFTrainer_rampup50_conv", ablation=True),
    # the practitioner's baseline (issues 38, 44): stock nnU-Net students of 2 rounds of filtered pseudo-labelling
    Arm("p", "nnU-Net + pseudo-labelling (2 rounds)", "nnUNetTrainer_conv", skcdf=False, pseudo_rounds=2),
    # issue 39's combination candidate: SKCDF (d's trainer) as the student of (p)'s round 1, the cases its filter
    # dropped as unlabelled images (skcdf_pseudolabel --student-unlabeled)
    Arm("q", "SKCDF student of pseudo-label round 1", "SKCDFTrainer_multiplyMask_conv", pseudo_rounds=1,
        candidate=True),
    # issue 39's appearance candidate: labelled samples mapped onto unlabelled cases' intensities, in SKCDF and nnU-Net
    Arm("r", "SKCDF + appearance transfer", "SKCDFTrainer_histMatch_conv", candidate=True),
    Arm("s", "nnU-Net + appearance transfer", "nnUNetTrainer_histMatch_conv", skcdf=False, candidate=True),
    # issue 39's mixing candidate: labelled boxes pasted into unlabelled samples, D_u taught the true labels there
    Arm("t", "SKCDF + copy-paste", "SKCDFTrainer_copyPaste_conv", candidate=True),
    # issue 39's filter candidate: unconfident pseudo-label voxels (softmax maximum < 0.95) leave D_u's losses
    Arm("u", "SKCDF + confidence filter", "SKCDFTrainer_confidence_conv", candidate=True),
    # "the paper" (issue 39): the reference code's settings wherever the integration has a switch, pinned
    Arm("v", "SKCDF (reference settings)", "SKCDFTrainer_reference_conv"),
    # issue 39's other combination candidate: SKCDF as the teacher of a pseudo-label round, the recipe's stock nnU-Net
    # students (one round: its teachers are (d)'s runs, not (a)'s); the model a user ships is a plain nnU-Net
    Arm("w", "nnU-Net student of SKCDF teachers (1 round)", "nnUNetTrainer_conv", skcdf=False, pseudo_rounds=1,
        teacher="d", candidate=True),
    # the recipe without a filter (findings item 37: run if (p)'s round 1 keeps under 25 % of its pool or no case
    # of some site): every case kept in both rounds, as FLARE22's winner between rounds and nnU-Net issue #2233
    Arm("x", "nnU-Net + pseudo-labelling, every case kept (2 rounds)", "nnUNetTrainer_conv", skcdf=False,
        pseudo_rounds=2, keep=1.0),
)}


def chain_key(arm: Arm) -> str:
    """The pseudo-labelling chain whose rounds ``arm`` trains on: its round-1 teacher arm, and ``Keep<percent>``
    when its rounds keep a fraction instead of filtering by the threshold: ``a`` for (p) and (q) (they share it),
    ``d`` for (w), ``aKeep100`` for (x)."""
    return arm.teacher + (f"Keep{round(100 * arm.keep)}" if arm.keep is not None else "")


def chain_arms() -> List[str]:
    """The arms that own a pseudo-labelling chain (its rounds and their cost): (p), and every arm with a chain of
    its own ((w): round 1 taught by (d); (x): every case kept); (q), a student of (p)'s round 1, shares (p)'s."""
    return [k for k, arm in ARMS.items() if arm.pseudo_rounds and (k == "p" or chain_key(arm) != "a")]


def chain_tag(chain: str) -> str:
    """What names a chain's rounds (datasets, claims, summaries): nothing for (a)'s filtered chain, ``fromD`` for
    the one (d) teaches, ``Keep100`` for (a)'s chain that keeps every case."""
    teacher, keep = chain.split("Keep", 1) if "Keep" in chain else (chain, "")
    return ("" if teacher == "a" else f"from{teacher.upper()}") + (f"Keep{keep}" if keep else "")


def sites_tag(sites: List[str]) -> str:
    """``ms`` for every built-in site in their order (``--sites all``), else ``ms`` + the sites' names."""
    from nnunetv2_skcdf.dataset_conversion.phantom_sites import SITES

    return "ms" if list(sites) == list(SITES) else "ms" + "".join(sites)


def task_tag(task: dict) -> str:
    """The task's part of work folder, store file and report names: ``2lab`` for the original phantom (the names
    of the runs stored before the multi-site task existed), ``4lab-siteA-ms`` for 4 labelled cases of site A of
    the multi-site phantom (``alllab-siteA-ms`` for its bound (c))."""
    tag = f"{task['labeled']}lab"
    if task.get("sites"):
        tag += f"-site{task['labelled_site']}-{sites_tag(task['sites'])}"
    return tag


CASES_FILE = "phantom_cases.json"  # skcdf_make_phantom --sites: per-case site and parameters, next to dataset.json


def case_sites(raw: Path) -> Dict[str, str]:
    """{case id: site} of a multi-site phantom (every role); {} for the original phantom (no per-case file)."""
    path = raw / CASES_FILE
    if not path.is_file():
        return {}
    return {cid: rec["site"] for cid, rec in json.loads(path.read_text())["cases"].items()}


def dice_by_site(summary: dict, sites: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    """{site: {class: mean Dice over the site's cases}} of an ``skcdf_evaluate`` summary (NaN-aware, like its own
    per-class means); the case id is the reference file's name up to its first dot."""
    grouped: Dict[str, Dict[str, List[float]]] = {}
    for case in summary["metric_per_case"]:
        site = sites.get(Path(case["reference_file"]).name.split(".")[0])
        if site is None:
            continue
        for key, metrics in case["metrics"].items():
            if key != "0":
                grouped.setdefault(site, {}).setdefault(key, []).append(metrics["Dice"])
    return {site: {k: _nanmean(v) for k, v in per.items()} for site, per in sorted(grouped.items())}


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def checkpoint_identity(path: Path) -> str:
    """``<size>:<mtime_ns>`` of a checkpoint: what the outputs made from it (predictions, curve points) record, so
    that a fold trained again (or its checkpoint replaced) never has its old outputs stored as the new run's."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def cached_point(results: dict, epoch: int, identity: str) -> bool:
    """Whether a curve's cached point of ``epoch`` was evaluated from the checkpoint ``identity`` now on disk;
    points cached before identities were recorded count as such (every such point belongs to a stored run)."""
    point = results.get(str(epoch))
    return point is not None and point.get("checkpoint", identity) == identity

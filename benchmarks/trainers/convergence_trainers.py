"""Trainers of ``benchmarks/convergence.py``: the same budget for every arm, snapshots for the learning curves.

Every trainer trains ``SKCDF_CONV_EPOCHS`` epochs of 50 iterations (the benchmark sets the variable and records
it; a resumed run refuses another budget) and keeps ``checkpoint_ep<E>.pth`` after the epochs listed in
``SKCDF_CONV_SNAPSHOTS`` (comma-separated completed-epoch counts), from which the benchmark computes the
learning curves. Otherwise each is its parent, unchanged: nnU-Net's optimiser, schedule (poly decay over the
budget), patch, batch, augmentation; no mirroring (the phantom has left/right organs, and the 8x test-time
mirroring is unaffordable on 2 cores); nnU-Net's final validation is skipped (the separate test set is
evaluated instead). Hidden labels are never read here: the diagnostics live in the benchmark script.
"""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation.SKCDFTrainer_ablations import (
    SKCDFTrainer_constantHeadEMA,
    SKCDFTrainer_cw0,
    SKCDFTrainer_cw1,
    SKCDFTrainer_excludeMask,
    SKCDFTrainer_multiplyMask,
    SKCDFTrainer_noABC,
    SKCDFTrainer_noSKC,
    SKCDFTrainer_lrScaledHeadEMA,
    SKCDFTrainer_noHeadEMA,
    SKCDFTrainer_perHeadSelf,
    SKCDFTrainer_rampup50,
    SKCDFTrainer_confidence,
    SKCDFTrainer_copyPaste,
    SKCDFTrainer_histMatch,
    SKCDFTrainer_strongView,
)
from nnunetv2_skcdf.training.nnUNetTrainer.variants.appearance.nnUNetTrainer_histMatch import nnUNetTrainer_histMatch
from nnunetv2_skcdf.training.nnUNetTrainer.variants.mirroring.no_mirroring import NoMirroringMixin
from nnunetv2_skcdf.training.nnUNetTrainer.variants.releases.SKCDFTrainer_releases import SKCDFTrainer_reference

ITERATIONS_PER_EPOCH = 50


def snapshot_name(epochs_done: int) -> str:
    return f"checkpoint_ep{epochs_done:04d}.pth"


class _ConvergenceBudget(NoMirroringMixin):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ["SKCDF_CONV_EPOCHS"])
        self.snapshots = {int(e) for e in os.environ["SKCDF_CONV_SNAPSHOTS"].split(",")}
        self.num_iterations_per_epoch = ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = 5
        self.save_every = 1  # a benchmark interrupted at any epoch resumes there (--c)
        if os.environ.get("SKCDF_CONV_THREADS"):  # nnU-Net's run_training sets all cores; a shared machine needs
            torch.set_num_threads(int(os.environ["SKCDF_CONV_THREADS"]))  # fewer (2-thread barriers starve)

    def on_epoch_end(self):
        epochs_done = self.current_epoch + 1
        if epochs_done in self.snapshots:  # before nnU-Net's bookkeeping, as its own checkpoint_latest
            self.save_checkpoint(os.path.join(self.output_folder, snapshot_name(epochs_done)))
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("convergence benchmark: final validation skipped (the test set is evaluated instead)")


# The arms stored before 0.4.0 made 'multiply' the default masking (b, g, i) were trained with 'exclude':
# ``SKCDFTrainer_excludeMask`` ahead of their variant pins it, so new runs of them (more folds, other tasks) match
# the stored ones. The ablations with no stored run at that time (e1, f, h) take SKCDFTrainer's current defaults
# (arm d), so that they ablate the method as shipped.
class nnUNetTrainer_conv(_ConvergenceBudget, nnUNetTrainer):
    pass


class SKCDFTrainer_constantHeadEMA_conv(_ConvergenceBudget, SKCDFTrainer_excludeMask,
                                        SKCDFTrainer_constantHeadEMA):
    """Arm (b): SKCDF's defaults up to 0.2 (constant head EMA), pinned so that new runs match the stored ones
    (those were trained as ``SKCDFTrainer_conv`` before 0.3.0 changed the default)."""


class SKCDFTrainer_multiplyMask_conv(_ConvergenceBudget, SKCDFTrainer_multiplyMask):
    pass


class SKCDFTrainer_noSKC_conv(_ConvergenceBudget, SKCDFTrainer_noSKC):
    """Arm (e1): SKCDFTrainer's defaults (arm d) without the SKC module."""


class SKCDFTrainer_noABC_conv(_ConvergenceBudget, SKCDFTrainer_noABC):
    pass


class SKCDFTrainer_perHeadSelf_conv(_ConvergenceBudget, SKCDFTrainer_perHeadSelf):
    """Arm (f): SKCDFTrainer's defaults (arm d) with the SKC module's per-head self mode."""


class SKCDFTrainer_lrScaledHeadEMA_conv(_ConvergenceBudget, SKCDFTrainer_excludeMask,
                                        SKCDFTrainer_lrScaledHeadEMA):
    pass


class SKCDFTrainer_noHeadEMA_conv(_ConvergenceBudget, SKCDFTrainer_noHeadEMA):
    """Arm (h): SKCDFTrainer's defaults (arm d) without the head EMA."""


class SKCDFTrainer_cw1_conv(_ConvergenceBudget, SKCDFTrainer_excludeMask, SKCDFTrainer_cw1):
    """Arm (i): consistency weight w = 1 instead of the reference's 10 (lambda(t) ramps to 1), on top of the 0.3
    defaults: does the unlabelled loss at ten times the supervised weight hold SKCDF at its pseudo labels'
    quality (BENCHMARKS_FINDINGS.md, item 10)?"""


class SKCDFTrainer_strongView_conv(_ConvergenceBudget, SKCDFTrainer_strongView):
    """Arm (j), an extension: D_u learns on a strongly intensity-perturbed copy of the view the pseudo labels come
    from, on top of SKCDFTrainer's defaults (since 0.4.0 the multiplied masking of arm d): does a teacher/student
    perturbation let the unlabelled images add what nnU-Net's own augmentation of the labelled cases does not
    (BENCHMARKS_FINDINGS.md, item 13)?"""


class SKCDFTrainer_cw0_conv(_ConvergenceBudget, SKCDFTrainer_cw0):
    """Arm (k): SKCDFTrainer's 0.4 defaults without the unlabelled loss (w = 0): what do the pseudo labels on the
    unlabelled images add to the gain of arm (d) over nnU-Net, beyond the architecture, the diluted balanced
    heads of the labelled pass and the cross-attention to the unlabelled images (BENCHMARKS_FINDINGS.md, item 16)?"""


class SKCDFTrainer_rampup50_conv(_ConvergenceBudget, SKCDFTrainer_rampup50):
    """Arm (l): SKCDFTrainer's 0.4 defaults with lambda(t) ramped over the first 50 epochs (2500 iterations)
    instead of the whole budget, full weight w = 10 after: the unlabelled loss is the part of SKCDF that pays
    (findings item 18) and, ramped over the whole budget, reaches its weight only at the last epoch."""


class SKCDFTrainer_histMatch_conv(_ConvergenceBudget, SKCDFTrainer_histMatch):
    """Arm (r), issue 39's appearance candidate: SKCDFTrainer's defaults with each labelled sample mapped onto the
    intensity distribution of an unlabelled sample's case with probability 0.5 (the multi-site task's labelled-only
    model fails where the contrast phase differs: sites B and C)."""


class nnUNetTrainer_histMatch_conv(_ConvergenceBudget, nnUNetTrainer_histMatch):
    """Arm (s): the same appearance transfer in stock nnU-Net, the baseline that tells what (r) owes to it alone."""


class SKCDFTrainer_confidence_conv(_ConvergenceBudget, SKCDFTrainer_confidence):
    """Arm (u), issue 39's filter candidate: SKCDFTrainer's defaults with pseudo-label voxels below a softmax maximum
    of 0.95 left out of D_u's losses (on the multi-site task most wrong pseudo-label voxels of site C are below it:
    BENCHMARKS_FINDINGS.md item 31)."""


class SKCDFTrainer_copyPaste_conv(_ConvergenceBudget, SKCDFTrainer_copyPaste):
    """Arm (t), issue 39's mixing candidate: SKCDFTrainer's defaults with a box of a labelled sample (2/3 of the
    patch per axis) pasted into every unlabelled sample; D_u learns the true labels inside the box."""


class SKCDFTrainer_reference_conv(_ConvergenceBudget, SKCDFTrainer_reference):
    """Arm (v): SKCDF with the reference code's settings (constant head EMA step, per-head self mode, multiplied
    masking; every setting pinned), the "paper settings" row issue 39's new default is compared with."""

"""Trainers of ``benchmarks/demo_plateau.py``: the demo's labelled-only trainers (``nnUNetTrainer_demo``, and
``_demoLong`` with twice the budget), unchanged except that they keep a snapshot ``checkpoint_ep<E>.pth`` after
every eighth of their budget, from which the benchmark draws the learning curve of the demo's baseline.
"""
import os

from nnunetv2_skcdf.training.nnUNetTrainer.variants.demo.demo_trainers import (
    nnUNetTrainer_demo,
    nnUNetTrainer_demoLong,
)

from convergence_trainers import snapshot_name  # noqa: F401 (the convergence benchmark's snapshot names)

#: snapshots per budget (the last one is checkpoint_final.pth)
CURVE_POINTS = 8


def snapshot_epochs(num_epochs: int) -> list:
    """Completed-epoch counts after which a snapshot is kept: every eighth of the budget, the end excluded."""
    return [round(k * num_epochs / CURVE_POINTS) for k in range(1, CURVE_POINTS)]


class _Curve:
    def on_epoch_end(self):
        epochs_done = self.current_epoch + 1
        if epochs_done in snapshot_epochs(self.num_epochs):
            self.save_checkpoint(os.path.join(self.output_folder, snapshot_name(epochs_done)))
        super().on_epoch_end()


class nnUNetTrainer_demoCurve(_Curve, nnUNetTrainer_demo):
    pass


class nnUNetTrainer_demoLongCurve(_Curve, nnUNetTrainer_demoLong):
    pass

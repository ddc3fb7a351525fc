"""Equal-budget trainers for the CPU demo (``run_demo.sh``): labelled-only nnU-Net, SKCDF, and the pseudo-label
student (a ``nnUNetTrainer_demo`` trained on ``skcdf_pseudolabel``'s student dataset).

``nnUNetTrainer_demo`` / ``SKCDFTrainer_demo`` (the demo, ``DEMO_EPOCHS`` x 50 iterations) and ``_demoLong`` (twice
that, ``run_demo.sh --long``: does a doubled budget change the result?) differ from their parents in the budget and
the optimiser only: nnU-Net's own ``nnUNetTrainerVanillaAdam`` (Adam, poly schedule) at ``DEMO_LR``, because
nnU-Net's SGD (0.01, momentum 0.99) needs ~8000 iterations on the phantom to learn its organs, more than a 15-minute
CPU demo affords, while Adam at 2e-3 learns the demo task's organs in ``DEMO_EPOCHS`` epochs (close to its plateau,
not at it: documentation/getting_started.md, "The demo and the tests"). Every arm uses the same optimiser and
budget. Mirroring (augmentation and inference) stays nnU-Net's, so that one model's mirror variants can vote in
``skcdf_pseudolabel``. At ``PLATEAU_EPOCH_FRACTION`` of the budget a snapshot
``checkpoint_plateau.pth`` is saved: the demo predicts the test set with it too, to show how much the last quarter
added. The final validation is skipped (the demo evaluates the test set). ``SKCDF_DEMO_THREADS`` (if set) is the
number of torch threads of the training: ``run_demo.sh`` trains two arms at a time, one core each, and nnU-Net's
``nnUNetv2_train`` would otherwise give each of them every core.

``_demo8epochs`` / ``_demo40epochs`` are the demo trainers of releases <= 0.4 (3D, 400 / 2000 SGD iterations, no
mirroring), kept so that their model folders still predict and resume.
"""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerVanillaAdam

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer
from nnunetv2_skcdf.training.nnUNetTrainer.variants.mirroring.no_mirroring import NoMirroringMixin


#: epochs of 50 iterations of the demo (``run_demo.sh``); ``run_demo.sh --long`` trains twice as many
DEMO_EPOCHS = 24
DEMO_LR = 2e-3
PLATEAU_EPOCH_FRACTION = 0.75
PLATEAU_CHECKPOINT = "checkpoint_plateau.pth"
THREADS_ENV = "SKCDF_DEMO_THREADS"


def demo_threads() -> int:
    """``$SKCDF_DEMO_THREADS`` as a positive int, 0 where unset (nnU-Net's own choice: every core)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return 0
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: give a positive number of torch threads, or unset it.")
    return int(value)


def plateau_epoch(num_epochs: int) -> int:
    """The epoch after which the plateau snapshot is saved (run_demo.sh reports it in iterations)."""
    return round(PLATEAU_EPOCH_FRACTION * num_epochs)


class _AdamDemo:
    """The demo's budget and optimiser (module docstring); ``demo_epochs`` set by each class."""

    demo_epochs = DEMO_EPOCHS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _demo_budget(self, self.demo_epochs)
        self.initial_lr = DEMO_LR
        threads = demo_threads()
        if threads:  # after run_training's torch.set_num_threads(cpu_count)
            torch.set_num_threads(threads)

    def configure_optimizers(self):
        return nnUNetTrainerVanillaAdam.configure_optimizers(self)

    def on_epoch_end(self):
        if self.current_epoch + 1 == plateau_epoch(self.num_epochs):
            self.save_checkpoint(os.path.join(self.output_folder, PLATEAU_CHECKPOINT))
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("demo: final validation skipped (run_demo.sh evaluates the test set)")


class nnUNetTrainer_demo(_AdamDemo, nnUNetTrainer):
    pass


class SKCDFTrainer_demo(_AdamDemo, SKCDFTrainer):
    pass


class nnUNetTrainer_demoLong(_AdamDemo, nnUNetTrainer):
    demo_epochs = 2 * DEMO_EPOCHS


class SKCDFTrainer_demoLong(_AdamDemo, SKCDFTrainer):
    demo_epochs = 2 * DEMO_EPOCHS


def _demo_budget(trainer: nnUNetTrainer, epochs: int) -> None:
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = 50
    trainer.num_val_iterations_per_epoch = 5


class nnUNetTrainer_demo8epochs(NoMirroringMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _demo_budget(self, 8)


class SKCDFTrainer_demo8epochs(NoMirroringMixin, SKCDFTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _demo_budget(self, 8)


class nnUNetTrainer_demo40epochs(NoMirroringMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _demo_budget(self, 40)


class SKCDFTrainer_demo40epochs(NoMirroringMixin, SKCDFTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _demo_budget(self, 40)

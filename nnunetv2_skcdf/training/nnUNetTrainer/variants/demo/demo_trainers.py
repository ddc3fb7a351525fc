"""Equal-budget pairs for the CPU demo (``run_demo.sh``): labelled-only nnU-Net vs SKCDF.

Both sides of a pair differ from their parent only in the budget -- epochs of 50 iterations, 5 validation
iterations -- and in skipping mirroring (augmentation and the 8x test-time mirroring of the final validation),
so the comparison stays fair and a 2-core laptop finishes it. ``_demo8epochs``: 400 iterations (the default
demo); ``_demo40epochs``: 2000 iterations (``run_demo.sh --long``).
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer
from nnunetv2_skcdf.training.nnUNetTrainer.variants.mirroring.no_mirroring import NoMirroringMixin


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

"""Equal-budget trainers of ``benchmarks/diagnostics/phantom_accuracy.py`` (found through ``nnUNet_extTrainer``, which the
script extends with this folder). Every one trains ``PHANTOM_ACC_EPOCHS`` epochs of 50 iterations, without
mirroring, and skips nnU-Net's final validation (the benchmark evaluates the separate test set instead).
Only the method differs: labelled-only nnU-Net, SKCDF, and SKCDF without the SKC module / the ABC heads."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer
from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation.SKCDFTrainer_ablations import (
    SKCDFTrainer_noABC,
    SKCDFTrainer_noSKC,
)
from nnunetv2_skcdf.training.nnUNetTrainer.variants.mirroring.no_mirroring import NoMirroringMixin

PHANTOM_ACC_EPOCHS = 10


class _BenchmarkBudget(NoMirroringMixin):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = PHANTOM_ACC_EPOCHS
        self.num_iterations_per_epoch = 50
        self.num_val_iterations_per_epoch = 5
        self.save_every = 1  # an interrupted benchmark continues (phantom_accuracy.py trains with --c)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("phantom_accuracy: final validation skipped (the test set is evaluated instead)")


class nnUNetTrainer_phantomAcc(_BenchmarkBudget, nnUNetTrainer):
    pass


class SKCDFTrainer_phantomAcc(_BenchmarkBudget, SKCDFTrainer):
    pass


class SKCDFTrainer_noSKC_phantomAcc(_BenchmarkBudget, SKCDFTrainer_noSKC):
    pass


class SKCDFTrainer_noABC_phantomAcc(_BenchmarkBudget, SKCDFTrainer_noABC):
    pass

"""Trainers used only by the tests (found through nnUNet_extTrainer, which the tests extend with this folder)."""
import torch

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer
from nnunetv2_skcdf.training.nnUNetTrainer.variants.mirroring.no_mirroring import NoMirroringMixin


class SKCDFTrainer_killTest(NoMirroringMixin, SKCDFTrainer):
    """6 short epochs with a checkpoint after every epoch, no final validation: a run to kill and resume."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 6
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass

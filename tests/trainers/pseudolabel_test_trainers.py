"""Trainers with a tiny budget for the pseudo-labelling round's end-to-end test: stock nnU-Net, and SKCDF as the
student of a round made with --student-unlabeled."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer


class _TinyBudget:
    """2 epochs of 10 iterations, no final validation; mirroring stays allowed at inference, so that one model's
    mirror variants can vote."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass


class nnUNetTrainer_plTest(_TinyBudget, nnUNetTrainer):
    """Stock nnUNetTrainer with the tiny budget: teachers and the stock student of the round test."""


class SKCDFTrainer_plTest(_TinyBudget, SKCDFTrainer):
    """SKCDFTrainer with the same budget: the student of a round made with --student-unlabeled."""

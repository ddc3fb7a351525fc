"""Short SKCDF runs for demos and tests (nnU-Net's ``_Xepochs`` naming).

``SKCDFTrainer_Xepochs`` change only the number of epochs (the consistency ramp-up follows: it spans all
epochs). ``SKCDFTrainer_cpuTest`` is the CI run: 8 epochs of 50 iterations, 2 validation iterations,
and no mirroring (neither augmentation nor test-time mirroring, which costs 8x in 3D final validation).
"""
import torch

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer
from nnunetv2_skcdf.training.nnUNetTrainer.variants.mirroring.no_mirroring import NoMirroringMixin


class SKCDFTrainer_5epochs(SKCDFTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class SKCDFTrainer_20epochs(SKCDFTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20


class SKCDFTrainer_100epochs(SKCDFTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class SKCDFTrainer_cpuTest(NoMirroringMixin, SKCDFTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 8
        self.num_iterations_per_epoch = 50
        self.num_val_iterations_per_epoch = 2

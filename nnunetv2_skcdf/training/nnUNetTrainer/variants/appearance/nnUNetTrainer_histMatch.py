"""``nnUNetTrainer_histMatch``: stock nnU-Net that uses the unlabelled images for their appearance only.

Each labelled training sample is, with probability ``appearance_transfer`` (0.5), mapped from its case's intensity
distribution onto that of the case of an unlabelled sample drawn in the same step (whole-case quantiles above the
clipped minimum, ``skcdf_components.appearance_transfer``): its intensities take on the distribution of an
unlabelled image (another site's contrast phase, dose, calibration), its labels stay valid. Everything else is
``nnUNetTrainer``: network, losses, optimiser, schedule, augmentation, prediction. It needs what ``SKCDFTrainer``
needs of the data (a split with an ``unlabeled`` list, preprocessed unlabelled images) and the same cost of the
unlabelled stream, without SKCDF's second decoder and unlabelled loss: the baseline that tells how much of a gain is
appearance alone (``SKCDFTrainer_histMatch`` is the same transfer inside SKCDF).
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_skcdf.training.unlabelled_stream import UnlabelledStream


class nnUNetTrainer_histMatch(UnlabelledStream, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.appearance_transfer = 0.5  # probability per labelled sample

    def initialize(self):
        if not 0.0 <= self.appearance_transfer <= 1.0:
            raise ValueError(f"{type(self).__name__}.appearance_transfer = {self.appearance_transfer!r}: give a "
                             f"probability in [0, 1].")
        super().initialize()

    def train_step(self, batch: dict) -> dict:
        unlabelled = next(self.dataloader_unlabeled)
        x_u = unlabelled["data"].to(self.device, non_blocking=True)
        x_l = batch["data"].to(self.device, non_blocking=True)
        return super().train_step({**batch, "data": self._transfer_appearance(x_l, batch["keys"], x_u,
                                                                               unlabelled["keys"])})

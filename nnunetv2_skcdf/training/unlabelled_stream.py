"""The unlabelled stream of a trainer: a mixin for ``nnUNetTrainer`` subclasses that learn from unlabelled images.

``class MyTrainer(UnlabelledStream, nnUNetTrainer)`` gets ``self.dataloader_unlabeled`` (the split's unlabelled
cases, nnU-Net's own augmentation, ``next()`` gives ``{'data', 'keys'}``: ``dataloading/unlabeled_loader.py``),
started in ``get_dataloaders`` after the split has been checked (a refusal is printed before nnU-Net's traceback)
and before nnU-Net's own workers, and finished when training ends. ``SKCDFTrainer`` and
``nnUNetTrainer_histMatch`` use it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from torch import distributed as dist

from nnunetv2_skcdf.splits.semi_supervised_splits import MAKE_ONE_HINT, load_semi_supervised_fold, validate_splits
from nnunetv2_skcdf.training import skcdf_components as C
from nnunetv2_skcdf.training.dataloading.unlabeled_dataset import nnUNetDatasetUnlabeled, resolve_unlabeled_sources
from nnunetv2_skcdf.training.dataloading.unlabeled_loader import get_unlabeled_dataloader
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError, refusal_first
from nnunetv2_skcdf.utilities.io import read_json


class UnlabelledStream:
    dataloader_unlabeled = None
    unlabeled_batch_size = None  # None = the plans' (DDP-adjusted) labelled batch size
    appearance_transfer = 0.0  # probability per labelled sample of the opt-in appearance transfer (0: none)
    _intensity_tables: Optional[Dict[str, torch.Tensor]] = None  # case id -> C.case_quantiles, filled on first use

    def _transfer_appearance(self, x_l: torch.Tensor, keys_l: Sequence[str], x_u: torch.Tensor,
                             keys_u: Sequence[str]) -> torch.Tensor:
        """The labelled batch with each sample, with probability ``appearance_transfer``, mapped from its case's
        intensity distribution onto that of the case of an unlabelled sample of the same step
        (``skcdf_components.appearance_transfer``); ``x_l`` itself at 0."""
        if self.appearance_transfer <= 0:
            return x_l
        return C.appearance_transfer(x_l, x_u, self.appearance_transfer,
                                     lambda i: self._intensity_table(str(keys_l[i]), labelled=True),
                                     lambda j: self._intensity_table(str(keys_u[j]), labelled=False))

    def _intensity_table(self, key: str, labelled: bool) -> torch.Tensor:
        """The whole preprocessed case's intensity table (``C.case_quantiles``), read from disk the first time the
        case is matched and kept for the run (one table of 257 values per channel and case)."""
        if self._intensity_tables is None:
            self._intensity_tables = {}
        if key not in self._intensity_tables:
            if labelled:
                dataset = self.dataset_class(self.preprocessed_dataset_folder, [key])
            else:
                dataset = nnUNetDatasetUnlabeled(resolve_unlabeled_sources(
                    self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier, [key]))
            data = dataset.load_case(key)[0]
            self._intensity_tables[key] = C.case_quantiles(np.asarray(data[:]))
        return self._intensity_tables[key]

    def get_dataloaders(self):
        # a refusal (split, missing or stale unlabelled data) is printed before nnUNetv2_train's long traceback
        with refusal_first(type(self).__name__, lambda line: self.print_to_log_file(line, also_print_to_console=False)):
            unlabeled = self._checked_unlabeled_ids()
            self.dataloader_unlabeled = self._get_unlabeled_dataloader(unlabeled)  # first: refuse before workers start
        return super().get_dataloaders()

    def _checked_unlabeled_ids(self) -> List[str]:
        """This fold's unlabelled ids, after checking the split before nnU-Net reads it: every fold's labelled and
        validation ids must be preprocessed training cases, and no case may have two roles (a labelled case in
        'unlabeled' would leak its label into the unlabelled loss' bookkeeping, a validation case in training
        would inflate validation). Unlabelled ids are checked by the unlabelled loader, which knows where each
        image was preprocessed."""
        path = os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json")
        # file, fold and 'unlabeled' key, with their own messages; then every fold of the same file
        _, _, unlabeled = load_semi_supervised_fold(self.preprocessed_dataset_folder_base, self.fold)
        splits = read_json(path, MAKE_ONE_HINT)
        training = set(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
        unlabeled_images = {c for fold in splits for c in fold.get("unlabeled", [])} - training
        try:
            validate_splits(splits, training, unlabeled_images,
                            hint="Fix the split or make it anew with skcdf_split -d <dataset> ... --overwrite.")
        except SKCDFInputError as e:
            raise SKCDFInputError(f"{path}: {e}") from None
        return unlabeled

    def _get_unlabeled_dataloader(self, unlabeled: List[str]):
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.is_ddp else (0, 1)
        return get_unlabeled_dataloader(self, unlabeled, self.unlabeled_batch_size or self.batch_size,
                                        rank=rank, world_size=world, view_transform=self._student_view_transform())

    def _student_view_transform(self):
        """A per-sample transform the unlabelled loader applies to a copy of each batch (``'data_view'``); None:
        no copy (``SKCDFTrainer`` overrides it for its opt-in student view)."""
        return None

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()

"""The unlabelled stream that runs beside nnU-Net's labelled loader.

Random patches (no foreground oversampling: there are no labels to oversample from) of the
configuration's patch size, nnU-Net's own training augmentation applied to the image only, an
endless stream, run by nnU-Net's augmenter classes (``nnUNet_n_proc_DA`` honoured) and shardable by
rank for multi-GPU training. Batches are ``{'data': (B, C, *patch) float32, 'keys': ids}``: no
``target`` key exists. With a ``view_transform`` (the trainer's opt-in student view) a batch also holds
``'data_view'``, a perturbed copy of ``'data'`` made here, in the loader's workers on the CPU: batchgeneratorsv2's
transforms build their kernels on the CPU, so they must never be handed a tensor already moved to the GPU.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from batchgenerators.utilities.file_and_folder_operations import join
from threadpoolctl import threadpool_limits

from nnunetv2_skcdf.preprocessing.unlabeled import (
    case_is_complete,
    check_unlabeled_folder_is_current,
    unlabeled_folder_name,
)
from nnunetv2_skcdf.training.dataloading.unlabeled_dataset import (
    nnUNetDatasetUnlabeled,
    resolve_unlabeled_sources,
)
from nnunetv2_skcdf.training.skcdf_components import perturbed_view
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError


def shard_identifiers(identifiers: Sequence[str], rank: int, world_size: int) -> List[str]:
    """Rank ``rank``'s disjoint share of the sorted ids (round robin), so ranks never draw the same case."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    ids = sorted(identifiers)
    if len(ids) < world_size:
        raise SKCDFInputError(
            f"{len(ids)} unlabelled case(s) cannot be sharded over {world_size} ranks (each rank needs at least one). "
            f"Add unlabelled images or train on fewer GPUs.")
    return ids[rank::world_size]


class nnUNetUnlabeledDataLoader(nnUNetDataLoader):
    """nnU-Net's loader with the label path removed. Patch sampling (incl. 2D) is nnU-Net's ``get_bbox``."""

    def __init__(self, data: nnUNetDatasetUnlabeled, batch_size: int, patch_size, final_patch_size, label_manager,
                 transforms=None, use_mask_for_norm: Optional[Sequence[bool]] = None, view_transform=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.view_transform = view_transform  # per-sample transform of the student's view (module docstring)
        # random patches only: with an ignore label nnU-Net would sample from annotated voxels, which need labels
        self.has_ignore = False
        self.needs_nonzero_mask = use_mask_for_norm is not None and any(use_mask_for_norm)

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        data_all = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                sample = self._load_patch(key)
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *sample.shape), dtype=torch.float32)
                data_all[j] = sample
            if self.view_transform is not None:
                return {"data": data_all, "data_view": perturbed_view(data_all, self.view_transform), "keys": keys}
        return {"data": data_all, "keys": keys}

    def _load_patch(self, key: str) -> torch.Tensor:
        data, _, _, _ = self._data.load_case(key)
        bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], force_fg=False, class_locations=None)
        bbox = [[lb, ub] for lb, ub in zip(bbox_lbs, bbox_ubs)]
        image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
        # MaskImageTransform needs the crop mask; otherwise no segmentation exists at all in this stream
        mask = torch.from_numpy(self._data.load_nonzero_mask(key, bbox)) if self.needs_nonzero_mask else None
        if self.patch_size_was_2d:
            image = image[:, 0]
            mask = mask[:, 0] if mask is not None else None
        if self.transforms is None:
            return image
        # pass no 'segmentation' key at all when there is none: batchgeneratorsv2's Convert3DTo2DTransform (dummy 2D
        # augmentation of anisotropic patches) tests for the key, not for None
        sample = {"image": image} if mask is None else {"image": image, "segmentation": mask}
        return self.transforms(**sample)["image"]


def unlabeled_training_transforms(trainer, patch_size, rotation_for_DA, mirror_axes, do_dummy_2d_data_aug):
    """The trainer's own training augmentation, without the label-only steps (deep-supervision targets,
    regions, cascade): spatial, intensity and mirroring transforms act on the image exactly as for
    labelled patches."""
    return trainer.get_training_transforms(
        patch_size, rotation_for_DA, None, mirror_axes, do_dummy_2d_data_aug,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=False,
        foreground_labels=None, regions=None, ignore_label=None)


def get_unlabeled_dataloader(trainer, unlabeled_ids: Sequence[str], batch_size: Optional[int] = None,
                             rank: int = 0, world_size: int = 1, num_processes: Optional[int] = None,
                             view_transform=None):
    """Build the endless unlabelled augmenter for an initialised ``nnUNetTrainer`` (or subclass).

    Uses the trainer's plans, configuration, patch sizes and augmentation; ``batch_size`` defaults to the
    trainer's. ``num_processes`` defaults to ``get_allowed_n_proc_DA()`` (i.e. ``nnUNet_n_proc_DA``).
    Returns a batchgenerators augmenter whose ``next()`` gives ``{'data', 'keys'}`` (and ``'data_view'`` with a
    ``view_transform``, see the module docstring).
    """
    if len(unlabeled_ids) == 0:
        raise SKCDFInputError(
            "The split has no unlabelled cases. Add some with 'skcdf_split -d <dataset> --labeled 0.2' (hides the "
            "labels of the other training cases) or put images into imagesUnlabeled/, run "
            "'skcdf_preprocess_unlabeled' and 'skcdf_split ... --add-unlabeled-images'.")
    cm = trainer.configuration_manager
    check_unlabeled_data_is_current(trainer, unlabeled_ids)
    sources = resolve_unlabeled_sources(trainer.preprocessed_dataset_folder_base, cm.data_identifier,
                                        shard_identifiers(unlabeled_ids, rank, world_size))
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    transforms = unlabeled_training_transforms(trainer, cm.patch_size, rotation, mirror_axes, dummy_2d)
    loader = nnUNetUnlabeledDataLoader(nnUNetDatasetUnlabeled(sources), batch_size or trainer.batch_size,
                                       initial_patch_size, cm.patch_size, trainer.label_manager,
                                       transforms=transforms, use_mask_for_norm=cm.use_mask_for_norm,
                                       view_transform=view_transform)
    return wrap_in_augmenter(loader, get_allowed_n_proc_DA() if num_processes is None else num_processes,
                             pin_memory=trainer.device.type == "cuda")


def check_unlabeled_data_is_current(trainer, unlabeled_ids: Sequence[str]) -> None:
    """Refuse ``imagesUnlabeled`` data preprocessed with other plans than the trainer's configuration (stale after a
    re-planning). Checked on the whole split, before sharding, so that every DDP rank refuses alike."""
    folder = join(trainer.preprocessed_dataset_folder_base,
                  unlabeled_folder_name(trainer.configuration_manager.data_identifier))
    if os.path.isdir(folder) and any(case_is_complete(folder, i) for i in unlabeled_ids):
        check_unlabeled_folder_is_current(folder, trainer.plans_manager.plans, trainer.configuration_name,
                                          trainer.dataset_json)


def wrap_in_augmenter(loader, num_processes: int, pin_memory: bool = False):
    """Same augmenter choice and caching as ``nnUNetTrainer.get_dataloaders`` for its training stream, with a seed
    per worker. batchgenerators seeds a worker's torch generator only when given a seed (numpy's it seeds from
    entropy either way), and the augmentations draw from torch: without seeds every worker, of this augmenter and
    of nnU-Net's labelled one, forked from the same torch state and drew the same augmentation decisions and noise
    fields, so x_l and x_u of a step shared them. The seeds come from numpy's global generator (unseeded by
    nnU-Net, as its own workers' numpy seeds)."""
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    seeds = [int(s) for s in np.random.randint(0, 2 ** 31 - 1, num_processes)]
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=max(6, num_processes // 2), seeds=seeds, pin_memory=pin_memory,
                                        wait_time=0.002)

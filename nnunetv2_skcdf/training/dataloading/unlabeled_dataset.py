"""Images-only view of preprocessed cases, for the unlabelled stream.

Unlabelled cases come from two places:
- ``<data_identifier>_unlabeled/``: cases of ``imagesUnlabeled`` (written by ``skcdf_preprocess_unlabeled``);
- ``<data_identifier>/``: training cases whose labels the split hides (nnU-Net's own preprocessed data).

``load_case`` never opens a ``_seg`` file and drops the label-derived ``class_locations`` from the
properties, so labels of hidden-label cases cannot reach the trainer through this class. The only
thing derived from a ``_seg`` file is the binary non-zero crop mask (``load_nonzero_mask``), which
nnU-Net's ``MaskImageTransform`` needs for datasets normalised with ``use_mask_for_norm`` (MRI);
it is computed from ``seg < 0`` and carries no label information.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import blosc2
import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.utilities.file_and_folder_operations import join, load_pickle
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

from nnunetv2_skcdf.preprocessing.unlabeled import case_is_complete, unlabeled_folder_name
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

#: properties written by nnU-Net's preprocessor that are computed from the label
LABEL_DERIVED_PROPERTIES = ("class_locations",)


def resolve_unlabeled_sources(preprocessed_dataset_folder_base: str, data_identifier: str,
                              identifiers: Sequence[str]) -> Dict[str, str]:
    """Map every unlabelled id to the folder that holds its preprocessed image.

    ``imagesUnlabeled`` cases (``<data_identifier>_unlabeled/``) take precedence over hidden-label
    training cases (``<data_identifier>/``); ids are unique across both by construction of the split.
    """
    unlabeled = join(preprocessed_dataset_folder_base, unlabeled_folder_name(data_identifier))
    labelled = join(preprocessed_dataset_folder_base, data_identifier)
    sources, missing = {}, []
    for i in identifiers:
        folder = next((f for f in (unlabeled, labelled) if os.path.isdir(f) and case_is_complete(f, i)), None)
        if folder is None:
            missing.append(i)
        else:
            sources[i] = folder
    if missing:
        raise SKCDFInputError(
            f"{len(missing)} unlabelled case(s) of the split have no preprocessed image in {unlabeled} or {labelled}: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. Run 'skcdf_preprocess_unlabeled -d <dataset> "
            f"-c <configuration>' (for imagesUnlabeled cases) or nnUNetv2_preprocess (for training cases).")
    return sources


class nnUNetDatasetUnlabeled(nnUNetBaseDataset):
    """Blosc2 cases from several folders, images only. ``load_case`` -> (data, None, None, properties)."""

    def __init__(self, sources: Dict[str, str]):
        # nnUNetBaseDataset wants one folder; ours are per case (the base attribute stays for introspection)
        super().__init__(folder="", identifiers=list(sources.keys()))
        self.sources = dict(sources)
        self.mmap_kwargs = {} if os.name == "nt" else {"mmap_mode": "r"}
        blosc2.set_nthreads(1)

    def _open(self, path: str):
        return blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1}, **self.mmap_kwargs)

    def load_case(self, identifier: str):
        folder = self.sources[identifier]
        data = self._open(join(folder, identifier + ".b2nd"))
        properties = load_pickle(join(folder, identifier + ".pkl"))
        for key in LABEL_DERIVED_PROPERTIES:
            properties.pop(key, None)
        return data, None, None, properties

    def load_nonzero_mask(self, identifier: str, bbox: List[List[int]]) -> np.ndarray:
        """(1, *patch) int16 crop mask of the patch ``bbox``: -1 outside the non-zero region, 0 inside."""
        seg = self._open(join(self.sources[identifier], identifier + "_seg.b2nd"))
        patch = crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)
        return np.where(patch < 0, -1, 0).astype(np.int16)

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("read-only view; unlabelled cases are written by skcdf_preprocess_unlabeled")

    @staticmethod
    def get_identifiers(folder: str) -> List[str]:
        return sorted(i[:-4] for i in os.listdir(folder) if i.endswith(".pkl"))

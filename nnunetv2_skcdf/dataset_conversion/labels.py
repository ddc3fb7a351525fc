"""The 13 abdominal organ classes of the Synapse multi-organ CT benchmark (BTCV), as used by SKCDF.

A tiny, dependency-free module: converters, the phantom generator and evaluation tables import the
class ids, nnU-Net label names and the abbreviations of the paper's tables from here, so that every
part of the project agrees on them. Label 0 is background.
"""
from __future__ import annotations

from typing import Dict, Tuple

#: ``(label id, nnU-Net label name, paper abbreviation)`` in label-id order.
SYNAPSE_CLASSES: Tuple[Tuple[int, str, str], ...] = (
    (1, "spleen", "Sp"),
    (2, "right_kidney", "RK"),
    (3, "left_kidney", "LK"),
    (4, "gallbladder", "Ga"),
    (5, "esophagus", "Es"),
    (6, "liver", "Li"),
    (7, "stomach", "St"),
    (8, "aorta", "Ao"),
    (9, "inferior_vena_cava", "IVC"),
    (10, "portal_and_splenic_veins", "PSV"),
    (11, "pancreas", "Pa"),
    (12, "right_adrenal_gland", "RAG"),
    (13, "left_adrenal_gland", "LAG"),
)


#: The 8 organs of the common Synapse evaluation protocol (TransUNet, Chen et al. 2021, and most papers after it):
#: the 13 classes without esophagus, inferior vena cava, portal/splenic veins and the adrenal glands.
SYNAPSE8: Tuple[str, ...] = ("spleen", "right_kidney", "left_kidney", "gallbladder", "liver", "stomach", "aorta",
                             "pancreas")

#: named organ sets (``skcdf_make_phantom --organs``)
ORGAN_SETS: Dict[str, Tuple[str, ...]] = {
    "all": tuple(name for _, name, _ in SYNAPSE_CLASSES),
    "synapse8": SYNAPSE8,
}


def synapse_labels_dict() -> Dict[str, int]:
    """The ``labels`` entry of an nnU-Net v2 dataset.json: ``{"background": 0, "spleen": 1, ...}``."""
    labels = {"background": 0}
    labels.update({name: label_id for label_id, name, _ in SYNAPSE_CLASSES})
    return labels

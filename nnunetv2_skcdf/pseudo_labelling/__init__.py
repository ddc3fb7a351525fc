"""Filtered iterative pseudo-labelling with stock nnU-Net (the practitioner's baseline): ``skcdf_pseudolabel``."""

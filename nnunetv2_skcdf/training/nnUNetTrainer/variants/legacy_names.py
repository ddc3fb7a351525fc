"""The trainer names of releases before 0.2 (``nnUNetTrainerSKCDF`` and ``nnUNetTrainerSKCDF_<variant>``).

``SKCDFTrainer`` is the one documented name (the design card's); its variants are ``SKCDFTrainer_<change>``.
Model folders trained under the old names are called ``nnUNetTrainerSKCDF__<plans>__<configuration>`` and their
checkpoints record ``trainer_name: nnUNetTrainerSKCDF``; nnU-Net resolves both by class name, and a trainer's
output folder is its class ``__name__``. So each old name is kept as an empty subclass of its new class: the
same architecture, hyperparameters and training, under the old ``__name__``, so that ``nnUNetv2_predict``,
``--val`` and ``--c`` keep finding old folders. Not for new runs (README: "Trainer names").
"""
from __future__ import annotations

from typing import Dict

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer
from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation import SKCDFTrainer_ablations as _ablations
from nnunetv2_skcdf.training.nnUNetTrainer.variants.demo import demo_trainers as _demo
from nnunetv2_skcdf.training.nnUNetTrainer.variants.training_length import SKCDFTrainer_Xepochs as _lengths

OLD_PREFIX, NEW_PREFIX = "nnUNetTrainerSKCDF", "SKCDFTrainer"


def _legacy_classes() -> Dict[str, type]:
    """{old name: subclass of the new class} for SKCDFTrainer and every SKCDFTrainer_* variant of this package."""
    new_classes = {SKCDFTrainer.__name__: SKCDFTrainer}
    for module in (_ablations, _demo, _lengths):
        new_classes.update({name: obj for name, obj in vars(module).items()
                            if isinstance(obj, type) and issubclass(obj, SKCDFTrainer)
                            and name.startswith(NEW_PREFIX)})
    legacy = {}
    for new_name, cls in sorted(new_classes.items()):
        old_name = OLD_PREFIX + new_name[len(NEW_PREFIX):]
        legacy[old_name] = type(old_name, (cls,), {
            "__module__": __name__, "__qualname__": old_name,
            "__doc__": f"Old name of ``{new_name}`` (kept for model folders trained before 0.2)."})
    return legacy


LEGACY_TRAINERS = _legacy_classes()
globals().update(LEGACY_TRAINERS)  # module attributes: nnU-Net's lookup finds classes by getattr(module, name)

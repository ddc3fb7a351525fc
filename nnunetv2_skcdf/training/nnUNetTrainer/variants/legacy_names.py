"""The trainer names of releases before 0.2 (``nnUNetTrainerSKCDF`` and ``nnUNetTrainerSKCDF_<variant>``).

``SKCDFTrainer`` is the one documented name (the design card's); its variants are ``SKCDFTrainer_<change>``.
Model folders trained under the old names are called ``nnUNetTrainerSKCDF__<plans>__<configuration>`` and their
checkpoints record ``trainer_name: nnUNetTrainerSKCDF``; nnU-Net resolves both by class name, and a trainer's
output folder is its class ``__name__``. So each old name is kept, training exactly as release 0.1 trained it:
``nnUNetTrainerSKCDF`` is ``SKCDFTrainer_v01`` (divisor windows, constant head EMA, exclude masking) under the old
``__name__``, and ``nnUNetTrainerSKCDF_<change>`` is ``SKCDFTrainer_<change>`` mixed in ahead of
``SKCDFTrainer_v01`` (0.1's rules plus that one change), so that ``nnUNetv2_predict``, ``--val`` and ``--c`` keep
finding old folders and ``--c`` continues them by the rules they started with. Not for new runs (README: "Trainer
names").
"""
from __future__ import annotations

from typing import Dict

from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation import SKCDFTrainer_ablations as _ablations
from nnunetv2_skcdf.training.nnUNetTrainer.variants.demo import demo_trainers as _demo
from nnunetv2_skcdf.training.nnUNetTrainer.variants.releases.SKCDFTrainer_releases import SKCDFTrainer_v01
from nnunetv2_skcdf.training.nnUNetTrainer.variants.training_length import SKCDFTrainer_Xepochs as _lengths

OLD_PREFIX, NEW_PREFIX = "nnUNetTrainerSKCDF", "SKCDFTrainer"
#: every trainer name 0.1 shipped, as suffixes of the prefix; variants added since exist under their new name only
OLD_SUFFIXES = ("", "_noSKC", "_selfAttention", "_globalLocal", "_parallelSKC", "_attnDropout", "_noABC",
                "_multiplyMask", "_noDecoupling", "_noEMA", "_cw1", "_cw5", "_cw20", "_noRampup", "_rampup50",
                "_ema09", "_ema0999", "_5epochs", "_20epochs", "_100epochs", "_cpuTest", "_demo8epochs",
                "_demo40epochs")


def _legacy_classes() -> Dict[str, type]:
    """{old name: SKCDFTrainer<suffix> on release 0.1's rules} for every name of 0.1."""
    modules = (_ablations, _demo, _lengths)
    legacy = {}
    for suffix in OLD_SUFFIXES:
        new_name, old_name = NEW_PREFIX + suffix, OLD_PREFIX + suffix
        variant = () if not suffix else (next(vars(m)[new_name] for m in modules if new_name in vars(m)),)
        legacy[old_name] = type(old_name, (*variant, SKCDFTrainer_v01), {
            "__module__": __name__, "__qualname__": old_name,
            "__doc__": f"Old name of ``{new_name}``, training as release 0.1 did (``SKCDFTrainer_v01``"
                       f"{' plus the change of ' + new_name if suffix else ''}); kept for model folders trained "
                       f"before 0.2."})
    return legacy


LEGACY_TRAINERS = _legacy_classes()
globals().update(LEGACY_TRAINERS)  # module attributes: nnU-Net's lookup finds classes by getattr(module, name)

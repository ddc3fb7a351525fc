"""One trainer per former default set of ``SKCDFTrainer``: each pins every setting (architecture class attributes
and the whole hyperparameter block) to what that release trained with, so that a model folder written by it
resumes (``--c``) unchanged whatever today's defaults are. The table, with the commits that wrote each set, is
``skcdf_settings.RELEASE_TRAINERS``; the resume matrix of documentation/migration.md says which folder goes with
which name.

- ``SKCDFTrainer_v01``: release 0.1.0 (and 0.2.0 before padded windows): divisor windows, constant head EMA,
  exclude masking. The old names ``nnUNetTrainerSKCDF*`` are this plus their variant's change (legacy_names).
- ``SKCDFTrainer_v01attnDropout``: 0.1.0's first day (commit 0b7890b up to 15e93fc), dropout 0.1 on the attention
  weights as well.
- ``SKCDFTrainer_v02``: 0.2.0 from padded windows (f152b61) on.
- ``SKCDFTrainer_v03``: 0.3.0, the lr-scaled head EMA.
- ``SKCDFTrainer_v04``: 0.4.0, the multiplied masking; the decoder EMA averages floating buffers too (which only
  BatchNorm plans have: on nnU-Net's default plans it trains exactly as today's ``SKCDFTrainer``).

Each composes as a mixin (``class X(SKCDFTrainer_cw1, SKCDFTrainer_v03)``: a variant's change on a release's rules).

- ``SKCDFTrainer_reference``: no release's defaults but the reference code's settings wherever the integration has
  a switch (``skcdf_settings.REFERENCE_SETTINGS``: constant head EMA step, per-head self mode, cross-attention over
  the whole other half, multiplied masking, parameters-only EMA, dropout 0.1 on the attention weights), pinned the
  same way: "the paper" under one name.
"""
import torch

from nnunetv2_skcdf.training import skcdf_settings as S
from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer


def _pinned_trainer(name: str, entry: dict, release, doc: str) -> type:
    """A subclass of SKCDFTrainer with the entry's architecture as class attributes and its training rules set in
    ``__init__`` after its parents' (reached through ``super()``, so that variants ahead of it in the bases keep
    their own change; the signature is nnU-Net's exact base signature, from which it rebuilds init kwargs).
    ``release``: the release whose rules the trainer name declares (None: a run of it is always recorded)."""
    architecture = {k: entry["settings"][k] for k in S.ARCHITECTURE_SETTINGS}
    training = {k: entry["settings"][k] for k in S.TRAINING_SETTINGS}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super(pinned, self).__init__(plans, configuration, fold, dataset_json, device)
        for key, value in training.items():
            setattr(self, key, value)

    pinned = type(name, (SKCDFTrainer,), {**architecture, "__init__": __init__, "skcdf_release": release,
                                          "__doc__": doc, "__module__": __name__, "__qualname__": name})
    return pinned


def _release_trainer(name: str) -> type:
    entry = S.RELEASE_TRAINERS[name]
    return _pinned_trainer(name, entry, entry["release"],
                           f"SKCDFTrainer as {entry['written_by']}: every setting pinned "
                           f"({S.__name__}.RELEASE_TRAINERS). Resumes model folders of that release unchanged.")


SKCDFTrainer_v01attnDropout = _release_trainer("SKCDFTrainer_v01attnDropout")
SKCDFTrainer_v01 = _release_trainer("SKCDFTrainer_v01")
SKCDFTrainer_v02 = _release_trainer("SKCDFTrainer_v02")
SKCDFTrainer_v03 = _release_trainer("SKCDFTrainer_v03")
SKCDFTrainer_v04 = _release_trainer("SKCDFTrainer_v04")
SKCDFTrainer_reference = _pinned_trainer(
    "SKCDFTrainer_reference", S.NAMED_RULE_SETS["SKCDFTrainer_reference"], None,
    f"SKCDFTrainer with {S.NAMED_RULE_SETS['SKCDFTrainer_reference']['written_by']} ({S.__name__}.REFERENCE_SETTINGS, "
    f"every setting pinned): the published method inside nnU-Net, whatever SKCDFTrainer's defaults become.")

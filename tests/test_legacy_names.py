"""Old names train exactly as the release they name, and one trainer per former default set pins all of it.

Release 0.1 (``nnUNetTrainerSKCDF*``): divisor windows, constant head EMA, exclude masking (git history:
``nnUNetTrainerSKCDF.py`` at b5a8ccb; README's "Masking" and "Head EMA" notes). Each old variant name is 0.1 plus
the one change its name says."""
from __future__ import annotations

import pytest

from test_ablation_variants import EXPECTED  # variant -> the settings it changes from today's defaults
from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer

#: variant -> the settings it pins (multiplyMask pins today's default, which 0.1's default was not)
PINS = {**EXPECTED, "SKCDFTrainer_multiplyMask": {"masking": "multiply"}}
RELEASES = ("SKCDFTrainer_v01attnDropout", "SKCDFTrainer_v01", "SKCDFTrainer_v02", "SKCDFTrainer_v03",
            "SKCDFTrainer_v04")
#: what each former default set was (the resume matrix in documentation/migration.md says which commits wrote it)
V04 = dict(skc_enabled=True, skc_heads=2, skc_window=None, skc_order="local_global", skc_self_heads="joint",
           skc_dropout=0.1, skc_attention_dropout=0.0, labelled_attention_mode="cross", balanced_heads=True,
           decoupled=True, masking="multiply", head_ema="lr_scaled", ema_momentum=0.99, ema_couple_decoders=True,
           ema_buffers=True, consistency_weight=10.0, rampup_epochs=None, unlabeled_batch_size=None,
           unlabelled_view="same", keep_rate_source="labelled_cases", skc_cross_group=None, appearance_transfer=0.0,
           copy_paste=0.0, copy_paste_size=2 / 3, pseudo_label_threshold=0.0)
EXPECTED_RELEASES = {
    "SKCDFTrainer_v04": V04,
    "SKCDFTrainer_v03": {**V04, "masking": "exclude"},
    "SKCDFTrainer_v02": {**V04, "masking": "exclude", "head_ema": "constant"},
    "SKCDFTrainer_v01": {**V04, "masking": "exclude", "head_ema": "constant", "skc_window": "divisor"},
    "SKCDFTrainer_v01attnDropout": {**V04, "masking": "exclude", "head_ema": "constant", "skc_window": "divisor",
                                    "skc_attention_dropout": 0.1},
}
#: the reference code's settings (SKCDFTrainer_reference; documentation/method.md): 0.4's but the constant head EMA
#: step, the reference's per-head self mode, the EMA of parameters only and its dropout on the attention weights
REFERENCE = {**V04, "head_ema": "constant", "skc_self_heads": "per_head", "ema_buffers": False,
             "skc_attention_dropout": 0.1}
PINNED = {**EXPECTED_RELEASES, "SKCDFTrainer_reference": REFERENCE}


def _raw(trainer) -> dict:
    return {k: getattr(trainer, k) for k in V04}


def _release(name):
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.releases import SKCDFTrainer_releases as R

    return getattr(R, name)


def test_release_table_is_the_one_the_trainers_use():
    from nnunetv2_skcdf.training import skcdf_settings as S

    assert {name: S.RELEASE_TRAINERS[name]["settings"] for name in RELEASES} == EXPECTED_RELEASES
    assert set(S.RELEASE_TRAINERS) == set(RELEASES)
    assert S.REFERENCE_SETTINGS == S.NAMED_RULE_SETS["SKCDFTrainer_reference"]["settings"] == REFERENCE


@pytest.mark.parametrize("name", list(PINNED))
def test_release_trainer_pins_every_setting(name, trainer_factory, monkeypatch):
    """Even if SKCDFTrainer's defaults change (simulated: every class attribute and every value of the
    hyperparameter block set to something else), a release trainer trains with its release's settings, and
    SKCDFTrainer_reference with the reference's (it declares no release: its runs are always recorded)."""
    original = SKCDFTrainer.__init__
    changed = dict(masking="exclude", head_ema="off", ema_momentum=0.5, ema_couple_decoders=False, ema_buffers=False,
                   consistency_weight=3.0, rampup_epochs=7, unlabeled_batch_size=5, unlabelled_view="strong_intensity",
                   keep_rate_source="other", skc_cross_group=3, appearance_transfer=0.7,
                   copy_paste=0.3, copy_paste_size=0.5, pseudo_label_threshold=0.8)

    def drifted_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for key, value in changed.items():
            setattr(self, key, value)

    monkeypatch.setattr(SKCDFTrainer, "__init__", drifted_init)
    for key, value in dict(skc_enabled=False, skc_heads=4, skc_window=(1, 1, 1), skc_order="parallel",
                           skc_self_heads="per_head", skc_dropout=0.3, skc_attention_dropout=0.3,
                           labelled_attention_mode="self", balanced_heads=False, decoupled=False).items():
        monkeypatch.setattr(SKCDFTrainer, key, value)
    trainer = trainer_factory(_release(name))
    assert _raw(trainer) == PINNED[name]
    assert "__" not in name and bool(trainer.skcdf_release) == (name in RELEASES)


def test_release_trainers_and_old_names_resolve_through_nnunet(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.legacy_names import LEGACY_TRAINERS

    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())
    for name in (*PINNED, *LEGACY_TRAINERS):
        cls = recursive_find_trainer_class_by_name(name)
        assert cls.__name__ == name and "__" not in name


def test_old_names_train_as_release_0_1(trainer_factory):
    """nnUNetTrainerSKCDF = SKCDFTrainer_v01 exactly; nnUNetTrainerSKCDF_<change> = v01 plus that change (the
    change of today's SKCDFTrainer_<change>), never today's defaults."""
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.legacy_names import LEGACY_TRAINERS

    v01 = EXPECTED_RELEASES["SKCDFTrainer_v01"]
    base = trainer_factory(LEGACY_TRAINERS["nnUNetTrainerSKCDF"])
    assert _raw(base) == v01
    assert (base.masking, base.head_ema, base.skc_window) == ("exclude", "constant", "divisor")
    for old, cls in sorted(LEGACY_TRAINERS.items()):
        new_name = old.replace("nnUNetTrainerSKCDF", "SKCDFTrainer")
        trainer = trainer_factory(cls)
        change = PINS.get(new_name, {})
        assert {k: v for k, v in _raw(trainer).items() if v01[k] != v} == change, old
        assert cls.__name__ == old and new_name in [b.__name__ for b in cls.__mro__] and trainer.skcdf_release
        if new_name in ("SKCDFTrainer_5epochs", "SKCDFTrainer_cpuTest", "SKCDFTrainer_demo8epochs"):
            assert trainer.num_epochs == {"SKCDFTrainer_5epochs": 5}.get(new_name, 8)


def test_a_run_of_main_between_the_settings_record_and_cross_groups_resumes_with_crossWholeBatch(trainer_factory):
    """Main trained for a while with the settings record but cross-attention over the whole other half, which no
    release did. On a plan with more than 2 samples per half such a run is named SKCDFTrainer_crossWholeBatch, whose
    settings skcdf_settings.NAMED_RULE_SETS holds; with BatchNorm (floating buffers: 0.4's buffer EMA acts) it is the only
    trainer with those rules, with InstanceNorm 0.4's trainer has them too; at 2 per half SKCDFTrainer has them."""
    from nnunetv2_skcdf.training import skcdf_settings as S
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation.SKCDFTrainer_ablations import (
        SKCDFTrainer_crossWholeBatch)

    table = S.NAMED_RULE_SETS["SKCDFTrainer_crossWholeBatch"]["settings"]
    assert S.raw_settings(trainer_factory(SKCDFTrainer_crossWholeBatch)) == table
    bottleneck = (4, 8, 8)
    for floats, batch, expected in ((True, (4, 4), ["SKCDFTrainer_crossWholeBatch"]),
                                    (False, (4, 4), ["SKCDFTrainer_v04", "SKCDFTrainer_crossWholeBatch"]),
                                    (True, (2, 2), ["SKCDFTrainer", "SKCDFTrainer_crossWholeBatch"])):
        run = S.effective(table, bottleneck, floats, batch)
        assert S.release_candidates(run, bottleneck, floats, batch=batch) == expected, (floats, batch)


def test_a_run_of_the_reference_settings_is_named_for_its_own_trainer_only():
    """A run of SKCDFTrainer_reference resumed by another trainer: the refusal's candidates are the reference trainer
    alone (no release had per-head self mode with a constant head EMA step), on every plan."""
    from nnunetv2_skcdf.training import skcdf_settings as S

    for floats, batch in ((False, (2, 2)), (True, (2, 2)), (False, (4, 4))):
        run = S.effective(REFERENCE, (4, 8, 8), floats, batch)
        assert S.release_candidates(run, (4, 8, 8), floats, batch=batch) == ["SKCDFTrainer_reference"]


def test_the_reference_trainer_trains_with_the_reference_network_and_head_ema(trainer_factory):
    """SKCDFTrainer_reference builds the reference's per-head self mode and trains (finite losses) with the constant
    head EMA step: m whatever the learning rate (today's default would scale the step with it)."""
    import numpy as np
    import torch

    trainer = trainer_factory(_release("SKCDFTrainer_reference"))
    trainer.on_train_start()
    try:
        net = trainer._net()
        local, glob = net.skc.local_block.attention, net.skc.global_block.attention
        assert (local.self_heads, glob.self_heads) == ("per_head", "per_head")
        assert trainer.skc_attention_dropout == 0.1  # the reference code drops attention weights too
        trainer.optimizer.param_groups[0]["lr"] = trainer.initial_lr / 2  # as later in nnU-Net's poly schedule
        assert trainer._head_ema_momentum() == trainer.ema_momentum == 0.99  # lr_scaled would give 0.995
        trainer.on_train_epoch_start()
        for _ in range(2):
            out = trainer.train_step(next(trainer.dataloader_train))
            assert np.isfinite(out["loss"]) and np.isfinite(out["l_u"])
        assert trainer.nonfinite_in_a_row == 0
        assert all(torch.isfinite(p).all() for p in net.parameters())
    finally:
        trainer.on_train_end()

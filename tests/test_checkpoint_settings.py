"""A run trains by the rules it started with: every SKCDF setting is recorded in the checkpoint; ``--c`` refuses
other rules (naming each difference and the trainer that resumes the run unchanged); ``--val`` and prediction
compare the architecture only and say nothing when it matches. Checkpoints written before the record existed are
inferred where that is certain (nnU-Net's debug.json written before the checkpoint's last epoch, or a trainer that
names a release, checked against the network's shapes), else refused for ``--c`` with the fix."""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer
from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation import SKCDFTrainer_ablations as A
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

#: every setting that decides how SKCDF trains (the trainer's class attributes and hyperparameter block)
RECORDED = {"skc_enabled", "skc_heads", "skc_window", "skc_order", "skc_self_heads", "skc_dropout",
            "skc_attention_dropout", "labelled_attention_mode", "balanced_heads", "decoupled",
            "masking", "head_ema", "ema_momentum", "ema_couple_decoders", "ema_buffers", "consistency_weight",
            "rampup_epochs", "unlabeled_batch_size", "unlabelled_view", "keep_rate_source", "skc_cross_group",
            "appearance_transfer", "copy_paste", "copy_paste_size", "pseudo_label_threshold"}
#: attributes of the hyperparameter block that are state or a safety stop, not a training rule
NOT_RULES = {"dataloader_unlabeled", "masked_loss", "nonfinite_in_a_row", "max_nonfinite_steps", "_strong_transform",
             "_resumed_from"}


def _record(checkpoint: dict) -> dict:
    from nnunetv2_skcdf.network.architectures.skcdf_unet import decode_record

    return decode_record(checkpoint["network_weights"]["_extra_state"])


@pytest.fixture
def make(tiny_training):
    """make(cls, configuration='3d_tiny') -> a CPU trainer; '3d_odd' has a 3 x 5 x 6 bottleneck, where the old
    (divisor) window rule gives (1, 1, 2) and today's (2, 2, 2); '3d_b4' is 3d_tiny with a batch of 4."""
    pre = tiny_training["preprocessed"]
    plans_file = pre / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    tiny = plans["configurations"]["3d_tiny"]
    total = np.prod(np.array(tiny["architecture"]["arch_kwargs"]["strides"]), axis=0)
    plans["configurations"]["3d_odd"] = {**tiny, "patch_size": [int(b * t) for b, t in zip((3, 5, 6), total)]}
    plans["configurations"]["3d_b4"] = {**tiny, "batch_size": 4}
    plans_file.write_text(json.dumps(plans))

    def make_trainer(cls=SKCDFTrainer, configuration="3d_tiny"):
        p = json.loads(plans_file.read_text())
        p["continue_training"] = False
        return cls(p, configuration, 0, json.loads((pre / "dataset.json").read_text()), device=torch.device("cpu"))

    return make_trainer


def _old_run(make, cls, configuration="3d_tiny", record=True, debug=None, folder_name=None) -> str:
    """A model folder after one epoch of ``cls``: ``checkpoint_latest.pth``; ``record=False`` strips the settings
    record (a checkpoint written before it existed); ``debug``: nnU-Net's debug.json written 'before' or 'after'
    the checkpoint's last epoch ended, or None (none). ``folder_name``: the trainer name the folder is renamed to
    (what the fix tells users to do). Returns the checkpoint path."""
    trainer = make(cls, configuration)
    trainer.initialize()
    end = time.time()
    trainer.logger.log("epoch_start_timestamps", end - 1, 0)
    trainer.logger.log("epoch_end_timestamps", end, 0)
    path = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    if not record:
        checkpoint = torch.load(path, weights_only=False)
        checkpoint["network_weights"].pop("_extra_state", None)
        torch.save(checkpoint, path)
    debug_file = Path(trainer.output_folder) / "debug.json"
    if debug is not None:
        trainer._save_debug_information()
        stamp = end - 60 if debug == "before" else end + 60
        os.utime(debug_file, (stamp, stamp))
    elif debug_file.exists():
        debug_file.unlink()
    if folder_name is None:
        return str(path)
    base = Path(trainer.output_folder_base)
    renamed = base.with_name(base.name.replace(type(trainer).__name__, folder_name, 1))
    shutil.rmtree(renamed, ignore_errors=True)
    shutil.move(str(base), str(renamed))
    return str(renamed / "fold_0" / path.name)


def _resume(make, cls, checkpoint: str, configuration="3d_tiny"):
    """--c: load_checkpoint, then on_train_start (refusals come before any loader starts)."""
    trainer = make(cls, configuration)
    assert Path(trainer.output_folder) == Path(checkpoint).parent
    trainer.load_checkpoint(checkpoint)
    return trainer


def _refused(trainer, match: str) -> str:
    with pytest.raises(SKCDFInputError, match=match) as refusal:
        trainer.on_train_start()
    assert trainer.dataloader_train is None and trainer.dataloader_unlabeled is None
    return str(refusal.value)


def _accepted(trainer):
    trainer.on_train_start()
    trainer.on_train_end()
    return trainer


# ---------------------------------------------------------------------------------------------- the record
def test_checkpoint_records_every_setting_of_the_trainer(make, tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = make()
    trainer.initialize()
    trainer.save_checkpoint(str(tmp_path / "ckpt.pth"))
    record = _record(torch.load(tmp_path / "ckpt.pth", weights_only=False))
    assert record["trainer"] == "SKCDFTrainer"
    assert set(record["architecture"]) | set(record["training"]) == RECORDED
    assert record["training"]["masking"] == "multiply" and record["training"]["head_ema"] == "lr_scaled"
    assert record["architecture"]["skc_window"] == [2, 2, 2]  # the window as built, not the rule's name
    # nothing of the hyperparameter block or the class attributes is left out (a new switch must be recorded)
    block = set(vars(make())) - set(vars(make(nnUNetTrainer))) - NOT_RULES
    assert block <= RECORDED, block - RECORDED
    class_settings = set(SKCDFTrainer.__annotations__) | {"skc_window"}
    assert class_settings <= RECORDED, class_settings - RECORDED


def test_every_variant_records_the_architecture_it_builds(make):
    """The trainer's settings (class attributes, resolved for the bottleneck) equal what the built network reports
    about itself, for every ablation: the record compares like with like."""
    from nnunetv2_skcdf.training import skcdf_settings as S

    from test_ablation_variants import EXPECTED

    names = sorted(n for n in vars(A) if n.startswith("SKCDFTrainer_"))
    assert set(names) >= set(EXPECTED)  # every ablation variant, not a renamed-away empty list
    for name in names:
        trainer = make(getattr(A, name))
        trainer.initialize()
        own = trainer.skcdf_settings()
        assert {k: own[k] for k in S.ARCHITECTURE_SETTINGS} == trainer._net().architecture(), name


# ---------------------------------------------------------------------------------------------- --c
def test_resume_with_other_rules_is_refused_naming_each_difference_and_the_trainer_to_use(make):
    """A run of the 0.2 rules (exclude masking, constant head EMA) resumed by today's SKCDFTrainer: refused before
    any loader starts, each difference named, and the release trainer that continues it unchanged, with the
    commands. That trainer resumes it."""
    old = type("Old02", (A.SKCDFTrainer_excludeMask, A.SKCDFTrainer_constantHeadEMA), {})
    checkpoint = _old_run(make, old, folder_name="SKCDFTrainer")
    message = _refused(_resume(make, SKCDFTrainer, checkpoint),
                       r"(?s)masking: 'exclude' in the checkpoint, 'multiply' in SKCDFTrainer.*"
                       r"head_ema: 'constant' in the checkpoint, 'lr_scaled' in SKCDFTrainer.*SKCDFTrainer_v02.*"
                       r"SKCDFTrainer_v02__nnUNetPlans__3d_tiny.*-tr SKCDFTrainer_v02 --c")
    assert "skc_window" not in message and "consistency_weight" not in message  # only the differences
    checkpoint = shutil.move(str(Path(checkpoint).parents[1]),
                             str(Path(checkpoint).parents[2] / "SKCDFTrainer_v02__nnUNetPlans__3d_tiny"))
    _accepted(_resume(make, _release("SKCDFTrainer_v02"), str(Path(checkpoint) / "fold_0" / "checkpoint_latest.pth")))


def test_cross_attention_groups_count_only_where_they_act(make):
    """Cross-attention groups of 2 (today's default) change nothing at a batch of 2 per half: a 0.4 run resumes
    under SKCDFTrainer. At a batch of 4 they do: the 0.4 run (whole other half) is refused, naming the setting and
    SKCDFTrainer_v04, which resumes it."""
    v04 = _release("SKCDFTrainer_v04")
    _accepted(_resume(make, SKCDFTrainer, _old_run(make, v04, folder_name="SKCDFTrainer")))
    checkpoint = _old_run(make, v04, "3d_b4", folder_name="SKCDFTrainer")
    _refused(_resume(make, SKCDFTrainer, checkpoint, "3d_b4"),
             r"(?s)skc_cross_group: None in the checkpoint, 2 in SKCDFTrainer.*SKCDFTrainer_v04")
    checkpoint = _old_run(make, v04, "3d_b4")
    _accepted(_resume(make, v04, checkpoint, "3d_b4"))


def test_a_record_written_before_a_setting_existed_resumes_with_the_value_runs_had_then(make):
    """A checkpoint whose record predates appearance_transfer and copy-paste (added after 0.4, off before) resumes
    under SKCDFTrainer (off by default); SKCDFTrainer_histMatch's run (on) resumed by SKCDFTrainer is refused, naming
    it, and so is SKCDFTrainer_copyPaste's."""
    from nnunetv2_skcdf.network.architectures.skcdf_unet import encode_record

    checkpoint = _old_run(make, SKCDFTrainer)
    saved = torch.load(checkpoint, weights_only=False)
    record = _record(saved)
    for added in ("appearance_transfer", "copy_paste", "copy_paste_size", "pseudo_label_threshold"):
        del record["training"][added]
    saved["network_weights"]["_extra_state"] = encode_record(record)
    torch.save(saved, checkpoint)
    _accepted(_resume(make, SKCDFTrainer, checkpoint))
    checkpoint = _old_run(make, A.SKCDFTrainer_histMatch, folder_name="SKCDFTrainer")
    _refused(_resume(make, SKCDFTrainer, checkpoint),
             r"appearance_transfer: 0.5 in the checkpoint, 0.0 in SKCDFTrainer")
    checkpoint = _old_run(make, A.SKCDFTrainer_copyPaste, folder_name="SKCDFTrainer")
    _refused(_resume(make, SKCDFTrainer, checkpoint), r"copy_paste: 1.0 in the checkpoint, 0.0 in SKCDFTrainer")


def test_resume_with_the_same_rules_is_silent_and_validation_needs_the_architecture_only(make, recwarn):
    checkpoint = _old_run(make, SKCDFTrainer)
    _accepted(_resume(make, SKCDFTrainer, checkpoint))
    # --val of the same folder by a trainer with other training rules (the folder renamed): loads, says nothing
    checkpoint = _old_run(make, SKCDFTrainer, folder_name="SKCDFTrainer_excludeMask")
    trainer = make(A.SKCDFTrainer_excludeMask)
    recwarn.clear()
    trainer.load_checkpoint(checkpoint)
    ours = [w for w in recwarn if "nnunetv2_skcdf" in str(w.filename)]  # any warning the package itself issues
    assert not ours, [str(w.message) for w in ours]


def test_prediction_compares_the_architecture_and_is_silent_when_it_matches(make):
    """nnUNetv2_predict builds the network from the checkpoint's trainer class and loads the weights: a setting
    that does not show in the tensor shapes (self-mode heads, block order) would predict with another network."""
    def built(cls):
        trainer = make(cls)
        trainer.initialize()
        return trainer._net()

    per_head, joint = built(A.SKCDFTrainer_perHeadSelf), built(SKCDFTrainer)
    with pytest.raises(RuntimeError, match=r"(?s)skc_self_heads: 'per_head' in the checkpoint, 'joint' here.*"
                                           r"SKCDFTrainer_perHeadSelf"):
        joint.load_state_dict(per_head.state_dict())
    with pytest.raises(RuntimeError, match=r"skc_order: 'global_local' in the checkpoint, 'local_global' here"):
        joint.load_state_dict(built(A.SKCDFTrainer_globalLocal).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        joint.load_state_dict(built(A.SKCDFTrainer_excludeMask).state_dict())  # training rules only: silent
        joint.load_state_dict(joint.state_dict())


# ---------------------------------------------------------------------------------------------- old checkpoints
def test_old_checkpoint_is_inferred_from_debug_json_written_before_its_last_epoch(make):
    """No record, but nnU-Net's debug.json (every trainer attribute, written when the session started) predates
    the checkpoint's last epoch: the settings are those of that session."""
    checkpoint = _old_run(make, A.SKCDFTrainer_excludeMask, record=False, debug="before", folder_name="SKCDFTrainer")
    _refused(_resume(make, SKCDFTrainer, checkpoint),
             r"(?s)inferred from.*debug.json.*masking: 'exclude' in the checkpoint, 'multiply' in SKCDFTrainer.*"
             r"SKCDFTrainer_v03")
    checkpoint = _old_run(make, A.SKCDFTrainer_excludeMask, record=False, debug="before")
    _accepted(_resume(make, A.SKCDFTrainer_excludeMask, checkpoint))


@pytest.mark.parametrize("debug", [None, "after"])
def test_old_checkpoint_without_a_trustworthy_debug_json_is_refused_with_the_fix(make, debug):
    """No record and no debug.json, or one written after the checkpoint's last epoch (a later session that saved no
    checkpoint): the rules are not known, so --c is refused naming the release trainers; a trainer that names a
    release resumes it with that release's rules."""
    checkpoint = _old_run(make, SKCDFTrainer, record=False, debug=debug)
    _refused(_resume(make, SKCDFTrainer, checkpoint),
             r"(?s)records no SKCDF settings.*SKCDFTrainer_v04.*SKCDFTrainer_v03.*"
             r"SKCDFTrainer_v04__nnUNetPlans__3d_tiny.*-tr SKCDFTrainer_v04 --c")
    checkpoint = _old_run(make, SKCDFTrainer, record=False, debug=debug, folder_name="SKCDFTrainer_v04")
    _accepted(_resume(make, _release("SKCDFTrainer_v04"), checkpoint))


def test_old_checkpoint_window_decides_between_releases(make):
    """On an odd bottleneck the local window in the weights tells the releases apart: a 0.1 run (divisor window
    (1, 1, 2)) resumes under its old name; a release trainer with another window rule is refused, naming v01; a
    run with today's window under the old name is refused."""
    v01 = type("Old01", (A.SKCDFTrainer_divisorWindow, A.SKCDFTrainer_excludeMask, A.SKCDFTrainer_constantHeadEMA),
               {})
    checkpoint = _old_run(make, v01, "3d_odd", record=False, folder_name="nnUNetTrainerSKCDF")
    trainer = _accepted(_resume(make, _legacy("nnUNetTrainerSKCDF"), checkpoint, "3d_odd"))
    assert trainer._net().skc.local_block.window == (1, 1, 2)
    checkpoint = _old_run(make, v01, "3d_odd", record=False, folder_name="SKCDFTrainer_v04")
    _refused(_resume(make, _release("SKCDFTrainer_v04"), checkpoint, "3d_odd"),
             r"(?s)skc_window: \[1, 1, 2\] in the checkpoint, \[2, 2, 2\] in SKCDFTrainer_v04.*SKCDFTrainer_v01")
    checkpoint = _old_run(make, SKCDFTrainer, "3d_odd", record=False, folder_name="nnUNetTrainerSKCDF")
    _refused(_resume(make, _legacy("nnUNetTrainerSKCDF"), checkpoint, "3d_odd"),
             r"(?s)skc_window: \[2, 2, 2\] in the checkpoint, \[1, 1, 2\] in nnUNetTrainerSKCDF")


def _release(name: str) -> type:
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.releases import SKCDFTrainer_releases as R

    return getattr(R, name)


def _legacy(name: str) -> type:
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.legacy_names import LEGACY_TRAINERS

    return LEGACY_TRAINERS[name]

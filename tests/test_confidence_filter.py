"""Confidence filter (issue 39's candidate, ``SKCDFTrainer_confidence``): pseudo-label voxels whose softmax maximum
is below a threshold leave the unlabelled decoder's losses through nnU-Net's ignore path."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.training import skcdf_components as C


def test_confident_keeps_the_voxels_whose_softmax_maximum_reaches_the_threshold():
    logits = torch.zeros(1, 3, 1, 3)
    logits[0, 0, 0, 0] = 10.0             # max ~ 1
    logits[0, 1, 0, 1] = math.log(2.0)    # softmax (1, 2, 1) / 4: max 0.5
    # voxel 2: uniform, max 1/3
    keep = C.confident(logits, 0.5)
    assert keep.dtype == torch.bool and keep.shape == (1, 1, 1, 3)
    assert keep[0, 0, 0].tolist() == [True, True, False]
    assert C.confident(logits, 0.6)[0, 0, 0].tolist() == [True, False, False]
    scales = C.confident([logits, logits[..., :2]], 0.5)
    assert [s.shape[-1] for s in scales] == [3, 2]
    assert C.confident(logits, 0.0) is None and C.confident(None, 0.9) is None


def test_skcdf_variant_leaves_unconfident_voxels_out_of_d_u_losses(trainer_factory, monkeypatch):
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation.SKCDFTrainer_ablations import (
        SKCDFTrainer_confidence)

    trainer = trainer_factory(SKCDFTrainer_confidence)
    assert trainer.pseudo_label_threshold == 0.95
    kept, masked_targets = [], []
    keep_fn = C.confident
    monkeypatch.setattr(C, "confident", lambda logits, t: kept.append((logits, keep_fn(logits, t))) or kept[-1][1])
    trainer.on_train_start()
    try:
        assert trainer.skcdf_settings()["pseudo_label_threshold"] == 0.95
        # an untrained network is unconfident everywhere at 0.95: a lower threshold gives both kinds of voxel
        trainer.pseudo_label_threshold = 0.08
        masked = trainer.masked_loss
        monkeypatch.setattr(trainer, "masked_loss", lambda out, target: masked_targets.append(target)
                            or masked(out, target))
        out = trainer.train_step(next(trainer.dataloader_train))
        assert np.isfinite(out["loss"])
        # the top-level calls: D_l's main head, then its balanced head (the per-scale recursion is inside)
        (main_logits, main_keep), (balanced_logits, _) = [k for k in kept if isinstance(k[0], list)]
        target, = masked_targets  # D_u's main head (the balanced head goes through multiply masking)
        ignore = trainer.mask_ignore_value
        for scale, (t, k, lg) in enumerate(zip(target, main_keep, main_logits)):
            assert torch.equal(t == ignore, ~k)
            pseudo = lg.argmax(1, keepdim=True)
            assert torch.equal(t[k].long(), pseudo[k].long())
        share = float(main_keep[0].float().mean())
        assert 0.0 < share < 1.0
        assert float(out["pseudo_confident"]) == pytest.approx(share)
        # the balanced head's own kept share is logged too (its confidence may differ from the main head's)
        (_, balanced_keep), = [k for k in kept if isinstance(k[0], list)][1:]
        assert float(out["pseudo_confident_balanced"]) == pytest.approx(float(balanced_keep[0].float().mean()))
        lines = []
        monkeypatch.setattr(trainer, "print_to_log_file", lambda *a, **k: lines.append(" ".join(map(str, a))))
        trainer.on_train_epoch_end([out])
        kept_line, = [line for line in lines if "kept by the confidence filter" in line]
        assert f"{100 * share:.1f} % (main head)" in kept_line and "% (balanced head)" in kept_line
    finally:
        trainer.on_train_end()
    # range refusal: test_ablation_variants.py::test_unknown_training_switch_is_refused_at_initialize


def test_the_trainer_keeps_pasted_boxes_with_and_without_deep_supervision():
    from types import SimpleNamespace

    from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer

    logits = torch.zeros(2, 3, 4, 6, 8)  # uniform: every voxel below 0.5
    boxes = [((0, 2), (0, 6), (4, 8)), None]
    trainer = SimpleNamespace(pseudo_label_threshold=0.5)
    for out in (SKCDFTrainer._confident(trainer, logits, boxes, (4, 6, 8)),  # one scale (no deep supervision)
                SKCDFTrainer._confident(trainer, [logits], boxes, (4, 6, 8))[0]):
        assert out.shape == (2, 1, 4, 6, 8) and int(out.sum()) == 2 * 6 * 4 and out[0, 0, :2, :, 4:].all()
    assert SKCDFTrainer._confident(SimpleNamespace(pseudo_label_threshold=0.0), logits, boxes, (4, 6, 8)) is None


def test_pasted_boxes_stay_whatever_the_confidence():
    keep = [torch.zeros(2, 1, 4, 6, 8, dtype=torch.bool), torch.zeros(2, 1, 2, 3, 4, dtype=torch.bool)]
    boxes = [((0, 2), (0, 6), (4, 8)), None]
    pasted = C.paste_targets(keep, [torch.ones_like(k) for k in keep], boxes, (4, 6, 8))
    assert pasted[0][0, 0, :2, :, 4:].all() and not pasted[0][0, 0, 2:].any() and not pasted[0][1].any()
    assert pasted[1][0, 0, :1, :, 2:].all() and not pasted[1][1].any()

"""Keep-rates, annealing, ramp-up, balanced masks and the masked nnU-Net loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_skcdf.training import skcdf_components as C


def test_keep_rates_rarest_class_is_one_and_absent_class_does_not_crash():
    counts = C.count_class_voxels([np.array([0, 0, 0, 0, 1, 1, 2, -1]), np.array([[0, 0], [1, 0]])], 4)
    assert counts.tolist() == [7, 3, 1, 0]  # -1 (outside the crop) not counted; class 3 absent
    rates = C.keep_rates_from_counts(counts)
    assert torch.allclose(rates, torch.tensor([1 / 7, 1 / 3, 1.0, 1.0]))
    assert torch.isfinite(rates).all()
    with pytest.raises(ValueError, match="no labelled voxel"):
        C.keep_rates_from_counts([0, 0])


def test_annealed_keep_rates_go_from_one_to_rates():
    rates = torch.tensor([0.1, 0.5, 1.0])
    assert torch.allclose(C.annealed_keep_rates(rates, 0, 100), torch.ones(3))
    assert torch.allclose(C.annealed_keep_rates(rates, 100, 100), rates)
    assert torch.allclose(C.annealed_keep_rates(rates, 50, 100), torch.tensor([0.55, 0.75, 1.0]))
    assert torch.allclose(C.annealed_keep_rates(rates, 500, 100), rates)  # clipped after the end


def test_consistency_weight_ramp():
    assert C.consistency_weight(0, 100, 10.0) == pytest.approx(10 * math.exp(-5))
    assert C.consistency_weight(50, 100, 10.0) == pytest.approx(10 * math.exp(-5 * 0.25))
    assert C.consistency_weight(100, 100, 10.0) == pytest.approx(10.0)
    assert C.consistency_weight(200, 100, 10.0) == pytest.approx(10.0)
    assert C.consistency_weight(3, 0, 10.0) == 10.0


def test_balanced_mask_keeps_each_class_at_its_rate():
    torch.manual_seed(0)
    target = torch.tensor([0, 1, 2, 5]).repeat_interleave(50_000).view(1, 1, -1)  # 5 = ignore label
    rates = torch.tensor([0.1, 0.5, 1.0])
    keep = C.balanced_mask(target, rates)
    assert keep.dtype == torch.bool and keep.shape == target.shape
    for cls, rate in ((0, 0.1), (1, 0.5), (2, 1.0)):
        assert keep[target == cls].float().mean().item() == pytest.approx(rate, abs=0.01)
    assert keep[target == 2].all()  # rate 1: every voxel, not 99 %
    assert not keep[target == 5].any()


def _nnunet_dc_ce():
    return DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_masked_loss_ignores_masked_voxels(deep_supervision):
    torch.manual_seed(0)
    loss = _nnunet_dc_ce()
    if deep_supervision:
        loss = DeepSupervisionWrapper(loss, [0.6, 0.4])
    C.set_ignore_value(loss, 4)
    logits = torch.randn(2, 4, 8, 8, 8)
    target = torch.randint(0, 4, (2, 1, 8, 8, 8))
    keep = torch.rand(target.shape) < 0.3
    masked = C.masked_target(target, keep, 4)
    assert (masked[~keep] == 4).all() and torch.equal(masked[keep], target[keep])
    changed = logits.clone()
    changed[(~keep).expand_as(logits)] = torch.randn(int((~keep).sum()) * 4) * 10  # only masked voxels change
    if deep_supervision:
        lo = loss([logits, logits[:, :, ::2, ::2, ::2]], [masked, masked[:, :, ::2, ::2, ::2]])
        hi = loss([changed, changed[:, :, ::2, ::2, ::2]], [masked, masked[:, :, ::2, ::2, ::2]])
    else:
        lo, hi = loss(logits, masked), loss(changed, masked)
    assert torch.allclose(lo, hi)
    # and a kept voxel does matter
    changed[keep.expand_as(logits)] += 5 * torch.randn(int(keep.sum()) * 4)
    other = loss([changed, changed[:, :, ::2, ::2, ::2]], [masked, masked[:, :, ::2, ::2, ::2]]) \
        if deep_supervision else loss(changed, masked)
    assert not torch.allclose(lo, other)


def test_multiply_mask_is_the_reference_behaviour():
    logits = torch.ones(1, 3, 2, 2)
    target = torch.full((1, 1, 2, 2), 2)
    keep = torch.tensor([[[[True, False], [False, True]]]])
    lg, tg = C.multiply_mask(logits, target, keep)
    assert tg[0, 0].tolist() == [[2, 0], [0, 2]]  # dropped voxels become 'background' targets
    assert lg[0, :, 0, 1].abs().sum() == 0 and lg[0, :, 0, 0].sum() == 3


def test_multiply_mask_dilutes_the_kept_voxels_gradient_and_exclude_does_not():
    """The method page's paragraph on masking, with nnU-Net's DC+CE: the multiplied masking scales the kept
    voxels' gradient by about the kept fraction (here 2 %: ~1/50), excluding the dropped voxels does not;
    neither sends gradient to a dropped voxel, and with every voxel kept the two are the same loss."""
    torch.manual_seed(0)
    classes, shape = 4, (2, 4, 16, 16, 16)
    target = torch.randint(0, classes, (shape[0], 1, *shape[2:]))
    logits0 = torch.randn(shape)

    def grad(masking: str, keep: torch.Tensor) -> torch.Tensor:
        logits = logits0.clone().requires_grad_(True)
        loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                              weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
        if masking == "multiply":
            loss(*C.multiply_mask(logits, target, keep)).backward()
        else:
            C.set_ignore_value(loss, classes)(logits, C.masked_target(target, keep, classes)).backward()
        return logits.grad

    keep = torch.rand(target.shape) < 0.02
    g_multiply, g_exclude = grad("multiply", keep), grad("exclude", keep)
    kept = keep.expand(shape)
    assert g_multiply[~kept].abs().max() == 0 and g_exclude[~kept].abs().max() == 0
    fraction = keep.float().mean()
    ratio = g_multiply[kept].norm() / g_exclude[kept].norm()
    assert 0.5 * fraction < ratio < 2 * fraction, (ratio, fraction)
    everything = torch.ones_like(keep)
    torch.testing.assert_close(grad("multiply", everything), grad("exclude", everything))


def test_pseudo_labels_and_histogram():
    logits = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2)]
    logits[0][:, 2] = 1
    logits[1][:, 1] = 1
    p = C.pseudo_labels(logits)
    assert p[0].shape == (2, 1, 4, 4) and p[0].dtype == torch.int16 and (p[0] == 2).all() and (p[1] == 1).all()
    assert C.class_histogram(p[0], 3).tolist() == [0, 0, 32]

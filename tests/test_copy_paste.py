"""Copy-paste (issue 39's candidate, ``SKCDFTrainer_copyPaste``): a box of a labelled sample pasted into an
unlabelled one; the unlabelled decoder learns the true labels inside the box at every deep-supervision scale."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.training import skcdf_components as C


def test_boxes_have_the_size_asked_lie_inside_the_patch_and_draw_nothing_when_off():
    state = torch.get_rng_state()
    assert C.paste_boxes(3, (20, 24, 28), 0.0, 2 / 3) == [None, None, None]
    assert torch.equal(torch.get_rng_state(), state)  # SKCDFTrainer's own draws stay the reference's
    g = torch.Generator().manual_seed(0)
    boxes = C.paste_boxes(50, (20, 24, 28), 1.0, 2 / 3, generator=g)
    edges = {tuple(b - a for a, b in box) for box in boxes}
    assert edges == {(13, 16, 19)}  # round(2/3 * S) per axis
    assert all(0 <= a and b <= s for box in boxes for (a, b), s in zip(box, (20, 24, 28)))
    assert len({box[0][0] for box in boxes}) > 4  # positions vary
    assert {tuple(b - a for a, b in box) for box in C.paste_boxes(5, (1, 6), 1.0, 0.1, generator=g)} == {(1, 1)}
    drawn = [sum(b is not None for b in C.paste_boxes(4, (8, 8), 0.5, 0.5, generator=g)) for _ in range(100)]
    assert 0.4 < np.mean(drawn) / 4 < 0.6


def test_copy_paste_takes_the_box_from_the_labelled_sample_of_the_same_index_and_never_writes_its_input():
    g = torch.Generator().manual_seed(1)
    x_l = torch.randn(2, 1, 6, 8, 10, generator=g)
    x_u = torch.randn(3, 1, 6, 8, 10, generator=g) + 50
    copy = x_u.clone()
    assert C.copy_paste(x_u, x_l, [None, None, None]) is x_u
    boxes = [((1, 5), (2, 6), (0, 10)), None, ((0, 6), (0, 3), (4, 9))]
    mixed = C.copy_paste(x_u, x_l, boxes)
    assert torch.equal(x_u, copy)
    assert torch.equal(mixed[0, :, 1:5, 2:6, :], x_l[0, :, 1:5, 2:6, :])
    assert torch.equal(mixed[2, :, :, 0:3, 4:9], x_l[0, :, :, 0:3, 4:9])  # sample 2 pairs with labelled 2 mod 2 = 0
    assert torch.equal(mixed[1], x_u[1])
    outside = torch.ones_like(x_u[0], dtype=torch.bool)
    outside[:, 1:5, 2:6, :] = False
    assert torch.equal(mixed[0][outside], x_u[0][outside])


@pytest.mark.parametrize("shape", [(20, 24, 28), (13, 17, 9), (40, 24, 48)])
def test_box_mask_at_a_coarser_scale_is_the_box_as_nnunet_downsamples_deep_supervision_targets(shape):
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    g = torch.Generator().manual_seed(2)
    scales = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [1, 0.5, 0.25]]
    for box in C.paste_boxes(6, shape, 1.0, 0.6, generator=g) + [tuple((1, s - 1) for s in shape)]:
        indicator = torch.zeros((1, *shape), dtype=torch.int16)
        indicator[(slice(None),) + tuple(slice(a, b) for a, b in box)] = 1
        downsampled = DownsampleSegForDSTransform(scales)(segmentation=indicator)["segmentation"]
        for target in downsampled:
            assert torch.equal(C.box_mask(box, shape, target.shape[1:]), target[0] == 1)


def test_paste_targets_puts_the_labelled_targets_in_the_box_at_every_scale():
    g = torch.Generator().manual_seed(3)
    full = (8, 12, 16)
    shapes = [full, (4, 6, 8), (2, 3, 4)]
    y_l = [torch.randint(1, 5, (2, 1, *s), generator=g, dtype=torch.int16) for s in shapes]
    p = [torch.zeros((2, 1, *s), dtype=torch.int16) for s in shapes]
    boxes = [((0, 4), (4, 12), (8, 16)), None]
    out = C.paste_targets(p, y_l, boxes, full)
    assert C.paste_targets(p, y_l, [None, None], full) is p and C.paste_targets(None, y_l, boxes, full) is None
    for t, y, s in zip(out, y_l, shapes):
        inside = C.box_mask(boxes[0], full, s)
        assert torch.equal(t[0, 0][inside], y[0, 0][inside]) and (t[0, 0][~inside] == 0).all()
        assert (t[1] == 0).all()  # no box: the pseudo labels
    assert all((q == 0).all() for q in p)  # input unchanged
    assert out[1][0, 0, :2, 2:6, 4:8].ne(0).all()  # the box at half resolution: rows 0-1, 2-5, 4-7


def test_skcdf_variant_feeds_the_mixed_batch_and_teaches_d_u_the_true_labels_in_the_box(trainer_factory, monkeypatch):
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation.SKCDFTrainer_ablations import SKCDFTrainer_copyPaste

    trainer = trainer_factory(SKCDFTrainer_copyPaste)
    assert trainer.copy_paste == 1.0
    boxes_drawn, pasted, seen, losses = [], [], [], []
    draw, paste = C.paste_boxes, C.paste_targets
    monkeypatch.setattr(C, "paste_boxes", lambda *a, **k: boxes_drawn.append(draw(*a, **k)) or boxes_drawn[-1])
    monkeypatch.setattr(C, "paste_targets", lambda *a: pasted.append((a, paste(*a))) or pasted[-1][1])
    trainer.on_train_start()
    try:
        settings = trainer.skcdf_settings()
        assert settings["copy_paste"] == 1.0 and settings["copy_paste_size"] == pytest.approx(2 / 3)
        net = trainer._net()
        forward = type(net).forward
        monkeypatch.setattr(type(net), "forward", lambda self, *a: seen.append(a) or forward(self, *a))
        loss = trainer.loss
        monkeypatch.setattr(trainer, "loss", lambda out, target: losses.append(target) or loss(out, target))
        batch = next(trainer.dataloader_train)
        raw_u = []
        unlabelled = trainer.dataloader_unlabeled
        trainer.dataloader_unlabeled = iter([raw_u.append(next(unlabelled)) or raw_u[-1]])
        try:
            out = trainer.train_step(batch)
        finally:
            trainer.dataloader_unlabeled = unlabelled
        assert np.isfinite(out["loss"])
        (x_l, x_u, _), = seen
        boxes, = boxes_drawn
        # the logged pseudo-label fractions count the unlabelled images' own voxels only, not the pasted boxes
        inside = sum(int(np.prod([b - a for a, b in box])) for box in boxes)
        assert int(out["pseudo_histogram"].sum()) == x_u.shape[0] * int(np.prod(x_u.shape[2:])) - inside
        assert all(b is not None for b in boxes)
        assert torch.equal(x_u, C.copy_paste(raw_u[0]["data"], x_l, boxes))
        assert not torch.equal(x_u, raw_u[0]["data"])
        # the two deep-supervision lists (main and balanced pseudo labels); the per-scale calls are its recursion
        (main_args, main_target), (balanced_args, _) = [(a, r) for a, r in pasted if isinstance(a[0], list)]
        assert main_args[1] is not None and main_args[2] == boxes and tuple(main_args[3]) == tuple(x_u.shape[2:])
        # D_u's main head learns the pasted targets (nnU-Net's loss, called for L_sup and the balanced heads too)
        assert sum(t is main_target for t in losses) == 1
        y_full = batch["target"][0]
        for j, box in enumerate(boxes):
            region = (j, slice(None)) + tuple(slice(a, b) for a, b in box)
            assert torch.equal(main_target[0][region].long(), y_full[(j % y_full.shape[0],) + region[1:]].long())
    finally:
        trainer.on_train_end()
    # range refusals: test_ablation_variants.py::test_unknown_training_switch_is_refused_at_initialize


def test_outside_boxes_keeps_the_voxels_of_the_unlabelled_images_own_content():
    labels = torch.arange(2 * 4 * 6 * 8).reshape(2, 1, 4, 6, 8)
    assert C.outside_boxes(labels, [None, None]) is labels
    out = C.outside_boxes(labels, [((0, 2), (1, 4), (2, 8)), None])
    assert out.numel() == labels.numel() - 2 * 3 * 6
    assert int(labels[0, 0, 0, 1, 2]) not in set(out.tolist()) and int(labels[1, 0, 0, 1, 2]) in set(out.tolist())


def test_the_box_size_is_no_setting_of_a_run_without_boxes():
    from nnunetv2_skcdf.training import skcdf_settings as S

    raw = {**S.CURRENT_DEFAULTS, "copy_paste_size": 0.5}
    assert S.effective(raw, (2, 3, 3), False)["copy_paste_size"] is None
    assert S.effective({**raw, "copy_paste": 1.0}, (2, 3, 3), False)["copy_paste_size"] == 0.5
    assert S.BEFORE_IT_EXISTED["copy_paste"] == 0.0

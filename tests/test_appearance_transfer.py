"""Appearance transfer (issue 39's candidate): labelled samples mapped onto the intensity distributions of the
cases of unlabelled samples of the same step, in SKCDF (``SKCDFTrainer_histMatch``) and in stock nnU-Net (``nnUNetTrainer_histMatch``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.training import skcdf_components as C


def _quantiles(x: torch.Tensor, t=(0.05, 0.25, 0.5, 0.75, 0.95)) -> torch.Tensor:
    return torch.quantile(x.reshape(-1)[:200_000].float(), torch.tensor(t))


def test_matched_image_has_the_reference_distribution_and_keeps_the_voxel_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 24, 48, 48, generator=g) * 2 + 5              # source: N(5, 2)
    ref = torch.rand(1, 20, 40, 40, generator=g) ** 2 * 10 - 3        # another shape, a skewed distribution
    source, target = C.case_quantiles(x, generator=g), C.case_quantiles(ref, generator=g)
    assert source.shape == (1, 257) and source[0, 0] == x.min()      # the minimum, then 256 quantiles
    y = C.match_quantiles(x, source, target)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(_quantiles(y), _quantiles(ref), atol=0.08)  # the reference's quantiles
    order = torch.argsort(x.reshape(-1))
    assert (y.reshape(-1)[order].diff() >= -1e-5).all()               # monotonic: no two voxels swap
    assert y.min() >= ref.min() - 1e-5 and y.max() <= ref.max() + 1e-5
    with pytest.raises(ValueError, match="1 channels, tables"):
        C.match_quantiles(x, torch.zeros(2, 257), torch.zeros(2, 257))


def test_the_clipped_minimum_maps_to_the_other_minimum_and_leaves_the_body_quantiles():
    # CT normalisation clips air to one value, the image's minimum: two cases with the same tissue distribution but
    # 60 % and 10 % air. Matching their body quantiles keeps tissue as tissue (matching all voxels, as patches
    # were matched before, sent the source's air to a tissue value and organ voxels towards air)
    g = torch.Generator().manual_seed(1)
    tissue = lambda n: torch.randn(n, generator=g) * 0.5 + 1.0  # noqa: E731
    air = -8.0
    x = torch.cat([torch.full((6000,), air), tissue(4000)]).reshape(1, 10, 10, 100)
    ref = torch.cat([torch.full((1000,), air - 1), tissue(9000) + 0.3]).reshape(1, 10, 10, 100)
    y = C.match_quantiles(x, C.case_quantiles(x, generator=g), C.case_quantiles(ref, generator=g))
    assert torch.all(y[x == air] == air - 1)                        # air to the other case's air, all of it
    body = y[x > air]
    assert float(body.min()) > -1.0 and abs(float(body.mean()) - 1.3) < 0.05  # tissue: the reference's tissue
    # a run of equal values inside the body maps to the middle of its quantile range
    z = torch.rand(1, 16, 64, 64, generator=g).clamp(max=0.5)  # half the voxels exactly 0.5
    r = torch.rand(1, 16, 64, 64, generator=g) * 4 - 2         # U(-2, 2)
    w = C.match_quantiles(z, C.case_quantiles(z, generator=g), C.case_quantiles(r, generator=g))
    top = w[z == 0.5].unique()
    assert top.numel() == 1 and float(top) == pytest.approx(1.0, abs=0.06)  # U(-2, 2) at quantile 0.75
    constant = torch.full((1, 4, 4), 3.0)  # no voxel above the minimum: the table keeps all of them
    assert C.match_quantiles(constant, C.case_quantiles(constant), C.case_quantiles(r)).unique().numel() == 1


def test_appearance_transfer_matches_each_sample_with_its_probability_and_never_writes_its_input():
    g = torch.Generator().manual_seed(2)
    x_l = torch.randn(4, 1, 8, 16, 16, generator=g)
    x_u = torch.rand(3, 1, 8, 16, 16, generator=g) * 10 + 100
    copy = x_l.clone()
    asked = []

    def table_l(i):
        asked.append(("l", i))
        return C.case_quantiles(x_l[i])

    def table_u(j):
        asked.append(("u", j))
        return C.case_quantiles(x_u[j])

    assert C.appearance_transfer(x_l, x_u, 0.0, table_l, table_u) is x_l and asked == []
    every = C.appearance_transfer(x_l, x_u, 1.0, table_l, table_u, generator=g)
    assert torch.equal(x_l, copy)
    assert (every >= 100 - 1e-4).all() and (every <= 110 + 1e-4).all()  # every sample in x_u's range
    assert sorted(i for k, i in asked if k == "l") == [0, 1, 2, 3]     # the tables of the matched cases only
    torch.manual_seed(3)
    matched = [int(((C.appearance_transfer(x_l, x_u, 0.5, table_l, table_u) - x_l).abs().amax(dim=(1, 2, 3, 4)) > 0)
                   .sum()) for _ in range(50)]
    assert 0.35 < np.mean(matched) / 4 < 0.65


def test_skcdf_variant_trains_on_the_transferred_labelled_batch(trainer_factory, monkeypatch):
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation.SKCDFTrainer_ablations import SKCDFTrainer_histMatch

    trainer = trainer_factory(SKCDFTrainer_histMatch)
    assert trainer.appearance_transfer == 0.5
    seen, calls = [], []
    original = C.appearance_transfer

    def spy(x_l, x_u, p, table_l, table_u, generator=None):
        out = original(x_l, x_u, p, table_l, table_u, generator)
        calls.append((x_l.clone(), x_u.clone(), out, [table_l(i) for i in range(x_l.shape[0])],
                      [table_u(j) for j in range(x_u.shape[0])]))
        return out

    monkeypatch.setattr(C, "appearance_transfer", spy)
    computed = []  # every whole-case table computed from disk
    quantiles = C.case_quantiles
    monkeypatch.setattr(C, "case_quantiles", lambda data: computed.append(1) or quantiles(data))
    trainer.on_train_start()
    try:
        assert trainer.skcdf_settings()["appearance_transfer"] == 0.5  # recorded with the weights
        trainer.appearance_transfer = 1.0  # every sample, so that the check below is deterministic
        net = trainer._net()
        forward = type(net).forward
        monkeypatch.setattr(type(net), "forward", lambda self, *a: seen.append(a) or forward(self, *a))
        batch = next(trainer.dataloader_train)
        out = trainer.train_step(batch)
        assert np.isfinite(out["loss"])
        (x_l, x_u, _), = seen
        (raw_l, raw_u, transferred, tables_l, tables_u), = calls
        assert torch.equal(x_l, transferred) and not torch.equal(x_l, raw_l) and torch.equal(x_u, raw_u)
        # each table is the whole preprocessed case's (read once, cached by id), not the patch's
        key = str(batch["keys"][0])
        data = trainer.dataset_class(trainer.preprocessed_dataset_folder, [key]).load_case(key)[0]
        assert len(computed) == len(trainer._intensity_tables) >= 2  # one computation per case matched
        assert trainer._intensity_table(key, labelled=True) is tables_l[0] and len(computed) == len(
            trainer._intensity_tables)  # asked again: the cached table, nothing read
        assert tables_l[0][0, 0] == float(np.min(data[:]))
        low = min(float(t[0, 0]) for t in tables_u)
        high = max(float(t[0, -1]) for t in tables_u)
        assert x_l.min() >= low - 1e-4 and x_l.max() <= high + 1e-4  # in the unlabelled cases' ranges
    finally:
        trainer.on_train_end()
    # range refusal: test_ablation_variants.py::test_unknown_training_switch_is_refused_at_initialize


def test_nnunet_variant_trains_with_the_unlabelled_stream_and_is_found_by_nnunet(tiny_training, monkeypatch):
    import json

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.appearance.nnUNetTrainer_histMatch import (
        nnUNetTrainer_histMatch)

    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())
    found = recursive_find_trainer_class_by_name("nnUNetTrainer_histMatch")  # nnU-Net imports it under its own name
    assert [c.__name__ for c in found.__mro__[:3]] == ["nnUNetTrainer_histMatch", "UnlabelledStream", "nnUNetTrainer"]
    pre = tiny_training["preprocessed"]
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    trainer = nnUNetTrainer_histMatch(plans, "3d_tiny", 0, json.loads((pre / "dataset.json").read_text()),
                                      device=torch.device("cpu"))
    trainer.appearance_transfer = 1.0
    seen = []
    trainer.on_train_start()
    try:
        forward = type(trainer.network).forward
        monkeypatch.setattr(type(trainer.network), "forward", lambda self, x: seen.append(x) or forward(self, x))
        batch = next(trainer.dataloader_train)
        reference = next(trainer.dataloader_unlabeled)["data"]  # the stream runs: batches of unlabelled images
        assert reference.shape[0] == trainer.batch_size and "target" not in next(trainer.dataloader_unlabeled)
        out = trainer.train_step(batch)
        assert np.isfinite(out["loss"])
        x, = seen  # the one forward of the step: the labelled batch after the transfer
        assert x.shape == batch["data"].shape and not torch.equal(x, batch["data"])
    finally:
        trainer.on_train_end()

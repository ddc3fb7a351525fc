"""The unlabelled stream: shapes, dtypes, augmentation, no labels, sharding, worker processes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import blosc2
import numpy as np
import pytest
import torch

from nnunetv2_skcdf.training.dataloading.unlabeled_dataset import nnUNetDatasetUnlabeled, resolve_unlabeled_sources
from nnunetv2_skcdf.training.dataloading.unlabeled_loader import (
    get_unlabeled_dataloader,
    nnUNetUnlabeledDataLoader,
    shard_identifiers,
)
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError


def make_trainer(workspace: dict, configuration: str = "3d_fullres"):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pre = workspace["preprocessed"]
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8 run_training sets this key before building a trainer
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return nnUNetTrainer(plans, configuration, 0, dataset_json, device=torch.device("cpu"))


def ids_of(workspace: dict):
    raw = workspace["raw"]
    images_unlabeled = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesUnlabeled").glob("*_0000.nii.gz"))
    training = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
    return images_unlabeled, training


@pytest.fixture
def workspace(planned_phantom, monkeypatch):
    for var, value in planned_phantom["env"].items():
        monkeypatch.setenv(var, value)
    return planned_phantom


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_batch_shapes_dtypes_and_no_labels(workspace, configuration):
    trainer = make_trainer(workspace, configuration)
    images_unlabeled, training = ids_of(workspace)
    hidden = training[:2]
    stream = get_unlabeled_dataloader(trainer, images_unlabeled + hidden, batch_size=3, num_processes=0)
    patch = tuple(trainer.configuration_manager.patch_size)
    for _ in range(3):
        batch = next(stream)
        assert set(batch) == {"data", "keys"}
        assert batch["data"].dtype == torch.float32 and tuple(batch["data"].shape) == (3, 1, *patch)
        assert torch.isfinite(batch["data"]).all()
        assert set(batch["keys"]) <= set(images_unlabeled + hidden)


def test_both_sources_are_resolved(workspace):
    trainer = make_trainer(workspace)
    images_unlabeled, training = ids_of(workspace)
    sources = resolve_unlabeled_sources(trainer.preprocessed_dataset_folder_base, "nnUNetPlans_3d_fullres",
                                        images_unlabeled + training[:1])
    assert {Path(sources[i]).name for i in images_unlabeled} == {"nnUNetPlans_3d_fullres_unlabeled"}
    assert Path(sources[training[0]]).name == "nnUNetPlans_3d_fullres"
    with pytest.raises(SKCDFInputError, match=r"have no preprocessed image.*\['ghost'\].*skcdf_preprocess_unlabeled"):
        resolve_unlabeled_sources(trainer.preprocessed_dataset_folder_base, "nnUNetPlans_3d_fullres", ["ghost"])


def test_hidden_labels_never_reach_the_loader(workspace, monkeypatch):
    """No _seg file is opened and no label-derived property is returned for hidden-label training cases."""
    trainer = make_trainer(workspace)
    _, training = ids_of(workspace)
    opened = []
    real_open = blosc2.open

    def spy(urlpath, *args, **kwargs):
        opened.append(str(urlpath))
        return real_open(urlpath, *args, **kwargs)

    monkeypatch.setattr(blosc2, "open", spy)
    stream = get_unlabeled_dataloader(trainer, training, batch_size=2, num_processes=0)
    for _ in range(5):
        batch = next(stream)
        assert "target" not in batch and "seg" not in batch
    assert opened and all(p.endswith(".b2nd") and not p.endswith("_seg.b2nd") for p in opened)
    dataset = stream.data_loader._data
    data, seg, seg_prev, props = dataset.load_case(training[0])
    assert seg is None and seg_prev is None and "class_locations" not in props


def test_nonzero_mask_for_mask_normalised_datasets_carries_no_labels(workspace):
    trainer = make_trainer(workspace)
    _, training = ids_of(workspace)
    sources = resolve_unlabeled_sources(trainer.preprocessed_dataset_folder_base, "nnUNetPlans_3d_fullres", training)
    dataset = nnUNetDatasetUnlabeled(sources)
    data, *_ = dataset.load_case(training[0])
    full = [[0, s] for s in data.shape[1:]]
    mask = dataset.load_nonzero_mask(training[0], full)
    labels = blosc2.open(os.path.join(sources[training[0]], training[0] + "_seg.b2nd"), mode="r")[:]
    assert labels.max() > 1  # organs are in the real seg file ...
    assert set(np.unique(mask)) <= {-1, 0}  # ... but only the crop mask comes out
    np.testing.assert_array_equal(mask < 0, labels < 0)
    loader = nnUNetUnlabeledDataLoader(dataset, 2, trainer.configuration_manager.patch_size,
                                       trainer.configuration_manager.patch_size, trainer.label_manager,
                                       use_mask_for_norm=[True])
    assert set(loader.generate_train_batch()) == {"data", "keys"}


def test_augmentation_is_nnunets_and_is_applied(workspace):
    trainer = make_trainer(workspace)
    images_unlabeled, _ = ids_of(workspace)
    stream = get_unlabeled_dataloader(trainer, images_unlabeled[:1], batch_size=4, num_processes=0)
    loader: nnUNetUnlabeledDataLoader = stream.data_loader
    names = [type(t).__name__ for t in loader.transforms.transforms]
    for expected in ("SpatialTransform", "MirrorTransform", "RandomTransform"):
        assert expected in names
    assert "DownsampleSegForDSTransform" not in names  # label-only steps are dropped

    # the loader crops nnU-Net's larger initial patch and returns exactly what the transforms make of it
    seen_in, seen_out = [], []
    real = loader.transforms

    def spy(**kwargs):
        seen_in.append(kwargs["image"].clone())
        out = real(**kwargs)
        seen_out.append(out["image"].clone())
        return out

    loader.transforms = spy
    batch = loader.generate_train_batch()
    final = tuple(trainer.configuration_manager.patch_size)
    assert all(tuple(x.shape[1:]) == tuple(loader.patch_size) for x in seen_in)
    assert all(a > b for a, b in zip(loader.patch_size, final))
    torch.testing.assert_close(batch["data"], torch.stack(seen_out))
    # and the transforms change the image: same input, different random augmentations
    x = seen_in[0]
    outs = [real(image=x.clone(), segmentation=None)["image"] for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_sharding_is_disjoint_and_complete():
    ids = [f"c{i:02d}" for i in range(11)]
    shards = [shard_identifiers(ids, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == ids
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1:])
    assert shard_identifiers(list(reversed(ids)), 1, 3) == shards[1]  # independent of input order
    with pytest.raises(SKCDFInputError, match="cannot be sharded over 4 ranks"):
        shard_identifiers(ids[:3], 0, 4)
    with pytest.raises(ValueError):
        shard_identifiers(ids, 3, 3)


def test_rank_draws_only_its_shard(workspace):
    trainer = make_trainer(workspace)
    images_unlabeled, training = ids_of(workspace)
    all_ids = images_unlabeled + training
    for rank in range(2):
        stream = get_unlabeled_dataloader(trainer, all_ids, batch_size=4, rank=rank, world_size=2, num_processes=0)
        seen = {k for _ in range(4) for k in next(stream)["keys"]}
        assert seen <= set(shard_identifiers(all_ids, rank, 2))


def test_empty_unlabeled_list_is_refused(workspace):
    trainer = make_trainer(workspace)
    with pytest.raises(SKCDFInputError, match=r"no unlabelled cases.*skcdf_split"):
        get_unlabeled_dataloader(trainer, [], batch_size=2, num_processes=0)


def test_worker_processes_follow_nnUNet_n_proc_DA(workspace, monkeypatch):
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    trainer = make_trainer(workspace)
    images_unlabeled, _ = ids_of(workspace)
    stream = get_unlabeled_dataloader(trainer, images_unlabeled, batch_size=2)
    try:
        assert isinstance(stream, NonDetMultiThreadedAugmenter) and stream.num_processes == 2
        batches = [next(stream) for _ in range(4)]
        patch = tuple(trainer.configuration_manager.patch_size)
        assert all(tuple(b["data"].shape) == (2, 1, *patch) for b in batches)
        # workers are seeded differently: the stream does not repeat one batch
        assert len({b["data"].sum().item() for b in batches}) > 1
        assert len(set(stream.seeds)) == 2 and all(isinstance(s, int) for s in stream.seeds)
    finally:
        stream._finish()


class _TorchDraws:
    """A batchgenerators loader whose batches are torch random numbers (nnU-Net's augmentations draw from torch),
    with the worker that drew them."""

    def __init__(self):
        from batchgenerators.dataloading.data_loader import SlimDataLoaderBase

        class Loader(SlimDataLoaderBase):
            def generate_train_batch(self):
                return {"data": torch.rand(3).numpy(), "worker": self.thread_id}

        self.loader = Loader([0], 1, number_of_threads_in_multithreaded=2)


def test_unlabelled_workers_draw_their_own_torch_numbers():
    """batchgenerators seeds a worker's torch generator only when given a seed; without, every worker forks the
    parent's torch state and draws the same augmentation decisions and noise as every other (the labelled
    stream's included: measured, worker 1 repeated worker 0's draws exactly)."""
    from nnunetv2_skcdf.training.dataloading.unlabeled_loader import wrap_in_augmenter

    torch.manual_seed(0)
    parent = tuple(torch.rand(3).tolist())  # what a worker forked from this state would draw first
    torch.manual_seed(0)
    stream = wrap_in_augmenter(_TorchDraws().loader, 2)
    draws = {0: [], 1: []}
    try:
        for _ in range(500):
            batch = next(stream)
            draws[int(batch["worker"])].append(tuple(float(v) for v in batch["data"]))
            if min(len(d) for d in draws.values()) >= 2:
                break
    finally:
        stream._finish()
    assert min(len(d) for d in draws.values()) >= 2, "both workers should have delivered batches"
    assert draws[0][:2] != draws[1][:2] and parent not in (draws[0][0], draws[1][0])

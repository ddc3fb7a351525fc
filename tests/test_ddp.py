"""Multi-GPU logic of SKCDFTrainer, tested on CPU: 2 processes, gloo backend, 2 iterations.

nnU-Net's DDP path assumes CUDA (it moves the trainer to cuda:<rank> and wraps the network with
``device_ids=[rank]``); the test keeps the trainer on the CPU and wraps without device ids, and changes nothing
else: batch split per rank, unlabelled stream sharded by rank, the training forward through DDP (gradient
all-reduce), EMA and keep-rates, and the epoch-end all-gather of SKCDF's logs run as on GPUs."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp


WORLD = 2


def _state_digest(module: torch.nn.Module, prefix: str = "") -> str:
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        if key.startswith(prefix):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _UnlabelledSpy:
    """Wraps the trainer's unlabelled loader and records the case keys of every batch it hands out."""

    def __init__(self, loader):
        self.loader, self.keys = loader, []

    def __next__(self):
        batch = next(self.loader)
        self.keys.append([str(k) for k in batch["keys"]])
        return batch


def _worker(rank: int, env: dict, preprocessed: str, init_file: str, out_dir: str) -> None:
    os.environ.update(env)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as base

    from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer

    ddp = base.DDP
    base.DDP = lambda module, device_ids=None, **kwargs: ddp(module, **kwargs)  # CPU: no device ids

    class CPUDDPTrainer(SKCDFTrainer):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.device, self.grad_scaler = torch.device("cpu"), None  # nnU-Net's DDP path forces cuda

    plans = json.loads((Path(preprocessed) / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    trainer = CPUDDPTrainer(plans, "3d_tiny", 0, json.loads((Path(preprocessed) / "dataset.json").read_text()))
    trainer.on_train_start()
    draw = torch.rand(8).tolist()  # the random fields of the masks, dropout, boxes: each rank its own
    try:
        spy = trainer.dataloader_unlabeled = _UnlabelledSpy(trainer.dataloader_unlabeled)
        trainer.on_train_epoch_start()
        before = _state_digest(trainer._net(), "decoder_u.")
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(2)]
        trainer.on_train_epoch_end(outputs)
        result = {"rank": rank, "is_ddp": trainer.is_ddp, "wrapped": type(trainer.network).__name__,
                  "batch_size": trainer.batch_size, "unlabelled_keys": spy.keys,
                  "keep_rates": trainer.class_keep_rates.tolist(), "digest": _state_digest(trainer._net()),
                  "decoder_u_moved": _state_digest(trainer._net(), "decoder_u.") != before,
                  "losses": [float(o["loss"]) for o in outputs], "l_sup": [float(o["l_sup"]) for o in outputs],
                  "draw": draw,
                  "logged_l_sup": [float(v) for v in trainer.logger.local_logger.my_fantastic_logging["train_l_sup"]],
                  "output_folder": trainer.output_folder}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        trainer.dataloader_unlabeled = trainer.dataloader_unlabeled.loader
        trainer.on_train_end()
        dist.destroy_process_group()


def test_two_process_gloo_training_steps(tiny_training, tmp_path):
    env = {**tiny_training["env"], "nnUNet_n_proc_DA": "0", "nnUNet_compile": "false"}
    out = tmp_path / "ranks"
    out.mkdir()
    mp.spawn(_worker, args=(env, str(tiny_training["preprocessed"]), str(tmp_path / "init"), str(out)),
             nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in ranks:
        assert r["is_ddp"] and r["wrapped"] == "DistributedDataParallel"
        assert r["batch_size"] == 1  # the plans' global batch of 2 split over 2 ranks, as nnU-Net does
        assert all(len(k) == 1 for k in r["unlabelled_keys"]) and r["decoder_u_moved"]
    # the unlabelled stream is sharded: the ranks never draw the same case
    drawn = [{k for step in r["unlabelled_keys"] for k in step} for r in ranks]
    assert drawn[0] and drawn[1] and not drawn[0] & drawn[1]
    # each rank draws its own random fields (one default seed on every process would give all ranks the same masks)
    assert ranks[0]["draw"] != ranks[1]["draw"]
    # identical keep-rates, and after two steps identical networks: DDP averaged the gradients, and the EMA
    # (D_u <- D_l, heads) moved every rank's copy the same way
    assert ranks[0]["keep_rates"] == ranks[1]["keep_rates"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # the epoch-end logs are gathered over ranks: the same L_sup on both, the mean of both ranks' losses
    assert ranks[0]["logged_l_sup"] == ranks[1]["logged_l_sup"] and len(ranks[0]["logged_l_sup"]) == 1
    assert ranks[0]["logged_l_sup"][0] == pytest.approx(np.mean(ranks[0]["l_sup"] + ranks[1]["l_sup"]), rel=1e-6)
    assert ranks[0]["l_sup"] != ranks[1]["l_sup"]  # different batches: the gathered mean is not one rank's
    # only rank 0 writes the training log
    logs = list(Path(ranks[0]["output_folder"]).glob("training_log_*.txt"))
    assert len(logs) == 1 and logs[0].read_text().count("SKCDF class keep-rates") == 1

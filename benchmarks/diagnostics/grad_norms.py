"""Gradient norms per loss term at a run's snapshots, and what nnU-Net's clipping (total norm 12) makes of them.

Question it answers (BENCHMARKS_FINDINGS.md, item 12): SKCDF's labelled decoder ``D_l`` ends below a
labelled-only nnU-Net trained on the same cases with the same optimiser and schedule. Both clip the total
gradient norm to 12 before the SGD step; SKCDF's total is the sum of four terms (supervised main + balanced,
lambda x unlabelled main + balanced). If that sum is clipped where nnU-Net's gradient is not, every term,
the supervised one included, is scaled down: the labels then teach SKCDF with a smaller effective learning
rate than nnU-Net. And if the unlabelled terms point against the supervised one on the shared encoder, they
cancel part of it before the step.

For each snapshot (``checkpoint_ep*.pth`` kept by ``benchmarks/convergence.py``) the trainer is rebuilt with the
snapshot's weights and epoch (so lambda(t) and the annealed keep-rates are the run's own), fresh training batches
are drawn by the trainer's own data loaders (nnU-Net's augmentation, single-threaded), and for each batch the
gradient of every loss term is computed separately (no optimiser step, no EMA step: the weights are not changed).
Reported per snapshot, mean over the batches:

- ``norm``: the norm of each term's gradient over all parameters, and of their sum (``total``: what is clipped);
- ``clip``: the clipping factor min(1, 12 / total) and the share of batches clipped;
- ``sup_step``: the norm of the supervised gradient after clipping (what the labels move the weights by);
- ``cos_encoder``: cosine between the supervised and the (lambda-weighted) unlabelled gradient on the encoder.

    python benchmarks/diagnostics/grad_norms.py --model a=MODEL_FOLDER_a:0 --model g=MODEL_FOLDER_g:0 \\
        --out benchmarks/results/grad_norms_2lab_8000it.json

Benchmark side only (reads no hidden labels). CPU, single-threaded data loading; measured with the default 6
batches and ``--threads 1`` beside a training run on 2 cores: ~30 s per SKCDF snapshot, ~15 s per nnU-Net one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

# this folder (the other diagnostics) and benchmarks/ (the shared modules: data_pipeline, convergence, ...)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

CLIP = 12.0  # nnU-Net's clip_grad_norm_ threshold (nnUNetTrainer.train_step)


def term_losses(trainer, batch: dict, unlabelled: dict | None) -> Dict[str, torch.Tensor]:
    """The loss terms of one training step, as the trainer's ``train_step`` composes them (same loss objects,
    masks, lambda and keep-rates); nnU-Net's trainer has the one term ``sup_main``."""
    x_l = batch["data"].to(trainer.device)
    y_l = [t.to(trainer.device) for t in batch["target"]] if isinstance(batch["target"], list) \
        else batch["target"].to(trainer.device)
    if unlabelled is None:
        return {"sup_main": trainer.loss(trainer.network(x_l), y_l)}
    from nnunetv2_skcdf.training import skcdf_components as C

    x_u = unlabelled["data"].to(trainer.device)
    lam = trainer._consistency_weight()
    rates_u = C.annealed_keep_rates(trainer.class_keep_rates, trainer.current_epoch, trainer.num_epochs)
    out = trainer.network(x_l, x_u)
    p, p_b = C.pseudo_labels(out.main_u), C.pseudo_labels(out.balanced_u)
    terms = {"sup_main": trainer.loss(out.main, y_l),
             "sup_balanced": trainer._balanced_loss(out.balanced, y_l, trainer.class_keep_rates),
             "u_main": lam * trainer.loss(out.unlabelled_main, p),
             "u_balanced": lam * trainer._balanced_loss(out.unlabelled_balanced, p_b, rates_u)}
    return {k: v for k, v in terms.items() if torch.is_tensor(v) and v.requires_grad}  # no-ABC: no balanced terms


def gradient_figures(named_params: List[tuple], terms: Dict[str, torch.Tensor], clip: float = CLIP) -> dict:
    """Per-term gradient norms, the norm of their sum, the clipping factor, the clipped supervised step and the
    encoder cosine between the supervised and the unlabelled gradient, for one batch."""
    params = [p for _, p in named_params]
    grads = {}
    keys = list(terms)
    for i, key in enumerate(keys):
        g = torch.autograd.grad(terms[key], params, retain_graph=i < len(keys) - 1, allow_unused=True)
        grads[key] = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]

    def norm(vectors):
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in vectors)))

    def summed(prefix):
        ks = [k for k in keys if k.startswith(prefix)]
        return [sum(grads[k][j] for k in ks) for j in range(len(params))] if ks else None

    total = summed("")
    sup, uns = summed("sup"), summed("u_")
    fig = {"norm": {k: norm(g) for k, g in grads.items()}}
    fig["norm"]["total"] = norm(total)
    factor = min(1.0, clip / max(fig["norm"]["total"], 1e-12))
    fig["clip_factor"] = factor
    fig["clipped"] = float(fig["norm"]["total"] > clip)
    fig["sup_step"] = factor * norm(sup)
    if uns is not None:
        enc = [j for j, (name, _) in enumerate(named_params) if name.startswith("encoder.")]
        a = torch.cat([sup[j].flatten() for j in enc]).double()
        b = torch.cat([uns[j].flatten() for j in enc]).double()
        fig["cos_encoder"] = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
    return fig


def mean_figures(rows: List[dict]) -> dict:
    """Mean (and std of the total norm) over batches."""
    out = {"norm": {k: float(np.mean([r["norm"][k] for r in rows])) for k in rows[0]["norm"]},
           "total_norm_std": float(np.std([r["norm"]["total"] for r in rows]))}
    for key in ("clip_factor", "clipped", "sup_step", "cos_encoder"):
        if key in rows[0]:
            out[key] = float(np.mean([r[key] for r in rows]))
    return out


def model_environment(folder: Path) -> tuple:
    """(work folder, dataset name, trainer, plans, configuration) of a model folder
    ``<work>/nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``; sets nnU-Net's paths and the
    convergence trainers' budget variables from ``<work>/budget.json``."""
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise SystemExit(f"{folder}: not a model folder named <trainer>__<plans>__<configuration>")
    from convergence import budget_variables, nnunet_paths

    work = folder.parent.parent.parent
    os.environ.update(nnunet_paths(work))
    budget = work / "budget.json"
    if budget.is_file():
        os.environ.update(budget_variables(json.loads(budget.read_text())))
    return work, folder.parent.name, parts[0], parts[1], parts[2]


def load_snapshot(dataset: str, trainer_name: str, plans: str, configuration: str, fold: int, path: Path,
                  log_dir: str):
    """The trainer with the snapshot's weights, optimiser state and epoch. Its output folder (nnU-Net writes a
    log from the constructor on) is under ``log_dir``: the model folder is only read."""
    from nnunetv2.run.run_training import get_trainer_from_args

    os.environ["nnUNet_results"] = log_dir  # nnU-Net's paths are read from the environment when used
    trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, plans, device=torch.device("cpu"))
    trainer.initialize()
    trainer.load_checkpoint(str(path))
    if hasattr(trainer, "_init_class_keep_rates"):
        trainer._init_class_keep_rates()  # from the counts the checkpoint carries
    trainer.network.train()
    return trainer


def snapshot_figures(trainer, batches: int, seed: int) -> dict:
    """Mean figures over ``batches`` fresh training batches of the trainer's own loaders."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    loader, _ = trainer.get_dataloaders()
    unl = getattr(trainer, "dataloader_unlabeled", None)
    named = [(n, p) for n, p in trainer.network.named_parameters() if p.requires_grad]
    rows = []
    for _ in range(batches):
        batch = next(loader)
        terms = term_losses(trainer, batch, next(unl) if unl is not None else None)
        rows.append(gradient_figures(named, terms))
    for it in (loader, unl):
        if hasattr(it, "_finish"):
            it._finish()
    fig = mean_figures(rows)
    fig["learning_rate"] = trainer.optimizer.param_groups[0]["lr"]
    if hasattr(trainer, "_consistency_weight"):
        fig["lambda"] = trainer._consistency_weight()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="KEY=MODEL_FOLDER:FOLD (repeatable)")
    parser.add_argument("--snapshots", default=None, help="comma-separated epochs (default: every snapshot)")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from teacher_student import parse_model
    from convergence import ext_trainer_path, machine
    from convergence_report import commit

    os.environ["nnUNet_extTrainer"] = os.pathsep.join(filter(None, (os.environ.get("nnUNet_extTrainer"),
                                                                    ext_trainer_path())))
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_compile", "false")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    wanted = {int(e) for e in args.snapshots.split(",")} if args.snapshots else None
    result = json.loads(out.read_text()) if out.is_file() else {}  # resumable: finished snapshots are kept
    result.update({"clip": CLIP, "batches": args.batches, "seed": args.seed, "machine": machine(),
                   "date": datetime.date.today().isoformat(), "commit": commit()})
    models = result.setdefault("models", {})
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    with tempfile.TemporaryDirectory() as log_dir:
        for spec in args.model:
            key, folder, fold = parse_model(spec)
            _, dataset, trainer_name, plans, configuration = model_environment(folder)
            snaps = sorted((int(re.search(r"ep(\d+)", p.name).group(1)), p)
                           for p in (folder / f"fold_{fold}").glob("checkpoint_ep*.pth"))
            if not snaps:
                raise SystemExit(f"--model {key}: no checkpoint_ep*.pth in {folder / f'fold_{fold}'} "
                                 f"(snapshots are kept by benchmarks/convergence.py)")
            entry = models.setdefault(key, {"folder": str(folder), "fold": fold, "trainer": trainer_name,
                                            "snapshots": {}})
            for epoch, path in snaps:
                if (wanted and epoch not in wanted) or str(epoch) in entry["snapshots"]:
                    continue
                trainer = load_snapshot(dataset, trainer_name, plans, configuration, fold, path, log_dir)
                fig = snapshot_figures(trainer, args.batches, args.seed + epoch)
                entry["snapshots"][str(epoch)] = fig
                atomic_save_json(result, str(out), indent=1)
                n = fig["norm"]
                print(f"{key} ep {epoch:3d} lr {fig['learning_rate']:.5f} lambda {fig.get('lambda', 0):.2f} | "
                      + " ".join(f"{k} {v:.2f}" for k, v in n.items())
                      + f" | clip {fig['clip_factor']:.2f} ({100 * fig['clipped']:.0f}% clipped) "
                        f"sup_step {fig['sup_step']:.2f}"
                      + (f" cos_enc {fig['cos_encoder']:+.2f}" if "cos_encoder" in fig else ""), flush=True)
                del trainer


if __name__ == "__main__":
    main()

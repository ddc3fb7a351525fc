"""Where a training iteration's time goes: PyTorch profiler tables of ``train_step`` for nnUNetTrainer and
SKCDFTrainer on the same plans, plus the time spent waiting for the labelled and unlabelled batches.
Prints and writes ``benchmarks/results/profile_train_step_<device><tag>.txt`` (a diagnosis, not a benchmark
table), ending with one summary line per trainer: wall and summed device (or CPU) self time per iteration.

    python benchmarks/profile_train_step.py -d 950 -c 3d_cpu [-p nnUNetPlans] [--device cpu] [--steps 10]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import RESULTS, machine  # noqa: E402


class _TimedLoader:
    """Proxy of a loader that records how long each ``next()`` takes (waiting for workers or augmenting)."""

    def __init__(self, loader):
        self.loader, self.seconds = loader, []

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.loader)
        self.seconds.append(time.perf_counter() - t0)
        return batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _busy_ms(averages, device_type: str) -> float:
    """Summed self time of the profiled events in ms: on a GPU those that ran on it (kernels, copies; what the
    table's footer 'Self CUDA time total' adds up), else the CPU ops' self time (footer 'Self CPU time total')."""
    from torch.autograd import DeviceType

    if device_type != "cuda":
        return sum(e.self_cpu_time_total for e in averages) / 1000
    try:
        return sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                   for e in averages if e.device_type != DeviceType.CPU) / 1000
    except Exception:  # a profiler API change must not cost the tables: the footer still has the total
        return float("nan")


def profile(trainer_name: str, args) -> tuple:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device(args.device)
    trainer = get_trainer_from_args(args.dataset, args.configuration, 0, trainer_name, args.plans, device=device)
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        labelled = trainer.dataloader_train = _TimedLoader(trainer.dataloader_train)
        unlabelled = None
        if getattr(trainer, "dataloader_unlabeled", None) is not None:
            unlabelled = trainer.dataloader_unlabeled = _TimedLoader(trainer.dataloader_unlabeled)
        for _ in range(args.warmup):
            trainer.train_step(next(trainer.dataloader_train))
        labelled.seconds.clear()
        if unlabelled:
            unlabelled.seconds.clear()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for _ in range(args.steps):
                trainer.train_step(next(trainer.dataloader_train))
            sync()
        wall = (time.perf_counter() - t0) / args.steps
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        table = averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)
        busy_ms = _busy_ms(averages, device.type) / args.steps
        waits = f"labelled batch wait {1000 * statistics.median(labelled.seconds):.1f} ms"
        if unlabelled:
            waits += f", unlabelled batch wait {1000 * statistics.median(unlabelled.seconds):.1f} ms (inside train_step)"
        text = (f"### {trainer_name}: {1000 * wall:.1f} ms per iteration under the profiler (profiler overhead "
                f"included); {waits}\n\n{table}\n")
        return text, {"wall_ms": 1000 * wall, "busy_ms": busy_ms}
    finally:
        trainer.on_train_end()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default="950")
    parser.add_argument("-c", "--configuration", default="3d_cpu")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("--tag", default="", help="suffix of the output file (e.g. _realistic)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "SKCDFTrainer"])
    args = parser.parse_args()
    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    os.environ.setdefault("nnUNet_extTrainer", trainer_folder())
    os.environ.setdefault("nnUNet_compile", "false")
    if args.device == "cpu":
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
    report = io.StringIO()
    report.write(f"# train_step profile, {args.device}: {' '.join(sys.argv[1:])}\n{machine()}\n\n")
    figures = {}
    for name in args.trainers:
        text, figures[name] = profile(name, args)
        report.write(text)
    unit = "device kernel+copy" if args.device == "cuda" else "CPU"
    for name, f in figures.items():
        report.write(f"SUMMARY {name}: wall {f['wall_ms']:.1f} ms/iteration, {unit} self time "
                     f"{f['busy_ms']:.1f} ms/iteration\n")
    if len(figures) == 2:
        (a, fa), (b, fb) = figures.items()
        report.write(f"SUMMARY ratio {b} / {a}: wall {fb['wall_ms'] / fa['wall_ms']:.2f}x, {unit} time "
                     f"{fb['busy_ms'] / fa['busy_ms']:.2f}x\n")
    text = report.getvalue()
    print(text)
    out = RESULTS / f"profile_train_step_{args.device}{args.tag}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()

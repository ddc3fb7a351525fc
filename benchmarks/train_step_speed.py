"""Seconds per training iteration and peak memory: nnUNetTrainer vs SKCDFTrainer, same plans, side by side.

Each measurement runs in its own process (so peak RSS belongs to one trainer), the two trainers alternate
(A B A B ...) so that machine noise hits both alike, and every process times ``train_step`` after warm-up
steps. Prints median and spread per trainer and the ratio, writes ``benchmarks/results/train_step_speed.json``
and a section of ``BENCHMARKS.md``. Needs a planned dataset with a split and preprocessed unlabelled data
(``run_demo.sh`` makes one), e.g.

    python benchmarks/train_step_speed.py -d 950 -c 3d_cpu [-p nnUNetPlans] [--repeats 3] [--steps 20] [--device cpu]

Any two trainers side by side (the ratio is second / first), e.g. the cost of an opt-in SKCDF extension:

    python benchmarks/train_step_speed.py -d 962 --trainers SKCDFTrainer SKCDFTrainer_strongView --tag _strongView
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import REPO, RESULTS, device_name, machine, write_section  # noqa: E402

TRAINERS = ("nnUNetTrainer", "SKCDFTrainer")


def child(dataset: str, configuration: str, trainer_name: str, steps: int, warmup: int, device: str,
          plans: str = "nnUNetPlans") -> dict:
    """Runs in a fresh process: build the trainer like nnUNetv2_train does, time train_step."""
    import resource

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, plans, device=torch.device(device))
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        times = []
        for i in range(warmup + steps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()  # a whole iteration as nnU-Net's loop runs it: fetch batch(es), step
            trainer.train_step(next(trainer.dataloader_train))
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"trainer": trainer_name, "median_s": statistics.median(times), "min_s": min(times),
                "max_s": max(times), "peak_mb": peak, "batch_size": trainer.batch_size,
                "patch_size": list(trainer.configuration_manager.patch_size)}
    finally:
        trainer.on_train_end()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default="950")
    parser.add_argument("-c", "--configuration", default="3d_cpu")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (e.g. nnUNetResEncUNetMPlans)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per trainer, interleaved")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="", help="suffix of the result file / section (e.g. _compile)")
    parser.add_argument("--trainers", nargs=2, default=list(TRAINERS), metavar=("BASE", "OTHER"),
                        help="the two trainers compared (ratio OTHER / BASE); default: %(default)s")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.dataset, args.configuration, args.child, args.steps, args.warmup,
                                           args.device, args.plans)))
        return
    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    # CPU: augmentation in-process (as fast as 2 workers on 2 cores); GPU: nnU-Net's default workers and
    # torch.compile unless the caller sets nnUNet_n_proc_DA / nnUNet_compile
    cpu = args.device == "cpu"
    env = {**os.environ, "nnUNet_extTrainer": trainer_folder()}
    env.setdefault("nnUNet_compile", "false" if cpu else "true")
    if cpu:
        env.setdefault("nnUNet_n_proc_DA", "0")
    trainers = tuple(args.trainers)
    if trainers[0] == trainers[1]:
        sys.exit(f"--trainers: two different trainers, got {trainers[0]} twice")
    runs = {t: [] for t in trainers}
    for _ in range(args.repeats):
        for trainer in trainers:
            out = subprocess.run([sys.executable, __file__, "-d", args.dataset, "-c", args.configuration, "-p",
                                  args.plans, "--steps",
                                  str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                                  "--child", trainer], env=env, capture_output=True, text=True)
            if out.returncode:  # show why (the device machine gives one try): the end of the child's output
                sys.exit(f"{trainer} process failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
            line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
            runs[trainer].append(json.loads(line[len("RESULT "):]))
            print(runs[trainer][-1])
    summary = {t: {"median_s": statistics.median(r["median_s"] for r in runs[t]),
                   "spread_s": [min(r["median_s"] for r in runs[t]), max(r["median_s"] for r in runs[t])],
                   "peak_mb": max(r["peak_mb"] for r in runs[t])} for t in trainers}
    base, ours = summary[trainers[0]], summary[trainers[1]]
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "device": args.device,
               "dataset": args.dataset, "configuration": args.configuration, "plans": args.plans,
               "trainers": list(trainers),
               "batch_size": runs[trainers[0]][0]["batch_size"], "patch_size": runs[trainers[0]][0]["patch_size"],
               "steps": args.steps, "repeats": args.repeats, "runs": runs, "summary": summary,
               "time_ratio": ours["median_s"] / base["median_s"], "memory_ratio": ours["peak_mb"] / base["peak_mb"]}
    # where the dataset came from: several work folders (the benchmarks' among them) hold a dataset of the same id
    pre = env.get("nnUNet_preprocessed")
    where = None if pre is None else Path(pre).resolve()
    results["preprocessed"] = (None if where is None else
                               os.path.relpath(where, REPO) if where.is_relative_to(REPO) else pre)
    source = f" (`nnUNet_preprocessed` = `{results['preprocessed']}`)" if results["preprocessed"] else ""
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    tag = f"{args.device}{args.tag}"
    results["device_name"] = device_name(args.device)
    results["compile"] = env["nnUNet_compile"]
    out = RESULTS / f"train_step_speed_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    unit = "peak CUDA memory allocated" if args.device == "cuda" else "peak RSS of the process"
    rows = "\n".join(f"| {t} | {s['median_s']:.3f} | {s['spread_s'][0]:.3f}-{s['spread_s'][1]:.3f} | "
                     f"{s['peak_mb']:.0f} |" for t, s in summary.items())
    which = "" if trainers == TRAINERS else f", {trainers[0]} vs {trainers[1]}"
    # a configuration other than the usual CPU / GPU one is named, so that its section's title differs
    which += "" if args.configuration in ("3d_cpu", "3d_fullres") else f", {args.configuration}"
    # nnU-Net trains with autocast on CUDA; the setting is in the title so that two runs on one card differ
    which += (", AMP" if args.device == "cuda" else "") + (", torch.compile" if results["compile"] == "true" else "")
    write_section(f"train_step_speed_{tag}", f"""## Training-iteration time and memory, {results['device_name']}{which} (`benchmarks/train_step_speed.py`)

Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}` — {results['date']} — {results['machine']}

Dataset {args.dataset}{source}, plans `{args.plans}`, configuration `{args.configuration}` (patch {results['patch_size']}, batch
{results['batch_size']} labelled patches, SKCDF as many unlabelled ones), {args.repeats} interleaved
processes per trainer x {args.steps} timed iterations (batch fetch + `train_step`, as nnU-Net's loop runs them)
after {args.warmup} warm-up iterations; torch.compile: {results['compile']}; memory = {unit}.

| trainer | median s/iteration | spread of process medians | peak memory (MB) |
|---|---|---|---|
{rows}

Ratio {trainers[1]} / {trainers[0]}: **{results['time_ratio']:.2f}x time, {results['memory_ratio']:.2f}x memory**.""")


if __name__ == "__main__":
    main()

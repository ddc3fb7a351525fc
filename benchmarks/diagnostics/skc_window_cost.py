"""What the reference window costs on an odd bottleneck: SKCDFTrainer (local window 2 per axis, bottleneck padded
and masked) vs SKCDFTrainer_divisorWindow (the rule of release 0.2: windows that divide the bottleneck, no padding),
side by side on a configuration whose bottleneck is odd.

1. Training iteration: processes of ``train_step_speed.py --child`` (batch fetch + ``train_step``), the two
   trainers alternating (A B A B ...), median per process, median of processes, ratio padded / unpadded.
2. The SKC module alone (forward + backward on the bottleneck tensor of the labelled pass, cross mode), both
   windows interleaved in one process.

Both parts use ``--threads`` intra-op threads (default 1: on a 2-core VM whose other core runs another job, two
OpenMP threads measured that job's load, with 5-10x swings between consecutive iterations).

Prints, writes ``benchmarks/results/skc_window_cost_<device>.json`` and a section of
``BENCHMARKS_FINDINGS.md``, e.g. on a phantom with a configuration of bottleneck 5 x 7 x 6 (the Synapse-like
plans' one):

    skcdf_add_cpu_config -d 950 --name 3d_cpu_odd --patch 40 56 48
    python benchmarks/diagnostics/skc_window_cost.py -d 950 -c 3d_cpu_odd [--repeats 3] [--steps 15]
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

# this folder (the other diagnostics) and benchmarks/ (the shared modules: data_pipeline, convergence, ...)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from data_pipeline import FINDINGS_MD, REPO, device_name, machine, write_section  # noqa: E402

PADDED, UNPADDED = "SKCDFTrainer", "SKCDFTrainer_divisorWindow"
STEP_SCRIPT = Path(__file__).resolve().parents[1] / "train_step_speed.py"


def train_step_runs(args, env: dict) -> dict:
    runs = {PADDED: [], UNPADDED: []}
    for _ in range(args.repeats):
        for trainer in (UNPADDED, PADDED):
            out = subprocess.run([sys.executable, str(STEP_SCRIPT), "-d", args.dataset, "-c", args.configuration,
                                  "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                                  "--child", trainer], env=env, capture_output=True, text=True, check=True)
            line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
            runs[trainer].append(json.loads(line[len("RESULT "):]))
            print(runs[trainer][-1], flush=True)
    return runs


def module_times(args) -> dict:
    """SKC module forward + backward (cross mode, 2 + 2 samples) on the configuration's bottleneck, both rules."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_skcdf.network.building_blocks.skc import SKCModule

    trainer = get_trainer_from_args(args.dataset, args.configuration, 0, PADDED, device=torch.device(args.device))
    trainer.initialize()
    skc = trainer._net().skc
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    size, channels = skc.spatial_size, skc.local_block.channels
    modules = {name: SKCModule(channels, size, window=window).to(args.device).train()
               for name, window in ((PADDED, None), (UNPADDED, "divisor"))}
    z = torch.randn(4, channels, *size, device=args.device)
    weight = torch.randn_like(z)

    def step(module) -> float:
        x = z.clone().requires_grad_()
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (module(x, "cross") * weight).sum().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = {name: [] for name in modules}
    for i in range(10 + args.module_repeats):
        for name, module in modules.items():
            t = step(module)
            if i >= 10:
                times[name].append(t)
    torch.set_num_threads(threads)
    return {"bottleneck": list(size), "channels": channels,
            "windows": {name: list(m.local_block.window) for name, m in modules.items()},
            "padded_size": {name: list(m.local_block.padded_size) for name, m in modules.items()},
            "median_ms": {name: statistics.median(t) * 1e3 for name, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_cpu_odd")
    parser.add_argument("--repeats", type=int, default=3, help="processes per trainer, interleaved")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--module-repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every measurement")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    cpu = args.device == "cpu"
    env = {**os.environ, "nnUNet_extTrainer": trainer_folder(), "OMP_NUM_THREADS": str(args.threads)}
    env.setdefault("nnUNet_compile", "false" if cpu else "true")
    if cpu:
        env.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.update({k: env[k] for k in ("nnUNet_extTrainer", "nnUNet_compile")})
    module = module_times(args)
    print(json.dumps(module, indent=2), flush=True)
    runs = train_step_runs(args, env)
    step = {t: statistics.median(r["median_s"] for r in runs[t]) for t in runs}
    spread = {t: [min(r["median_s"] for r in runs[t]), max(r["median_s"] for r in runs[t])] for t in runs}
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "device": args.device,
               "device_name": device_name(args.device), "dataset": args.dataset, "configuration": args.configuration,
               "patch_size": runs[PADDED][0]["patch_size"], "batch_size": runs[PADDED][0]["batch_size"],
               "steps": args.steps, "repeats": args.repeats, "runs": runs, "step_median_s": step,
               "step_spread_s": spread, "threads": args.threads, "step_ratio": step[PADDED] / step[UNPADDED],
               "module": module,
               "module_ratio": module["median_ms"][PADDED] / module["median_ms"][UNPADDED]}
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    out = REPO / "benchmarks" / "results" / f"skc_window_cost_{args.device}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    rows = "\n".join(
        f"| `{t}` | {module['windows'][t]} | {module['padded_size'][t]} | {step[t]:.3f} "
        f"({spread[t][0]:.3f}-{spread[t][1]:.3f}) | {module['median_ms'][t]:.2f} |" for t in (UNPADDED, PADDED))
    write_section(f"skc_window_cost_{args.device}", f"""## SKC local window on an odd bottleneck, {results['device_name']} (`benchmarks/diagnostics/skc_window_cost.py`)

Command: `python benchmarks/diagnostics/{Path(__file__).name} {' '.join(sys.argv[1:])}` — {results['date']} — {results['machine']}

Dataset {args.dataset}, configuration `{args.configuration}` (patch {results['patch_size']}, batch {results['batch_size']}
labelled + {results['batch_size']} unlabelled patches, bottleneck {module['bottleneck']} x {module['channels']} channels).
Training iteration: {args.repeats} interleaved processes per trainer x {args.steps} timed iterations (batch fetch +
`train_step`) after {args.warmup} warm-up ones, median of process medians (spread). SKC module: forward + backward
in cross mode on 2 + 2 bottleneck tensors, {args.module_repeats} interleaved calls, median. {args.threads} intra-op
thread(s) per process.

| trainer | local window | local block works on | s / iteration | SKC module ms |
|---|---|---|---|---|
{rows}

The reference window with padding costs {results['step_ratio']:.3f}x the iteration time of the old rule
(SKC module alone: {results['module_ratio']:.2f}x).""", FINDINGS_MD)


if __name__ == "__main__":
    main()

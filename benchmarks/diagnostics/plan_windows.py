"""The SKC local window on the plans nnU-Net makes for Synapse-like CT: default and ResEnc M planners.

Makes a phantom of Synapse-like geometry (96 x 512 x 512 voxels at 3 x 0.78 x 0.78 mm, 4 cases), runs only nnU-Net's
fingerprint and planning (no preprocessing), and tabulates per configuration and planner: patch, total encoder
stride, bottleneck, the local window of the rule of release 0.2 (largest divisor <= 2) and of today's rule (2 per
axis, padded), tokens per window and the padded bottleneck. Steps already done in ``--workdir`` are skipped.
Prints, writes ``benchmarks/results/plan_windows.json`` and a section of ``BENCHMARKS_FINDINGS.md``:

    python benchmarks/diagnostics/plan_windows.py [--workdir skcdf_data/plan_windows] [-np 2]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

# this folder (the other diagnostics) and benchmarks/ (the shared modules: data_pipeline, convergence, ...)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from data_pipeline import FINDINGS_MD, REPO, machine, sh, write_section  # noqa: E402

DATASET_ID, NAME = 971, "SynapseGeom"
SHAPE, SPACING = (96, 512, 512), (3, 0.78, 0.78)
PLANNERS = (("default", "nnUNetPlans", None), ("ResEnc M", "nnUNetResEncUNetMPlans", "nnUNetPlannerResEncM"))


def plan(workdir: Path, processes: int) -> Path:
    env = {**os.environ, **{v: str(workdir / v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    name = f"Dataset{DATASET_ID:03d}_{NAME}"
    raw, pre = Path(env["nnUNet_raw"]) / name, Path(env["nnUNet_preprocessed"]) / name
    log = workdir / "commands.log"
    if not (raw / "dataset.json").is_file():
        sh(["skcdf_make_phantom", "-d", str(DATASET_ID), "-n", NAME, "--shape", *map(str, SHAPE), "--spacing",
            *map(str, SPACING), "--num-train", "4", "--num-test", "0", "--num-unlabeled", "0", "-np", str(processes),
            "--no-progress"], env, log)
    if not (pre / "dataset_fingerprint.json").is_file():
        sh(["nnUNetv2_extract_fingerprint", "-d", str(DATASET_ID), "-np", str(processes)], env, log)
    for _, plans, planner in PLANNERS:
        if not (pre / f"{plans}.json").is_file():
            sh(["nnUNetv2_plan_experiment", "-d", str(DATASET_ID)] + (["-pl", planner] if planner else []), env, log)
    return pre


def table(pre: Path) -> list:
    import numpy as np

    from nnunetv2_skcdf.network.architectures.skcdf_unet import bottleneck_size
    from nnunetv2_skcdf.network.building_blocks.skc import choose_window, divisor_window, padded_size

    rows = []
    for planner, plans_name, _ in PLANNERS:
        plans = json.loads((pre / f"{plans_name}.json").read_text())
        for configuration in ("3d_fullres", "3d_lowres", "2d"):
            config = plans["configurations"].get(configuration)
            if config is None:
                continue
            strides = config["architecture"]["arch_kwargs"]["strides"]
            total = np.prod(np.array(strides), axis=0).tolist()
            bottleneck = bottleneck_size(config["patch_size"], strides)
            old, new = divisor_window(bottleneck), choose_window(bottleneck)
            rows.append({"configuration": configuration, "planner": planner, "patch": config["patch_size"],
                         "total_stride": total, "bottleneck": bottleneck, "window_old": list(old),
                         "window_new": list(new), "tokens_old": math.prod(old), "tokens_new": math.prod(new),
                         "padded_bottleneck": list(padded_size(bottleneck, new)),
                         "windows_new": math.prod(-(-s // w) for s, w in zip(bottleneck, new))})
    return rows


def markdown_table(rows: list) -> str:
    def x(v):
        return " x ".join(map(str, v))

    lines = ["| configuration | planner | patch | total stride | bottleneck | window up to 0.2 | window now "
             "(padded bottleneck) | tokens per window before / now |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        padded = "" if r["padded_bottleneck"] == r["bottleneck"] else f" ({x(r['padded_bottleneck'])})"
        lines.append(f"| {r['configuration']} | {r['planner']} | {x(r['patch'])} | {x(r['total_stride'])} | "
                     f"{x(r['bottleneck'])} | {x(r['window_old'])} | {x(r['window_new'])}{padded} | "
                     f"{r['tokens_old']} / {r['tokens_new']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO / "skcdf_data" / "plan_windows"))
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    args = parser.parse_args()
    rows = table(plan(Path(args.workdir), args.num_processes))
    md = markdown_table(rows)
    print(md)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "shape_zyx": SHAPE,
               "spacing_zyx_mm": SPACING, "rows": rows}
    out = REPO / "benchmarks" / "results" / "plan_windows.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_section("plan_windows", f"""## SKC local window on Synapse-like plans (`benchmarks/diagnostics/plan_windows.py`)

Command: `python benchmarks/diagnostics/{Path(__file__).name} {' '.join(sys.argv[1:])}` — {results['date']} — {results['machine']}

Phantom of Synapse-like geometry (`skcdf_make_phantom --shape {' '.join(map(str, SHAPE))} --spacing
{' '.join(map(str, SPACING))} --num-train 4`), nnU-Net 2.8 fingerprint + `nnUNetv2_plan_experiment` (default planner)
and `-pl nnUNetPlannerResEncM`; no preprocessing. The reference code was built for a 4 x 8 x 8 bottleneck with
2 x 2 x 2 windows (8 tokens per window).

{md}""", FINDINGS_MD)


if __name__ == "__main__":
    main()

"""Data-side figures: phantom generation time and class voxel fractions, nnU-Net planning and preprocessing
time, unlabelled preprocessing time, unlabelled loader throughput with 0 and 2 worker processes.

Runs on the default phantom (dataset 950 layout) in a temporary folder, prints every figure and writes
them to ``benchmarks/results/data_pipeline.json`` and a Markdown section in ``BENCHMARKS.md``.

    python benchmarks/data_pipeline.py [--num-batches 40] [--keep DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASET = 950
#: where the speed scripts write their JSON / profiler tables and the Markdown sections; the environment can
#: point them elsewhere (benchmarks/gpu_realistic.sh: straight into the device machine's $OUT; its CPU dry run:
#: a scratch folder, so that no dry-run number reaches the committed files)
RESULTS = Path(os.environ.get("SKCDF_RESULTS_DIR") or REPO / "benchmarks" / "results")
BENCHMARKS_MD = Path(os.environ.get("SKCDF_BENCHMARKS_MD") or REPO / "BENCHMARKS.md")
#: where the one-off diagnostics of benchmarks/diagnostics/ write their sections (beside the findings they back)
FINDINGS_MD = Path(os.environ.get("SKCDF_FINDINGS_MD") or REPO / "BENCHMARKS_FINDINGS.md")


def machine(cpu_only: bool = False) -> str:
    """Host, cores, Python, torch and the GPU torch sees ("CPU only" where none, or where ``cpu_only``: a benchmark
    that runs everything with ``-device cpu``)."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu_only else "CPU only"
    return f"{platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | " \
           f"Python {platform.python_version()} | torch {torch.__version__} | {gpu}"


def device_name(device: str) -> str:
    """The accelerator's name for a torch device type ('cuda' -> e.g. 'NVIDIA H200'), 'CPU' otherwise."""
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def sh(cmd: list, env: dict, log: Path) -> float:
    """Run a console command with its output appended to ``log``; -> wall seconds (raises if it fails)."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, env=env, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def phantom_figures(root: str) -> dict:
    from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES
    from nnunetv2_skcdf.dataset_conversion.phantom import (
        DEFAULT_SHAPE as shape,
        DEFAULT_SPACING as spacing,
        generate_case,
        make_phantom_dataset,
    )

    times, counts = [], []
    for i in range(10):
        rng = np.random.default_rng(np.random.SeedSequence([1234, i]))
        (_, label), dt = timed(generate_case, rng, shape, spacing)
        times.append(dt)
        counts.append(np.bincount(label.ravel(), minlength=14))
    fractions = (np.array(counts) / np.prod(shape)).mean(0)
    _, t_dataset = timed(make_phantom_dataset, output_root=root, dataset_id=DATASET, seed=0, progress=False)
    names = ["background"] + [name for _, name, _ in SYNAPSE_CLASSES]
    return {
        "shape_zyx": list(shape), "spacing_zyx_mm": list(spacing),
        "generate_case_s_median": statistics.median(times), "generate_case_s_max": max(times),
        "make_phantom_dataset_s (36 cases, written)": t_dataset,
        "class_voxel_fraction_mean": {n: float(f) for n, f in zip(names, fractions)},
        "liver_to_adrenal_ratio_min": float(min(fractions[6] / fractions[12], fractions[6] / fractions[13])),
    }


def run(cmd: list, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def loader_throughput(num_processes: int, num_batches: int) -> dict:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_skcdf.splits.semi_supervised_splits import load_semi_supervised_fold
    from nnunetv2_skcdf.training.dataloading.unlabeled_loader import get_unlabeled_dataloader

    pre = Path(os.environ["nnUNet_preprocessed"]) / "Dataset950_SKCDFPhantom"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8 run_training sets this key before building a trainer
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, json.loads((pre / "dataset.json").read_text()),
                            device=torch.device("cpu"))
    _, _, unlabeled = load_semi_supervised_fold(str(pre), 0)
    batch_size = trainer.configuration_manager.batch_size
    stream = get_unlabeled_dataloader(trainer, unlabeled, batch_size=batch_size, num_processes=num_processes)
    for _ in range(3):  # warm-up: worker start, first reads
        next(stream)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(stream)
    dt = time.perf_counter() - t0
    if hasattr(stream, "_finish"):
        stream._finish()
    return {"workers": num_processes, "batch_size": batch_size,
            "patch_size": list(trainer.configuration_manager.patch_size),
            "patches_per_s": num_batches * batch_size / dt}


#: an ATX heading line (``## Title``); the sections hold no fenced code
HEADING = re.compile(r"^(#{1,6}) ")


def _heading_level(text: str) -> int:
    """The level of the first Markdown heading (``## x`` -> 2) of ``text``; 0 if it has none."""
    first = next((line for line in text.splitlines() if HEADING.match(line)), None)
    return len(HEADING.match(first).group(1)) if first else 0


def shift_headings(text: str, shift: int) -> str:
    """Every Markdown heading of ``text`` ``shift`` levels deeper (negative: higher), kept within 1..6."""
    if not shift:
        return text
    return "\n".join(f"{'#' * min(6, max(1, len(m.group(1)) + shift))} {line[m.end():]}" if m else line
                     for line, m in ((line, HEADING.match(line)) for line in text.split("\n")))


def write_section(name: str, body: str, md: Optional[Path] = None) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md (``$SKCDF_BENCHMARKS_MD`` if set; ``md``: another
    file, e.g. :data:`FINDINGS_MD`), delimited by ``<!-- name:start -->`` / ``<!-- name:end -->``.

    A script writes its section with a ``## Title``; a section already in the file keeps the heading level it has
    there (BENCHMARKS.md nests sections under group headings, e.g. ``### Title``), every heading of the body shifted
    alike, so the file decides the depth and a rewrite leaves the outline as it was. A new section is appended at
    the end as written (move its marker pair into its group; it is found there by its markers). The first heading
    carries the anchor ``<a id="name"></a>`` that the summary table links to."""
    md = Path(md) if md else BENCHMARKS_MD
    text = md.read_text() if md.exists() else "# Benchmarks\n\nFigures written by the scripts in `benchmarks/`.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    lines = body.split("\n")
    if HEADING.match(lines[0]) and "<a id=" not in lines[0]:
        lines[0] += f' <a id="{name}"></a>'
    body = "\n".join(lines)
    if start in text and _heading_level(body):
        placed = _heading_level(text[text.index(start):text.index(end)])
        body = shift_headings(body, placed - _heading_level(body)) if placed else body
    section = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    from nnunetv2_skcdf.utilities.io import atomic_output

    with atomic_output(str(md)) as tmp:  # a crash mid-write must not truncate the other sections
        Path(tmp).write_text(text)


def markdown(results: dict, command: str) -> str:
    p = results["phantom"]
    rows = "\n".join(f"| {k} | {v * 100:.3f} % |" for k, v in p["class_voxel_fraction_mean"].items())
    loaders = "\n".join(f"| {r['workers']} | {r['batch_size']} | {r['patch_size']} | {r['patches_per_s']:.1f} |"
                        for r in results["loader"])
    return f"""## Data pipeline (`benchmarks/data_pipeline.py`)

Command: `{command}` — {results['date']} — {results['machine']}

| step | time |
|---|---|
| `generate_case`, default phantom {p['shape_zyx']} voxels (z,y,x), spacing {p['spacing_zyx_mm']} mm, median of 10 | {p['generate_case_s_median']:.3f} s (max {p['generate_case_s_max']:.3f} s) |
| `make_phantom_dataset`, 20 train + 6 test + 10 unlabelled, written | {p['make_phantom_dataset_s (36 cases, written)']:.1f} s |
| `nnUNetv2_plan_and_preprocess -c 3d_fullres -np 2` (26 labelled cases) | {results['nnunet_plan_and_preprocess_s']:.1f} s |
| `skcdf_preprocess_unlabeled -c 3d_fullres -np 2` (10 cases) | {results['preprocess_unlabeled_s']:.1f} s ({results['preprocess_unlabeled_s'] / 10:.2f} s/case) |

Mean class voxel fractions (10 default cases); liver / adrenal ratio >= {p['liver_to_adrenal_ratio_min']:.0f}:

| class | fraction |
|---|---|
{rows}

Unlabelled loader (fold 0 of a 20 %-labelled split: hidden-label + imagesUnlabeled cases, nnU-Net training
augmentation, default 3d_fullres patch and batch size):

| workers | batch | patch | patches/s |
|---|---|---|---|
{loaders}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-batches", type=int, default=40)
    parser.add_argument("--keep", help="use this folder instead of a temporary one and keep it")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="skcdf_bench_"))
    env = {**os.environ, "nnUNet_def_n_proc": "2"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = env[var] = str(root / var)
        os.makedirs(env[var], exist_ok=True)
    results = {"date": datetime.date.today().isoformat(), "machine": machine()}
    results["phantom"] = phantom_figures(env["nnUNet_raw"])
    results["nnunet_plan_and_preprocess_s"] = run(
        ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET), "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env)
    run(["skcdf_split", "-d", str(DATASET), "--labeled", "0.2", "--add-unlabeled-images"], env)
    results["preprocess_unlabeled_s"] = run(
        ["skcdf_preprocess_unlabeled", "-d", str(DATASET), "-c", "3d_fullres", "-np", "2", "--quiet"], env)
    results["loader"] = [loader_throughput(n, args.num_batches) for n in (0, 2)]
    print(json.dumps(results, indent=2))
    out = REPO / "benchmarks" / "results" / "data_pipeline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_section("data_pipeline", markdown(results, " ".join(["python", f"benchmarks/{Path(__file__).name}",
                                                               *sys.argv[1:]])))
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

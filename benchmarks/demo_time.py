"""What README's first command costs a newcomer: ``bash run_demo.sh`` from a fresh clone, set-up included.

Clones this repository's HEAD into a temporary folder and runs ``bash run_demo.sh`` there in a clean environment
(PATH, HOME, LANG and pip's own PIP_* settings only: a new ``./.venv``, the data under the clone's
``./skcdf_data``), then records the total wall time, the demo's own step times (its ``times.tsv``), each arm's
mean test Dice, the plateau check, the machine, and the load average before and during the run. The figure is the
demo's time on an otherwise idle machine: the script refuses to start while the 1-minute load average is above
``--max-load`` and reports the load it sampled during the run (the demo's two lanes alone make it about 2).

Writes ``benchmarks/results/demo_time.json`` and BENCHMARKS.md's section ``demo_time`` (``--long``: the same for
``bash run_demo.sh --long``, as ``demo_time_long``); README's line about the demo's time is generated from the JSON
files (``python benchmarks/results_tables.py``).

    python benchmarks/demo_time.py [--max-load 0.5] [--keep] [--long]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from data_pipeline import RESULTS, machine, write_section  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from demo_report import ARMS, PLATEAU_ARM, mean_dice, read_times  # noqa: E402

NAME = "demo_time"


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def clean_env(home: str) -> dict:
    keep = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    return {**keep, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
            "LANG": os.environ.get("LANG", "C.UTF-8")}


def measure(workdir: Path, log: Path, long: bool = False) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(10):
            samples.append(load1())

    sampler = threading.Thread(target=sample, daemon=True)
    before = load1()
    t0 = time.perf_counter()
    sampler.start()
    with open(log, "w") as f:
        rc = subprocess.run(["bash", "run_demo.sh", *(["--long"] if long else [])], cwd=clone,
                            env=clean_env(os.environ.get("HOME", str(workdir))),
                            stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"run_demo.sh failed (exit {rc}); its output: {log}")
    out = clone / "skcdf_data" / ("demoLong" if long else "demo")
    steps = read_times(out / "times.tsv")
    dice = {folder: round(mean_dice(json.loads((out / folder / "summary.json").read_text())), 2)
            for folder, _ in ARMS}
    plateau = round(mean_dice(json.loads((out / PLATEAU_ARM / "summary.json").read_text())), 2)
    # run_demo.sh trains and predicts with -device cpu
    return {"date": datetime.date.today().isoformat(), "commit": commit, "machine": machine(cpu_only=True),
            "wall_s": round(wall, 1), "steps_s": steps, "mean_dice": dice, "plateau_mean_dice": plateau,
            "load_before": before, "load_during_mean": round(sum(samples) / max(len(samples), 1), 2),
            "load_during_max": max(samples, default=before),
            "table": (out / "demo_table.md").read_text()}


def markdown(r: dict, command: str, long: bool = False) -> str:
    steps = "\n".join(f"| {k} | {v / 60:.1f} min |" for k, v in r["steps_s"].items())
    names = dict(ARMS)
    dice = "\n".join(f"| {names[k]} | {v:.1f} |" for k, v in r["mean_dice"].items())
    title = "`run_demo.sh --long`'s" if long else "The demo's"
    return f"""## {title} wall time from a fresh clone (`benchmarks/demo_time.py{' --long' if long else ''}`)

Command: `{command}` — {r['date']} — commit {r['commit']} — {r['machine']}

`bash run_demo.sh{' --long' if long else ''}` in a fresh clone, clean environment, set-up (a new `.venv`) included: **{r['wall_s'] / 60:.1f} min**.
Load average (1 min) before the start {r['load_before']:.2f}, during the run {r['load_during_mean']:.2f} on average,
{r['load_during_max']:.2f} at most (the demo's two lanes alone make it about 2).

| step (run_demo.sh's times.tsv) | wall time |
|---|---|
{steps}

| arm | mean test Dice |
|---|---|
{dice}

The labelled-only model's snapshot at 3/4 of its budget: {r['plateau_mean_dice']:.1f}.

The demo's own closing text:

```
{r['table'].rstrip()}
```"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-load", type=float, default=0.5,
                   help="refuse to start while the 1-minute load average is above this (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is printed)")
    p.add_argument("--long", action="store_true", help="time `bash run_demo.sh --long` (twice the budget) instead; "
                   "stored as demo_time_long")
    a = p.parse_args()
    load = load1()
    if load > a.max_load:
        raise SystemExit(f"load average {load:.2f} > --max-load {a.max_load}: the machine is busy, so the demo's "
                         f"time would not be a newcomer's. Stop the other jobs (or wait) and run this again.")
    workdir = Path(tempfile.mkdtemp(prefix="skcdf_demo_time_"))
    log = workdir / "run_demo.log"
    try:
        r = measure(workdir, log, a.long)
    finally:
        print(f"run_demo.sh's output: {log}")
    command = "python benchmarks/demo_time.py" + (f" --max-load {a.max_load:g}" if a.max_load != 0.5 else "") + \
        (" --long" if a.long else "")
    name = f"{NAME}_long" if a.long else NAME
    RESULTS.mkdir(parents=True, exist_ok=True)
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    atomic_save_json(r, str(RESULTS / f"{name}.json"))
    section = markdown(r, command, a.long)
    write_section(name, section)
    print(section)
    if not a.keep:
        shutil.rmtree(workdir / "clone", ignore_errors=True)


if __name__ == "__main__":
    main()

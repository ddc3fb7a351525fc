"""Installing as users install: the wheel and the sdist build, and the wheel, installed (not editable) into a fresh
virtual environment beside an existing nnU-Net, works from outside the source tree.

How the fresh environment reuses the nnU-Net install: ``python -m venv`` without system site-packages (the
interpreter running the tests is itself a venv, whose packages ``--system-site-packages`` would not see), a
``.pth`` file in its site-packages naming the test environment's site-packages (appended to ``sys.path``; the
``.pth`` files there, e.g. the editable install's finder, are *not* processed, so the source tree cannot leak in),
and ``pip install --no-deps --no-index <wheel>`` (the dependencies come from that path). Every check runs in its
own process from a temporary folder. Marked ``slow`` (a minute or so): ``bash run_tests.sh -m slow``.
"""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args, cwd, env=None, timeout=600) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, \
        f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _source_copy(tmp_path: Path) -> Path:
    """The package as it is in the working tree (setup.py, README.md, nnunetv2_skcdf/), built outside the repository
    so that no build/ or egg-info folder is written into it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "nnunetv2_skcdf", src / "nnunetv2_skcdf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def _fresh_env(tmp_path: Path) -> Path:
    """A new venv whose only link to the test environment is a .pth naming that environment's site-packages."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "_existing_nnunet.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_and_sdist_build_and_the_wheel_works_installed_outside_the_source_tree(tmp_path):
    pytest.importorskip("build", reason="needs the 'build' package (pip install build)")
    src, dist = _source_copy(tmp_path), tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", dist, src], tmp_path)
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")

    # everything the package consists of is in both: every module (trainer variants for nnUNet_extTrainer
    # included, with the __init__.py of every subpackage) and every data file
    package = {p.relative_to(src).as_posix() for p in (src / "nnunetv2_skcdf").rglob("*") if p.is_file()}
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert package <= in_wheel, sorted(package - in_wheel)
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert package <= in_sdist, sorted(package - in_sdist)
    # every console script points at a module the wheel holds
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(wheel).read(
        next(n for n in in_wheel if n.endswith(".dist-info/entry_points.txt"))).decode())
    scripts = dict(entry_points["console_scripts"])
    for name, target in scripts.items():
        module = target.split(":")[0].replace(".", "/")
        assert f"{module}.py" in in_wheel, f"console script {name} -> {target}: not in the wheel"

    venv = _fresh_env(tmp_path)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel],
         tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "nnUNet_extTrainer", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"

    installed = Path(_run([python, "-c", "import nnunetv2_skcdf, os; print(os.path.dirname(nnunetv2_skcdf.__file__))"],
                          outside, env).strip())
    assert venv in installed.parents and REPO not in installed.parents  # the wheel's copy, not the source tree
    trainer_path = _run([bin_dir / "skcdf_trainer_path"], outside, env).strip()
    assert Path(trainer_path) == installed / "training" / "nnUNetTrainer"

    # nnU-Net's lookup imports the folder's modules under their own names and forgets them afterwards: the file a
    # class comes from is read off its __init__'s code
    lookup = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              "for name in ('SKCDFTrainer', 'SKCDFTrainer_v04', 'nnUNetTrainerSKCDF', 'SKCDFTrainer_strongView'):\n"
              "    cls = find(name)\n"
              "    print('FOUND', cls.__name__, cls.__init__.__code__.co_filename)\n")
    found = [line.split() for line in _run([python, "-c", lookup], outside, {**env, "nnUNet_extTrainer": trainer_path})
             .splitlines() if line.startswith("FOUND ")]
    assert [name for _, name, _ in found] == ["SKCDFTrainer", "SKCDFTrainer_v04", "nnUNetTrainerSKCDF",
                                              "SKCDFTrainer_strongView"]
    assert all(venv in Path(path).parents for _, _, path in found), found

    assert "usage: skcdf_split" in _run([bin_dir / "skcdf_split", "--help"], outside, env)

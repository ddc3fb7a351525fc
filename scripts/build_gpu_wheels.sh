#!/usr/bin/env bash
# Fill .whl/ with what the GPU machine lacks (its image: Python 3.12, torch, numpy, scipy, ... but no nnU-Net; no
# network there), for `run` with carry [".whl"] and benchmarks/gpu_checks.sh:
#   1. the pinned dependencies below, fetched once as cp312 manylinux x86-64 wheels (the ones PyPI has only as
#      sdists are pure Python and built here); SimpleITK's wheel is re-zipped with LZMA (53 -> 29 MB, same files,
#      pip installs it as is), else wheels + working tree exceed the 64 MiB (67108864 bytes) a call carries;
#   2. .whl/nnunetv2_skcdf-*.whl rebuilt from the working tree, every time;
# then prints the sizes that travel. Needs network here (pip) and the venv (SKCDF_VENV, default ./.venv).
# The pins are the versions of the CPU venv the tests ran with (nnunetv2 2.8.1 and what it imports).
set -euo pipefail; cd "$(dirname "$0")/.."
PY="${SKCDF_VENV:-$PWD/.venv}/bin/python"
mkdir -p .whl
"$PY" - <<'EOF'
import glob, os, subprocess, sys, time, zipfile

BINARY = ["nnunetv2==2.8.1", "blosc2==4.14.1", "connected-components-3d==4.1.1", "ndindex==1.10.1",
          "nibabel==5.4.2", "numexpr==2.14.2", "simpleitk==2.5.7"]
SDIST_ONLY = ["acvl_utils==0.2.6", "batchgenerators==0.25.5", "batchgeneratorsv2==0.3.6",
              "dynamic_network_architectures==0.4.4"]
PLATFORM = ["--python-version", "3.12", "--implementation", "cp"] + [
    a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]


def have(req):
    name, version = req.split("==")
    return glob.glob(f".whl/{name.lower().replace('-', '_')}-{version}-*.whl")


for req in BINARY + SDIST_ONLY:
    if have(req):
        continue
    print("fetching", req, flush=True)
    if req in BINARY:
        cmd = ["download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", ".whl", req]
    else:
        cmd = ["wheel", "--no-deps", "--no-build-isolation", "-w", ".whl", req]
    subprocess.run([sys.executable, "-m", "pip", "-q", *cmd], check=True)
    assert have(req), f"no wheel named like {req} in .whl/"

# SimpleITK: one 270 MB shared library, deflated to 53 MB; LZMA takes it to 29 MB (a few minutes, once)
(sitk,) = have("simpleitk==2.5.7")
with zipfile.ZipFile(sitk) as z:
    lzma = all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist() if i.file_size > 2 ** 20)
if not lzma:
    print("re-zipping", sitk, "with LZMA ...", flush=True)
    t0, tmp = time.time(), sitk + ".tmp"
    with zipfile.ZipFile(sitk) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():  # same names, times and modes; RECORD's hashes are of the contents: unchanged
            new = zipfile.ZipInfo(info.filename, info.date_time)
            new.external_attr, new.compress_type = info.external_attr, zipfile.ZIP_LZMA
            zout.writestr(new, zin.read(info))
    os.replace(tmp, sitk)
    print(f"  {os.path.getsize(sitk)} bytes, {time.time() - t0:.0f} s")
EOF
rm -rf build .whl/nnunetv2_skcdf-*.whl; "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl . ; ls -l .whl; w=$(du -cb .whl/* | tail -1 | cut -f1); t=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1); echo "wheels $w + working tree $t = $((w + t)) bytes (limit 67108864)"

#!/usr/bin/env bash
# Download, on this machine, the wheels bench/gpu_run.sh installs on the GPU machine: the
# packages scgeneformer needs that the device image lacks (its python is 3.12; see
# ../.library/device/KINDS.md). About 10 MiB, kept out of git by .git/info/exclude.
set -euo pipefail
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
for package in anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 \
    scverse-misc==0.0.3 session-info2==0.4.2 zarr==3.1.6 donfig==0.8.1.post1 \
    numcodecs==0.16.6 google-crc32c==1.9.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$package"
done
ls .whl

#!/usr/bin/env bash
# Every GPU check of the project in one device run; figures and logs go to $OUT.
#
# From a session with a lent GPU (see bench/RESULTS.md, "GPU"):
#   1. here, once: bash bench/fetch_gpu_wheels.sh    (anndata and its needs, into .whl/)
#   2. run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)
# About 6-11 minutes on one H100/H200. SMALL=1 shrinks every size for a dry run on a CPU, where
# WHEELS= skips the wheels: PY=.venv/bin/python SMALL=1 WHEELS= bash bench/gpu_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-bench/_out}
mkdir -p "$OUT"
WHEELS=${WHEELS-.whl}
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    # The device image has torch, transformers, numba, h5py, pandas; anndata travels as wheels.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "${SMALL:-0}" = 1 ]; then
    CHECK=(--small)
    PRETRAIN=(--length 128 --token-budget 1024 --steps 4)
    SCREEN=(--length 64 --cells 2 --goal-cells 6)
    METHODS=(--length 64 --cells 2 --train-cells 60 --epochs 1)
else
    CHECK=()
    PRETRAIN=(--length 2048 --token-budget 65536 --steps 12)
    SCREEN=(--length 1400 --cells 8 --goal-cells 100)
    # exact, first_order and two_stage side by side on cells of about 1,400 genes.
    METHODS=(--length 1400 --train-length 512 --cells 8 --train-cells 800 --epochs 4 --full-model)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no GPU"; } \
    | tee "$OUT/machine.txt"
status=0
# The environment and the plan every tool would use (what users paste into bug reports).
"$PY" -m scgeneformer env 2>&1 | tee "$OUT/env.txt" || status=1
timeout 330 "$PY" bench/gpu_check.py --out "$OUT/gpu_check.md" "${CHECK[@]}" 2>&1 \
    | tee "$OUT/gpu_check.log" || status=1
timeout 150 "$PY" bench/bench_pretrain.py --store-cells 0 "${PRETRAIN[@]}" 2>&1 \
    | tee "$OUT/pretrain.log" || status=1
timeout 120 "$PY" bench/bench_in_silico.py --source random "${SCREEN[@]}" 2>&1 \
    | tee "$OUT/in_silico.log" || status=1
timeout 180 "$PY" bench/bench_in_silico.py --methods "${METHODS[@]}" 2>&1 \
    | tee "$OUT/in_silico_methods.log" || status=1
exit $status

#!/usr/bin/env bash
# The kernels' GPU session in one command, on a machine with 4 GPUs (how GPU_NOTES.md's "Kernels" numbers were
# made): GPU tests, the tile sweep and the peers' benchmarks run side by side, one GPU each; then our kernels are
# benchmarked with the sweep's best tiles. Writes results.csv, run.log, tiles.txt and the plot under $OUT.
# Usage (repo root): OUT=/tmp/out BENCH_GIT_SHA=$(git rev-parse --short HEAD) bash grpo_kernels/bench/run_device.sh
set -u
OUT=${OUT:-/tmp/kernels-bench}
mkdir -p "$OUT/parts"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # Liger-Kernel and cut-cross-entropy wheels, carried along
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=index,name,memory.total,clocks.sm --format=csv > "$OUT/parts/gpus.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/parts/gpus.txt"

on() { local gpu=$1 name=$2; shift 2; CUDA_VISIBLE_DEVICES=$gpu timeout "${STEP_TIMEOUT:-400}" "$@" > "$OUT/parts/$name.log" 2>&1; }
B="python3 -m grpo_kernels.bench --rep-ms ${REP_MS:-800}"
on 0 gpu_tests python3 -m pytest tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider -x &
tests=$!
if [ "${SWEEP:-1}" = 1 ]; then
  on 1 sweep python3 -m grpo_kernels.bench.sweep --out "$OUT/tiles.txt" &
  sweep=$!
else  # the defaults in grpo_kernels/_lm_head.py
  true & sweep=$!
fi
if [ "${PEERS:-1}" = 1 ]; then  # PEERS=0 when the peers' rows of an earlier run on the same card are kept
  on 2 peers72b $B --shapes 16384x8192x152064 --providers eager,compile,liger,cce --csv "$OUT/parts/peers72b.csv" &
  on 3 peers7b $B --shapes 16384x3584x152064 4096x8192x152064 --providers eager,liger,cce \
    --csv "$OUT/parts/peers7b.csv" &
  wait $sweep
  TILES=$(cat "$OUT/tiles.txt" 2>/dev/null || true)
  on 1 ours72b $B --providers ours --tiles "$TILES" --shapes 16384x8192x152064 8192x8192x152064 \
    --csv "$OUT/parts/ours72b.csv" &
  wait $tests
  on 0 ours7b $B --providers ours --tiles "$TILES" --shapes 16384x3584x152064 4096x8192x152064 4096x3584x152064 \
    --csv "$OUT/parts/ours7b.csv" &
else
  wait $sweep
  TILES=$(cat "$OUT/tiles.txt" 2>/dev/null || true)
  for mib in ${BUFFERS:-0}; do  # backward chunk buffers to compare, MiB (0: the default)
    on 1 "ours72b-$mib" $B --providers ours --tiles "$TILES" --buffer-mib "$mib" --shapes 16384x8192x152064 \
      --csv "$OUT/parts/ours72b-$mib.csv"
  done &
  on 2 ours72b2 $B --providers ours --tiles "$TILES" --shapes 8192x8192x152064 4096x8192x152064 \
    --csv "$OUT/parts/ours72b2.csv" &
  on 3 ours7b $B --providers ours --tiles "$TILES" --shapes 16384x3584x152064 4096x3584x152064 \
    --csv "$OUT/parts/ours7b.csv" &
fi
wait
python3 - "$OUT" <<'EOF'
import csv, glob, os, sys
out = sys.argv[1]
rows = [r for p in sorted(glob.glob(f"{out}/parts/*.csv")) for r in csv.DictReader(open(p))]
if rows:
    with open(f"{out}/results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    from grpo_kernels.bench.bench import plot, print_table
    for r in rows:
        for k in ("N", "H", "V"):
            r[k] = int(r[k])
        for k in ("ms", "tflops", "x_roofline", "peak_extra_gib", "err_logp", "err_grad_h", "matmul_ms"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
    print_table(rows)
    plot(rows, f"{out}/plot.png")
EOF
for f in "$OUT"/parts/*; do echo "===== $f"; cat "$f"; done > "$OUT/run.log"
rm -rf "$OUT/parts"

#!/usr/bin/env bash
# The measurements of a machine of several GPUs, one per call (each fits the device tool's 10 minutes), each writing
# its JSON records, its BENCHMARKS.md tables and its log under $OUT:
#
#   bash tools/multigpu.sh check            # NCCL correctness: ring, star, tensor parallel against one GPU
#   bash tools/multigpu.sh hosts 128k       # 8B: star (a block per GPU, and L/4; both anchor modes) against ring
#   bash tools/multigpu.sh hosts 512k
#   bash tools/multigpu.sh hosts 1m         # also the 1M-token run: TTFT, decode, peak memory per GPU
#   bash tools/multigpu.sh tp llama3_70b 64k,128k   # 70B: every tp degree on one host, 2 hosts × tp, star and ring
#   bash tools/multigpu.sh tp llama3 4k,32k
#
# Runs that the memory plan says do not fit are listed as not run. Copy $OUT/BENCHMARKS.md's tables into the repo's
# BENCHMARKS.md with `tools/benchmarks.py`'s figures (or rerun the part with --append BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the records and logs go to}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# longctx importable on a machine where it is not installed: a folder whose `longctx` is this checkout
if ! python3 -c "import longctx.models" 2>/dev/null; then
  mkdir -p /tmp/longctx-ns && ln -sfn "$PWD" /tmp/longctx-ns/longctx
  export PYTHONPATH="/tmp/longctx-ns${PYTHONPATH:+:$PYTHONPATH}"
fi
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
what=${1:?which measurement: check, hosts CTX or tp MODEL CTXS}
case "$what" in
  check)
    torchrun --standalone --nproc-per-node "$N" tools/check_cuda.py 2>&1 | tee "$OUT/check_cuda-$N.log" ;;
  hosts)
    python3 tools/benchmarks.py hosts --nproc "$N" --ctx-names "${2:?a ctx preset}" --append "$OUT/BENCHMARKS.md" \
      --jsonl "$OUT/hosts-$2-$N.jsonl" 2>&1 | tee "$OUT/hosts-$2-$N.log" ;;
  tp)
    python3 tools/benchmarks.py tp --nproc "$N" --models "${2:?a model preset}" --ctx-names "${3:?ctx presets}" \
      --append "$OUT/BENCHMARKS.md" --jsonl "$OUT/tp-$2-$N.jsonl" 2>&1 | tee "$OUT/tp-$2-$N.log" ;;
  *)
    echo "unknown measurement $what: check, hosts CTX or tp MODEL CTXS" >&2; exit 2 ;;
esac

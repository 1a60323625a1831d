#!/usr/bin/env bash
# The one GPU check: on a machine with an NVIDIA GPU (written for a lent H200: 16 cores, no
# internet), from the repository root:
#
#   OUT=/some/folder bash bench/gpu_check.sh
#
# (bench/gpu_wheels.sh, run beforehand on a machine with PyPI access, puts the wheels the GPU
# image lacks into .whl/; carry that folder along and they are installed first.)
# 1. installs the package in editable mode (so `softvq_fast.kernels` resolves) and builds
#    softvq_fast._C with its CUDA kernels (MAX_JOBS=16; CUDA_HOME from the
#    environment, else /usr/local/cuda if it has nvcc, else from nvcc on PATH; architectures
#    SOFTVQ_FAST_CUDA_ARCHS, default 9.0 here to halve the compile),
# 2. runs the benchmark suites that the open issues wait on in full mode (attention: softvq
#    against the libraries, with its error against float64; claims: 256 and 512 px, each within
#    its own budget), then the CUDA tests (`-m cuda`: attention kernels, Triton soft-VQ and
#    LayerNorm-modulate kernels, CUDA-graph sampling, tokenizer on CUDA), then the other suites
#    (layernorm_modulate, lpips_distance, soft-VQ, tokenizer, then the training steps: train,
#    tokenizer_train),
#    our CUDA attention kernel under compute-sanitizer
#    (memcheck, racecheck) and Nsight Compute, then the CPU tests with whatever time is left,
# 3. prints the stage statuses, the attention comparison and what the CUDA attention `auto` order
#    should become from it (bench/attention_order.py) last.
# $OUT receives at most 8 files (the device tool's limit): log.txt, summary.md,
# bench_results.md and bench_results.json (every suite), and details.tar.gz (per-suite files,
# PNG plots, junit XML, the Nsight Compute report as text). A
# failing or slow stage does not stop the others; each has a time limit and the whole script
# stays within CHECK_SECONDS (default 470 s, under the 8 minutes a session allows).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT/bench"
exec > >(tee -a "$OUT/log.txt") 2>&1

START=$(date +%s)
BUDGET=${CHECK_SECONDS:-470}
PYTHON=${PYTHON:-python3}
STAGES=()

# run_stage NAME LIMIT_SECONDS COMMAND...: runs with min(LIMIT, time left - 5 s), records the status.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START) - 5))
  if ((left < limit)); then limit=$left; fi
  if ((limit < 10)); then
    STAGES+=("$name: skipped (out of time)")
    echo "=== $name: skipped, out of time ==="
    return
  fi
  echo "=== $name (limit ${limit}s) ==="
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  local verdict="ok"
  if ((rc == 124 || rc == 137)); then verdict="TIMED OUT"; elif ((rc != 0)); then verdict="FAILED (rc=$rc)"; fi
  STAGES+=("$name: $verdict in $(($(date +%s) - t0)) s")
  echo "=== $name: $verdict ==="
}

if compgen -G ".whl/*.whl" > /dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
  # /usr/local/cuda first: an nvcc on PATH may be a wrapper script outside the toolkit.
  if [[ -x /usr/local/cuda/bin/nvcc ]] || ! command -v nvcc > /dev/null; then CUDA_HOME=/usr/local/cuda
  else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); fi
fi
export CUDA_HOME
export MAX_JOBS=${MAX_JOBS:-16}
export SOFTVQ_FAST_CUDA=1
export SOFTVQ_FAST_CUDA_ARCHS=${SOFTVQ_FAST_CUDA_ARCHS:-9.0}

run_stage environment 30 bash -c "nvidia-smi; '$CUDA_HOME/bin/nvcc' --version | tail -2; nproc; \
  $PYTHON -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'; \
  $PYTHON -c 'import triton; print(\"triton\", triton.__version__)'; \
  $PYTHON -c 'import diffusers; print(\"diffusers\", diffusers.__version__)' \
  || echo 'NO DIFFUSERS: the claims suite (SD-VAE baselines) will fail; carry .whl from bench/gpu_wheels.sh'"
run_stage build 200 bash -c "$PYTHON -m pip install -q --no-build-isolation --no-deps --no-index -e . \
  || { echo 'editable install failed: building in place (softvq_fast.kernels will not resolve)'; $PYTHON setup.py build_ext --inplace; }"
run_stage extension 30 $PYTHON -c "import softvq_fast, softvq_fast._extension as e; print(e.extension_status()); assert e.extension_has_cuda()"
# bench_suites SUITE:LIMIT...: the benchmark suites in full mode.
bench_suites() {
  local suite_limit suite
  for suite_limit in "$@"; do
    suite=${suite_limit%%:*}
    run_stage "bench-$suite" "${suite_limit##*:}" $PYTHON -m bench --full --suite "$suite" --out "$OUT/bench/$suite"
  done
}
# claims: its two resolutions' budgets (bench/suites/claims.py, full_setup) and the sampling-step
# comparison fit this limit.
bench_suites attention:60 claims:180
run_stage tests-cuda 120 $PYTHON -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/bench/junit-cuda.xml" --durations=10 tests
bench_suites layernorm_modulate:45 lpips_distance:30 softvq:60 tokenizer:60
# The training suites: each stays within its limit (bench/suites/train.py, tokenizer_train.py).
bench_suites train:120 tokenizer_train:120
# Then our CUDA attention kernel under compute-sanitizer (out-of-bounds or misaligned accesses;
# shared memory races) at the CUDA tests' bf16 shapes, and under Nsight Compute at the benchmark
# shapes (clocks left alone; one profiled launch per shape).
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
NCU=$(command -v ncu || echo "$CUDA_HOME/bin/ncu")
SANITIZE=("$SANITIZER" --error-exitcode 1 --kernel-name kns=attention_forward)
SANITIZE_TESTS=($PYTHON -m pytest -q -x -p no:cacheprovider tests/test_attention_cuda.py)
run_stage sanitize-memcheck 45 "${SANITIZE[@]}" --tool memcheck "${SANITIZE_TESTS[@]}" \
  -k "unaligned or (matches_float64 and dtype0)"
run_stage sanitize-racecheck 45 "${SANITIZE[@]}" --tool racecheck "${SANITIZE_TESTS[@]}" \
  -k "matches_float64 and dtype0 and (x17x17x or x129x129x or x50x700x or x200x77x)"
run_stage ncu-attention 45 bash -c "'$NCU' --clock-control none --kernel-name regex:attention_forward \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
  --section WarpStateStats $PYTHON -m bench.cuda_attention_runs > '$OUT/bench/ncu_attention.txt' 2>&1; rc=\$?; \
  grep -E 'attention_forward|Duration|Memory Throughput|Compute \\(SM\\) Throughput|Achieved Occupancy|Registers Per' \
  '$OUT/bench/ncu_attention.txt'; exit \$rc"
run_stage tests-rest 120 $PYTHON -m pytest -q -m "not cuda" -p no:cacheprovider --junitxml="$OUT/bench/junit-rest.xml" tests

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(($(date +%s) - START)) s"
  echo
  for line in "${STAGES[@]}"; do echo "- $line"; done
  echo
  $PYTHON -m bench.attention_order "$OUT/bench/attention"
} | tee "$OUT/summary.md"

# Fold the per-suite files into the few that the device tool brings back.
$PYTHON - "$OUT" << 'EOF'
import glob, json, os, sys
from bench.harness import markdown_table
out = sys.argv[1]
merged, texts = {}, []
for folder in sorted(glob.glob(os.path.join(out, "bench", "*", ""))):
    name = os.path.basename(os.path.dirname(folder))
    if os.path.exists(folder + "results.json"):
        merged[name] = json.load(open(folder + "results.json"))
        texts.append(open(folder + "results.md").read())
    elif os.path.exists(folder + name + ".partial.json"):  # stopped by its time limit
        merged[name] = json.load(open(folder + name + ".partial.json"))
        part = merged[name]["suites"][name]
        texts.append(f"## {name}: stopped by its time limit; the {len(part['rows'])} rows it finished\n\n"
                     + markdown_table(part["rows"]) + "".join(f"{n}\n" for n in part["notes"]))
json.dump(merged, open(os.path.join(out, "bench_results.json"), "w"), indent=1)
open(os.path.join(out, "bench_results.md"), "w").write("\n".join(texts))
EOF
tar czf "$OUT/details.tar.gz" -C "$OUT" bench && rm -rf "$OUT/bench"

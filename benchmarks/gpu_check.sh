#!/usr/bin/env bash
# didi device check (issue 11): one Llama-3.1-8B-sized decoder layer (hidden 4096, intermediate 14336, 32 q /
# 8 kv heads, head_dim 128) + the 128256×4096 embedding (tied), θ0 + 4 tasks in bf16 safetensors, through
# decompose → search → refine on one CUDA GPU at 1.24×: seconds per stage, peak GPU memory
# (torch.cuda.max_memory_allocated, per stage), peak host RSS. Body: benchmarks/gpu_check.py.
#
# How to run it on a GPU machine, from the repository root:
#
#     python3 -m venv .venv && . .venv/bin/activate && pip install -e .     # once (a CUDA build of torch)
#     bash benchmarks/gpu_check.sh
#
# Offline machine whose Python already has torch (CUDA), lightning, safetensors and transformers: install
# didi alone with `pip install --no-build-isolation --no-deps -e .` (didi's backbones/ and datamodules/
# import as didi.backbones / didi.datamodules only once installed). PYTHON=/path/to/python picks the
# interpreter (default: the active venv's python, else ./.venv/bin/python, else python3).
#
# Budget: about 7.5 GB of temporary files (the zoo: 5 × 1.49 GB) in a directory under ${TMPDIR:-/tmp},
# removed at the end (also after a failure or the time limit); about 20 GB of host memory while the zoo is
# written (an estimate); one GPU. Not yet run on a GPU: estimated 3-5 min on one H100/H200 (writing the zoo
# about 1 min on 16 cores; the row-streamed embedding's rows are read from the checkpoints once per stage
# and then kept on the GPU, 10.5 GB in the decomposition, 8.4 GB in the refinement, if they take at most half
# its free memory: `rows_kept` in the JSON). The whole check is cut at 470 s (GPU_CHECK_LIMIT_S) so it ends within 8
# minutes; what it measured until then is kept in the JSON, with the stage it was stopped in.
# Output: $OUT/gpu_check.json when OUT is set (the device machine returns files written under $OUT), else
# benchmarks/results/gpu_check.json; the table of stages on stderr. Exit status 2 without CUDA or without
# the packages; 124 when the time limit cut it.
# Extra arguments go to gpu_check.py (e.g. `--tasks 2`; `--device cpu --small` is the CPU test of the script).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY=python
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi

if ! "$PY" -c "import torch, lightning, safetensors, transformers, didi.backbones, didi.shards" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch, lightning, safetensors, transformers and didi (installed)." >&2
    echo "gpu_check: from the repository root: pip install -e .   (offline: pip install --no-build-isolation --no-deps -e .)" >&2
    exit 2
fi

export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
WORK="$(mktemp -d "${TMPDIR:-/tmp}/didi-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
"$PY" -c "import torch, sys; print(f'gpu_check: {sys.executable}, torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {torch.cuda.is_available()}', file=sys.stderr)"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null | sed 's/^/gpu_check: /' >&2 || true

set +e
timeout --signal=TERM --kill-after=20 "${GPU_CHECK_LIMIT_S:-470}" "$PY" benchmarks/gpu_check.py --work "$WORK/run" "$@"
rc=$?
set -e
if [[ $rc -eq 124 ]]; then
    echo "gpu_check: stopped at the ${GPU_CHECK_LIMIT_S:-470} s limit; the JSON holds the stages that finished" >&2
fi
exit $rc

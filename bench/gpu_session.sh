#!/usr/bin/env bash
# The unattended GPU session behind the issue-13 figures in bench/RESULTS.md, on a machine with two GPUs
# (the lent nvidia-h200-x2). Every phase logs to OUT and the session goes on when one fails:
#   1. GPU 0, alone: the whole Beauty pipeline from the raw files (bench/bench_pipeline.py);
#   2. GPU 1, once assign-sids is done: the LLM heads' throughput variants (bench/bench_llm_throughput.py);
#      on a machine with one GPU, GPU 0 after the pipeline (each benchmark has its GPU to itself), and
#      phases 3 and 4 are skipped;
#   3. both GPUs: the shipped fusion config under DDP (--trainer.devices 2), then `mmrec test`;
#   4. both GPUs: cost rows for Llama-3.2-1B and Llama-3-8B shapes (random weights) under FSDP.
# OUT/session.log says when each phase started; OUT/done marks the end.
#
#   bash bench/gpu_session.sh GGUF TEXT_MODEL DATA_DIR OUT
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf; TEXT_MODEL: all-MiniLM-L6-v2 folder; DATA_DIR: user_sequences.txt
# and items.csv of Amazon Beauty 2014; OUT: where logs, JSON and RESULTS.md sections go.
# PHASES (default "1 2 3 4") picks phases, e.g. PHASES="3 4" after a session that ran 1 and 2.
# The session runs longer than one remote call: start it detached (setsid nohup ... &) with an OUT that
# outlives the call (not a folder that the remote runner empties at every call), and fetch OUT when done.
set -u
GGUF=$1 TEXT=$2 DATA=$3 OUT=$4
PHASES=${PHASES:-1 2 3 4}
RUN=runs/beauty
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
RESULTS="$OUT/RESULTS.md"
GPUS=$(nvidia-smi -L | wc -l)
stamp() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }
phase() { [[ " $PHASES " == *" $1 "* ]]; }

pipeline=
if phase 1; then
  stamp "phase 1: pipeline on GPU 0"
  CUDA_VISIBLE_DEVICES=0 python3 bench/bench_pipeline.py --run_dir "$RUN" --data_dir "$DATA" --text_model "$TEXT" \
    --backbone "$GGUF" --results "$RESULTS" --json "$OUT/pipeline.json" >"$OUT/pipeline.log" 2>&1 &
  pipeline=$!
fi

if phase 2 && [ "$GPUS" -lt 2 ] && [ -n "$pipeline" ]; then
  wait "$pipeline"
  stamp "phase 1 done (one GPU: the throughput variants run after it)"
fi
if phase 2; then
  # the backbone may still be arriving when the session starts (it travels in parts): wait for it too
  until { [ -f "$RUN/assign-sids/manifest.json" ] && [ -f "$GGUF" ]; } || { [ -n "$pipeline" ] && ! kill -0 "$pipeline" 2>/dev/null; }; do sleep 5; done
  stamp "phase 2: throughput variants on GPU $((GPUS - 1))"
  if [ -f "$RUN/assign-sids/manifest.json" ]; then
    CUDA_VISIBLE_DEVICES=$((GPUS - 1)) python3 bench/bench_llm_throughput.py --run_dir "$RUN" --backbone "$GGUF" \
      --results "$RESULTS" --json "$OUT/throughput.json" >"$OUT/throughput.log" 2>&1
  fi
fi
[ -n "$pipeline" ] && wait "$pipeline"
stamp "phases 1 and 2 done"
if [ "$GPUS" -lt 2 ]; then
  stamp "one GPU: phases 3 and 4 (DDP, FSDP on 2 GPUs) skipped"
  PHASES=
fi

if phase 3; then
  stamp "phase 3: fusion head under DDP on 2 GPUs"
  DDP=runs/beauty-ddp
  rm -rf "$DDP" && mkdir -p "$DDP" && cp -r "$RUN/prepare" "$RUN/fit-collab" "$RUN/assign-sids" "$DDP/"
  {
    python3 -m mmrec.cli fit-recommender --config configs/beauty/fit-recommender.yaml --run_dir "$DDP" \
      --model.backbone.name_or_path "$GGUF" --trainer.devices 2 --trainer.strategy ddp &&
    python3 -m mmrec.cli test --config configs/beauty/test.yaml --run_dir "$DDP" --model fusion
  } >"$OUT/ddp.log" 2>&1
  python3 - "$DDP" "$OUT/ddp.json" <<'EOF'
import json, pathlib, sys
run, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
read = lambda path: json.loads(path.read_text()) if path.exists() else None
out.write_text(json.dumps({"manifest": read(run / "fit-recommender/manifest.json"),
                           "metrics": read(run / "test/fusion-test/metrics.json")}, indent=1))
EOF
fi

if phase 4; then
  stamp "phase 4: FSDP cost rows on 2 GPUs"
  FUSION="--config configs/beauty/fit-recommender.yaml --config configs/strategies/fit-recommender-fsdp.yaml --trainer.devices 2"
  LORA="--model.init_args.backbone.finetune lora --model.init_args.backbone.dtype bfloat16 --model.init_args.backbone.compile false"
  python3 bench/bench_llm_throughput.py --run_dir "$RUN" --steps 30 --skip 20 --title "FSDP on 2 GPUs, random-weight backbones" \
    --variant "Llama-3.2-1B shape, LoRA r 8, FSDP=$FUSION $LORA --model.init_args.backbone.name_or_path configs/backbones/llama-3.2-1b.json --data.batch_size 512" \
    --variant "Llama-3-8B shape, LoRA r 8, FSDP=$FUSION $LORA --model.init_args.backbone.name_or_path configs/backbones/llama-3-8b.json --data.batch_size 256" \
    --results "$RESULTS" --json "$OUT/fsdp.json" >"$OUT/fsdp.log" 2>&1
fi
stamp "session done"
touch "$OUT/done"

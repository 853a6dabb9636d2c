#!/usr/bin/env bash
# The unattended GPU session behind the issue-13 and issue-14 figures in bench/RESULTS.md, on a machine with
# two GPUs (the lent nvidia-h200-x2). Every phase logs to OUT and the session goes on when one fails:
#   ddp-throughput  both GPUs: the fusion head's tokens/s on 1 GPU, then under DDP on 2 (plain `--trainer.strategy
#                   ddp`, configs/strategies/fit-recommender-ddp.yaml, and that with a bf16 gradient all-reduce), SmolLM2-135M's
#                   shape with random weights, on the run
#                   folder THROUGHPUT_RUN (prepare, fit-collab, assign-sids; no backbone file needed);
#   pipeline        GPU 0, alone: the whole Beauty pipeline from the raw files (bench/bench_pipeline.py);
#   diagnosis       GPU 1, once the pipeline's assign-sids is done: fusion-head variants, two at a time, scored on
#                   the validation split only (bench/bench_seeds.py, one seed each, no time cap: exploratory, issue 14);
#   ddp-quality     both GPUs, after those: the shipped fusion config under DDP, then `mmrec test`, to hold
#                   against the pipeline's one-GPU run;
#   seeds           (not in the default list; with pipeline) issue 14 on the test split: SASRec for SEEDS (default
#                   42 43 44) on GPU 1 once prepare is done, then the fusion head's VARIANTS (default "distill
#                   no-distill"; the ablations: random-backbone lora no-code-embeddings random-code-init no-collab
#                   no-text head-only prefix-ngram mse-quantizer) for SEEDS on the pipeline's SASRec and SIDs, one
#                   run a GPU (GPU 1 once SASRec is done, GPU 0 once the pipeline is, any further GPU of an
#                   nvidia-h200-x4 at once), each `--trainer.max_time null` (early
#                   stopping ends it: a shared GPU would otherwise cut it short), then bench/bench_seeds.py's
#                   mean ± std and `mmrec compare` against SASRec's seeds. VAL_VARIANTS (default none) queue
#                   behind them (VAL_FIRST=1: ahead), one seed (42) each on the validation split: the next configuration's
#                   choice. SEEDS_INPUTS=DIR (prepare, fit-collab, assign-sids of an earlier session, the inputs.tgz it
#                   left in OUT) runs the variants on those, not on this session's pipeline; SASREC_TESTS=DIR (the
#                   sasrec-tests.tgz a session left, of SASRec's seeds on those inputs) skips training SASRec again.
#                   Issue 16's comparison: NEW_ITEMS=0.05
#                   (prepare's split.new_items in the pipeline), SLICES=1 (`mmrec test --slices true`), RUN=runs/beauty-new,
#                   VARIANTS="cold-start cold-start-prefix-ngram cold-start-all-bigrams cold-start-full-tuple"
#                   (PIPELINE_SKIP=fit-recommender,test-fusion,... leaves stages out of the pipeline: there only
#                   its inputs to the seeds matter, not its timing);
#   generative-seeds (not in the default list) GPU GEN_GPU (default 1): the generative head with
#                   configs/beauty/fit-recommender-generative-long.yaml for SEEDS, test split (issue 14: TIGER);
#   refinement      (not in the default list) GPU REFINE_GPU (default 1): issue 18's prepare with and without
#                   SmolLM2-refined titles, text-only SIDs and retrieval (bench/bench_text_refinement.py);
#   gpu-tests       (not in the default list) GPUs 0 and 1 once the pipeline is done: tests/test_gpu.py (`make test-gpu`:
#                   the LLM heads under FSDP and DDP over NCCL);
#   fsdp            both GPUs (not in the default list): cost rows for Llama-3.2-1B and Llama-3-8B shapes.
# OUT/session.log says when each phase started; OUT/done marks the end.
#
#   THROUGHPUT_RUN=DIR bash bench/gpu_session.sh GGUF TEXT_MODEL DATA_DIR OUT
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf (it may still be arriving: phases that need it wait for the file);
# TEXT_MODEL: all-MiniLM-L6-v2 folder; DATA_DIR: user_sequences.txt and items.csv of Amazon Beauty 2014;
# OUT: where logs, JSON and RESULTS.md sections go. PHASES (default "ddp-throughput pipeline diagnosis
# ddp-quality") picks phases. The session runs longer than one remote call: start it detached (setsid nohup
# ... &) with an OUT that outlives the call, and fetch OUT when done.
set -u
GGUF=$1 TEXT=$2 DATA=$3 OUT=$4
PHASES=${PHASES:-ddp-throughput pipeline diagnosis ddp-quality}
RUN=${RUN:-runs/beauty}
NGPU=$(nvidia-smi -L | wc -l)
FUSION=configs/beauty/fit-recommender.yaml
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
RESULTS="$OUT/RESULTS.md"
stamp() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }
phase() { [[ " $PHASES " == *" $1 "* ]]; }
wait_for() { until [ -f "$1" ]; do sleep 5; done; }
# until the pipeline has assigned SIDs (or has stopped without them)
wait_for_sids() { until [ -f "$RUN/assign-sids/manifest.json" ] || { [ -n "$pipeline" ] && ! kill -0 "$pipeline" 2>/dev/null; }; do sleep 5; done; }

if phase ddp-throughput; then
  stamp "ddp-throughput: 1 GPU, then DDP on 2"
  SHAPE="--model.init_args.backbone.name_or_path configs/backbones/smollm2-135m.json --model.init_args.modalities [collab] --model.init_args.prompt.system null"
  # NCCL_DEBUG=INFO: the log says which transport carries the all-reduce (P2P over NVLink, or SHM through the host)
  NCCL_DEBUG=INFO python3 bench/bench_llm_throughput.py --run_dir "$THROUGHPUT_RUN" --steps 80 --skip 50 \
    --title "Fusion head on 1 and 2 GPUs (DDP), SmolLM2-135M shape with random weights, Beauty sequences" \
    --variant "1 GPU=--config $FUSION $SHAPE" \
    --variant "DDP, 2 GPUs (--trainer.strategy ddp)=--config $FUSION $SHAPE --trainer.devices 2 --trainer.strategy ddp" \
    --variant "DDP, 2 GPUs (configs/strategies/fit-recommender-ddp.yaml)=--config $FUSION --config configs/strategies/fit-recommender-ddp.yaml $SHAPE --trainer.devices 2" \
    --variant "DDP, 2 GPUs (fit-recommender-ddp.yaml, bf16 gradient all-reduce)=--config $FUSION --config configs/strategies/fit-recommender-ddp.yaml $SHAPE --trainer.devices 2 --trainer.strategy.init_args.ddp_comm_hook torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook" \
    --results "$RESULTS" --json "$OUT/ddp-throughput.json" >"$OUT/ddp-throughput.log" 2>&1
fi

pipeline=
if phase pipeline; then
  wait_for "$GGUF"
  stamp "pipeline on GPU 0"
  # fresh caches: the timing is that of a new machine (no converted backbone, no compiled kernels)
  CUDA_VISIBLE_DEVICES=0 MMREC_CACHE_DIR=/tmp/pipeline-cache TORCHINDUCTOR_CACHE_DIR=/tmp/pipeline-inductor \
    TRITON_CACHE_DIR=/tmp/pipeline-triton python3 bench/bench_pipeline.py --run_dir "$RUN" --data_dir "$DATA" --text_model "$TEXT" \
    --backbone "$GGUF" ${NEW_ITEMS:+--override "prepare=--split.new_items $NEW_ITEMS"} ${PIPELINE_SKIP:+--skip "$PIPELINE_SKIP"} \
    --results "$RESULTS" --json "$OUT/pipeline.json" >"$OUT/pipeline.log" 2>&1 &
  pipeline=$!
fi

if phase gpu-tests; then  # `make test-gpu` (FSDP and DDP over NCCL on 2 GPUs), once the timed pipeline is done
  (
    while [ -n "$pipeline" ] && kill -0 "$pipeline" 2>/dev/null; do sleep 5; done
    stamp "gpu-tests on both GPUs"
    CUDA_VISIBLE_DEVICES=0,1 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py >"$OUT/gpu-tests.log" 2>&1
    stamp "gpu-tests done (exit $?)"
  ) &
fi

if phase diagnosis; then
  wait_for_sids
  BASE=runs/diagnosis-inputs
  rm -rf "$BASE" && mkdir -p "$BASE" && cp -r "$RUN/prepare" "$RUN/fit-collab" "$RUN/assign-sids" "$BASE/"
  stamp "diagnosis on GPU 1 (validation split)"
  variant() {  # NAME, then fit-recommender options ("--key value", one per argument) after the shipped config
    local name=$1 option overrides=(--override "--model.backbone.name_or_path $GGUF" --override "--trainer.max_time null")
    shift
    for option in "$@"; do overrides+=(--override "$option"); done
    CUDA_VISIBLE_DEVICES=1 MMREC_CACHE_DIR=/tmp/diagnosis-cache python3 bench/bench_seeds.py --prepared "$BASE" \
      --stage fit-recommender --config "$FUSION" "${overrides[@]}" --model fusion --seeds 42 --runs "runs/diagnosis/$name" \
      --test_config configs/beauty/test.yaml --results "$OUT/RESULTS-diagnosis.md" >"$OUT/diagnosis-$name.log" 2>&1
  }
  variant shipped & variant distill-0.5 "--model.distill_weight 0.5" & wait
  variant distill-0.8-t2 "--model.distill_weight 0.8" "--model.distill_temperature 2.0" &
  variant random-backbone "--model.backbone.name_or_path configs/backbones/smollm2-135m.json" & wait
  CUDA_VISIBLE_DEVICES=1 python3 -m mmrec.cli test --config configs/beauty/test.yaml --run_dir "$BASE" --model sasrec --split valid \
    >"$OUT/diagnosis-sasrec.log" 2>&1
fi

if phase seeds; then
  # beside the timed pipeline: fewer loader workers and threads, so that it keeps its CPU share
  export OMP_NUM_THREADS=4
  SEEDS=${SEEDS:-42 43 44}
  # issue 14's variants of the fusion head: options after the shipped config, "|" between options
  declare -A VARIANT=(
    [distill]=""
    [no-distill]="--config configs/beauty/fit-recommender-no-distill.yaml"
    [random-backbone]="--model.backbone.weights random"
    [random-backbone-20]="--model.backbone.weights random|--trainer.max_epochs 20"
    [lora]="--model.backbone.finetune lora|--model.backbone.dtype bfloat16|--model.lora_lr 1e-3"
    [no-code-embeddings]="--model.sid_modalities []"
    [random-code-init]="--config configs/beauty/fit-recommender-random-init.yaml"
    [no-collab]="--model.modalities [text]"
    [no-text]="--model.modalities [collab]"
    [head-only]="--model.scorers [head]"
    [prefix-ngram]="--model.sid_scheme prefix_ngram"
    [mse-quantizer]=""
    [distill-t2]="--model.distill_temperature 2.0"
    [distill-0.8]="--model.distill_weight 0.8"
    [distill-0.8-t2]="--model.distill_weight 0.8|--model.distill_temperature 2.0"
    [distill-0.9-t2]="--model.distill_weight 0.9|--model.distill_temperature 2.0"
    [distill-0.8-t4]="--model.distill_weight 0.8|--model.distill_temperature 4.0"
    [cold-start]="--config configs/cold-start/fit-recommender.yaml"
    [cold-start-prefix-ngram]="--config configs/cold-start/fit-recommender.yaml|--model.sid_scheme prefix_ngram"
    [cold-start-all-bigrams]="--config configs/cold-start/fit-recommender.yaml|--model.sid_scheme all_bigrams"
    [cold-start-full-tuple]="--config configs/cold-start/fit-recommender.yaml|--model.sid_scheme full_tuple"
  )
  TEST_OPTIONS=(${SLICES:+--test_option "--slices true"})
  VARIANTS=${VARIANTS:-distill no-distill}
  INPUTS=${SEEDS_INPUTS:-$RUN}  # SEEDS_INPUTS: an earlier session's inputs (rows comparable with its rows)
  LLM=runs/seeds-inputs/llm MSE=runs/seeds-inputs/llm-mse
  FUSION_OVERRIDES=(--override "--model.backbone.name_or_path $GGUF" --override "--trainer.max_time null" --override "--data.num_workers 4")
  variant_args() {  # VARIANT: bench_seeds arguments (its inputs, then its options)
    local inputs=$LLM option
    [ "$1" = mse-quantizer ] && inputs=$MSE
    printf '%s\n' --prepared "$inputs"
    IFS='|' read -ra options <<<"${VARIANT[$1]}"
    for option in "${options[@]}"; do printf '%s\n' --override "$option"; done
  }
  QUEUE=runs/seeds-queue && rm -rf "$QUEUE" && mkdir -p "$QUEUE"
  rm -f "$LLM.ready" "$MSE.ready" runs/seeds/sasrec.done
  # variant by variant (all seeds of one before the next), so that a session cut short still ends with whole
  # variants, each summarised as soon as its seeds are done
  JOBS=() TEST_JOBS=()
  for variant in $VARIANTS; do for seed in $SEEDS; do TEST_JOBS+=("$variant@$seed@test"); done; done
  VAL_JOBS=()
  for variant in ${VAL_VARIANTS:-}; do VAL_JOBS+=("$variant@42@valid"); done
  if [ -n "${VAL_FIRST:-}" ]; then JOBS=("${VAL_JOBS[@]}" "${TEST_JOBS[@]}"); else JOBS=("${TEST_JOBS[@]}" "${VAL_JOBS[@]}"); fi
  next_job() { local job; for job in "${JOBS[@]}"; do mkdir "$QUEUE/$job" 2>/dev/null && { echo "$job"; return; }; done; }
  fusion_job() {  # GPU VARIANT@SEED@SPLIT: one seed of one variant, scored on SPLIT, once its inputs are there
    local gpu=$1 variant seed split args inputs=$LLM
    IFS=@ read -r variant seed split <<<"$2"
    [ "$variant" = mse-quantizer ] && inputs=$MSE
    wait_for "$inputs.ready"
    mapfile -t args < <(variant_args "$variant")
    CUDA_VISIBLE_DEVICES=$gpu python3 bench/bench_seeds.py "${args[@]}" --stage fit-recommender --config "$FUSION" \
      "${FUSION_OVERRIDES[@]}" --model fusion --seeds "$seed" --runs "runs/seeds/fusion-$variant" --split "$split" \
      --test_config configs/beauty/test.yaml "${TEST_OPTIONS[@]}" --results "$OUT/RESULTS-seeds-single.md" \
      >"$OUT/seeds-$variant-$seed-$split.log" 2>&1
    touch "$QUEUE/$2/done"
  }
  worker() { local job; while job=$(next_job) && [ -n "$job" ]; do fusion_job "$1" "$job"; done; }
  # SASRec's seeds: the baseline of every comparison
  SASREC=${SASREC_TESTS:-runs/seeds/sasrec}
  summarise() {  # VARIANT: mean ± std over SEEDS and mmrec compare against SASRec's seeds, once its test runs are done
    local variant=$1 seed args
    for seed in $SEEDS; do wait_for "$QUEUE/$variant@$seed@test/done"; done
    wait_for runs/seeds/sasrec.done
    mapfile -t args < <(variant_args "$variant")
    python3 bench/bench_seeds.py "${args[@]}" --stage fit-recommender --config "$FUSION" "${FUSION_OVERRIDES[@]}" \
      --model fusion --seeds $SEEDS --runs "runs/seeds/fusion-$variant" --split test --test_config configs/beauty/test.yaml \
      "${TEST_OPTIONS[@]}" --baseline_runs $(for seed in $SEEDS; do echo "$SASREC/seed$seed"; done) --baseline_model sasrec \
      --results "$OUT/RESULTS.md" >"$OUT/seeds-summary-$variant.log" 2>&1
    stamp "seeds: $variant summarised"
  }
  wait_for "$INPUTS/prepare/manifest.json"
  (  # the inputs every fusion variant reads, once the pipeline has them; without SEEDS_INPUTS kept in OUT, so
     # that a later session runs its variants on the very same SASRec and SIDs (SEEDS_INPUTS=<them unpacked>)
    [ -n "${SEEDS_INPUTS:-}" ] || wait_for_sids
    mkdir -p "$LLM" && cp -r "$INPUTS/prepare" "$INPUTS/fit-collab" "$INPUTS/assign-sids" "$LLM/" && touch "$LLM.ready"
    [ -n "${SEEDS_INPUTS:-}" ] || tar -czf "$OUT/inputs.tgz" -C "$LLM" prepare fit-collab assign-sids
  ) &
  # one run a GPU: a distilling fusion run peaks at 56-72 GiB, and two of them ran out of memory on one H200.
  # GPU 0 times the pipeline and GPU 1 trains SASRec first; any further GPU (nvidia-h200-x4) starts at once
  SUMMARIES=()
  for variant in $VARIANTS; do summarise "$variant" & SUMMARIES+=($!); done
  stamp "seeds: the fusion head on $NGPU GPUs, variants: $VARIANTS"
  for ((gpu = 2; gpu < NGPU; gpu++)); do worker "$gpu" & done
  if [ -z "${SASREC_TESTS:-}" ]; then
    mkdir -p runs/seeds-inputs/sasrec && cp -r "$INPUTS/prepare" runs/seeds-inputs/sasrec/
    stamp "seeds: SASRec on GPU 1"
    SASREC_JOBS=()
    for seed in $SEEDS; do
      CUDA_VISIBLE_DEVICES=1 python3 bench/bench_seeds.py --prepared runs/seeds-inputs/sasrec --stage fit-collab \
        --config configs/beauty/fit-collab.yaml --override "--data.num_workers 2" --model sasrec --seeds "$seed" \
        --runs runs/seeds/sasrec --split test --test_config configs/beauty/test.yaml "${TEST_OPTIONS[@]}" \
        --results "$OUT/RESULTS-seeds-single.md" >"$OUT/seeds-sasrec-$seed.log" 2>&1 &
      SASREC_JOBS+=($!)
    done
    wait "${SASREC_JOBS[@]}"  # not a bare wait: that would also wait for the pipeline
    python3 bench/bench_seeds.py --prepared runs/seeds-inputs/sasrec --stage fit-collab --config configs/beauty/fit-collab.yaml \
      --override "--data.num_workers 2" --model sasrec --seeds $SEEDS --runs runs/seeds/sasrec --split test \
      --test_config configs/beauty/test.yaml "${TEST_OPTIONS[@]}" --results "$OUT/RESULTS.md" >"$OUT/seeds-summary-sasrec.log" 2>&1
    tar -czf "$OUT/sasrec-tests.tgz" -C runs/seeds/sasrec $(for seed in $SEEDS; do echo "seed$seed/test"; done)
  fi
  mkdir -p runs/seeds && touch runs/seeds/sasrec.done
  if [[ " $VARIANTS " == *" mse-quantizer "* ]]; then  # the quantizer ablation: its own SIDs, MSE reconstruction
    wait_for "$LLM.ready"
    mkdir -p "$MSE" && cp -r "$INPUTS/prepare" "$INPUTS/fit-collab" "$MSE/"
    CUDA_VISIBLE_DEVICES=1 python3 -m mmrec.cli fit-quantizer --config configs/beauty/fit-quantizer.yaml --run_dir "$MSE" \
      --model.recon_loss mse --trainer.enable_progress_bar false >"$OUT/seeds-mse-quantizer.log" 2>&1 &&
    CUDA_VISIBLE_DEVICES=1 python3 -m mmrec.cli assign-sids --config configs/beauty/assign-sids.yaml --run_dir "$MSE" \
      >>"$OUT/seeds-mse-quantizer.log" 2>&1
    rm -rf "$MSE/fit-quantizer" "$MSE"/*.work
    touch "$MSE.ready"  # also after a failure: its runs then fail at once, and the session goes on
  fi
  worker 1 &
  if [ -n "$pipeline" ]; then wait "$pipeline"; fi
  worker 0 &
  wait "${SUMMARIES[@]}"
  stamp "seeds: summaries written"
  wait
  unset OMP_NUM_THREADS
fi

if phase generative-seeds; then  # issue 14: the generative head trained to convergence, against TIGER's figures
  wait_for_sids
  mkdir -p runs/generative-inputs && cp -r "$RUN/prepare" "$RUN/fit-collab" "$RUN/assign-sids" runs/generative-inputs/
  stamp "generative-seeds on GPU ${GEN_GPU:-1}"
  CUDA_VISIBLE_DEVICES=${GEN_GPU:-1} python3 bench/bench_seeds.py --prepared runs/generative-inputs --stage fit-recommender \
    --config configs/beauty/fit-recommender-generative.yaml --config configs/beauty/fit-recommender-generative-long.yaml \
    --override "--model.init_args.backbone.name_or_path $GGUF" --model generative --seeds ${SEEDS:-42 43 44} \
    --runs runs/seeds/generative-long --split test --test_config configs/beauty/test.yaml --test_option "--batch_size 1024" \
    --results "$OUT/RESULTS.md" >"$OUT/generative-seeds.log" 2>&1
fi

if phase refinement; then  # issue 18: prepare with and without SmolLM2-refined titles (bench/bench_text_refinement.py)
  wait_for "$GGUF"
  stamp "refinement on GPU ${REFINE_GPU:-1}"
  CUDA_VISIBLE_DEVICES=${REFINE_GPU:-1} python3 bench/bench_text_refinement.py --runs runs/refine-bench --model "$GGUF" \
    --prepare_option "--text.model $TEXT" --prepare_option "--source.init_args.sequences $DATA/user_sequences.txt" \
    --prepare_option "--source.init_args.items $DATA/items.csv" --results "$OUT/RESULTS.md" >"$OUT/refinement.log" 2>&1
fi

[ -n "$pipeline" ] && wait "$pipeline"
stamp "pipeline and diagnosis done"

if phase ddp-quality; then
  stamp "ddp-quality: the shipped fusion config on 2 GPUs"
  DDP=runs/beauty-ddp
  rm -rf "$DDP" && mkdir -p "$DDP" && cp -r "$RUN/prepare" "$RUN/fit-collab" "$RUN/assign-sids" "$DDP/"
  {
    python3 -m mmrec.cli fit-recommender --config "$FUSION" --run_dir "$DDP" --trainer.enable_progress_bar false \
      --model.backbone.name_or_path "$GGUF" --trainer.devices 2 --trainer.strategy ddp &&
    python3 -m mmrec.cli test --config configs/beauty/test.yaml --run_dir "$DDP" --model fusion
  } >"$OUT/ddp-quality.log" 2>&1
  cp "$DDP/fit-recommender/manifest.json" "$OUT/ddp-quality-manifest.json" 2>/dev/null
  cp "$DDP/test/fusion-test/metrics.json" "$OUT/ddp-quality-metrics.json" 2>/dev/null
fi

if phase fsdp; then
  stamp "fsdp: cost rows on 2 GPUs"
  FSDP="--config $FUSION --config configs/strategies/fit-recommender-fsdp.yaml --trainer.devices 2"
  LORA="--model.init_args.backbone.finetune lora --model.init_args.backbone.dtype bfloat16 --model.init_args.backbone.compile false"
  python3 bench/bench_llm_throughput.py --run_dir "$RUN" --steps 30 --skip 20 --title "FSDP on 2 GPUs, random-weight backbones" \
    --variant "Llama-3.2-1B shape, LoRA r 8, FSDP=$FSDP $LORA --model.init_args.backbone.name_or_path configs/backbones/llama-3.2-1b.json --data.batch_size 512" \
    --variant "Llama-3-8B shape, LoRA r 8, FSDP=$FSDP $LORA --model.init_args.backbone.name_or_path configs/backbones/llama-3-8b.json --data.batch_size 256" \
    --results "$RESULTS" --json "$OUT/fsdp.json" >"$OUT/fsdp.log" 2>&1
fi
wait
# validation curves and every stage's manifest (fit, validation and training seconds: where a stage's time went)
(cd runs && find diagnosis beauty beauty-ddp seeds \( -path '*logs*' -name metrics.csv \) -o -name manifest.json 2>/dev/null |
  tar -czf "$OUT/curves.tgz" -T -)
stamp "session done"
touch "$OUT/done"

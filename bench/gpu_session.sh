#!/usr/bin/env bash
# The unattended GPU session behind the device figures of bench/RESULTS.md (issues 13, 14, 16 and 18), on a
# machine with one, two or four GPUs (the lent nvidia-h200, -x2 or -x4). Every phase logs to OUT and the session goes on
# when one fails:
#   ddp-throughput  (not in the default list) both GPUs: the fusion head's tokens/s on 1 GPU, then under DDP on 2
#                   (plain `--trainer.strategy ddp`, configs/strategies/fit-recommender-ddp.yaml, and that with a
#                   bf16 gradient all-reduce), SmolLM2-135M's shape with random weights, on the run folder
#                   THROUGHPUT_RUN (prepare, fit-collab, assign-sids; no backbone file needed);
#   ddp-throughput-shipped  (not in the default list) both GPUs, alone, before everything else: the same on the
#                   shipped config with the real backbone (GGUF) on the llm inputs, 100 steps, 1 GPU and DDP;
#   pipeline        GPU 0, alone: the whole Beauty pipeline from the raw files (bench/bench_pipeline.py) in RUN
#                   (default runs/beauty);
#   seeds           the variants' seeds and what they need, jobs of the queue below;
#   refinement      (not in the default list) one job of the queue, its last (REFINE_FIRST=1: its first, so that
#                   it holds one GPU from the start; never beside a training job: session 15 ran it beside a
#                   generative run, which held 135 of the H200's 140 GiB, and every generation batch ran out of
#                   memory): issue 18's prepare with and without SmolLM2-refined titles, text-only SIDs and
#                   retrieval (bench/bench_text_refinement.py); REFINE_FUSION=1: then the fusion head on both, SEEDS
#                   each (every variant made here: the text-SID collisions of identical titles were 113 on an H200
#                   and 139 on a CPU, so a variant made on another machine would measure the machine too);
#   gpu-tests       GPUs 0 and 1 once the pipeline is done: tests/test_gpu.py (`make test-gpu`: the LLM heads
#                   under FSDP and DDP over NCCL), beside the queue's jobs;
#   ddp-quality     the shipped fusion config under DDP on 2 GPUs (configs/strategies/fit-recommender-ddp.yaml),
#                   seed 42, as the queue's fusion runs train (no time cap), then `mmrec test`: its whole-run tokens/s
#                   and quality, to hold against the same config's one-GPU run on the same llm inputs in the same
#                   session (the queue's first job, shipped@42@test). With 4 GPUs or more it runs first on the last
#                   two, whose workers start after it; on two or three, first on GPUs 0 and 1, then the one-GPU run
#                   on GPU 0, both alone, before any worker starts, unless the pipeline phase holds GPU 0 (then after
#                   everything else); on one GPU only the one-GPU run, the queue's first job (its epoch-boundary and
#                   checkpoint-staging seconds, which do not need a second GPU);
#   fsdp            both GPUs (not in the default list): cost rows for Llama-3.2-1B and Llama-3-8B shapes.
# OUT/session.log says when each phase and each job started; OUT/done marks the end.
#
# The job queue (phases seeds and refinement): one worker a GPU (GPU 0's once the pipeline phase is done, the
# others at once) takes the queue's jobs in order, one at a time: one run a GPU, since a distilling fusion run
# peaks at 56-72 GiB and two of them ran out of memory on one H200. A job whose inputs are not there yet waits
# on its GPU for their ready mark; the jobs that make inputs are queued first, so that such waits stay short.
# The jobs, in queue order:
#   inputs@new      issue 16's inputs: bench/bench_pipeline.py's prepare (NEW_ITEMS, default 0.05, of the items
#                   held out of training: the new-item protocol), fit-collab, fit-quantizer and assign-sids in
#                   runs/beauty-new, then SASRec's SEEDS on that prepare (queued when a variant reads them and
#                   NEW_INPUTS is not given; NEW_BESIDE=1: never queued, but run on GPU 0 beside its queue (after
#                   ddp-quality's one-GPU timing run, where that phase runs), whether or not a variant reads them: a
#                   later session's NEW_INPUTS);
#   sasrec@llm      SASRec's SEEDS (default 42 43 44) on the llm inputs' prepare (queued when a variant is tested
#                   on the llm or mse inputs and SASREC_TESTS is not given);
#   sasrec@new      the same on NEW_INPUTS' prepare (queued when NEW_INPUTS is given and NEW_SASREC_TESTS is not;
#                   NEW_BESIDE=1: never queued, but run on GPU 0 beside its queue like inputs@new, so that the
#                   variants that compare with it need not wait for it);
#   inputs@mse      the quantizer ablation's SIDs: llm's prepare and fit-collab, a quantizer with MSE
#                   reconstruction (queued when a variant reads them);
#   VARIANT@SEED@SPLIT  one seed of one variant of the VARIANT table (bench/bench_seeds.py: its head's config,
#                   then its options, on its inputs), scored on SPLIT. VARIANTS (default "distill no-distill"; "" none) are
#                   tested variant by variant, SEEDS each, so that a session cut short ends with whole variants; a
#                   word VARIANT@valid in VARIANTS scores one seed (42) on the validation split in that place, the
#                   next configuration's choice; a word VARIANT@SEED tests that one seed in that place, not
#                   summarised (a seed an earlier session's cut left out: its figures go to
#                   OUT/RESULTS-seeds-single.md); VAL_VARIANTS (default none) are such words after VARIANTS
#                   (VAL_FIRST=1: ahead of them). Once a variant's test seeds are done, bench_seeds.py's mean ± std
#                   and `mmrec compare` against SASRec's seeds on the same prepare go to OUT/RESULTS.md;
#   refinement      (above).
# The heads: fusion (configs/beauty/fit-recommender.yaml, `--trainer.max_time null`: early stopping ends it, a
# shared host would otherwise cut it short) and generative (configs/beauty/fit-recommender-generative.yaml,
# tested at `--batch_size 1024`). The inputs (prepare, fit-collab, assign-sids) and the SASRec seeds they compare with:
#   llm  this session's pipeline run RUN (kept in OUT/inputs.tgz), or SEEDS_INPUTS=DIR: an earlier session's
#        inputs.tgz unpacked (waited for: DIR/prepare/manifest.json), so that the rows of both sessions read the
#        very same SASRec and SIDs; SASRec: sasrec@llm (kept in OUT/sasrec-tests.tgz), or SASREC_TESTS=DIR: an
#        earlier session's sasrec-tests.tgz unpacked (waited for: DIR/seed<last of SEEDS>/test/sasrec-test/metrics.json);
#   mse  llm with inputs@mse's SIDs; llm's SASRec;
#   new  inputs@new's (kept in OUT/inputs-new.tgz), or NEW_INPUTS=DIR: an earlier session's inputs-new.tgz
#        unpacked (waited for: DIR/assign-sids/manifest.json); SASRec: the seeds inputs@new trains (kept in
#        OUT/sasrec-new-tests.tgz), sasrec@new where NEW_INPUTS is given, or NEW_SASREC_TESTS=DIR: an earlier
#        session's sasrec-new-tests.tgz unpacked; every test with `--slices true` (new, head, torso, tail,
#        history length).
#
#   THROUGHPUT_RUN=DIR bash bench/gpu_session.sh GGUF TEXT_MODEL DATA_DIR OUT
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf (it may still be arriving: phases and jobs that need it wait for the file);
# TEXT_MODEL: all-MiniLM-L6-v2 folder; DATA_DIR: user_sequences.txt and items.csv of Amazon Beauty 2014;
# OUT: where logs, JSON and RESULTS.md sections go. PHASES (default "pipeline gpu-tests seeds ddp-quality")
# picks phases. The session runs longer than one remote call: start it detached (setsid nohup
# ... &) with an OUT that outlives the call, and fetch OUT when done.
set -u
GGUF=$1 TEXT=$2 DATA=$3 OUT=$4
PHASES=${PHASES:-pipeline gpu-tests seeds ddp-quality}
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

if phase ddp-throughput-shipped; then
  # the shipped config itself (SmolLM2's weights, every modality, the system prompt, distillation) on the llm inputs:
  # whether its steps scale as the random-weight shape's did (1.93x, session 6) or as its whole runs do (1.66x steady)
  INPUTS=${SEEDS_INPUTS:-$RUN}
  wait_for "$GGUF"
  wait_for "$INPUTS/assign-sids/manifest.json"
  stamp "ddp-throughput-shipped: 1 GPU, then DDP on 2"
  python3 bench/bench_llm_throughput.py --run_dir "$INPUTS" --work_dir /tmp/ddp-throughput-shipped --backbone "$GGUF" \
    --steps 100 --skip 70 --title "The shipped fusion config on 1 and 2 GPUs (DDP), SmolLM2-135M-Instruct, Beauty" \
    --variant "1 GPU=--config $FUSION" \
    --variant "DDP, 2 GPUs (configs/strategies/fit-recommender-ddp.yaml)=--config $FUSION --config configs/strategies/fit-recommender-ddp.yaml --trainer.devices 2" \
    --results "$RESULTS" --json "$OUT/ddp-throughput-shipped.json" >"$OUT/ddp-throughput-shipped.log" 2>&1
  stamp "ddp-throughput-shipped done (exit $?)"
fi

pipeline=
if phase pipeline; then
  wait_for "$GGUF"
  stamp "pipeline on GPU 0"
  # fresh caches: the timing is that of a new machine (no converted backbone, no compiled kernels)
  CUDA_VISIBLE_DEVICES=0 MMREC_CACHE_DIR=/tmp/pipeline-cache TORCHINDUCTOR_CACHE_DIR=/tmp/pipeline-inductor \
    TRITON_CACHE_DIR=/tmp/pipeline-triton python3 bench/bench_pipeline.py --run_dir "$RUN" --data_dir "$DATA" --text_model "$TEXT" \
    --backbone "$GGUF" --results "$RESULTS" --json "$OUT/pipeline.json" >"$OUT/pipeline.log" 2>&1 &
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

if phase seeds || phase refinement || phase ddp-quality; then
  # beside the timed pipeline and each other: fewer loader workers and threads a job, so that each keeps its CPU share
  export OMP_NUM_THREADS=4
  SEEDS=${SEEDS:-42 43 44}
  NEW_ITEMS=${NEW_ITEMS:-0.05}
  # the variants (issues 14 and 16): options after their head's config, "|" between options; a "--config FILE"
  # option becomes one of bench_seeds' --config layers
  declare -A VARIANT=(
    [distill]=""
    # the same, under the name ddp-quality's one-GPU reference goes by
    [shipped]=""
    [no-distill]="--config configs/beauty/fit-recommender-no-distill.yaml"
    [random-backbone]="--model.backbone.weights random"
    [random-backbone-20]="--model.backbone.weights random|--trainer.max_epochs 20"
    [lora]="--model.backbone.finetune lora|--model.backbone.dtype bfloat16|--model.lora_lr 1e-3"
    [no-code-embeddings]="--model.sid_modalities []"
    # item vectors from the code embeddings alone; the collab and text scorers still read their raw embeddings
    [no-raw-embeddings]="--model.modalities []|--model.sid_modalities [collab, text]|--model.scorers [head, collab, text]"
    [codebook-code-init]="--config configs/beauty/fit-recommender-codebook-init.yaml"
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
    # issue 14 against TIGER: trained to convergence (up to 16 epochs, early stopping, a 9-minute cap)
    [generative-long]="--config configs/beauty/fit-recommender-generative-long.yaml"
    # its next candidates (issue 14's levers for the generative head), to be chosen on validation: SID token rows
    # at random instead of from the codebooks; each history SID followed by the first 6 tokens of the item's title
    # (LC-Rec), some 1.8x the prompt tokens, so half the batch (the shipped batch peaks at 87 GiB of one H200)
    [generative-long-random-init]="--config configs/beauty/fit-recommender-generative-long.yaml|--model.init_args.code_init random"
    [generative-long-titles]="--config configs/beauty/fit-recommender-generative-long.yaml|--model.init_args.with_titles true|--model.init_args.title_tokens 6|--data.batch_size 512"
    # TIGER's own setting: the history and the target written as text SIDs (the item's content) instead of collab SIDs
    [generative-long-text-sids]="--config configs/beauty/fit-recommender-generative-long.yaml|--model.init_args.sid_modality text"
    # issue 16: text SIDs, since no new item has a collab SID, and `mmrec test --slices true` refuses a model that
    # cannot write some of the targets; trained to convergence, as the fusion rows it is compared with (early
    # stopping, no time cap)
    [new-items-generative]="--config configs/beauty/fit-recommender-generative-long.yaml|--model.init_args.sid_modality text"
    # the shipped config on 2 GPUs under DDP: ddp_job's, never a queued job (a worker holds one GPU)
    [ddp]="--config configs/strategies/fit-recommender-ddp.yaml|--trainer.devices 2"
  )
  # a variant's head where it is not the fusion head, and its inputs where they are not llm
  declare -A HEAD_OF=([generative-long]=generative [generative-long-random-init]=generative
    [generative-long-titles]=generative [generative-long-text-sids]=generative [new-items-generative]=generative)
  declare -A INPUTS_OF=([mse-quantizer]=mse [cold-start]=new [cold-start-prefix-ngram]=new [cold-start-all-bigrams]=new
    [cold-start-full-tuple]=new [new-items-generative]=new)
  declare -A CONFIG_OF=([fusion]=$FUSION [generative]=configs/beauty/fit-recommender-generative.yaml)
  # options of every run of a head: the backbone file (the generative config nests its model under init_args)
  declare -A HEAD_OPTIONS=(
    [fusion]="--model.backbone.name_or_path $GGUF|--trainer.max_time null|--data.num_workers 4"
    [generative]="--model.init_args.backbone.name_or_path $GGUF|--data.num_workers 4"
  )
  # `mmrec test` options of a head (beam search keeps one prompt cache row per user) and of the inputs
  declare -A HEAD_TEST=([fusion]="" [generative]="--batch_size 1024")
  declare -A INPUTS_TEST=([llm]="" [mse]="" [new]="--slices true")
  baseline_of() { if [ "$1" = new ]; then echo new; else echo llm; fi; }  # INPUTS: whose SASRec seeds they compare with
  sasrec_tests() { if [ "$1" = llm ]; then echo "${SASREC_TESTS:-}"; else echo "${NEW_SASREC_TESTS:-}"; fi; }  # INPUTS: given ones
  sasrec_runs() { if [ "$1" = llm ]; then echo "${SASREC_TESTS:-runs/seeds/sasrec}"; else echo "${NEW_SASREC_TESTS:-runs/seeds/sasrec-$1}"; fi; }
  baseline_mark() {  # INPUTS: the file that says SASRec's seeds for them are there
    if [ -n "$(sasrec_tests "$1")" ]; then echo "$(sasrec_tests "$1")/seed${SEEDS##* }/test/sasrec-test/metrics.json"
    else echo "runs/seeds/sasrec-$1.done"; fi
  }

  bench_args() {  # VARIANT SPLIT: its bench/bench_seeds.py arguments but --seeds and --results, one a line
    local variant=$1 split=$2 head=${HEAD_OF[$1]:-fusion} inputs=${INPUTS_OF[$1]:-llm} option options runs=runs/seeds/$1
    [ "$split" = valid ] && runs+=-valid  # not the test runs' folders: bench_seeds clears a seed's folder to train it
    printf '%s\n' --prepared "runs/seeds-inputs/$inputs" --stage fit-recommender --model "$head" \
      --config "${CONFIG_OF[$head]}" --runs "$runs" --split "$split" --test_config configs/beauty/test.yaml
    IFS='|' read -ra options <<<"${VARIANT[$variant]}|${HEAD_OPTIONS[$head]}"
    for option in "${options[@]}"; do
      case $option in
        "") ;;
        "--config "*) printf '%s\n' --config "${option#--config }" ;;
        *) printf '%s\n' --override "$option" ;;
      esac
    done
    for option in "${HEAD_TEST[$head]}" "${INPUTS_TEST[$inputs]}"; do [ -z "$option" ] || printf '%s\n' --test_option "$option"; done
  }
  seeds_done() {  # RUNS MODEL SEED...: whether every seed's test metrics are there
    local runs=$1 model=$2 seed
    shift 2
    for seed in "$@"; do [ -f "$runs/seed$seed/test/$model-test/metrics.json" ] || return 1; done
  }

  # the jobs
  variant_job() {  # GPU VARIANT SEED SPLIT
    local gpu=$1 variant=$2 seed=$3 split=$4 args
    wait_for "runs/seeds-inputs/${INPUTS_OF[$variant]:-llm}.ready"
    wait_for "$GGUF"
    mapfile -t args < <(bench_args "$variant" "$split")
    CUDA_VISIBLE_DEVICES=$gpu python3 bench/bench_seeds.py "${args[@]}" --seeds "$seed" \
      --results "$OUT/RESULTS-seeds-single.md" >"$OUT/seeds-$variant-$seed-$split.log" 2>&1
    keep_manifest "runs/seeds/$variant$([ "$split" = valid ] && echo -valid)/seed$seed" "$variant-$seed-$split"
    if [ "${HEAD_OF[$variant]:-fusion}" = generative ] && [ "$split" = valid ]; then
      beam_sweep "$gpu" "runs/seeds/$variant-valid/seed$seed" "$variant-$seed"
    fi
  }
  beam_sweep() {  # GPU RUN_DIR NAME: a trained generative model re-decoded on validation with BEAMS (default 10 50)
    # beams beside its own (20), then at its own width with renormalized scores: issue 14's decoding levers, a few
    # seconds each, no retraining; OUT/RESULTS-beams.md
    local gpu=$1 run=$2 name=$3 beams folder options
    [ -f "$run/fit-recommender-generative/manifest.json" ] || return 0
    for beams in own ${BEAMS:-10 50} renorm; do
      folder=$run/test/generative-valid options=()
      case $beams in
        own) ;;
        renorm) folder+=-renorm options=(--renormalize true) ;;
        *) folder+=-beams$beams options=(--num_beams "$beams") ;;
      esac
      if [ ${#options[@]} -gt 0 ]; then
        CUDA_VISIBLE_DEVICES=$gpu python3 -m mmrec.cli test --config configs/beauty/test.yaml --run_dir "$run" \
          --model generative --split valid --batch_size 512 "${options[@]}" >>"$OUT/beams-$name.log" 2>&1
      fi
      python3 - "$folder/metrics.json" "$name" >>"$OUT/RESULTS-beams.md" <<'PY'
import json, sys
path, name = sys.argv[1:]
try:
    document = json.load(open(path))
except OSError:
    print(f"| {name} | {path} | failed | | |")
else:
    metrics = document["metrics"]
    protocol = document["protocol"]
    scores = "renormalized" if protocol.get("renormalize") else "model"
    print(f"| {name} | {protocol.get('num_beams')} | {scores} | {metrics['recall@10']:.4f} | {metrics['ndcg@10']:.4f} |")
PY
    done
    # the renormalized decode against the model's own, paired over the validation users (the same model: only
    # the scoring differs)
    compare_section "$OUT/RESULTS-beams.md" "$name: renormalized against its own scores, validation split" \
      --baseline "$run/test/generative-valid" --candidate "$run/test/generative-valid-renorm"
  }
  compare_section() {  # FILE TITLE ARGS...: `mmrec compare ARGS` appended to FILE under TITLE, as a code block
    local file=$1 title=$2
    shift 2
    { echo; echo "$title"; echo; echo '```'; python3 -m mmrec.cli compare "$@" 2>&1; echo '```'; } >>"$file"
  }
  keep_manifest() {  # RUN_DIR NAME: its LLM head's manifest (tokens/s, training seconds) in OUT at once, not only
    # in curves.tgz at the session's end, which a session cut short never reaches; nothing when the run failed
    local manifest
    mkdir -p "$OUT/manifests"
    for manifest in "$1"/fit-recommender*/manifest.json; do
      [ -f "$manifest" ] && cp "$manifest" "$OUT/manifests/$2.json"
    done
    return 0
  }
  sasrec_job() {  # GPU INPUTS: SASRec's seeds side by side on one GPU (each needs under 1 GiB), then their summary
    local gpu=$1 inputs=$2 runs seed pids=() args
    runs=$(sasrec_runs "$inputs")
    args=(--prepared "runs/seeds-inputs/sasrec-$inputs" --stage fit-collab --config configs/beauty/fit-collab.yaml
      --override "--data.num_workers 2" --model sasrec --runs "$runs" --split test --test_config configs/beauty/test.yaml)
    [ -z "${INPUTS_TEST[$inputs]}" ] || args+=(--test_option "${INPUTS_TEST[$inputs]}")
    wait_for "runs/seeds-inputs/$inputs.prepared"
    for seed in $SEEDS; do
      CUDA_VISIBLE_DEVICES=$gpu python3 bench/bench_seeds.py "${args[@]}" --seeds "$seed" \
        --results "$OUT/RESULTS-seeds-single.md" >"$OUT/seeds-sasrec-$inputs-$seed.log" 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"
    # only on seeds that are done: bench_seeds would train a missing one again, on whichever GPU
    if seeds_done "$runs" sasrec $SEEDS; then
      CUDA_VISIBLE_DEVICES=$gpu python3 bench/bench_seeds.py "${args[@]}" --seeds $SEEDS --results "$OUT/RESULTS.md" \
        >"$OUT/seeds-summary-sasrec-$inputs.log" 2>&1
      # kept for a later session's SASREC_TESTS or NEW_SASREC_TESTS
      tar -czf "$OUT/$([ "$inputs" = llm ] && echo sasrec-tests || echo "sasrec-$inputs-tests").tgz" -C "$runs" \
        $(for seed in $SEEDS; do echo "seed$seed/test"; done)
    fi
    touch "runs/seeds/sasrec-$inputs.done"  # also after a failure: the summaries then go without a comparison
  }
  publish() {  # INPUTS RUN_DIR STAGES...: copy the stages' folders, then mark them ready (also after a failure:
    # the jobs that read them then fail at once, and the session goes on)
    local inputs=$1 run=$2 stage
    shift 2
    mkdir -p "runs/seeds-inputs/$inputs"
    for stage in "$@"; do cp -r "$run/$stage" "runs/seeds-inputs/$inputs/"; done
    touch "runs/seeds-inputs/$inputs.ready"
  }
  publish_prepare() {  # INPUTS RUN_DIR: the prepare SASRec's seeds copy (only it: their fit-collab is their own)
    mkdir -p "runs/seeds-inputs/sasrec-$1" && cp -r "$2/prepare" "runs/seeds-inputs/sasrec-$1/"
    touch "runs/seeds-inputs/$1.prepared"
  }
  new_items_job() {  # GPU: the pipeline's stages before the LLM heads, new items held out, then SASRec on them
    local gpu=$1 run=runs/beauty-new
    CUDA_VISIBLE_DEVICES=$gpu python3 bench/bench_pipeline.py --run_dir "$run" --data_dir "$DATA" --text_model "$TEXT" \
      --stages prepare,fit-collab,fit-quantizer,assign-sids --override "prepare=--split.new_items $NEW_ITEMS" \
      --results "$OUT/RESULTS-new-items.md" --json "$OUT/new-items-pipeline.json" >"$OUT/seeds-new-items-pipeline.log" 2>&1
    publish new "$run" prepare fit-collab assign-sids
    publish_prepare new "$run"
    # a later session's NEW_INPUTS: its rows then read the very same SASRec and SIDs as this session's
    tar -czf "$OUT/inputs-new.tgz" -C runs/seeds-inputs/new prepare fit-collab assign-sids
    [ -n "${NEW_SASREC_TESTS:-}" ] || sasrec_job "$gpu" new
  }
  mse_job() {  # GPU: llm's prepare and fit-collab, the SIDs of a quantizer trained with MSE reconstruction
    local gpu=$1 run=runs/mse-quantizer
    wait_for runs/seeds-inputs/llm.ready
    rm -rf "$run" && mkdir -p "$run" && cp -r runs/seeds-inputs/llm/prepare runs/seeds-inputs/llm/fit-collab "$run/"
    CUDA_VISIBLE_DEVICES=$gpu python3 -m mmrec.cli fit-quantizer --config configs/beauty/fit-quantizer.yaml --run_dir "$run" \
      --model.recon_loss mse --trainer.enable_progress_bar false >"$OUT/seeds-mse-quantizer.log" 2>&1 &&
    CUDA_VISIBLE_DEVICES=$gpu python3 -m mmrec.cli assign-sids --config configs/beauty/assign-sids.yaml --run_dir "$run" \
      >>"$OUT/seeds-mse-quantizer.log" 2>&1
    publish mse "$run" prepare fit-collab assign-sids
  }
  refinement_job() {  # GPU
    local fusion=()
    wait_for "$GGUF"
    [ -z "${REFINE_FUSION:-}" ] || fusion=(--fusion_seeds $SEEDS --fusion_option "--model.backbone.name_or_path $GGUF"
      --fusion_option "--data.num_workers 4")
    # batches of 1,024 prompts, not the script's 256: a 135M model's greedy step is mostly per-step overhead at these
    # sizes, so a quarter of the steps. Session 16, alone on an H200: 1,258 s for Beauty's 12,066 distinct titles
    # (11 generations each), 57 GiB of GPU memory held (the evaluate and refine prompts carry description and verdict)
    CUDA_VISIBLE_DEVICES=$1 python3 bench/bench_text_refinement.py --runs runs/refine-bench --model "$GGUF" --batch_size 1024 \
      --prepare_option "--text.model $TEXT" --prepare_option "--source.init_args.sequences $DATA/user_sequences.txt" \
      --prepare_option "--source.init_args.items $DATA/items.csv" "${fusion[@]}" --results "$OUT/RESULTS.md" \
      >"$OUT/refinement.log" 2>&1
  }
  run_job() {  # GPU JOB
    local gpu=$1 job=$2 variant seed split
    stamp "job $job on GPU $gpu"
    case $job in
      inputs@new) new_items_job "$gpu" ;;
      sasrec@llm) sasrec_job "$gpu" llm ;;
      sasrec@new) sasrec_job "$gpu" new ;;
      inputs@mse) mse_job "$gpu" ;;
      refinement) refinement_job "$gpu" ;;
      *) IFS=@ read -r variant seed split <<<"$job" && variant_job "$gpu" "$variant" "$seed" "$split" ;;
    esac
    stamp "job $job done on GPU $gpu (exit $?)"
    touch "$QUEUE/$job/done"
  }
  summarise() {  # VARIANT: mean ± std over SEEDS and `mmrec compare` against SASRec's seeds, once its test runs are done
    local variant=$1 seed args baseline compare=() against="no SASRec seeds: they failed" head=${HEAD_OF[$1]:-fusion}
    baseline=$(baseline_of "${INPUTS_OF[$variant]:-llm}")
    for seed in $SEEDS; do wait_for "$QUEUE/$variant@$seed@test/done"; done
    wait_for "$(baseline_mark "$baseline")"
    mapfile -t args < <(bench_args "$variant" test)
    # only on seeds that are done: bench_seeds would train a missing one again, on whichever GPU
    if ! seeds_done "runs/seeds/$variant" "$head" $SEEDS; then stamp "seeds: $variant not summarised: a seed failed"; return; fi
    if seeds_done "$(sasrec_runs "$baseline")" sasrec $SEEDS; then
      against=$(sasrec_runs "$baseline")
      compare=(--baseline_model sasrec --baseline_runs $(for seed in $SEEDS; do echo "$against/seed$seed"; done))
    fi
    python3 bench/bench_seeds.py "${args[@]}" --seeds $SEEDS "${compare[@]}" --results "$OUT/RESULTS.md" \
      >"$OUT/seeds-summary-$variant.log" 2>&1
    stamp "seeds: $variant summarised (exit $?; against $against)"
    local other
    case $variant in
      cold-start) for other in "${TESTED[@]}"; do [[ $other == cold-start-* ]] && compare_scheme "$other"; done ;;
      cold-start-*) compare_scheme "$variant" ;;
    esac
    return 0
  }
  compare_scheme() {  # VARIANT (cold-start-*): issue 16's question, its seeds against `sum`'s (cold-start), paired,
    # slice by slice; once, when both are done (each side's summary asks: whichever ends last does it)
    local variant=$1 seed baseline=() candidate=()
    seeds_done runs/seeds/cold-start fusion $SEEDS && seeds_done "runs/seeds/$variant" fusion $SEEDS || return 0
    mkdir "$QUEUE/compare-$variant" 2>/dev/null || return 0
    for seed in $SEEDS; do
      baseline+=("runs/seeds/cold-start/seed$seed/test/fusion-test")
      candidate+=("runs/seeds/$variant/seed$seed/test/fusion-test")
    done
    compare_section "$OUT/RESULTS-schemes.md" "## $variant against cold-start (sum), test split, seeds $SEEDS, by slice" \
      --baseline "${baseline[@]}" --candidate "${candidate[@]}" --slices true --output "runs/seeds/compare-cold-start-vs-$variant.json"
  }
  ddp_job() {  # GPUS ("2,3"): the shipped fusion config under DDP on those two, seed 42 of the llm inputs, tested
    wait_for runs/seeds-inputs/llm.ready
    wait_for "$GGUF"
    stamp "ddp-quality on GPUs $1"
    local args
    mapfile -t args < <(bench_args ddp test)
    CUDA_VISIBLE_DEVICES=$1 fresh_caches ddp python3 bench/bench_seeds.py "${args[@]}" --seeds 42 \
      --results "$OUT/RESULTS-ddp.md" >"$OUT/ddp-quality.log" 2>&1
    stamp "ddp-quality done (exit $?)"
    keep_manifest runs/seeds/ddp/seed42 ddp-42-test
  }
  fresh_caches() {  # NAME COMMAND...: COMMAND with compile caches of its own, empty, as on a new machine: the DDP
    # run and its one-GPU reference each compile from nothing (a reference reusing the DDP run's compiled graphs
    # would start faster and understate the ratio's cost of compiling on two GPUs at once)
    local dir=/tmp/fresh-caches/$1
    shift
    rm -rf "$dir" && TORCHINDUCTOR_CACHE_DIR=$dir/inductor TRITON_CACHE_DIR=$dir/triton "$@"
  }
  worker() {  # GPU: its jobs, until the queue has none left
    local job
    while job=$(next_job) && [ -n "$job" ]; do run_job "$1" "$job"; done
  }
  next_job() { local job; for job in "${JOBS[@]}"; do mkdir "$QUEUE/$job" 2>/dev/null && { echo "$job"; return; }; done; }

  # the queue: the jobs that make inputs, then the variants' seeds, the refinement last (or first)
  SEED_JOBS=() TESTED=()
  declare -A READ=()  # the inputs the variants read
  WORDS=$(for variant in ${VAL_VARIANTS:-}; do echo "$variant@valid"; done)
  # VARIANTS="" (set but empty): no test variants, only VAL_VARIANTS
  if [ -n "${VAL_FIRST:-}" ]; then WORDS="$WORDS ${VARIANTS-distill no-distill}"; else WORDS="${VARIANTS-distill no-distill} $WORDS"; fi
  phase seeds || WORDS=
  phase ddp-quality && READ[llm]=1
  for word in $WORDS; do
    case $word in
      *@valid) variant=${word%@valid} job=$variant@42@valid ;;
      *@*)
        variant=${word%@*} job=$word@test
        if [[ ! ${word##*@} =~ ^[0-9]+$ ]]; then stamp "seeds: $word is neither VARIANT@valid nor VARIANT@SEED, left out"; continue; fi ;;
      *) variant=$word job= ;;
    esac
    if [ -z "${VARIANT[$variant]+set}" ]; then stamp "seeds: no variant $variant, left out"; continue; fi
    READ[${INPUTS_OF[$variant]:-llm}]=1
    if [ -z "$job" ]; then
      TESTED+=("$variant")
      for seed in $SEEDS; do SEED_JOBS+=("$variant@$seed@test"); done
    else
      SEED_JOBS+=("$job")
    fi
  done
  NEW_JOB=  # the new-item protocol's one job, if needed: its inputs, or SASRec's seeds on given inputs
  if [ -z "${NEW_INPUTS:-}" ]; then
    if [ -n "${READ[new]:-}${NEW_BESIDE:-}" ]; then NEW_JOB=inputs@new; fi
  elif [ -n "${READ[new]:-}" ] && [ -z "${NEW_SASREC_TESTS:-}" ]; then NEW_JOB=sasrec@new; fi
  JOBS=()
  if [ -n "$NEW_JOB" ] && [ -z "${NEW_BESIDE:-}" ]; then JOBS+=("$NEW_JOB"); fi
  for variant in "${TESTED[@]}"; do
    if [ "$(baseline_of "${INPUTS_OF[$variant]:-llm}")" = llm ] && [ -z "${SASREC_TESTS:-}" ]; then JOBS+=(sasrec@llm); break; fi
  done
  [ -n "${READ[mse]:-}" ] && JOBS+=(inputs@mse)
  JOBS+=("${SEED_JOBS[@]}")
  phase ddp-quality && JOBS=(shipped@42@test "${JOBS[@]}")
  if phase refinement; then
    if [ -n "${REFINE_FIRST:-}" ]; then JOBS=(refinement "${JOBS[@]}"); else JOBS+=(refinement); fi
  fi
  QUEUE=runs/seeds-queue && rm -rf "$QUEUE" runs/seeds-inputs runs/seeds/sasrec-*.done && mkdir -p "$QUEUE" runs/seeds

  if [ -n "${READ[llm]:-}${READ[mse]:-}" ]; then
    (  # the llm inputs, once there: the prepare (SASRec's seeds start on it), then prepare, fit-collab and the SIDs
      INPUTS=${SEEDS_INPUTS:-$RUN}
      wait_for "$INPUTS/prepare/manifest.json"
      publish_prepare llm "$INPUTS"
      [ -n "${SEEDS_INPUTS:-}" ] || wait_for_sids
      publish llm "$INPUTS" prepare fit-collab assign-sids
      # this session's, kept in OUT: a later session runs its variants on the very same SASRec and SIDs
      # (SEEDS_INPUTS=<them unpacked>)
      [ -n "${SEEDS_INPUTS:-}" ] || tar -czf "$OUT/inputs.tgz" -C runs/seeds-inputs/llm prepare fit-collab assign-sids
    ) &
  fi
  if [ -n "${READ[new]:-}" ] && [ -n "${NEW_INPUTS:-}" ]; then
    (  # an earlier session's new-item inputs, once unpacked
      wait_for "$NEW_INPUTS/assign-sids/manifest.json"
      publish_prepare new "$NEW_INPUTS"
      publish new "$NEW_INPUTS" prepare fit-collab assign-sids
    ) &
  fi
  SUMMARIES=()
  for variant in "${TESTED[@]}"; do summarise "$variant" & SUMMARIES+=($!); done
  stamp "job queue on $NGPU GPUs: ${JOBS[*]}"
  # the DDP run takes the last two GPUs first where there are 4 or more; on fewer, GPUs 0 and 1 before any worker
  # (a throughput figure wants them to itself), then its one-GPU reference on GPU 0, alone too (beside another
  # job it would train slower, which flatters the ratio), unless the timed pipeline holds GPU 0: then after the queue
  WORKERS=$NGPU DDP_AFTER=
  if phase ddp-quality; then
    if [ "$NGPU" -lt 2 ]; then stamp "ddp-quality: one GPU, so no DDP run; its one-GPU reference is the queue's first job"
    elif [ "$NGPU" -ge 4 ]; then WORKERS=$((NGPU - 2))
    elif [ -z "$pipeline" ]; then ddp_job 0,1 && mkdir "$QUEUE/shipped@42@test" && fresh_caches shipped run_job 0 shipped@42@test
    else DDP_AFTER=1; fi
  fi
  for ((gpu = 1; gpu < WORKERS; gpu++)); do worker "$gpu" & done
  if [ "$WORKERS" -lt "$NGPU" ]; then
    ( ddp_job "$WORKERS,$((WORKERS + 1))"; worker "$WORKERS" & worker "$((WORKERS + 1))" & wait ) &
  fi
  if [ -n "$pipeline" ]; then wait "$pipeline"; pipeline=; fi  # GPU 0 times the pipeline alone
  worker 0 &
  if [ -n "$NEW_JOB" ] && [ -n "${NEW_BESIDE:-}" ]; then
    (  # light beside GPU 0's queue (MiniLM, SASRec, the quantizer: a few GiB), after the timing reference if any
      if phase ddp-quality; then wait_for "$QUEUE/shipped@42@test/done"; fi
      mkdir -p "$QUEUE/$NEW_JOB" && run_job 0 "$NEW_JOB"
    ) &
  fi
  # not a bare wait for the summaries: that would also wait for the workers
  if [ ${#SUMMARIES[@]} -gt 0 ]; then wait "${SUMMARIES[@]}"; stamp "seeds: summaries written"; fi
  wait
  if [ -n "$DDP_AFTER" ]; then ddp_job 0,1; fi
  unset OMP_NUM_THREADS
fi

if [ -n "$pipeline" ]; then wait "$pipeline"; fi
stamp "pipeline and job queue done"

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
(cd runs && find beauty beauty-new seeds \( -path '*logs*' -name metrics.csv \) -o -name manifest.json 2>/dev/null |
  tar -czf "$OUT/curves.tgz" -T -)
stamp "session done"
touch "$OUT/done"

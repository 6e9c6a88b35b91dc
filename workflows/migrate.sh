#!/usr/bin/env bash
# One-off migration of a corpus (billions of vectors) from the old model's space
# into the new model's: fit on a training split of the paired rows, refuse to go on
# if the fit is poor, map every corpus row, verify the output is complete.
#
#   SCHEDULER=tcp://scheduler:8786 workflows/migrate.sh \
#     s3://emb/pairs_old.zarr s3://emb/pairs_new.zarr s3://emb/corpus_old.zarr \
#     s3://emb/migration-2025-06
#
# Rerunnable: run it again after a crash, a kill or a failed gate. Every step runs
# each time: a finished fit or apply with the same inputs and
# options does nothing, an unfinished one resumes from its checkpoint next to its
# output, and one whose inputs or options changed (another TRAIN_ROWS, new pairs) is
# refused naming the change (exit 2) rather than reused.
#
# Environment:
#   SCHEDULER   dask.distributed scheduler address or scheduler file (.json);
#               unset: WORKERS local worker processes (default: all cores)
#   TRAIN_ROWS  paired rows to fit on, START:STOP (default: all of them); set it,
#               e.g. 0:1000000, to keep the later rows free for evaluating the map
#   MAX_RELATIVE_RESIDUAL  gate on ||AQ-B||^2/||B||^2 over the training rows
#               (default 0.5); set it from a pilot fit on your model pair
#   FSSPEC_S3='{"endpoint_url": "..."}'  object-store options: fsspec's env config
#               reaches every command and Dask workers that get the same env (or
#               pass --storage-option to each command).
set -euo pipefail

if [[ $# -ne 4 ]]; then
  echo "usage: $0 PAIRS_OLD PAIRS_NEW CORPUS_OLD OUT_DIR" >&2
  exit 2
fi
pairs_old=$1 pairs_new=$2 corpus=$3 out=${4%/}
transform="$out/old2new.transform"
mapped="$out/corpus.zarr"
rows=()
if [[ -n ${TRAIN_ROWS:-} ]]; then
  rows=(--rows "$TRAIN_ROWS")
fi
max_residual=${MAX_RELATIVE_RESIDUAL:-0.5}

if [[ -n ${SCHEDULER:-} ]]; then
  run=(--scheduler "$SCHEDULER")
else
  run=(--workers "${WORKERS:-$(nproc)}")
fi

say() { echo "migrate: $*" >&2; }

# 1. Fit (a no-op when this very fit is already done).
bigalign fit "$pairs_old" "$pairs_new" -o "$transform" --center "${rows[@]}" "${run[@]}"

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

# 3. Apply (resumes an unfinished one; a no-op when it is done).
bigalign apply "$transform" "$corpus" -o "$mapped" "${run[@]}"

# 4. Verify: the output is marked complete only after its last region is stored.
if ! bigalign info "$mapped"; then
  say "$mapped is not complete; rerun this script to resume"
  exit 1
fi
say "done: $mapped"

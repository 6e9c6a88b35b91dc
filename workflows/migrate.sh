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
# The gate reads held-out figures, as `bigalign realign` does: the fit uses TRAIN_ROWS
# and `bigalign evaluate` scores it on the paired rows after them (each mapped source
# row searched by cosine among all held-out target rows). A failed gate exits 4 (as
# realign's), with nothing mapped; bad arguments 2; an incomplete output 1.
#
# Environment:
#   SCHEDULER   dask.distributed scheduler address or scheduler file (.json);
#               unset: WORKERS local worker processes (default: all cores)
#   TRAIN_ROWS  paired rows to fit on, START:STOP (default: the first 90%); the rows
#               after them are held out for the gate, so leave some
#   MIN_RECALL_AT_10  gate: held-out recall@10, mapped source -> native target, raw
#               cosine (default 0.9); set it from a pilot fit on your model pair
#   MAX_HELDOUT_RELATIVE_RESIDUAL  optional gate: held-out ||sAQ-B||^2/||B-mean B||^2
#               (0 perfect, 1 no better than the target mean; unset: not checked). Not
#               the training relative residual that `bigalign info` prints
#   MAX_QUERIES held-out queries searched (default 10000, a seeded sample; 0 = all)
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
say() { echo "migrate: $*" >&2; }
if [[ -n ${MAX_RELATIVE_RESIDUAL:-} ]]; then
  say "MAX_RELATIVE_RESIDUAL is gone: the gate reads held-out figures now; set"
  say "MIN_RECALL_AT_10 and/or MAX_HELDOUT_RELATIVE_RESIDUAL (held-out, centred spread)"
  exit 2
fi
min_recall=${MIN_RECALL_AT_10:-0.9}
max_residual=${MAX_HELDOUT_RELATIVE_RESIDUAL:-}

if [[ -n ${SCHEDULER:-} ]]; then
  run=(--scheduler "$SCHEDULER")
else
  run=(--workers "${WORKERS:-$(nproc)}")
fi

# 0. The training rows: TRAIN_ROWS, else the first 90% of the pairs (info reads the
# array's or store's shape; plain Python, no jq: most hosts have python3 but not jq).
if [[ -z ${TRAIN_ROWS:-} ]]; then
  TRAIN_ROWS=$(bigalign info --json "$pairs_old" | python3 -c '
import json, sys
d = json.load(sys.stdin)
shape = d.get("shape") or (d.get("embeddings") or {}).get("shape")
if not shape:
    sys.exit("migrate: cannot read the row count of the pairs; set TRAIN_ROWS")
print("0:%d" % (shape[0] * 9 // 10))
')
fi


# 1. Fit on the training rows (a no-op when this very fit is already done).
bigalign fit "$pairs_old" "$pairs_new" -o "$transform" --center --rows "$TRAIN_ROWS" \
  "${run[@]}"

# 2. Gate on held-out quality before spending hours on the corpus: evaluate scores the
# fit on the rows it did not use (after TRAIN_ROWS).
evaluation=$(bigalign evaluate "$transform" "$pairs_old" "$pairs_new" --no-baselines \
  --max-queries "${MAX_QUERIES:-10000}" --json -q)
gate=0
python3 -c '
import json, sys
result = json.load(sys.stdin)
(this,) = [m for m in result["methods"] if m.get("this")]
recall = this["retrieval"]["raw"]["recall@10"]
residual = this["relative_residual"]        # held out, over the centred spread
min_recall = float(sys.argv[1])
max_residual = float(sys.argv[2]) if sys.argv[2] else None
ok = recall >= min_recall and (max_residual is None or residual <= max_residual)
print("migrate: held-out rows %s (%d queries): recall@10 %.4f (min %g), held-out "
      "relative residual %.4f (max %s): %s"
      % (result["rows"], result["queries"], recall, min_recall, residual,
         "-" if max_residual is None else "%g" % max_residual,
         "ok" if ok else "FAILED"), file=sys.stderr)
sys.exit(0 if ok else 4)
' "$min_recall" "$max_residual" <<<"$evaluation" || gate=$?
if [[ $gate -eq 4 ]]; then
  say "the fit fails the gate on held-out rows: not migrating (exit 4)."
  say "check the row pairing and centring, or set the thresholds knowingly"
  exit 4
elif [[ $gate -ne 0 ]]; then
  say "cannot read the evaluation (exit $gate)"
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

#!/bin/bash
# The GPU measurements of issue 9, in parts that each fit one device call (from the project root).
#   bash benchmarks/gpu_session.sh model   grr-coca and baseline-coca with per-block compile at micro-batch 48
#                                          (`grr bench train`, the trainer's step)
#   bash benchmarks/gpu_session.sh peer    grr-coca, baseline-coca and open_clip's CoCa eager in one process,
#                                          open_clip compiled (benchmarks/peer_openclip.py; open_clip wheels
#                                          in $WHL), the gpu tests of the step
#   bash benchmarks/gpu_session.sh data    DALI (/tmp/dali.env), a 32,102-id tokenizer, 6,000 photo crops
#                                          sharded, the loaders, and `grr train pretrain` end to end
#   bash benchmarks/gpu_session.sh speed   (~5-6 min on an H200, no DALI) a profile of grr-coca per-block compiled
#                                          at micro-batch 192 (benchmarks/profile_step.py, trace into $OUT);
#                                          grr-coca and baseline-coca at 192 with the per-step and the deferred
#                                          read-back (one compiled model each); the gpu tests; then, in what is
#                                          left of SPEED_S seconds, grr-coca compiled whole with
#                                          max-autotune-no-cudagraphs (skipped when under 90 s are left)
#   bash benchmarks/gpu_session.sh levers  (issue 19; ~7.5 min on an H200, within LEVERS_S=450 s, no DALI) the GEMM
#                                          shapes 2073/2080/2112 and 32,102/32,128 (benchmarks/gemm_shapes.py);
#                                          SDPA backends per call site (benchmarks/sdpa_sites.py); the gpu tests;
#                                          grr-coca, baseline-coca and open_clip compiled in one process at $BIG
#                                          with the levers (open_clip wheels in $WHL); a profile of grr-coca with
#                                          every lever (compile regions; the kernel list names the copies); the
#                                          step as the second session ran it (compile blocks, levers off);
#                                          dropout 0; inductor_random=fallback. A command is cut to what is left
#                                          of LEVERS_S, and skipped (named) under 30 s.
#   bash benchmarks/gpu_session.sh levers2 (a second call, ~6 min) trimmed text in buckets (synthetic captions of
#                                          5-40 words), micro-batch 384 as two contrastive groups of 192,
#                                          baseline-coca with the levers, max-autotune-no-cudagraphs per block
#   DRY=1 bash benchmarks/gpu_session.sh levers|levers2: a dry run on a CPU (tiny presets, micro-batch 2,
#                                          1 step, no compile, microbenchmarks at micro-batch 1)
#   bash benchmarks/gpu_session.sh dali    the DALI tests (/tmp/dali.env as for data), whole log in
#                                          $OUT/dali_tests.log: a reader thread left alive fails its test with
#                                          the thread's stack; a test hung for 120 s dumps every thread's stack
#   bash benchmarks/gpu_session.sh gpu     every test marked `gpu` (README "Tests and benchmarks": `pytest -m gpu`)
# Results are appended to $OUT/results.txt and printed. P, BASE, B, BIG, N, KIT, COMPILE override the preset,
# the baseline, the micro-batches, the steps, the folder of ../shared/gpu's scripts and the compile mode
# (for a dry run on a CPU).
set -u
PART=${1:-model}
if [[ -n ${DRY:-} ]]; then  # a CPU dry run: everything tiny and eager
  export P=${P:-grr-tiny} BASE=${BASE:-baseline-tiny} B=${B:-2} BIG=${BIG:-2} N=${N:-1} COMPILE=${COMPILE:-off}
  export MICRO=${MICRO:-1} REPS=${REPS:-1} PN=${PN:-1}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; R=$OUT/results.txt
P=${P:-grr-coca}; BASE=${BASE:-baseline-coca}; B=${B:-48}; BIG=${BIG:-192}; N=${N:-10}
KIT=${KIT:-.gpu-kit}; WHL=${WHL:-$KIT/whl}; PY=${PY:-python3}
G="$PY -m grr_cli.main"
[[ -f /tmp/dali.env ]] && . /tmp/dali.env
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$R"
run() {  # run LIMIT CMD...: the command's last lines (progress bars dropped) into the results
  local t=$1; shift; echo "== $*" >>"$R"; local s=$SECONDS
  timeout "$t" "$@" >"$OUT/last.log" 2>&1; local rc=$?
  tr '\r' '\n' <"$OUT/last.log" | grep -v '%|\|^ *$\|Warning\|warn(\|^USDT' | tail -n "${TAIL:-3}" | tee -a "$R"
  echo "   rc=$rc wall=$((SECONDS - s))s" | tee -a "$R"
}
case $PART in
model)
  run 150 $G bench train --preset "$P" --batch-size "$B" --steps "$N" --compile blocks
  run 150 $G bench train --preset "$BASE" --batch-size "$B" --steps "$N" --compile blocks ;;
peer)
  compgen -G "$WHL/*.whl" >/dev/null && $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHL"/*.whl
  TAIL=5 run 200 $PY benchmarks/peer_openclip.py --batch-size "$B" --steps "$N" --models "$P,$BASE,open_clip"
  TAIL=3 run 200 $PY benchmarks/peer_openclip.py --batch-size "$B" --steps "$N" --models open_clip --compile model --no-flops
  TAIL=6 run 90 $PY -m pytest -q -m gpu tests/test_step.py -p no:cacheprovider ;;
data)
  [[ -f /tmp/dali.env ]] || { [[ -f $KIT/dali.sh ]] && bash "$KIT/dali.sh" | tail -n 1 | tee -a "$R"; }
  [[ -f /tmp/dali.env ]] && . /tmp/dali.env
  TOK=${TOK:-/tmp/t5tok}
  [[ -f $TOK/spiece.model ]] || run 300 $PY benchmarks/t5_sized_tokenizer.py "$TOK"
  if [[ ! -f /tmp/shards/manifest.json ]]; then
    $PY "$KIT/make_input.py" /tmp/raw "${TARS:-8}" "${PER_TAR:-750}" | tail -n 1 | tee -a "$R"
    run 150 $G data shard --input /tmp/raw --out /tmp/shards --split 95/5 --workers "${W:-16}" --shard-size 1000 --tokenizer "$TOK"
  fi
  run 90 $G bench loader /tmp/shards --loader dali --workers 4 --batch-size "$BIG" --batches 60
  rm -rf /tmp/run
  run 300 $G train pretrain --preset "$P" --data /tmp/shards --out /tmp/run --max-steps "${STEPS:-8}" \
      --set tensorboard=false --loader "${LOADER:-dali}" --set num_workers="${W:-16}" ${EXTRA:-}
  [[ -f /tmp/run/metrics.jsonl ]] && $PY - /tmp/run/metrics.jsonl <<'PY' | tee -a "$R"
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
print("e2e:", ", ".join(f"step {r['step']} {r['samples_per_s']:.0f} sps mfu {r.get('mfu') or 0:.3f}" for r in rs))
PY
  TAIL=8 run 200 $PY -m pytest -q tests/test_loader_dali.py tests/test_loader_reader.py -p no:cacheprovider ;;
speed)
  T0=$SECONDS; C=${COMPILE:-blocks}
  TAIL=45 run 180 $PY benchmarks/profile_step.py --preset "$P" --batch-size "$BIG" --compile "$C" --steps "${PN:-5}" --out "$OUT"
  TAIL=2 run 120 $G bench train --preset "$P" --batch-size "$BIG" --steps "$N" --compile "$C" --read-back both
  TAIL=2 run 120 $G bench train --preset "$BASE" --batch-size "$BIG" --steps "$N" --compile "$C" --read-back both
  TAIL=6 run 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_step.py tests/test_loader_dali.py
  LEFT=$(( ${SPEED_S:-340} - (SECONDS - T0) ))
  if (( LEFT >= 90 )); then  # a compile that runs past LEFT is killed: reported as rc=124, i.e. skipped
    TAIL=1 run "$LEFT" $G bench train --preset "$P" --batch-size "$BIG" --steps "$N" --compile model \
        --inductor-mode max-autotune-no-cudagraphs
  else
    echo "== max-autotune-no-cudagraphs whole-model compile skipped: ${LEFT}s left of ${SPEED_S:-340}s" | tee -a "$R"
  fi ;;
levers|levers2)
  T0=$SECONDS; C=${COMPILE:-regions}; BUDGET=${LEVERS_S:-450}
  fit() {  # fit LIMIT CMD...: run with at most LIMIT s, and not past the part's budget; skip under 30 s left
    local left=$(( BUDGET - (SECONDS - T0) )) t=$1; shift
    (( left < 30 )) && { echo "== skipped (${left}s left of ${BUDGET}s): $*" | tee -a "$R"; return; }
    run $(( t < left ? t : left )) "$@"
  }
  BENCH="$G bench train --preset $P --batch-size $BIG --steps $N"
  OFF="--set aligned_widths=off --set fused_caption_loss=off --set clip_in_optimizer=off"
  if [[ $PART == levers ]]; then
    TAIL=16 fit 60 $PY benchmarks/gemm_shapes.py --batch-size "${MICRO:-$BIG}" --reps "${REPS:-20}"
    TAIL=24 fit 60 $PY benchmarks/sdpa_sites.py --batch-size "${MICRO:-$BIG}" --reps "${REPS:-20}"
    TAIL=6 fit 80 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_step.py tests/test_speed_levers.py
    compgen -G "$WHL/*.whl" >/dev/null && $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHL"/*.whl
    MODELS="$P,$BASE"
    if PYTHONPATH=/tmp/site $PY -c "import open_clip" 2>/dev/null; then MODELS="$MODELS,open_clip"
    else echo "== open_clip not importable (no wheels in $WHL): the peer rows are grr's only" | tee -a "$R"; fi
    TAIL=5 fit 200 $PY benchmarks/peer_openclip.py --batch-size "$BIG" --steps "$N" --compile "$C" --models "$MODELS"
    TAIL=70 fit 120 $PY benchmarks/profile_step.py --preset "$P" --batch-size "$BIG" --compile "$C" --steps "${PN:-3}" \
        --out "$OUT"
    TAIL=1 fit 100 $BENCH --compile "${COMPILE:-blocks}" $OFF
    TAIL=1 fit 90 $BENCH --compile "$C" --set dropout=0
    TAIL=1 fit 90 $BENCH --compile "$C" --set inductor_random=fallback
  else
    TAIL=1 fit 110 $BENCH --compile "$C" --set trim_text_padding=true
    TAIL=1 fit 110 $G bench train --preset "$P" --batch-size $(( 2 * BIG )) --steps "$N" --compile "$C" \
        --set micro_batch_groups=2
    TAIL=1 fit 90 $G bench train --preset "$BASE" --batch-size "$BIG" --steps "$N" --compile "$C"
    TAIL=1 fit 150 $BENCH --compile "$C" --inductor-mode max-autotune-no-cudagraphs
  fi ;;
dali)
  [[ -f /tmp/dali.env ]] || { [[ -f $KIT/dali.sh ]] && bash "$KIT/dali.sh" | tail -n 1 | tee -a "$R"; }
  [[ -f /tmp/dali.env ]] && . /tmp/dali.env
  $PY -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -n 1 | tee -a "$R"
  echo "== pytest tests/test_loader_dali.py tests/test_loader_reader.py (whole log: dali_tests.log)" >>"$R"
  timeout 240 $PY -X faulthandler -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120 -rfE \
      tests/test_loader_dali.py tests/test_loader_reader.py >"$OUT/dali_tests.log" 2>&1; rc=$?
  grep -E "^(FAILED|ERROR)|grr-dali-reader still alive|left grr-dali-reader|did not stop within|Timeout|passed|failed" \
      "$OUT/dali_tests.log" | tail -n 15 | tee -a "$R"
  echo "   rc=$rc" | tee -a "$R" ;;
gpu) TAIL=8 run 400 $PY -m pytest -q -m gpu -p no:cacheprovider -rfEs ;;
*) echo "usage: gpu_session.sh model|peer|data|speed|levers|levers2|dali|gpu"; exit 2 ;;
esac
echo "== done $PART" | tee -a "$R"

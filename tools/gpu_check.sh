#!/usr/bin/env bash
# One prepared check of attribindex on a machine with a CUDA GPU, written to ONE report file (markdown): set-up, then
# within 8 minutes, each stage under its own `timeout`:
#   1. the CUDA tests (`pytest -m gpu`: the blockwise ones in tests/index/test_blockwise.py and the CUDA variants of
#      exact re-rank, explain and capture: tests/{exact,query,train}/test_*_cuda.py);
#   2. tools/gpu_exact_search.py (exact top-k on the GPU, every path it has);
#   3. tools/bench_extract.py on a model of Llama-3.2-1B's shape (1.24B parameters, random weights, built locally).
#
#   bash tools/gpu_check.sh [--report FILE]   # default FILE: $OUT/gpu-report.md when $OUT is a folder, else
#                                             # gpu-check/gpu-report.md in the repository (ignored by git)
#   bash tools/gpu_check.sh --fetch-wheels    # here, with a package index: the wheels an offline GPU machine lacks
#
# Without a CUDA GPU it prints one line ("no CUDA device: <why>; nothing run ..."), writes the report saying so and
# exits 0, importing and installing nothing. With one, it exits 0 when every stage passed and 1 otherwise.
#
# Set-up. The GPU extras are README.md's: a CUDA build of torch (TORCH_SPEC) and faiss-gpu (FAISS_EXTRA=gpu). With
# either variable set and a package index reachable, tools/setup.sh installs them into .venv (downloads run before the
# 8 minutes start); unset, nothing is installed from an index. A lent GPU machine reaches none: there the script says
# that the GPU extras cannot be installed and goes on with what it has: the first Python whose torch sees the GPU
# (GPU_CHECK_PYTHON, else .venv/bin/python, else python3), plus any wheels carried in .whl/ (GPU_CHECK_WHEELS),
# installed into a private folder when that Python lacks a module the stages import. Its image has torch but no
# faiss: carry faiss-cpu (run `--fetch-wheels` here first); exact search then runs on torch's GPU path
# (TorchFlatIndex) instead of faiss-gpu.
#
# Settings (environment): GPU_CHECK_BUDGET_S (480: the run stages' seconds, set-up's local part included),
# GPU_CHECK_PYTHON, GPU_CHECK_WHEELS, GPU_CHECK_SEARCH_ARGS (gpu_exact_search.py's options), GPU_CHECK_BENCH_ARGS
# (bench_extract.py's), GPU_CHECK_NVIDIA_SMI (the nvidia-smi to ask), TORCH_SPEC and FAISS_EXTRA (tools/setup.sh's).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1

REPORT=
FETCH_WHEELS=0
while [ $# -gt 0 ]; do
  case $1 in
    --report) REPORT=${2:?--report needs a file}; shift 2 ;;
    --report=*) REPORT=${1#--report=}; shift ;;
    --fetch-wheels) FETCH_WHEELS=1; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
# The Python of the lent GPU machines' image (KINDS.md of the device tool: 3.12, x86_64); wheels are fetched for it.
WHEEL_PYTHON=${GPU_CHECK_WHEEL_PYTHON:-3.12}

if [ "$FETCH_WHEELS" = 1 ]; then
  # faiss-cpu is the one module the stages need that the GPU image lacks (its dependencies, numpy and packaging,
  # are there). faiss-gpu cannot travel: its CUDA 12 runtime wheels (cuBLAS alone is hundreds of MB) are far over the
  # 64 MiB a device run carries. Same version as this checkout's .venv when it has one.
  py=python3
  [ -x "$REPO/.venv/bin/python" ] && py=$REPO/.venv/bin/python
  version=$("$py" -c 'import importlib.metadata as m; print(m.version("faiss-cpu"))' 2>/dev/null) || version=
  mkdir -p "$WHEELS"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" "faiss-cpu${version:+==$version}" || exit 1
  echo "wheels for an offline GPU machine (CPython $WHEEL_PYTHON, x86_64) in $WHEELS:"
  ls -l "$WHEELS"
  echo "carry that folder with the run (device tool: carry [\"${WHEELS#"$REPO"/}\"]); this script installs them there."
  exit 0
fi

if [ -z "$REPORT" ]; then
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then REPORT=$OUT/gpu-report.md; else REPORT=$REPO/gpu-check/gpu-report.md; fi
fi
mkdir -p "$(dirname "$REPORT")" || exit 1

report_header() {
  local commit
  commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) || commit="unknown (no git here)"
  if [ "$commit" != "unknown (no git here)" ] && [ -n "$(git -C "$REPO" status --porcelain 2>/dev/null | head -1)" ]; then
    commit="$commit + uncommitted changes"
  fi
  printf '# attribindex GPU check\n\n- date: %s\n- host: %s\n- commit: %s\n' \
    "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$(hostname 2>/dev/null || echo unknown)" "$commit"
}

# ---- 1. Is there a CUDA GPU? (bash and nvidia-smi only: nothing heavy is imported on a machine without one) ----
SMI=${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}
no_cuda=
if [ "${CUDA_VISIBLE_DEVICES+set}" = set ] && { [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = -1 ]; }; then
  no_cuda="CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' hides every GPU"
elif ! command -v "$SMI" >/dev/null 2>&1; then
  no_cuda="nvidia-smi not found ($SMI): no NVIDIA driver here"
else
  listed=$(timeout 30 "$SMI" -L 2>&1)
  smi_rc=$?
  first_line=$(printf '%s\n' "$listed" | head -1)
  if [ $smi_rc -ne 0 ]; then
    no_cuda="nvidia-smi failed (exit $smi_rc): ${first_line:-no message}"
  elif ! printf '%s\n' "$listed" | grep -q '^GPU [0-9]'; then
    no_cuda="nvidia-smi lists no GPU: ${first_line:-no output}"
  fi
fi
if [ -n "$no_cuda" ]; then
  {
    report_header
    printf -- '- result: not run: no CUDA device: %s\n\n' "$no_cuda"
    printf 'No CUDA device was found, so nothing was set up or run: no CUDA tests, no tools/gpu_exact_search.py, no\n'
    printf 'extraction bench. Run `bash tools/gpu_check.sh` on a machine with an NVIDIA GPU and its driver.\n'
  } >"$REPORT"
  echo "no CUDA device: $no_cuda; nothing run (report: $REPORT)"
  exit 0
fi

# ---- 2. A GPU is there: set-up, then the stages, each under `timeout` within the budget ----
BUDGET=${GPU_CHECK_BUDGET_S:-480}
MARGIN=20 # seconds kept back: `timeout -k` grace, writing the report
STARTED=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 # every model is built here; nothing is downloaded
SECTIONS=$WORK/sections.md
: >"$SECTIONS"
STAGES=() # "name|status|seconds|numbers" rows of the summary table
FAILED=0
say() { echo "gpu_check: $*" >&2; }
section() { printf '\n## %s\n\n' "$1" >>"$SECTIONS"; }
fenced() { # stdin as a code block of the report, unless empty
  local text
  text=$(cat)
  [ -n "$text" ] && printf '```\n%s\n```\n' "$text" >>"$SECTIONS"
}
record() { # name status seconds numbers
  STAGES+=("$1|$2|$3|$4")
  [ "$2" = PASS ] || FAILED=1
  say "$1: $2 (${3}s) $4"
}

gpus=$(printf '%s\n' "$listed" | grep '^GPU [0-9]' | sed 's/ (UUID:.*//')
smi_query=$(timeout 30 "$SMI" --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -4)
say "GPU: $(printf '%s' "$gpus" | head -1)"

setup_started=$(date +%s)
setup_notes=()
note() { setup_notes+=("$1"); say "set-up: $1"; }

# Python with a CUDA torch. The probe prints "torch_version cuda_version available device_count".
PROBE='import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count())'
probe() { timeout 120 "$1" -c "$PROBE" 2>/dev/null | tail -1; }
PY=
TORCH_INFO=
choose_python() {
  local candidates=() candidate info
  if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    candidates=("$GPU_CHECK_PYTHON")
  else
    [ -x "$REPO/.venv/bin/python" ] && candidates+=("$REPO/.venv/bin/python")
    command -v python3 >/dev/null 2>&1 && candidates+=("$(command -v python3)")
  fi
  PY=
  PROBED=()
  for candidate in "${candidates[@]}"; do
    info=$(probe "$candidate")
    PROBED+=("$candidate: ${info:-no torch}")
    if [ "$(echo "$info" | cut -d' ' -f3)" = True ]; then
      PY=$candidate
      TORCH_INFO=$info
      return 0
    fi
  done
  return 1
}

# The GPU extras (TORCH_SPEC: a CUDA build of torch; FAISS_EXTRA=gpu: faiss-gpu) are installed into .venv by
# tools/setup.sh only when asked for by setting either variable, as README.md says: set-up changes that environment
# (on a machine with faiss-cpu there, faiss-gpu joins it, and the two overwrite each other's module). Downloads do not
# count against the budget: its clock restarts after them.
has_gpu_extras() { # python
  timeout 120 "$1" -c 'import sys, faiss, torch
sys.exit(0 if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 else 1)' \
    >/dev/null 2>&1
}
index_answers() { # does a package index answer pip? (a lent GPU machine reaches none)
  local python
  python=${PY:-$(command -v python3)} || return 1
  timeout 30 "$python" -m pip index versions faiss-gpu --retries 0 --timeout 5 >"$WORK/index.log" 2>&1
}
EXTRAS="TORCH_SPEC=${TORCH_SPEC:-the default of tools/setup.sh}, FAISS_EXTRA=${FAISS_EXTRA:-gpu}"
choose_python
if [ -n "$PY" ] && has_gpu_extras "$PY"; then
  note "GPU extras present in $PY: torch with CUDA and faiss with GPU support"
elif ! index_answers; then
  note "no package index is reachable from here, so the GPU extras (TORCH_SPEC: a CUDA build of torch; FAISS_EXTRA=gpu: faiss-gpu) cannot be installed; going on with what this machine has"
elif [ -z "${TORCH_SPEC:-}${FAISS_EXTRA:-}" ]; then
  note "GPU extras not installed: set TORCH_SPEC and FAISS_EXTRA=gpu to have tools/setup.sh install them into .venv (README.md); going on with what this machine has"
else
  note "installing the GPU extras into .venv with tools/setup.sh ($EXTRAS)"
  if timeout -k 10 "${GPU_CHECK_SETUP_S:-900}" env FAISS_EXTRA="${FAISS_EXTRA:-gpu}" bash tools/setup.sh >"$WORK/setup.log" 2>&1; then
    note "tools/setup.sh done"
  else
    note "tools/setup.sh failed or ran past ${GPU_CHECK_SETUP_S:-900}s (its last lines are below); going on with what is installed"
    tail -15 "$WORK/setup.log" >"$WORK/setup-tail.log"
  fi
  STARTED=$(date +%s) # the downloads are behind us: the budget counts from here
  choose_python
fi
DEADLINE=$((STARTED + BUDGET - MARGIN))

if [ -z "$PY" ]; then
  note "a GPU is listed, but no Python here has a torch that sees it (${PROBED[*]:-no python3 found})"
  section "Set-up"
  printf -- '- %s\n' "${setup_notes[@]}" >>"$SECTIONS"
  [ -s "$WORK/setup-tail.log" ] && fenced <"$WORK/setup-tail.log"
  printf '\nInstall a CUDA build of torch: `TORCH_SPEC="torch==<version>" FAISS_EXTRA=gpu bash tools/setup.sh`, or name\na Python that has one in GPU_CHECK_PYTHON.\n' >>"$SECTIONS"
  record set-up FAIL $(($(date +%s) - setup_started)) "no torch that sees CUDA"
else
  note "Python: $PY (torch $(echo "$TORCH_INFO" | cut -d' ' -f1), CUDA $(echo "$TORCH_INFO" | cut -d' ' -f2), $(echo "$TORCH_INFO" | cut -d' ' -f4) device(s))"
  # Modules the stages import; anything missing comes from carried wheels, into a folder of this run only.
  NEEDED="faiss numpy torch transformers tokenizers safetensors yaml click tqdm filelock pytest"
  missing_modules() {
    PYTHONPATH=${SITE:-} timeout 60 "$PY" -c 'import importlib.util, sys
print(" ".join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))' $NEEDED 2>/dev/null
  }
  SITE=
  missing=$(missing_modules)
  if [ -n "$missing" ]; then
    wheels=$(ls "$WHEELS"/*.whl 2>/dev/null)
    if [ -n "$wheels" ]; then
      SITE=$WORK/site
      # --no-deps: the wheels carried are all it gets (there is no index); one version of each, as carried
      if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        $wheels >"$WORK/wheels.log" 2>&1; then
        note "missing here: $missing; installed the carried wheels: $(cd "$WHEELS" && echo *.whl)"
      else
        note "missing here: $missing; installing the carried wheels failed: $(tail -1 "$WORK/wheels.log")"
      fi
      missing=$(missing_modules)
    fi
    [ -n "$missing" ] && note "still missing: $missing (carry their wheels in $WHEELS: \`bash tools/gpu_check.sh --fetch-wheels\` on a machine with a package index)"
  fi
  export PYTHONPATH="${SITE:+$SITE:}$REPO${PYTHONPATH:+:$PYTHONPATH}"
  builds=$(timeout 60 "$PY" -c 'import importlib.metadata as m
print(" ".join(sorted({n for d in m.distributions() if (n := (d.metadata["Name"] or "").lower()) == "faiss-cpu" or n.startswith("faiss-gpu")})))' 2>/dev/null)
  case $builds in *" "*) note "several faiss builds are installed ($builds): they overwrite each other's module, and attribindex refuses to run; keep one (pip uninstall faiss-cpu on a GPU machine)" ;; esac
  faiss_info=$(timeout 60 "$PY" -c 'import faiss
gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
print(faiss.__version__, "with GPU support" if gpu else "CPU only")' 2>/dev/null | tail -1)
  case $faiss_info in
    *"with GPU support") note "faiss $faiss_info: exact flat search runs on GPU faiss" ;;
    *"CPU only") note "faiss $faiss_info (faiss-gpu is not installed): exact flat search on the GPU runs through torch (TorchFlatIndex, bfloat16 scores re-ranked exactly), not faiss-gpu" ;;
    *) note "faiss is not importable: the CUDA tests that open an index fail; carry a faiss-cpu wheel (\`bash tools/gpu_check.sh --fetch-wheels\`)" ;;
  esac
  section "Set-up"
  {
    printf -- '- GPU: %s\n' "$(printf '%s' "$gpus" | paste -sd ';' -)"
    [ -n "$smi_query" ] && printf -- '- nvidia-smi (name, memory, driver): %s\n' "$(printf '%s' "$smi_query" | paste -sd ';' -)"
    printf -- '- %s\n' "${setup_notes[@]}"
  } >>"$SECTIONS"
  [ -s "$WORK/setup-tail.log" ] && fenced <"$WORK/setup-tail.log"
  record set-up PASS $(($(date +%s) - setup_started)) "torch $(echo "$TORCH_INFO" | cut -d' ' -f1); faiss ${faiss_info:-missing}"
fi

# run_stage NAME CAP RESERVE COMMAND...: COMMAND under `timeout`, at most CAP seconds and never into the RESERVE seconds
# the later stages are owed; its output in $WORK/NAME.log. Sets STAGE_STATUS, STAGE_WHY, STAGE_SECONDS, STAGE_LOG.
run_stage() {
  local name=$1 cap=$2 reserve=$3 left limit rc=0 began
  shift 3
  STAGE_LOG=$WORK/$name.log
  : >"$STAGE_LOG"
  left=$((DEADLINE - $(date +%s) - reserve))
  limit=$((cap < left ? cap : left))
  if [ -z "$PY" ]; then
    STAGE_STATUS="SKIPPED"; STAGE_SECONDS=0; STAGE_WHY="set-up found no torch that sees CUDA"; return
  fi
  if [ "$limit" -lt 15 ]; then
    STAGE_STATUS="SKIPPED"; STAGE_SECONDS=0; STAGE_WHY="no time left of the ${BUDGET}s budget"; return
  fi
  say "$name: running (at most ${limit}s)"
  began=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$STAGE_LOG" 2>&1 || rc=$?
  STAGE_SECONDS=$(($(date +%s) - began))
  STAGE_WHY=
  case $rc in
    0) STAGE_STATUS=PASS ;;
    124 | 137) STAGE_STATUS=TIMEOUT; STAGE_WHY="stopped after ${limit}s" ;;
    *) STAGE_STATUS=FAIL; STAGE_WHY="exit $rc" ;;
  esac
}
log_tail() { { echo "last lines of its output:"; tail -"${1:-40}" "$STAGE_LOG"; } | fenced; }

# Stage caps (seconds) and what each stage is owed at least, so one slow stage cannot starve the later ones.
TEST_FILES=(tests/index/test_blockwise.py tests/exact/test_exact_cuda.py tests/query/test_explain_cuda.py
  tests/train/test_capture_cuda.py)
run_stage cuda-tests 180 120 "${PY:-false}" -m pytest -q -m gpu -rfEs -p no:cacheprovider "${TEST_FILES[@]}"
summary=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' "$STAGE_LOG" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
if [ "$STAGE_STATUS" = PASS ] && grep -qE '[0-9]+ skipped' <<<"$summary"; then
  STAGE_STATUS=FAIL # on a CUDA machine every -m gpu test must run: a skip means the GPU was not used
  STAGE_WHY="a test was skipped on a CUDA machine"
fi
record cuda-tests "$STAGE_STATUS" "$STAGE_SECONDS" "${summary:-no summary line}${STAGE_WHY:+ ($STAGE_WHY)}"
section "CUDA tests: $STAGE_STATUS"
{
  printf '`pytest -q -m gpu %s`: %s\n\n' "${TEST_FILES[*]}" "${summary:-no summary line}"
} >>"$SECTIONS"
grep -E '^(FAILED|ERROR|SKIPPED)' "$STAGE_LOG" | fenced
if [ -z "$summary" ] || grep -qE '^(FAILED|ERROR)' "$STAGE_LOG"; then log_tail 60; fi

SEARCH_ARGS=${GPU_CHECK_SEARCH_ARGS:---stream-rows 250000 --budget-s 100}
mkdir -p "$WORK/search"
# shellcheck disable=SC2086 # the options are words on purpose
run_stage exact-search 150 60 env OUT="$WORK/search" "${PY:-false}" tools/gpu_exact_search.py $SEARCH_ARGS
table=$(sed -n '/^exact top-/,/^total /p' "$STAGE_LOG")
[ -n "$table" ] || table=$(grep -E 'nq=|FAILED|skipped' "$STAGE_LOG")
if [ "$STAGE_STATUS" = PASS ] && grep -q "nothing to time" "$STAGE_LOG"; then
  STAGE_STATUS=FAIL
  STAGE_WHY="its torch saw no GPU"
elif [ "$STAGE_STATUS" = PASS ] && grep -q FAILED "$STAGE_LOG"; then
  STAGE_STATUS=FAIL # the tool goes on past a broken path and exits 0: its table says which one failed
  STAGE_WHY="a search path failed"
fi
setting=$(grep -E '^ *(gpu|rows|dim|faiss_gpu):' "$STAGE_LOG" | sed 's/^ *//' | paste -sd ',' - | sed 's/,/, /g')
record exact-search "$STAGE_STATUS" "$STAGE_SECONDS" "${setting:-no numbers}${STAGE_WHY:+ ($STAGE_WHY)}"
section "tools/gpu_exact_search.py $SEARCH_ARGS: $STAGE_STATUS"
{ sed -n '1,/^generated /p' "$STAGE_LOG" | head -20; echo; echo "${table:-no rows timed}"; } | fenced
[ "$STAGE_STATUS" = PASS ] || log_tail 30

BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---batch-size 8 --max-length 512 --batches 6 --dtype bfloat16}
# shellcheck disable=SC2086
run_stage extraction-bench 150 0 "${PY:-false}" tools/bench_extract.py --llama-1b --device cuda $BENCH_ARGS
numbers=$(grep -E 'ratio LoGra|LoGra extraction:' "$STAGE_LOG" | tr -s ' ' | paste -sd ';' -)
record extraction-bench "$STAGE_STATUS" "$STAGE_SECONDS" "${numbers:-no numbers}${STAGE_WHY:+ ($STAGE_WHY)}"
section "tools/bench_extract.py --llama-1b --device cuda $BENCH_ARGS: $STAGE_STATUS"
sed -n '/^Llama-3.2-1B/,$p' "$STAGE_LOG" | fenced
[ "$STAGE_STATUS" = PASS ] || log_tail 30

total=$(($(date +%s) - setup_started))
{
  report_header
  printf -- '- result: %s\n' "$([ $FAILED = 0 ] && echo "every stage passed" || echo "FAILED (see the table)")"
  printf -- '- time: %ss from set-up to the last stage (budget %ss for the run stages)\n\n' "$total" "$BUDGET"
  printf '| stage | status | seconds | numbers |\n| --- | --- | --- | --- |\n'
  for row in "${STAGES[@]}"; do
    IFS='|' read -r name status seconds numbers <<<"$row"
    printf '| %s | %s | %s | %s |\n' "$name" "$status" "$seconds" "$numbers"
  done
  cat "$SECTIONS"
} >"$REPORT"
say "report: $REPORT"
exit $FAILED

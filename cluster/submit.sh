#!/usr/bin/env bash
# Submit a `tpr` command to a Ray cluster as a Ray job, at most once per command line.
# Run `cluster/submit.sh --help` for usage.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/submit.sh [OPTIONS] -- tpr COMMAND [ARGS...]

Submit a tpr command to a Ray cluster with
  ray job submit --address ADDR --working-dir . --runtime-env cluster/runtime_env.yaml \
                 --submission-id ID --no-wait -- tpr COMMAND [ARGS...]
then follow its logs until it ends (unless --no-wait).

The submission id is stable: tpr-<subcommand>-<first 12 hex of sha1(command line)>, so running
the same command again (a retried CI step, a lost terminal) does not start a second job:
  PENDING/RUNNING  -> prints the id and follows the existing job (or returns, with --no-wait)
  SUCCEEDED        -> prints the id and exits 0 without submitting
  FAILED/STOPPED   -> exits 1 and says how to resubmit (--resubmit, or a new --id)
A submit that races another one with the same id is detected from Ray's
"already exists" error and treated the same way.

Options:
  --address ADDR           Ray dashboard (job server) address, e.g. http://10.0.0.5:8265.
                           Default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else
                           http://127.0.0.1:8265.
  --id ID                  Submission id to use instead of the derived one.
  --no-wait                Return right after submitting; prints the `ray job logs` and
                           `ray job status` commands to follow the job.
  --runtime-env FILE       Runtime env YAML (default: cluster/runtime_env.yaml).
  --working-dir DIR        Directory uploaded as the job's working dir (default: repo root).
  --entrypoint-num-cpus N  CPUs reserved for the driver (`tpr ...` itself) on the cluster.
  --entrypoint-num-gpus N  GPUs reserved for the driver (normally 0: workers take the GPUs).
  --env NAME[=VALUE]       Add an env var to the job's runtime env (repeatable). NAME alone
                           forwards the value from this shell. Values are visible in the
                           dashboard: never pass secrets this way. MLFLOW_TRACKING_URI is
                           forwarded automatically when it is set here.
  --token-file PATH        Ray auth token file; implies RAY_AUTH_MODE=token.
  --resubmit               If the job with this id FAILED or was STOPPED, delete that record
                           (`ray job delete`) and submit again under the same id.
  --print-id               Print the submission id for the command and exit.
  --dry-run                Print the `ray job submit` command line and exit (no cluster needed).
  -h, --help               Show this help and exit.

Token authentication (Ray >= 2.52, RAY_AUTH_MODE=token):
  The cluster and this script must hold the same token. Ray's CLI reads it from, in order:
  RAY_AUTH_TOKEN (the token itself), RAY_AUTH_TOKEN_PATH (a file), ~/.ray/auth_token.
  Make one with `ray get-auth-token --generate` (writes ~/.ray/auth_token), start the cluster
  with RAY_AUTH_MODE=token and that token (see cluster/README.md), then either export
  RAY_AUTH_MODE=token here or use --token-file. When RAY_AUTH_MODE is unset and a token is
  found in one of those places, this script turns token mode on for its own `ray` calls, as
  `ray start --head` does (sending the header to a cluster without auth is harmless).
  Set RAY_AUTH_MODE=disabled to never send it.

Environment:
  RAY_BIN   ray executable to use (default: .venv/bin/ray of this repo if present, else `ray`
            on PATH). The cluster side must have `tpr` on PATH (cluster/Dockerfile installs it;
            for a local `ray start --head`, start Ray from the activated .venv).
  TPR_SUBMIT_AGENT_WAIT_S
            seconds to keep retrying while a just-started cluster says "No available agent
            to submit job" (default 120).

Examples:
  cluster/submit.sh --address http://127.0.0.1:8265 -- \
      tpr train pipelines/configs/irra_synthetic_tiny.yaml --runs-dir /mnt/shared/tpr-runs
  cluster/submit.sh --no-wait --entrypoint-num-cpus 1 -- \
      tpr sweep pipelines/configs/fmfa_cuhk_base.yaml --space tune_spaces/fmfa.yaml \
      --samples 16 --max-concurrent 4 --runs-dir s3://my-bucket/tpr-runs
EOF
}

die() { echo "submit.sh: error: $*" >&2; exit 2; }
say() { echo "[submit] $*" >&2; }

ORIG_PWD=$PWD
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Make a user-given path absolute against the directory the script was called from.
abspath() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$ORIG_PWD/$1" ;;
  esac
}

ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
JOB_ID=""
NO_WAIT=0
RUNTIME_ENV="$REPO_ROOT/cluster/runtime_env.yaml"
WORKING_DIR="$REPO_ROOT"
ENTRY_CPUS=""
ENTRY_GPUS=""
RESUBMIT=0
PRINT_ID=0
DRY_RUN=0
EXTRA_ENV=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --address) [[ $# -ge 2 ]] || die "--address needs a value"; ADDRESS=$2; shift 2 ;;
    --address=*) ADDRESS=${1#*=}; shift ;;
    --id) [[ $# -ge 2 ]] || die "--id needs a value"; JOB_ID=$2; shift 2 ;;
    --id=*) JOB_ID=${1#*=}; shift ;;
    --no-wait) NO_WAIT=1; shift ;;
    --runtime-env) [[ $# -ge 2 ]] || die "--runtime-env needs a value"; RUNTIME_ENV=$(abspath "$2"); shift 2 ;;
    --runtime-env=*) RUNTIME_ENV=$(abspath "${1#*=}"); shift ;;
    --working-dir) [[ $# -ge 2 ]] || die "--working-dir needs a value"; WORKING_DIR=$(abspath "$2"); shift 2 ;;
    --working-dir=*) WORKING_DIR=$(abspath "${1#*=}"); shift ;;
    --entrypoint-num-cpus) [[ $# -ge 2 ]] || die "--entrypoint-num-cpus needs a value"; ENTRY_CPUS=$2; shift 2 ;;
    --entrypoint-num-cpus=*) ENTRY_CPUS=${1#*=}; shift ;;
    --entrypoint-num-gpus) [[ $# -ge 2 ]] || die "--entrypoint-num-gpus needs a value"; ENTRY_GPUS=$2; shift 2 ;;
    --entrypoint-num-gpus=*) ENTRY_GPUS=${1#*=}; shift ;;
    --env) [[ $# -ge 2 ]] || die "--env needs NAME or NAME=VALUE"; EXTRA_ENV+=("$2"); shift 2 ;;
    --env=*) EXTRA_ENV+=("${1#*=}"); shift ;;
    --token-file) [[ $# -ge 2 ]] || die "--token-file needs a path"
      export RAY_AUTH_TOKEN_PATH; RAY_AUTH_TOKEN_PATH=$(abspath "$2"); export RAY_AUTH_MODE=token; shift 2 ;;
    --resubmit) RESUBMIT=1; shift ;;
    --print-id) PRINT_ID=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command to run goes after '--'; see --help)" ;;
  esac
done

CMD=("$@")
[[ ${#CMD[@]} -gt 0 ]] || die "no command given: put it after '--', e.g. -- tpr sweep CONFIG --space SPACE"
[[ "${CMD[0]}" == "tpr" ]] || die "the command must be a tpr command (got '${CMD[0]}'): -- tpr COMMAND [ARGS...]"
[[ ${#CMD[@]} -ge 2 ]] || die "no tpr subcommand given (train, sweep, evaluate, promote, ...)"

# ---------------------------------------------------------------- submission id
sha1_hex() {
  if command -v sha1sum >/dev/null 2>&1; then sha1sum | cut -c1-40
  elif command -v shasum >/dev/null 2>&1; then shasum -a 1 | cut -c1-40
  else die "need sha1sum or shasum to derive the submission id (or pass --id)"; fi
}
if [[ -z "$JOB_ID" ]]; then
  # NUL-separated argv: `tpr train "a b"` and `tpr train a b` hash differently.
  digest=$(printf '%s\0' "${CMD[@]}" | sha1_hex)
  sub=$(printf '%s' "${CMD[1]}" | tr -c 'a-zA-Z0-9' '-' | tr 'A-Z' 'a-z')
  if [[ "${CMD[1]}" == "data" && ${#CMD[@]} -ge 3 && "${CMD[2]}" != -* ]]; then
    sub="data-$(printf '%s' "${CMD[2]}" | tr -c 'a-zA-Z0-9' '-' | tr 'A-Z' 'a-z')"
  fi
  sub=$(printf '%s' "$sub" | tr -s '-' | sed 's/^-*//; s/-*$//')
  JOB_ID="tpr-${sub:+$sub-}${digest:0:12}"
fi
[[ "$JOB_ID" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "submission id '$JOB_ID' must use only letters, digits, '.', '_', '-'"

if [[ $PRINT_ID -eq 1 ]]; then
  printf '%s\n' "$JOB_ID"
  exit 0
fi

# ---------------------------------------------------------------- tools and inputs
if [[ -n "${RAY_BIN:-}" ]]; then
  RAY=$RAY_BIN
elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
  RAY="$REPO_ROOT/.venv/bin/ray"
elif command -v ray >/dev/null 2>&1; then
  RAY=$(command -v ray)
else
  die "'ray' not found: run scripts/bootstrap.sh (creates .venv), put ray on PATH, or set RAY_BIN"
fi
[[ -f "$RUNTIME_ENV" ]] || die "runtime env file not found: $RUNTIME_ENV"
[[ -d "$WORKING_DIR" ]] || die "working dir not found: $WORKING_DIR"

# Env vars for the job: MLFLOW_TRACKING_URI from this shell, then each --env.
if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
  EXTRA_ENV=("MLFLOW_TRACKING_URI" "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}")
fi
ENV_PAIRS=()
for item in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
  name=${item%%=*}
  [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env '$item': '$name' is not a valid variable name"
  if [[ "$item" == *=* ]]; then
    value=${item#*=}
  else
    [[ -n "${!name+x}" ]] || die "--env $name: $name is not set in this shell (use --env $name=VALUE)"
    value=${!name}
  fi
  case "$name" in
    *PASSWORD*|*SECRET*|*TOKEN*|AWS_ACCESS_KEY_ID)
      die "--env $name looks like a credential; runtime envs are visible in the dashboard. Put it in the cluster's secret instead (cluster/README.md)" ;;
  esac
  ENV_PAIRS+=("$name=$value")
done

# With extra env vars, write a merged runtime env next to nothing in the repo (a temp file),
# since `ray job submit` takes either --runtime-env or --runtime-env-json, not both.
RUNTIME_ENV_ARG=$RUNTIME_ENV
TMP_RUNTIME_ENV=""
cleanup() { if [[ -n "$TMP_RUNTIME_ENV" ]]; then rm -f "$TMP_RUNTIME_ENV"; fi; }
trap cleanup EXIT
if [[ ${#ENV_PAIRS[@]} -gt 0 ]]; then
  if [[ -x "$(dirname "$RAY")/python" ]]; then PY="$(dirname "$RAY")/python"; else PY=python3; fi
  TMP_RUNTIME_ENV=$(mktemp "${TMPDIR:-/tmp}/tpr-runtime-env.XXXXXX")
  "$PY" - "$RUNTIME_ENV" "$TMP_RUNTIME_ENV" "${ENV_PAIRS[@]}" <<'PYEOF' || die "could not merge --env values into $RUNTIME_ENV"
import sys

import yaml

src, dst, *pairs = sys.argv[1:]
with open(src) as f:
    env = yaml.safe_load(f) or {}
env_vars = dict(env.get("env_vars") or {})
for pair in pairs:
    name, _, value = pair.partition("=")
    env_vars[name] = value
env["env_vars"] = env_vars
with open(dst, "w") as f:
    yaml.safe_dump(env, f, sort_keys=False)
PYEOF
  RUNTIME_ENV_ARG=$TMP_RUNTIME_ENV
fi

SUBMIT=("$RAY" job submit --address "$ADDRESS" --working-dir "$WORKING_DIR"
        --runtime-env "$RUNTIME_ENV_ARG" --submission-id "$JOB_ID" --no-wait)
if [[ -n "$ENTRY_CPUS" ]]; then SUBMIT+=(--entrypoint-num-cpus "$ENTRY_CPUS"); fi
if [[ -n "$ENTRY_GPUS" ]]; then SUBMIT+=(--entrypoint-num-gpus "$ENTRY_GPUS"); fi
SUBMIT+=(-- "${CMD[@]}")

if [[ $DRY_RUN -eq 1 ]]; then
  # Show the file the user named, not the temp copy, plus the env vars merged into it.
  shown=("${SUBMIT[@]}")
  for i in "${!shown[@]}"; do
    if [[ -n "$TMP_RUNTIME_ENV" && "${shown[$i]}" == "$TMP_RUNTIME_ENV" ]]; then shown[$i]=$RUNTIME_ENV; fi
  done
  printf '%q ' "${shown[@]}"; echo
  for pair in "${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"}"; do echo "# runtime env var: ${pair%%=*}"; done
  exit 0
fi

# ---------------------------------------------------------------- token authentication
token_source() {
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then echo "RAY_AUTH_TOKEN"; return 0; fi
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
    echo "$RAY_AUTH_TOKEN_PATH"; return 0
  fi
  if [[ -s "$HOME/.ray/auth_token" ]]; then echo "$HOME/.ray/auth_token"; return 0; fi
  return 1
}
case "${RAY_AUTH_MODE:-}" in
  token)
    src=$(token_source) || die "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or --token-file, or put the cluster's token in ~/.ray/auth_token (see cluster/README.md)"
    say "token auth on (token from $src)" ;;
  "")
    if src=$(token_source); then
      export RAY_AUTH_MODE=token
      say "token auth on (token from $src; set RAY_AUTH_MODE=disabled to turn off)"
    fi ;;
  *) : ;;
esac

# ---------------------------------------------------------------- job state
# Prints one of NONE PENDING RUNNING SUCCEEDED FAILED STOPPED; dies if the cluster can't be asked.
job_state() {
  local out rc=0
  out=$("$RAY" job status "$JOB_ID" --address "$ADDRESS" --log-style record --log-color false 2>&1) || rc=$?
  out=$(printf '%s\n' "$out" | sed 's/\x1b\[[0-9;]*m//g')
  if [[ $rc -ne 0 ]]; then
    if grep -q "does not exist" <<<"$out"; then echo NONE; return 0; fi
    printf '%s\n' "$out" | tail -n 5 >&2
    die "could not get the status of job '$JOB_ID' from $ADDRESS (see above)"
  fi
  # These lines are what `ray job status` logs for each state (ray/dashboard/modules/job/cli.py).
  local running
  running=$(sed -n "s/.*Status for job '.*': \([A-Z_]*\).*/\1/p" <<<"$out" | head -n 1)
  if grep -Fq "Job '$JOB_ID' succeeded" <<<"$out"; then echo SUCCEEDED
  elif grep -Fq "Job '$JOB_ID' failed" <<<"$out"; then echo FAILED
  elif grep -Fq "Job '$JOB_ID' was stopped" <<<"$out"; then echo STOPPED
  elif [[ -n "$running" ]]; then echo "$running"
  else
    printf '%s\n' "$out" >&2
    die "could not read the status of job '$JOB_ID' from the output above"
  fi
}

follow_up() {
  say "follow it with:"
  say "  $RAY job logs $JOB_ID --address $ADDRESS --follow"
  say "  $RAY job status $JOB_ID --address $ADDRESS"
  say "  $RAY job stop $JOB_ID --address $ADDRESS"
}

# Follow an existing job to its end; exit 0 only if it succeeded.
wait_for_job() {
  if [[ $NO_WAIT -eq 1 ]]; then follow_up; exit 0; fi
  say "following logs of $JOB_ID (Ctrl-C stops following, not the job)"
  "$RAY" job logs "$JOB_ID" --address "$ADDRESS" --follow --log-style record || true
  local final
  final=$(job_state)
  say "job $JOB_ID: $final"
  [[ "$final" == SUCCEEDED ]] && exit 0
  exit 1
}

# Decide what to do about a job that already holds this id.
handle_existing() {
  local state=$1
  case "$state" in
    PENDING|RUNNING)
      say "job $JOB_ID is already $state: not submitting again"
      printf '%s\n' "$JOB_ID"
      wait_for_job ;;
    SUCCEEDED)
      say "job $JOB_ID already SUCCEEDED: not submitting again (logs: $RAY job logs $JOB_ID --address $ADDRESS)"
      printf '%s\n' "$JOB_ID"
      exit 0 ;;
    FAILED|STOPPED)
      if [[ $RESUBMIT -eq 1 ]]; then
        say "job $JOB_ID is $state: deleting its record and submitting again (--resubmit)"
        "$RAY" job delete "$JOB_ID" --address "$ADDRESS" >&2 || die "could not delete job $JOB_ID"
        return 0
      fi
      say "job $JOB_ID is $state. Its logs: $RAY job logs $JOB_ID --address $ADDRESS"
      say "to run it again: add --resubmit (replaces that record), or pass --id NEW_ID"
      printf '%s\n' "$JOB_ID"
      exit 1 ;;
    *) die "job $JOB_ID is in an unknown state '$state'" ;;
  esac
}

cd "$REPO_ROOT"
state=$(job_state)
[[ "$state" == NONE ]] || handle_existing "$state"

say "submitting $JOB_ID to $ADDRESS: ${CMD[*]}"
rc=0
out=$("${SUBMIT[@]}" 2>&1) || rc=$?
# A cluster that has just started answers before its job agent has registered, and Ray says
# "No available agent to submit job, please try again later": so do, for a while.
AGENT_WAIT_S=${TPR_SUBMIT_AGENT_WAIT_S:-120}
waited=0
while [[ $rc -ne 0 ]] && grep -q "No available agent to submit job" <<<"$out" && ((waited < AGENT_WAIT_S)); do
  say "the cluster's job agent is not up yet; trying again in 5 s (waited ${waited} s of ${AGENT_WAIT_S})"
  sleep 5
  waited=$((waited + 5))
  rc=0
  out=$("${SUBMIT[@]}" 2>&1) || rc=$?
done
if [[ $rc -ne 0 ]]; then
  if grep -q "already exists" <<<"$out"; then
    # Another submit with this id won the race between our status check and this submit.
    say "job $JOB_ID was submitted meanwhile by someone else"
    state=$(job_state)
    RESUBMIT=0
    handle_existing "$state"
  fi
  printf '%s\n' "$out" >&2
  die "ray job submit failed (exit $rc)"
fi
printf '%s\n' "$out" | sed 's/\x1b\[[0-9;]*m//g' | grep -E "submitted successfully|Uploading" >&2 || true
say "submitted $JOB_ID"
printf '%s\n' "$JOB_ID"
wait_for_job

#!/usr/bin/env bash
# Waits for a TrainingRun to be Promoted, and fails fast with the operator's reason when it ends
# any other way (Rejected, RolledBack, Failed), instead of sitting out the whole timeout:
#
#   scripts/wait-trainingrun.sh NAMESPACE NAME [TIMEOUT_SECONDS]
#
# Exit codes: 0 Promoted; 1 ended otherwise (status message and conditions printed); 2 timed out;
# 64 usage. The run may not exist yet (helm creates it with the release), so until the timeout a
# failing `kubectl get` is retried rather than fatal. WAIT_INTERVAL_SECONDS sets the poll period.
set -uo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 NAMESPACE NAME [TIMEOUT_SECONDS]" >&2
  exit 64
fi
namespace=$1
name=$2
timeout=${3:-1800}
interval=${WAIT_INTERVAL_SECONDS:-5}
KUBECTL=${KUBECTL:-kubectl}

# Phase, message and conditions in one call; the fields are tab- and newline-separated.
template='{.status.phase}{"\t"}{.status.message}{"\n"}{range .status.conditions[*]}  {.type}={.status} ({.reason}): {.message}{"\n"}{end}'
deadline=$((SECONDS + timeout))
last_phase=""
while :; do
  if status=$("$KUBECTL" -n "$namespace" get trainingrun "$name" -o "jsonpath=$template" 2>&1); then
    phase=${status%%$'\t'*}
    if [[ "$phase" != "$last_phase" ]]; then
      echo "trainingrun/$name: ${phase:-(no phase yet)}" >&2
      last_phase=$phase
    fi
    case "$phase" in
      Promoted)
        exit 0
        ;;
      Rejected | RolledBack | Failed)
        first_line=${status%%$'\n'*}
        echo "trainingrun/$name in namespace $namespace ended $phase: ${first_line#*$'\t'}" >&2
        echo "conditions:" >&2
        printf '%s\n' "${status#*$'\n'}" >&2
        exit 1
        ;;
    esac
  elif ((SECONDS >= deadline)); then
    echo "kubectl get trainingrun/$name failed: $status" >&2
  fi
  if ((SECONDS >= deadline)); then
    echo "timed out after ${timeout}s waiting for trainingrun/$name to be Promoted (phase: ${last_phase:-none})" >&2
    exit 2
  fi
  sleep "$interval"
done

#!/usr/bin/env bash
# Sends all of ffpush's traffic (and so its always-on instance) back to an earlier revision.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: deploy/rollback.sh [--dry-run] [PROJECT_ID [REGION]] [REVISION]

Without REVISION: lists ffpush's revisions. With it: runs
  gcloud run services update-traffic ffpush --project PROJECT_ID --region REGION \
    --to-revisions=REVISION=100
PROJECT_ID and REGION come from the arguments or the environment variables of the same names.
The next deploy/deploy.sh sends traffic to its new revision again.
USAGE
}

DRY_RUN=false
positional=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=true; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; echo "rollback.sh: unknown option $1" >&2; exit 64 ;;
    *) positional+=("$1"); shift ;;
  esac
done
# A lone argument that is not a project is a revision name (ffpush-00012-abc).
if ((${#positional[@]} == 1)) && [[ "${positional[0]}" == ffpush-* ]]; then
  positional=("${PROJECT_ID:-}" "${REGION:-}" "${positional[0]}")
fi
PROJECT_ID="${positional[0]:-${PROJECT_ID:-}}"
REGION="${positional[1]:-${REGION:-}}"
REVISION="${positional[2]:-}"
if [[ -z "$PROJECT_ID" || -z "$REGION" ]]; then
  usage >&2
  echo "rollback.sh: give PROJECT_ID and REGION as arguments or in the environment" >&2
  exit 64
fi

run() {
  if $DRY_RUN; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

if [[ -z "$REVISION" ]]; then
  run gcloud run revisions list --service ffpush --project "$PROJECT_ID" --region "$REGION"
  echo "Pick one: deploy/rollback.sh $PROJECT_ID $REGION REVISION"
else
  run gcloud run services update-traffic ffpush --project "$PROJECT_ID" --region "$REGION" \
    --to-revisions="$REVISION=100"
fi

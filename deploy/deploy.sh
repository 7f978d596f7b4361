#!/usr/bin/env bash
# Builds ffpush with Cloud Build and deploys it to Cloud Run; optionally deletes the Cloud
# Functions FlutterFlow generated for push notifications. Run `deploy/deploy.sh --help`.
set -euo pipefail

SERVICE=ffpush
REPOSITORY=ffpush
# The names FlutterFlow gives its generated push-notification send functions.
FUNCTIONS=(sendPushNotificationsTrigger sendUserPushNotificationsTrigger sendScheduledPushNotifications)
# FlutterFlow functions that must stay deployed: the app calls addFcmToken to register its
# device tokens (ffpush only reads them). Never deleted, whatever FUNCTIONS says.
KEEP=(addFcmToken)
ROLES=(
  roles/datastore.user                  # read/write Firestore documents
  roles/firebasecloudmessaging.admin    # cloudmessaging.messages.create: send through FCM
  roles/logging.logWriter
  roles/monitoring.metricWriter
)
APIS=(
  run.googleapis.com
  artifactregistry.googleapis.com
  cloudbuild.googleapis.com
  firestore.googleapis.com
  fcm.googleapis.com
  iam.googleapis.com
)

usage() {
  cat <<'USAGE'
Usage: deploy/deploy.sh [options] [PROJECT_ID [REGION]]

Builds the Dockerfile with Cloud Build, pushes it to Artifact Registry and deploys
deploy/service.yaml to Cloud Run as service "ffpush", running as the service account
ffpush@PROJECT_ID.iam.gserviceaccount.com. PROJECT_ID and REGION come from the arguments or
from the environment variables of the same names. Safe to run again: what exists is kept.

Options:
  --tag TAG                image tag (default: git commit and UTC time)
  --delete-functions       once ffpush answers ready, delete FlutterFlow's generated
                           functions sendPushNotificationsTrigger,
                           sendUserPushNotificationsTrigger, sendScheduledPushNotifications
                           (destructive; without it they keep running next to ffpush).
                           addFcmToken is never touched: the app registers its device
                           tokens through it, so it must stay deployed
  --functions-region R     region of those functions (default: us-central1, FlutterFlow's)
  --dry-run                print the commands instead of running them
  -h, --help               this text

Verify:
  URL=$(gcloud run services describe ffpush --project PROJECT_ID --region REGION \
        --format='value(status.url)')
  curl -H "Authorization: Bearer $(gcloud auth print-identity-token)" "$URL/readyz"
  gcloud logging read 'resource.labels.service_name="ffpush"' --project PROJECT_ID --limit 20

Roll back to an earlier revision (deploy/rollback.sh does the same):
  gcloud run revisions list --service ffpush --project PROJECT_ID --region REGION
  gcloud run services update-traffic ffpush --project PROJECT_ID --region REGION \
    --to-revisions=REVISION=100
USAGE
}

die() {
  echo "deploy.sh: $*" >&2
  exit 64
}

DRY_RUN=false
DELETE_FUNCTIONS=false
FUNCTIONS_REGION=us-central1
TAG=""
positional=()
while (($#)); do
  case "$1" in
    --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
    --delete-functions) DELETE_FUNCTIONS=true; shift ;;
    --functions-region) FUNCTIONS_REGION="${2:?--functions-region needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=true; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) positional+=("$1"); shift ;;
  esac
done
((${#positional[@]} <= 2)) || die "too many arguments (expected PROJECT_ID [REGION])"
PROJECT_ID="${positional[0]:-${PROJECT_ID:-}}"
REGION="${positional[1]:-${REGION:-}}"
[[ -n "$PROJECT_ID" ]] || { usage >&2; die "give PROJECT_ID as an argument or in the environment"; }
[[ -n "$REGION" ]] || { usage >&2; die "give REGION (e.g. europe-west1) as an argument or in the environment"; }

cd "$(dirname "$0")/.."
if [[ -z "$TAG" ]]; then
  TAG="$(git rev-parse --short=12 HEAD 2>/dev/null || echo build)-$(date -u +%Y%m%d%H%M%S)"
fi
# The values go into sed expressions and resource names: allow what GCP allows, nothing else.
[[ "$PROJECT_ID" =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] || die "PROJECT_ID=$PROJECT_ID is not a project id"
[[ "$REGION" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "REGION=$REGION is not a region such as europe-west1"
[[ "$FUNCTIONS_REGION" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "--functions-region $FUNCTIONS_REGION is not a region"
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--tag $TAG is not a valid image tag"

SA="$SERVICE@$PROJECT_ID.iam.gserviceaccount.com"
IMAGE="$REGION-docker.pkg.dev/$PROJECT_ID/$REPOSITORY/$SERVICE:$TAG"

# Runs a command, or only prints it with --dry-run.
run() {
  if $DRY_RUN; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# True when a describe-style command succeeds. With --dry-run nothing is asked, so everything
# counts as missing and its create command is printed.
exists() {
  if $DRY_RUN; then
    return 1
  fi
  "$@" >/dev/null 2>&1
}

step() {
  echo
  echo "== $*"
}

step "Enabling APIs"
run gcloud services enable "${APIS[@]}" --project "$PROJECT_ID"

step "Service account $SA"
if exists gcloud iam service-accounts describe "$SA" --project "$PROJECT_ID"; then
  echo "exists"
else
  run gcloud iam service-accounts create "$SERVICE" --project "$PROJECT_ID" \
    --display-name "ffpush push-notification worker"
fi
for role in "${ROLES[@]}"; do
  run gcloud projects add-iam-policy-binding "$PROJECT_ID" \
    --member "serviceAccount:$SA" --role "$role" --condition None --quiet --format none
done

step "Artifact Registry repository $REPOSITORY in $REGION"
if exists gcloud artifacts repositories describe "$REPOSITORY" --location "$REGION" --project "$PROJECT_ID"; then
  echo "exists"
else
  run gcloud artifacts repositories create "$REPOSITORY" --repository-format docker \
    --location "$REGION" --project "$PROJECT_ID" --description "ffpush images"
fi

step "Building $IMAGE"
# A release build with LTO: more cores and more time than Cloud Build's defaults.
run gcloud builds submit --tag "$IMAGE" --project "$PROJECT_ID" \
  --machine-type e2-highcpu-8 --timeout 1800s .

step "Deploying service $SERVICE"
rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT
manifest="$rendered/service.yaml"
sed -e "s/PROJECT_ID/$PROJECT_ID/g" -e "s/REGION/$REGION/g" -e "s/TAG/$TAG/g" \
  deploy/service.yaml >"$manifest"
if $DRY_RUN; then
  echo "# rendered deploy/service.yaml:"
  sed 's/^/#   /' "$manifest"
fi
run gcloud run services replace "$manifest" --project "$PROJECT_ID" --region "$REGION"

step "Checking /readyz"
if $DRY_RUN; then
  echo "# curl the service URL's /readyz with an identity token until it answers 200"
else
  url="$(gcloud run services describe "$SERVICE" --project "$PROJECT_ID" --region "$REGION" \
    --format 'value(status.url)')"
  ready=false
  for _ in $(seq 1 20); do
    if curl -fsS -H "Authorization: Bearer $(gcloud auth print-identity-token)" "$url/readyz"; then
      echo
      ready=true
      break
    fi
    sleep 3
  done
  if ! $ready; then
    echo "ffpush is deployed but $url/readyz did not answer 200: see" >&2
    echo "  gcloud logging read 'resource.labels.service_name=\"$SERVICE\"' --project $PROJECT_ID --limit 50" >&2
    echo "FlutterFlow's functions were left in place." >&2
    exit 1
  fi
fi

step "FlutterFlow's generated functions in $FUNCTIONS_REGION"
for keep in "${KEEP[@]}"; do
  echo "$keep is kept: the app registers its device tokens by calling it"
done
if $DELETE_FUNCTIONS; then
  for fn in "${FUNCTIONS[@]}"; do
    for keep in "${KEEP[@]}"; do
      [[ "$fn" != "$keep" ]] || die "refusing to delete $keep: the app needs it to register device tokens"
    done
    if $DRY_RUN; then
      echo "# if $fn exists:"
      run gcloud functions delete "$fn" --region "$FUNCTIONS_REGION" --project "$PROJECT_ID" --quiet
    elif exists gcloud functions describe "$fn" --region "$FUNCTIONS_REGION" --project "$PROJECT_ID"; then
      run gcloud functions delete "$fn" --region "$FUNCTIONS_REGION" --project "$PROJECT_ID" --quiet
    else
      echo "$fn: not found, nothing to delete"
    fi
  done
else
  cat <<EOF
Left in place. While they run, they and ffpush both send each notification. Once ffpush is
verified, run this again with --delete-functions, or delete them yourself:
  gcloud functions delete ${FUNCTIONS[0]} --region $FUNCTIONS_REGION --project $PROJECT_ID --quiet
  gcloud functions delete ${FUNCTIONS[1]} --region $FUNCTIONS_REGION --project $PROJECT_ID --quiet
  gcloud functions delete ${FUNCTIONS[2]} --region $FUNCTIONS_REGION --project $PROJECT_ID --quiet
If FlutterFlow deploys its Cloud Functions again, they come back: delete them again.
EOF
fi

step "Done: $IMAGE"

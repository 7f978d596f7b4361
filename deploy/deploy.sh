#!/usr/bin/env bash
# Builds ffpush with Cloud Build and deploys it to Cloud Run with its metrics collector, its
# Cloud Monitoring dashboard and alert policies; optionally deletes the Cloud Functions
# FlutterFlow generated for push notifications. Run `deploy/deploy.sh --help`.
set -euo pipefail

# The service account, its roles, the image build, the dashboard, the alert policies and
# FlutterFlow's functions are the same for the VM (deploy/gce.sh): deploy/lib.sh.
# shellcheck source=deploy/lib.sh
. "$(dirname "$0")/lib.sh"
# The RunMonitoring config of the metrics collector (deploy/gmp-config.yaml) lives here;
# deploy/service.yaml mounts it.
GMP_SECRET=ffpush-gmp-config
APIS=(
  run.googleapis.com
  artifactregistry.googleapis.com
  cloudbuild.googleapis.com
  firestore.googleapis.com
  fcm.googleapis.com
  iam.googleapis.com
  monitoring.googleapis.com
  secretmanager.googleapis.com
)

usage() {
  cat <<'USAGE'
Usage: deploy/deploy.sh [options] [PROJECT_ID [REGION]]

Builds the Dockerfile with Cloud Build, pushes it to Artifact Registry and deploys
deploy/service.yaml to Cloud Run as service "ffpush", running as the service account
ffpush@PROJECT_ID.iam.gserviceaccount.com, next to Google's Managed Service for Prometheus
sidecar (its scrape config, deploy/gmp-config.yaml, goes to Secret Manager as
ffpush-gmp-config). Creates or updates the Cloud Monitoring dashboard deploy/dashboard.json
and the alert policies deploy/alerts/*.json. PROJECT_ID and REGION come from the arguments
or from the environment variables of the same names. Safe to run again: what exists is kept
or brought up to date.

Options:
  --tag TAG                image tag (default: git commit and UTC time)
  --delete-functions       once ffpush answers ready, delete FlutterFlow's generated
                           functions sendPushNotificationsTrigger,
                           sendUserPushNotificationsTrigger, sendScheduledPushNotifications
                           (destructive; without it they keep running next to ffpush).
                           addFcmToken is never touched: the app registers its device
                           tokens through it, so it must stay deployed
  --functions-region R     region of those functions (default: us-central1, FlutterFlow's)
  --alert-channel NAME     notify this channel (projects/P/notificationChannels/ID) when an
                           alert fires; repeat for more. Without it the alerts only open
                           incidents in the console. List channels with
                           gcloud beta monitoring channels list --project PROJECT_ID
  --retention HOURS        opt-in: delete finished notifications HOURS after they finished
                           (e.g. 2160h, 90 days; at least 24h). Sets FFPUSH_RETENTION on the
                           service (finished documents get ffpush_expires_at) and creates a
                           Firestore TTL policy on that field for ff_push_notifications and
                           ff_user_push_notifications. The FlutterFlow console lists past
                           notifications from these collections: they go too. Without it
                           nothing is deleted and each start replays the whole history
  --dry-run                print the commands instead of running them
  -h, --help               this text

Verify:
  URL=$(gcloud run services describe ffpush --project PROJECT_ID --region REGION \
        --format='value(status.url)')
  curl -H "Authorization: Bearer $(gcloud auth print-identity-token)" "$URL/readyz"
  gcloud logging read 'resource.labels.service_name="ffpush"' --project PROJECT_ID --limit 20
  Metrics: Cloud Monitoring → Dashboards → ffpush (a minute after the first scrape)

Needs the Google Cloud CLI with its alpha commands (alert policies):
  gcloud components install alpha   (or the google-cloud-cli package from apt/yum)

Roll back to an earlier revision (deploy/rollback.sh does the same):
  gcloud run revisions list --service ffpush --project PROJECT_ID --region REGION
  gcloud run services update-traffic ffpush --project PROJECT_ID --region REGION \
    --to-revisions=REVISION=100
USAGE
}

DRY_RUN=false
DELETE_FUNCTIONS=false
FUNCTIONS_REGION=us-central1
TAG=""
RETENTION=""
CHANNELS=()
positional=()
while (($#)); do
  case "$1" in
    --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
    --delete-functions) DELETE_FUNCTIONS=true; shift ;;
    --functions-region) FUNCTIONS_REGION="${2:?--functions-region needs a value}"; shift 2 ;;
    --alert-channel) CHANNELS+=("${2:?--alert-channel needs a value}"); shift 2 ;;
    --retention) RETENTION="${2:?--retention needs a value}"; shift 2 ;;
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
  TAG="$(default_tag)"
fi
check_project
[[ "$REGION" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "REGION=$REGION is not a region such as europe-west1"
[[ "$FUNCTIONS_REGION" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "--functions-region $FUNCTIONS_REGION is not a region"
check_tag
alert_channels
need_alpha
if [[ -n "$RETENTION" ]]; then
  [[ "$RETENTION" =~ ^[0-9]+h$ ]] && ((${RETENTION%h} >= 24)) ||
    die "--retention $RETENTION: give hours, at least 24h (e.g. 2160h for 90 days)"
fi

SA="$SERVICE@$PROJECT_ID.iam.gserviceaccount.com"
IMAGE="$REGION-docker.pkg.dev/$PROJECT_ID/$REPOSITORY/$SERVICE:$TAG"

# Files with the placeholders filled in go here.
RENDERED="$(mktemp -d)"
trap 'rm -rf "$RENDERED"' EXIT

step "Enabling APIs"
run gcloud services enable "${APIS[@]}" --project "$PROJECT_ID"

service_account

step "Metrics collector config: secret $GMP_SECRET (deploy/gmp-config.yaml)"
if exists gcloud secrets describe "$GMP_SECRET" --project "$PROJECT_ID"; then
  current="$(gcloud secrets versions access latest --secret "$GMP_SECRET" --project "$PROJECT_ID" 2>/dev/null || true)"
  if [[ "$current" == "$(cat deploy/gmp-config.yaml)" ]]; then
    echo "exists, up to date"
  else
    run gcloud secrets versions add "$GMP_SECRET" --project "$PROJECT_ID" \
      --data-file deploy/gmp-config.yaml
  fi
else
  if $DRY_RUN; then
    echo "# if it exists and its latest version differs: gcloud secrets versions add $GMP_SECRET --data-file deploy/gmp-config.yaml"
  fi
  run gcloud secrets create "$GMP_SECRET" --project "$PROJECT_ID" \
    --replication-policy automatic --data-file deploy/gmp-config.yaml
fi
# Only this secret, not every secret in the project.
run gcloud secrets add-iam-policy-binding "$GMP_SECRET" --project "$PROJECT_ID" \
  --member "serviceAccount:$SA" --role roles/secretmanager.secretAccessor --format none

build_image "$REGION"

step "Deploying service $SERVICE (with its metrics collector)"
manifest="$RENDERED/service.yaml"
sed -e "s/PROJECT_ID/$PROJECT_ID/g" -e "s/REGION/$REGION/g" -e "s/TAG/$TAG/g" \
  deploy/service.yaml >"$manifest"
if [[ -n "$RETENTION" ]]; then
  # The one env list in the manifest is ffpush's (the collector has none).
  awk -v retention="$RETENTION" '{ print }
    /^          env:$/ { print "            - name: FFPUSH_RETENTION"; print "              value: " retention }' \
    "$manifest" >"$manifest.retention"
  mv "$manifest.retention" "$manifest"
fi
if $DRY_RUN; then
  echo "# rendered deploy/service.yaml:"
  sed 's/^/#   /' "$manifest"
fi
run gcloud run services replace "$manifest" --project "$PROJECT_ID" --region "$REGION"

if [[ -n "$RETENTION" ]]; then
  step "Retention: Firestore TTL on ffpush_expires_at ($RETENTION after completed_at)"
  # https://cloud.google.com/sdk/gcloud/reference/firestore/fields/ttls/update; Firestore
  # deletes an expired document typically within 24 h of its expiry, not at once
  # (https://firebase.google.com/docs/firestore/ttl). Documents finished before ffpush had
  # the setting carry no ffpush_expires_at and stay.
  for group in ff_push_notifications ff_user_push_notifications; do
    run gcloud firestore fields ttls update ffpush_expires_at --collection-group "$group" \
      --enable-ttl --async --project "$PROJECT_ID"
  done
fi

dashboard
alert_policies

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

flutterflow_functions

step "Done: $IMAGE"

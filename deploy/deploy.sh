#!/usr/bin/env bash
# Builds ffpush with Cloud Build and deploys it to Cloud Run with its metrics collector, its
# Cloud Monitoring dashboard and alert policies; optionally deletes the Cloud Functions
# FlutterFlow generated for push notifications. Run `deploy/deploy.sh --help`.
set -euo pipefail

SERVICE=ffpush
REPOSITORY=ffpush
# The RunMonitoring config of the metrics collector (deploy/gmp-config.yaml) lives here;
# deploy/service.yaml mounts it.
GMP_SECRET=ffpush-gmp-config
# deploy/dashboard.json's id (its "name" ends in it).
DASHBOARD=ffpush
# The names FlutterFlow gives its generated push-notification send functions.
FUNCTIONS=(sendPushNotificationsTrigger sendUserPushNotificationsTrigger sendScheduledPushNotifications)
# FlutterFlow functions that must stay deployed: the app calls addFcmToken to register its
# device tokens (ffpush only reads them). Never deleted, whatever FUNCTIONS says.
KEEP=(addFcmToken)
ROLES=(
  roles/datastore.user                  # read/write Firestore documents
  roles/firebasecloudmessaging.admin    # cloudmessaging.messages.create: send through FCM
  roles/logging.logWriter
  roles/monitoring.metricWriter         # the metrics collector writes to Cloud Monitoring
)
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

die() {
  echo "deploy.sh: $*" >&2
  exit 64
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
  TAG="$(git rev-parse --short=12 HEAD 2>/dev/null || echo build)-$(date -u +%Y%m%d%H%M%S)"
fi
# The values go into sed expressions and resource names: allow what GCP allows, nothing else.
[[ "$PROJECT_ID" =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] || die "PROJECT_ID=$PROJECT_ID is not a project id"
[[ "$REGION" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "REGION=$REGION is not a region such as europe-west1"
[[ "$FUNCTIONS_REGION" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "--functions-region $FUNCTIONS_REGION is not a region"
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--tag $TAG is not a valid image tag"
if [[ -n "$RETENTION" ]]; then
  [[ "$RETENTION" =~ ^[0-9]+h$ ]] && ((${RETENTION%h} >= 24)) ||
    die "--retention $RETENTION: give hours, at least 24h (e.g. 2160h for 90 days)"
fi
channels_json=""
# (The ${a[@]+…} form: an empty array under `set -u` in the bash 3 macOS ships.)
for channel in ${CHANNELS[@]+"${CHANNELS[@]}"}; do
  [[ "$channel" =~ ^projects/[a-z0-9-]+/notificationChannels/[0-9]+$ ]] ||
    die "--alert-channel $channel: give projects/PROJECT/notificationChannels/ID"
  channels_json+="${channels_json:+, }\"$channel\""
done

if ! $DRY_RUN && ! gcloud alpha monitoring policies list --help >/dev/null 2>&1; then
  die "the alert policies need gcloud's alpha commands: gcloud components install alpha"
fi

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

# Files with the placeholders filled in go here.
rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT

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

step "Deploying service $SERVICE (with its metrics collector)"
manifest="$rendered/service.yaml"
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

step "Dashboard $DASHBOARD (deploy/dashboard.json)"
dashboard="$rendered/dashboard.json"
sed -e "s/PROJECT_ID/$PROJECT_ID/g" deploy/dashboard.json >"$dashboard"
if $DRY_RUN; then
  echo "# if it exists: the same file with its current etag added (gcloud monitoring dashboards describe $DASHBOARD):"
  run gcloud monitoring dashboards update "$DASHBOARD" --project "$PROJECT_ID" --config-from-file "$dashboard" --format none
  echo "# else:"
  run gcloud monitoring dashboards create --project "$PROJECT_ID" --config-from-file "$dashboard" --format none
elif etag="$(gcloud monitoring dashboards describe "$DASHBOARD" --project "$PROJECT_ID" \
  --format 'value(etag)' 2>/dev/null)" && [[ -n "$etag" ]]; then
  [[ "$etag" =~ ^[A-Za-z0-9_-]+$ ]] || die "dashboard $DASHBOARD has an unexpected etag $etag"
  # The file starts with a line holding only "{"; the etag says which version is replaced.
  { printf '{\n  "etag": "%s",\n' "$etag"; tail -n +2 "$dashboard"; } >"$dashboard.update"
  run gcloud monitoring dashboards update "$DASHBOARD" --project "$PROJECT_ID" \
    --config-from-file "$dashboard.update" --format none
else
  run gcloud monitoring dashboards create --project "$PROJECT_ID" --config-from-file "$dashboard" --format none
fi

step "Alert policies (deploy/alerts)"
for file in deploy/alerts/*.json; do
  id="$(basename "$file" .json)"
  policy="$rendered/alert-$id.json"
  sed -e "s|\"notificationChannels\": \[\]|\"notificationChannels\": [$channels_json]|" "$file" >"$policy"
  # Each file's userLabels carry app=ffpush and policy=<file name>: how it is found again.
  if $DRY_RUN; then
    echo "# $id: if gcloud alpha monitoring policies list --filter 'userLabels.app=ffpush AND userLabels.policy=$id' finds NAME:"
    run gcloud alpha monitoring policies update NAME --project "$PROJECT_ID" --policy-from-file "$policy" \
      --format none
    echo "# else:"
    run gcloud alpha monitoring policies create --project "$PROJECT_ID" --policy-from-file "$policy" \
      --format none
    echo "# rendered $file:"
    sed 's/^/#   /' "$policy"
    continue
  fi
  existing="$(gcloud alpha monitoring policies list --project "$PROJECT_ID" \
    --filter "userLabels.app=ffpush AND userLabels.policy=$id" --format 'value(name)')"
  if [[ -n "$existing" ]]; then
    if (($(wc -l <<<"$existing") > 1)); then
      echo "$id: several policies carry its labels; updating the first, delete the others:" >&2
      echo "$existing" >&2
    fi
    echo "$id: updating $(head -n 1 <<<"$existing")"
    run gcloud alpha monitoring policies update "$(head -n 1 <<<"$existing")" \
      --project "$PROJECT_ID" --policy-from-file "$policy" --format none
  else
    echo "$id: creating"
    run gcloud alpha monitoring policies create --project "$PROJECT_ID" --policy-from-file "$policy" \
      --format none
  fi
done
if ((${#CHANNELS[@]} == 0)); then
  echo "No --alert-channel: the policies open incidents in the console but notify nobody."
fi

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

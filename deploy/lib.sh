# shellcheck shell=bash
# Shared by deploy/deploy.sh (Cloud Run) and deploy/gce.sh (one Compute Engine VM): the
# service account and its roles, the image build, the dashboard and alert policies,
# FlutterFlow's generated functions, and how each command is run or, with --dry-run, only
# printed. Sourced by both scripts, never run by itself; they set DRY_RUN, PROJECT_ID and the
# variables each function names.

SERVICE=ffpush
REPOSITORY=ffpush
# deploy/dashboard.json's id (its "name" ends in it).
DASHBOARD=ffpush
# The names FlutterFlow gives its generated push-notification send functions.
FUNCTIONS=(sendPushNotificationsTrigger sendUserPushNotificationsTrigger sendScheduledPushNotifications)
# FlutterFlow functions that must stay deployed: the app calls addFcmToken to register its
# device tokens (ffpush only reads them). Never deleted, whatever FUNCTIONS says.
KEEP=(addFcmToken)
# What ffpush's service account may do, wherever it runs.
ROLES=(
  roles/datastore.user                  # read/write Firestore documents
  roles/firebasecloudmessaging.admin    # cloudmessaging.messages.create: send through FCM
  roles/logging.logWriter
  roles/monitoring.metricWriter         # the metrics collector writes to Cloud Monitoring
)

die() {
  echo "$(basename "$0"): $*" >&2
  exit 64
}

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

# The values go into sed expressions and resource names: allow what GCP allows, nothing else.
check_project() {
  [[ "$PROJECT_ID" =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] || die "PROJECT_ID=$PROJECT_ID is not a project id"
}

check_tag() {
  [[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--tag $TAG is not a valid image tag"
}

default_tag() {
  echo "$(git rev-parse --short=12 HEAD 2>/dev/null || echo build)-$(date -u +%Y%m%d%H%M%S)"
}

# CHANNELS (--alert-channel, repeatable) → channels_json, the policies' notificationChannels.
alert_channels() {
  channels_json=""
  # (The ${a[@]+…} form: an empty array under `set -u` in the bash 3 macOS ships.)
  for channel in ${CHANNELS[@]+"${CHANNELS[@]}"}; do
    [[ "$channel" =~ ^projects/[a-z0-9-]+/notificationChannels/[0-9]+$ ]] ||
      die "--alert-channel $channel: give projects/PROJECT/notificationChannels/ID"
    channels_json+="${channels_json:+, }\"$channel\""
  done
}

need_alpha() {
  if ! $DRY_RUN && ! gcloud alpha monitoring policies list --help >/dev/null 2>&1; then
    die "the alert policies need gcloud's alpha commands: gcloud components install alpha"
  fi
}

# The service account SA with ROLES on the project.
service_account() {
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
}

# The Artifact Registry repository in $1, and IMAGE built into it by Cloud Build.
build_image() {
  local location="$1"
  step "Artifact Registry repository $REPOSITORY in $location"
  if exists gcloud artifacts repositories describe "$REPOSITORY" --location "$location" --project "$PROJECT_ID"; then
    echo "exists"
  else
    run gcloud artifacts repositories create "$REPOSITORY" --repository-format docker \
      --location "$location" --project "$PROJECT_ID" --description "ffpush images"
  fi

  step "Building $IMAGE"
  # A release build with LTO: more cores and more time than Cloud Build's defaults.
  run gcloud builds submit --tag "$IMAGE" --project "$PROJECT_ID" \
    --machine-type e2-highcpu-8 --timeout 1800s .
}

# deploy/dashboard.json, created or replaced under its id; RENDERED is a scratch directory.
dashboard() {
  step "Dashboard $DASHBOARD (deploy/dashboard.json)"
  local file="$RENDERED/dashboard.json" etag
  sed -e "s/PROJECT_ID/$PROJECT_ID/g" deploy/dashboard.json >"$file"
  if $DRY_RUN; then
    echo "# if it exists: the same file with its current etag added (gcloud monitoring dashboards describe $DASHBOARD):"
    run gcloud monitoring dashboards update "$DASHBOARD" --project "$PROJECT_ID" --config-from-file "$file" --format none
    echo "# else:"
    run gcloud monitoring dashboards create --project "$PROJECT_ID" --config-from-file "$file" --format none
  elif etag="$(gcloud monitoring dashboards describe "$DASHBOARD" --project "$PROJECT_ID" \
    --format 'value(etag)' 2>/dev/null)" && [[ -n "$etag" ]]; then
    [[ "$etag" =~ ^[A-Za-z0-9_-]+$ ]] || die "dashboard $DASHBOARD has an unexpected etag $etag"
    # The file starts with a line holding only "{"; the etag says which version is replaced.
    { printf '{\n  "etag": "%s",\n' "$etag"; tail -n +2 "$file"; } >"$file.update"
    run gcloud monitoring dashboards update "$DASHBOARD" --project "$PROJECT_ID" \
      --config-from-file "$file.update" --format none
  else
    run gcloud monitoring dashboards create --project "$PROJECT_ID" --config-from-file "$file" --format none
  fi
}

# deploy/alerts/*.json, each created or replaced (found again by its labels), notifying
# channels_json.
alert_policies() {
  step "Alert policies (deploy/alerts)"
  local file id policy existing
  for file in deploy/alerts/*.json; do
    id="$(basename "$file" .json)"
    policy="$RENDERED/alert-$id.json"
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
}

# FlutterFlow's send functions in FUNCTIONS_REGION: deleted with DELETE_FUNCTIONS=true (call it
# only once ffpush answers ready), otherwise how to delete them is printed.
flutterflow_functions() {
  step "FlutterFlow's generated functions in $FUNCTIONS_REGION"
  local keep fn
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
}

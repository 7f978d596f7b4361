#!/usr/bin/env bash
# Runs ffpush on one Compute Engine e2-micro VM, the machine of Google Cloud's Always Free
# tier, instead of Cloud Run: the same image, service account, dashboard and alert policies
# as deploy/deploy.sh. Run `deploy/gce.sh --help`.
set -euo pipefail

# The service account, its roles, the image build, the dashboard, the alert policies and
# FlutterFlow's functions are those of deploy/deploy.sh: deploy/lib.sh.
# shellcheck source=deploy/lib.sh
. "$(dirname "$0")/lib.sh"
VM=ffpush
# The free tier covers one e2-micro a month in these regions only (Google Cloud's free
# program page), with 30 GB of standard persistent disk.
FREE_REGIONS=(us-west1 us-central1 us-east1)
APIS=(
  compute.googleapis.com
  artifactregistry.googleapis.com
  cloudbuild.googleapis.com
  firestore.googleapis.com
  fcm.googleapis.com
  iam.googleapis.com
  logging.googleapis.com
  monitoring.googleapis.com
)

usage() {
  cat <<'USAGE'
Usage: deploy/gce.sh [options] [PROJECT_ID [ZONE]]

Builds the Dockerfile with Cloud Build (or takes --image), and runs it on one Compute Engine
VM "ffpush": an e2-micro (Google Cloud's Always Free tier in us-west1, us-central1 and
us-east1) with Debian 12, a 10 GB standard disk, the service account
ffpush@PROJECT_ID.iam.gserviceaccount.com (the roles deploy/deploy.sh grants, and reading
this one image repository), and deploy/gce-startup.sh as its startup script: Docker runs the
image under systemd (started at boot, restarted when it exits), Google's Ops Agent sends its
logs to Cloud Logging and scrapes its /metrics into Cloud Monitoring. No firewall rule is
created: nothing outside the VM can reach it. Creates or updates the dashboard
deploy/dashboard.json, and with --alerts or --alert-channel the alert policies
deploy/alerts/*.json (Cloud Monitoring bills each policy's condition, so the free path
leaves them out unless asked). PROJECT_ID and ZONE come
from the arguments or from the environment variables of the same names (ZONE default:
us-central1-a). Safe to run again: a VM that exists gets the new image and is restarted
(ffpush is down for the reboot and its start; nothing is lost, see docs/operations.md).

Options:
  --tag TAG                image tag (default: git commit and UTC time)
  --image IMAGE            run this image (e.g. the one deploy/deploy.sh built) instead of
                           building one; it must be in Artifact Registry in this project
  --machine-type TYPE      default e2-micro; any other type is billed
  --delete-functions       once ffpush answers ready, delete FlutterFlow's generated
                           functions sendPushNotificationsTrigger,
                           sendUserPushNotificationsTrigger, sendScheduledPushNotifications
                           (destructive; without it they keep running next to ffpush).
                           addFcmToken is never touched: the app registers its device
                           tokens through it, so it must stay deployed
  --functions-region R     region of those functions (default: us-central1, FlutterFlow's)
  --alerts                 also create the alert policies (billed per condition)
  --alert-channel NAME     create the alert policies and notify this channel
                           (projects/P/notificationChannels/ID) when one fires; repeatable
  --dry-run                print the commands instead of running them
  -h, --help               this text

Verify:
  gcloud compute instances get-serial-port-output ffpush --zone ZONE --project PROJECT_ID | grep 'ffpush:'
  gcloud logging read 'resource.type="gce_instance" AND jsonPayload.target:"ffpush"' --project PROJECT_ID --limit 20
  gcloud compute ssh ffpush --zone ZONE --project PROJECT_ID -- curl -s localhost:8080/readyz
  Metrics: Cloud Monitoring → Dashboards → ffpush (a minute after the first scrape)

Restart without a reboot (about a second of downtime, see docs/operations.md):
  gcloud compute ssh ffpush --zone ZONE --project PROJECT_ID -- sudo systemctl restart ffpush
USAGE
}

DRY_RUN=false
DELETE_FUNCTIONS=false
FUNCTIONS_REGION=us-central1
TAG=""
IMAGE=""
MACHINE_TYPE=e2-micro
ALERTS=false
CHANNELS=()
positional=()
while (($#)); do
  case "$1" in
    --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
    --image) IMAGE="${2:?--image needs a value}"; shift 2 ;;
    --machine-type) MACHINE_TYPE="${2:?--machine-type needs a value}"; shift 2 ;;
    --delete-functions) DELETE_FUNCTIONS=true; shift ;;
    --functions-region) FUNCTIONS_REGION="${2:?--functions-region needs a value}"; shift 2 ;;
    --alerts) ALERTS=true; shift ;;
    --alert-channel) CHANNELS+=("${2:?--alert-channel needs a value}"); ALERTS=true; shift 2 ;;
    --dry-run) DRY_RUN=true; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) positional+=("$1"); shift ;;
  esac
done
((${#positional[@]} <= 2)) || die "too many arguments (expected PROJECT_ID [ZONE])"
PROJECT_ID="${positional[0]:-${PROJECT_ID:-}}"
ZONE="${positional[1]:-${ZONE:-us-central1-a}}"
[[ -n "$PROJECT_ID" ]] || { usage >&2; die "give PROJECT_ID as an argument or in the environment"; }

cd "$(dirname "$0")/.."
check_project
[[ "$ZONE" =~ ^([a-z]+-[a-z]+[0-9]+)-[a-z]$ ]] || die "ZONE=$ZONE is not a zone such as us-central1-a"
REGION="${BASH_REMATCH[1]}"
[[ "$FUNCTIONS_REGION" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "--functions-region $FUNCTIONS_REGION is not a region"
[[ "$MACHINE_TYPE" =~ ^[a-z0-9-]+$ ]] || die "--machine-type $MACHINE_TYPE is not a machine type"
alert_channels
if $ALERTS; then
  need_alpha
fi

SA="$SERVICE@$PROJECT_ID.iam.gserviceaccount.com"
if [[ -n "$IMAGE" ]]; then
  [[ -z "$TAG" ]] || die "give --image or --tag, not both"
  [[ "$IMAGE" =~ ^([a-z0-9-]+)-docker\.pkg\.dev/$PROJECT_ID/([a-z0-9-]+)/[a-z0-9._/-]+(:[A-Za-z0-9_.-]+|@sha256:[0-9a-f]{64})$ ]] ||
    die "--image $IMAGE: give an Artifact Registry image of this project, LOCATION-docker.pkg.dev/$PROJECT_ID/REPOSITORY/NAME:TAG"
  IMAGE_LOCATION="${BASH_REMATCH[1]}"
  IMAGE_REPOSITORY="${BASH_REMATCH[2]}"
else
  [[ -n "$TAG" ]] || TAG="$(default_tag)"
  check_tag
  IMAGE="$REGION-docker.pkg.dev/$PROJECT_ID/$REPOSITORY/$SERVICE:$TAG"
  IMAGE_LOCATION="$REGION"
  IMAGE_REPOSITORY="$REPOSITORY"
fi

free=false
for region in "${FREE_REGIONS[@]}"; do
  [[ "$REGION" != "$region" ]] || free=true
done
if [[ "$MACHINE_TYPE" != e2-micro ]] || ! $free; then
  echo "Note: only an e2-micro in ${FREE_REGIONS[*]} is in the free tier; $MACHINE_TYPE in $REGION is billed." >&2
fi

RENDERED="$(mktemp -d)"
trap 'rm -rf "$RENDERED"' EXIT

step "Enabling APIs"
run gcloud services enable "${APIS[@]}" --project "$PROJECT_ID"

service_account

if [[ "$IMAGE_REPOSITORY" == "$REPOSITORY" && "$IMAGE_LOCATION" == "$REGION" && -n "$TAG" ]]; then
  build_image "$REGION"
else
  step "Image $IMAGE (not built here)"
fi
# Cloud Run pulls with its own service agent; a VM pulls with its service account, which
# may read this one repository and nothing else.
step "Letting $SA pull from $IMAGE_LOCATION/$IMAGE_REPOSITORY"
run gcloud artifacts repositories add-iam-policy-binding "$IMAGE_REPOSITORY" \
  --location "$IMAGE_LOCATION" --project "$PROJECT_ID" \
  --member "serviceAccount:$SA" --role roles/artifactregistry.reader --format none

step "VM $VM ($MACHINE_TYPE in $ZONE)"
# The startup script echoes the deploy id when ffpush is ready: how this run knows it is its
# own boot that got there, not an earlier one still in the serial console.
DEPLOY_ID="$(date -u +%Y%m%dT%H%M%SZ)-$$"
metadata="ffpush-image=$IMAGE,ffpush-deploy=$DEPLOY_ID,enable-oslogin=TRUE"
if exists gcloud compute instances describe "$VM" --zone "$ZONE" --project "$PROJECT_ID"; then
  echo "exists: new image and startup script, then a restart (ffpush is down until it is ready again)"
  run gcloud compute instances add-metadata "$VM" --zone "$ZONE" --project "$PROJECT_ID" \
    --metadata "$metadata" --metadata-from-file startup-script=deploy/gce-startup.sh
  run gcloud compute instances reset "$VM" --zone "$ZONE" --project "$PROJECT_ID"
else
  if $DRY_RUN; then
    echo "# if it exists: gcloud compute instances add-metadata $VM (the same metadata), then gcloud compute instances reset $VM"
  fi
  # The free tier's disk is standard persistent disk (30 GB-months); Debian 12 has gcloud,
  # which pulls from Artifact Registry, and is an Ops Agent platform.
  run gcloud compute instances create "$VM" --zone "$ZONE" --project "$PROJECT_ID" \
    --machine-type "$MACHINE_TYPE" \
    --image-family debian-12 --image-project debian-cloud \
    --boot-disk-size 10GB --boot-disk-type pd-standard \
    --service-account "$SA" --scopes cloud-platform \
    --shielded-secure-boot --shielded-vtpm --shielded-integrity-monitoring \
    --labels app=ffpush \
    --metadata "$metadata" --metadata-from-file startup-script=deploy/gce-startup.sh
fi

dashboard
if $ALERTS; then
  alert_policies
else
  step "Alert policies: not created"
  echo "Cloud Monitoring bills each alert condition (\$1.50 a month each, docs/operations.md, \"What it costs\");"
  echo "run again with --alerts, or --alert-channel to be notified, to create deploy/alerts/*.json."
fi

step "Waiting for ffpush to answer ready (the VM's serial console)"
if $DRY_RUN; then
  echo "# gcloud compute instances get-serial-port-output $VM until the startup script prints \"ffpush: ready (deploy $DEPLOY_ID)\""
else
  ready=false
  # First boot installs Docker and the Ops Agent: minutes on an e2-micro.
  for _ in $(seq 1 60); do
    output="$(gcloud compute instances get-serial-port-output "$VM" --zone "$ZONE" --project "$PROJECT_ID" 2>/dev/null || true)"
    if grep -qF "ffpush: ready (deploy $DEPLOY_ID)" <<<"$output"; then
      echo "ffpush: ready (deploy $DEPLOY_ID, $IMAGE)"
      ready=true
      break
    fi
    sleep 10
  done
  if ! $ready; then
    echo "ffpush is deployed but did not report ready within 10 minutes: see" >&2
    echo "  gcloud compute instances get-serial-port-output $VM --zone $ZONE --project $PROJECT_ID" >&2
    echo "FlutterFlow's functions were left in place." >&2
    exit 1
  fi
fi

flutterflow_functions

step "Done: $IMAGE on $VM"

#!/usr/bin/env bash
# The ffpush VM's startup script (Compute Engine metadata `startup-script`, run as root at
# every boot; deploy/gce.sh sets it). Installs, once, Docker and Google's Ops Agent; then
# writes what is below and (re)starts ffpush, so a boot always runs the image the metadata
# names:
# - the systemd unit ffpush.service: the image from Artifact Registry (metadata
#   `ffpush-image`) as `ffpush run`, started at boot, restarted whenever it exits, stopped with
#   SIGTERM and a grace period;
# - the Ops Agent's config: ffpush's JSON log lines to Cloud Logging (severity kept), and its
#   /metrics scraped every 30 s into Managed Service for Prometheus, the same series the
#   Cloud Run collector writes, so deploy/dashboard.json and deploy/alerts work unchanged.
# Its output goes to the serial console; deploy/gce.sh waits there for "ffpush: ready
# (deploy ID)", ID being the metadata `ffpush-deploy` it set.
set -euo pipefail
# The startup-script runner may leave HOME unset; gcloud and docker keep their config there.
export HOME=/root

metadata() {
  curl -fsS -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/$1"
}
IMAGE="$(metadata instance/attributes/ffpush-image)"
# Set by deploy/gce.sh for each deploy; a plain reboot has none.
DEPLOY="$(metadata instance/attributes/ffpush-deploy 2>/dev/null || echo none)"
PROJECT="$(metadata project/project-id)"
REGISTRY="${IMAGE%%/*}"

if ! command -v docker >/dev/null; then
  apt-get update
  apt-get install -y --no-install-recommends docker.io
fi
if ! systemctl cat google-cloud-ops-agent.service >/dev/null 2>&1; then
  # Google's documented install: adds its apt repository and installs the agent.
  curl -fsSo /tmp/add-google-cloud-ops-agent-repo.sh https://dl.google.com/cloudagents/add-google-cloud-ops-agent-repo.sh
  bash /tmp/add-google-cloud-ops-agent-repo.sh --also-install
fi
# Pulls from Artifact Registry with the VM's service account (gcloud is on Google's images).
gcloud auth configure-docker "$REGISTRY" --quiet

# ffpush's settings: the same as deploy/service.yaml's (README, Settings), and the port the
# Ops Agent scrapes. Nothing listens publicly: no firewall rule lets anyone in.
# One VM is one instance: its heartbeat in ffpush_instances (the shared FCM rate) every 30 s
# instead of 2 s is 2 880 Firestore writes a day, inside the free 20 000 (at 2 s: 43 200).
cat >/etc/ffpush.env <<EOF
GOOGLE_CLOUD_PROJECT=$PROJECT
LOG_FORMAT=json
FFPUSH_SHUTDOWN_GRACE=8s
FFPUSH_LEASE=60s
FFPUSH_HEARTBEAT_INTERVAL=30s
PORT=8080
EOF

cat >/etc/systemd/system/ffpush.service <<EOF
[Unit]
Description=ffpush: FlutterFlow push notifications from Firestore through FCM
Requires=docker.service
After=docker.service network-online.target
Wants=network-online.target
# Never give up restarting.
StartLimitIntervalSec=0

[Service]
# Where gcloud auth configure-docker put the registry's credential helper.
Environment=DOCKER_CONFIG=/root/.docker
Restart=always
RestartSec=5
ExecStartPre=-/usr/bin/docker rm -f ffpush
# A failed pull (registry unreachable) runs the image already on the disk.
ExecStartPre=-/usr/bin/docker pull $IMAGE
# Host network: the Ops Agent scrapes localhost:8080, and the metadata server gives the
# service account's tokens. The log files are the Ops Agent's input, rotated at 3 x 10 MB.
ExecStart=/usr/bin/docker run --rm --name ffpush --network host --env-file /etc/ffpush.env \\
  --read-only --cap-drop ALL --security-opt no-new-privileges \\
  --log-driver json-file --log-opt max-size=10m --log-opt max-file=3 \\
  $IMAGE
# SIGTERM, then FFPUSH_SHUTDOWN_GRACE (8 s) for sends in flight, within docker's 10 s.
ExecStop=/usr/bin/docker stop --time 10 ffpush
TimeoutStopSec=20

[Install]
WantedBy=multi-user.target
EOF

cat >/etc/google-cloud-ops-agent/config.yaml <<'EOF'
logging:
  receivers:
    ffpush:
      type: files
      include_paths: [/var/lib/docker/containers/*/*-json.log]
  processors:
    # Docker wraps each line: {"log": "<ffpush's JSON line>\n", "stream": …, "time": …}.
    docker:
      type: parse_json
      field: message
    ffpush:
      type: parse_json
      field: log
    severity:
      type: modify_fields
      fields:
        severity:
          move_from: jsonPayload.severity
  service:
    pipelines:
      ffpush:
        receivers: [ffpush]
        processors: [docker, ffpush, severity]
metrics:
  receivers:
    ffpush:
      type: prometheus
      config:
        scrape_configs:
          - job_name: ffpush
            scrape_interval: 30s
            scrape_timeout: 10s
            metrics_path: /metrics
            static_configs:
              - targets: [localhost:8080]
  service:
    pipelines:
      ffpush:
        receivers: [ffpush]
EOF

systemctl daemon-reload
systemctl enable ffpush.service
systemctl restart google-cloud-ops-agent
systemctl restart ffpush.service

# Tell deploy/gce.sh (watching the serial console) when ffpush answers ready.
for _ in $(seq 1 120); do
  if curl -fsS localhost:8080/readyz >/dev/null 2>&1; then
    echo "ffpush: ready (deploy $DEPLOY) $IMAGE"
    exit 0
  fi
  sleep 2
done
echo "ffpush: not ready after 240 s; see journalctl -u ffpush and Cloud Logging"
exit 1

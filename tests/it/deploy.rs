//! The deployment files checked against the code: `deploy/service.yaml` sets only settings
//! `ffpush run` knows, with values it accepts, and wires the metrics collector to the port and
//! path ffpush serves; the Dockerfile runs `ffpush run` as non-root; the scripts parse and
//! `deploy.sh --dry-run` renders a complete manifest and every monitoring step; `gce.sh
//! --dry-run` sets up the free-tier VM with the same account, roles and monitoring, and its
//! startup script runs `ffpush run` with settings it accepts, supervised, logged and scraped;
//! `firebase.json` points the Firebase CLI at `migrations/`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::builder::Resettable;
use clap::{Args as _, FromArgMatches as _};
use ffpush::config::{ConfigErrors, LogFormat, Settings, SettingsArgs};
use serde_yaml_ng::Value;

fn path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

/// `deploy/service.yaml` with its placeholders filled in, as deploy.sh's sed does.
fn manifest() -> Value {
    let text = read("deploy/service.yaml")
        .replace("PROJECT_ID", "demo-project")
        .replace("REGION", "europe-west1")
        .replace("TAG", "test");
    serde_yaml_ng::from_str(&text).expect("deploy/service.yaml is not valid YAML")
}

fn settings_command() -> clap::Command {
    SettingsArgs::augment_args(clap::Command::new("ffpush-run"))
}

/// Env var name → long flag, for every setting `ffpush run` reads from the environment.
fn known_env() -> BTreeMap<String, String> {
    settings_command()
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            Some((env, a.get_long()?.to_string()))
        })
        .collect()
}

/// What `ffpush run` makes of exactly these env vars on Cloud Run (`K_SERVICE` set).
fn settings_from(env: &[(String, String)]) -> Result<Settings, ConfigErrors> {
    let flags = known_env();
    let argv = std::iter::once("ffpush-run".to_string()).chain(
        env.iter()
            .map(|(name, value)| format!("--{}={value}", flags[name])),
    );
    // Only the manifest counts: this process's own environment must not fill gaps.
    let matches = settings_command()
        .mut_args(|a| a.env(Resettable::Reset))
        .try_get_matches_from(argv)
        .expect("the manifest's settings as flags");
    let mut args = SettingsArgs::from_arg_matches(&matches).expect("SettingsArgs from matches");
    args.k_service = Some("ffpush".to_string());
    Settings::from_args(&args)
}

/// The containers by name.
fn containers(manifest: &Value) -> BTreeMap<String, &Value> {
    manifest["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("spec.template.spec.containers")
        .iter()
        .map(|c| (c["name"].as_str().expect("container name").to_string(), c))
        .collect()
}

/// The ingress container: ffpush.
fn container(manifest: &Value) -> &Value {
    containers(manifest)
        .remove("ffpush")
        .expect("a container named ffpush")
}

/// `512Mi`, `1Gi` → MiB.
fn mebibytes(quantity: &Value) -> u64 {
    let q = quantity.as_str().expect("a quoted quantity such as 512Mi");
    match (q.strip_suffix("Mi"), q.strip_suffix("Gi")) {
        (Some(n), _) => n.parse().expect("MiB"),
        (_, Some(n)) => n.parse::<u64>().expect("GiB") * 1024,
        _ => panic!("{q}: give Mi or Gi"),
    }
}

/// `"0.75"`, `"1"`, `"500m"` → vCPU.
fn vcpus(quantity: &Value) -> f64 {
    let q = quantity
        .as_str()
        .expect("a quoted CPU quantity such as \"0.75\"");
    match q.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().expect("millicores") / 1000.0,
        None => q.parse().expect("vCPU"),
    }
}

/// The number BENCHMARKS.md states between `before` and `after` on the first line holding
/// both; of a range (`18.5–23.4`), the upper end.
fn benchmarked(before: &str, after: &str) -> f64 {
    read("BENCHMARKS.md")
        .lines()
        .find_map(|l| {
            let rest = &l[l.find(before)? + before.len()..];
            let text = &rest[..rest.find(after)?];
            text.rsplit('–').next()?.trim().parse().ok()
        })
        .unwrap_or_else(|| {
            panic!("BENCHMARKS.md states no number between {before:?} and {after:?}")
        })
}

fn manifest_env(manifest: &Value) -> Vec<(String, String)> {
    container(manifest)["env"]
        .as_sequence()
        .expect("container env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_string();
            let value = e["value"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: give a string value (quote numbers)"))
                .to_string();
            (name, value)
        })
        .collect()
}

#[test]
fn the_harness_sees_the_settings() {
    let known = known_env();
    for name in ["GOOGLE_CLOUD_PROJECT", "PORT", "FFPUSH_LEASE", "LOG_FORMAT"] {
        assert!(known.contains_key(name), "{name} missing from {known:?}");
    }
    let bad = settings_from(&[
        ("GOOGLE_CLOUD_PROJECT".into(), "demo-project".into()),
        ("FFPUSH_CONCURRENCY".into(), "0".into()),
    ]);
    assert_eq!(bad.unwrap_err()[0].setting, "FFPUSH_CONCURRENCY");
}

#[test]
fn service_env_is_settings_ffpush_knows_and_accepts() {
    let m = manifest();
    let env = manifest_env(&m);
    let known = known_env();
    for (name, _) in &env {
        assert!(
            known.contains_key(name),
            "deploy/service.yaml sets {name}, which ffpush run does not read (it knows {:?})",
            known.keys().collect::<Vec<_>>()
        );
    }
    assert!(
        env.iter().all(|(name, _)| name != "PORT"),
        "Cloud Run sets PORT and rejects it in the manifest"
    );
    let settings = settings_from(&env).unwrap_or_else(|e| panic!("deploy/service.yaml: {e}"));
    assert_eq!(settings.project, "demo-project");
    assert_eq!(settings.log_format, LogFormat::Json);
    assert!(
        settings.shutdown_grace < Duration::from_secs(10),
        "Cloud Run kills 10 s after SIGTERM; FFPUSH_SHUTDOWN_GRACE must end before"
    );
}

#[test]
fn service_runs_always_on_with_probes_and_its_own_account() {
    let m = manifest();
    assert_eq!(m["apiVersion"], "serving.knative.dev/v1");
    assert_eq!(m["kind"], "Service");
    assert_eq!(m["metadata"]["name"], "ffpush");

    let annotations = &m["spec"]["template"]["metadata"]["annotations"];
    let min_scale: u32 = annotations["autoscaling.knative.dev/minScale"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("minScale annotation, a quoted number");
    assert!(min_scale >= 1, "a listener needs an instance always up");
    assert_eq!(
        annotations["run.googleapis.com/cpu-throttling"], "false",
        "a listener needs CPU between requests"
    );

    let account = m["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");
    assert!(
        account.starts_with("ffpush@") && account.ends_with(".iam.gserviceaccount.com"),
        "{account}"
    );

    assert_eq!(
        annotations["run.googleapis.com/execution-environment"], "gen2",
        "the execution environment is pinned"
    );
    let total: u64 = containers(&m)
        .values()
        .map(|c| mebibytes(&c["resources"]["limits"]["memory"]))
        .sum();
    let ffpush = mebibytes(&container(&m)["resources"]["limits"]["memory"]);
    assert!(
        ffpush >= 512 && total >= 512,
        "gen2 needs at least 512 MiB (ffpush {ffpush}, all {total})"
    );

    let c = container(&m);
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(
        annotations["run.googleapis.com/startup-cpu-boost"], "true",
        "the start (TLS, listen replay) gets more than the steady share"
    );
    // Traffic moves (and the old revision goes) once the startup probe passes: only once
    // caught up. Alive is all the liveness probe asks.
    for (probe, path) in [("startupProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], 8080, "{probe}");
    }
    let startup = &c["startupProbe"];
    let budget = startup["failureThreshold"]
        .as_u64()
        .expect("failureThreshold")
        * startup["periodSeconds"].as_u64().expect("periodSeconds");
    // Cloud Run's limit is 240 s; a replay of a million documents takes about 80 s.
    assert!(
        (160..=240).contains(&budget),
        "startup budget {budget} s: room for a million-document replay, within Cloud Run's 240 s"
    );
    let command = &c["command"];
    assert!(
        command.is_null() || *command == serde_yaml_ng::from_str::<Value>("[ffpush, run]").unwrap(),
        "the image's ENTRYPOINT is the command, not {command:?}"
    );
    assert!(
        c["args"].as_sequence().is_none_or(|a| a.is_empty()),
        "no args after `ffpush run`: settings are env vars"
    );
}

/// Every vCPU is billed every second with CPU always allocated, so the instance has the least
/// Cloud Run allows, split by what each container needs, and ffpush's share and memory keep a
/// margin over what BENCHMARKS.md measured.
#[test]
fn the_instance_is_the_smallest_that_holds_the_benchmarks() {
    let m = manifest();
    let all = containers(&m);
    let cpu = |name: &str| vcpus(&all[name]["resources"]["limits"]["cpu"]);
    let memory = |name: &str| mebibytes(&all[name]["resources"]["limits"]["memory"]);
    let total: f64 = all.keys().map(|name| cpu(name)).sum();
    // Cloud Run: with CPU always allocated an instance has at least 1 vCPU in all.
    assert!(
        (total - 1.0).abs() < 1e-9,
        "the containers' CPU adds up to {total} vCPU; 1 is the least Cloud Run allows with CPU always allocated"
    );

    // ffpush at the default FFPUSH_FCM_RATE (a project's default FCM quota), at the highest
    // CPU per message any realistic cell measured.
    let settings = settings_from(&manifest_env(&m)).expect("the manifest's settings");
    let cpu_ms_per_1000 = benchmarked("≤ 40 CPU-ms per 1 000 messages | ", " CPU-ms/1000");
    let busiest = f64::from(settings.fcm_rate) / 1000.0 * cpu_ms_per_1000 / 1000.0;
    assert!(
        cpu("ffpush") >= 3.0 * busiest,
        "ffpush has {} vCPU; sending {} messages/s takes {busiest:.2}",
        cpu("ffpush"),
        settings.fcm_rate
    );

    // Memory: the worker's measured peak (1 000 000 unique tokens) with room to spare, and the
    // collector within what Cloud Run gives a container by default.
    let peak = benchmarked("VmHWM **", " MB**");
    assert!(
        memory("ffpush") as f64 >= 4.0 * peak,
        "ffpush has {} MiB; it peaked at {peak} MB",
        memory("ffpush")
    );
    let collector = memory("collector");
    assert!(
        (128..=512).contains(&collector),
        "collector {collector} MiB"
    );
    assert!(cpu("collector") > 0.0 && cpu("ffpush") > cpu("collector"));
}

#[test]
fn the_metrics_collector_scrapes_what_ffpush_serves() {
    let m = manifest();
    let all = containers(&m);
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        ["collector", "ffpush"],
        "ffpush and the collector, nothing else"
    );
    let collector = all["collector"];
    let image = collector["image"].as_str().expect("collector image");
    let (repository, version) = image.rsplit_once(':').expect("a tagged image");
    assert_eq!(
        repository,
        "us-docker.pkg.dev/cloud-ops-agents-artifacts/cloud-run-gmp-sidecar/cloud-run-gmp-sidecar",
        "Google's Managed Service for Prometheus sidecar"
    );
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "pin a release (x.y.z), not {version}"
    );
    assert!(
        collector["ports"].is_null(),
        "only the ingress container may have a port"
    );

    // The collector starts after ffpush is up, so its first scrape finds /metrics.
    let annotations = &m["spec"]["template"]["metadata"]["annotations"];
    let dependencies: serde_json::Value = serde_json::from_str(
        annotations["run.googleapis.com/container-dependencies"]
            .as_str()
            .expect("run.googleapis.com/container-dependencies, a JSON string"),
    )
    .expect("container-dependencies is JSON");
    assert_eq!(dependencies, serde_json::json!({"collector": ["ffpush"]}));
    let ffpush = &all["ffpush"];
    assert_eq!(
        ffpush["startupProbe"]["httpGet"]["path"], "/readyz",
        "the dependency waits for this probe"
    );

    // The collector's own health port: probed, and not ffpush's.
    let health = collector["startupProbe"]["tcpSocket"]["port"]
        .as_u64()
        .expect("a TCP startup probe on the collector's health port");
    assert_eq!(health, 13133);
    assert_ne!(Some(health), ffpush["ports"][0]["containerPort"].as_u64());
    let liveness = &collector["livenessProbe"];
    assert_eq!(liveness["httpGet"]["path"], "/liveness");
    assert_eq!(liveness["httpGet"]["port"], 13133);
    // Its /liveness answers after a deliberate 5 s delay.
    let timeout = liveness["timeoutSeconds"].as_u64().expect("timeoutSeconds");
    let period = liveness["periodSeconds"].as_u64().expect("periodSeconds");
    assert!(
        timeout > 5 && timeout <= period,
        "timeout {timeout}, period {period}"
    );

    // The RunMonitoring config reaches /etc/rungmp/config.yaml from the secret deploy.sh fills.
    let mount = collector["volumeMounts"][0].clone();
    assert_eq!(mount["mountPath"], "/etc/rungmp/");
    let volume = m["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["secret"]["items"][0]["path"], "config.yaml");
    assert_eq!(volume["secret"]["items"][0]["key"], "latest");
    let secret = volume["secret"]["secretName"].as_str().expect("secretName");
    let script = read("deploy/deploy.sh");
    assert!(
        script.contains(&format!("GMP_SECRET={secret}\n")),
        "deploy.sh stores the config in {secret}"
    );

    // And the config scrapes ffpush's port and metrics path.
    let config: Value = serde_yaml_ng::from_str(&read("deploy/gmp-config.yaml"))
        .expect("deploy/gmp-config.yaml is YAML");
    assert_eq!(config["apiVersion"], "monitoring.googleapis.com/v1beta");
    assert_eq!(config["kind"], "RunMonitoring");
    let endpoints = config["spec"]["endpoints"]
        .as_sequence()
        .expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    let endpoint = &endpoints[0];
    assert_eq!(
        endpoint["port"].as_u64(),
        ffpush["ports"][0]["containerPort"].as_u64(),
        "the port Cloud Run gives ffpush as PORT"
    );
    assert_eq!(endpoint["path"], "/metrics");
    let seconds = |v: &Value| {
        ffpush::config::parse_duration(v.as_str().expect("a duration such as 30s"))
            .expect("a duration")
    };
    assert!(seconds(&endpoint["timeout"]) <= seconds(&endpoint["interval"]));
    assert!(seconds(&endpoint["interval"]) <= Duration::from_secs(60));
}

#[tokio::test]
async fn ffpush_serves_metrics_where_the_collector_looks() {
    let config: Value = serde_yaml_ng::from_str(&read("deploy/gmp-config.yaml")).unwrap();
    let path = config["spec"]["endpoints"][0]["path"].as_str().unwrap();
    let app = crate::TestApp::new().await;
    let (worker, _) = app.start_worker().await;
    let url = format!("http://127.0.0.1:{}{path}", worker.http_addr.port());
    let response = reqwest::get(&url).await.expect("GET /metrics");
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let body = response.text().await.unwrap();
    assert!(
        body.contains("# TYPE ffpush_notifications_total counter"),
        "{body}"
    );
    worker.stop().await;
}

#[test]
fn firebase_json_points_the_firebase_cli_at_migrations() {
    let text = read("firebase.json");
    let file: serde_json::Value = serde_json::from_str(&text).expect("firebase.json is JSON");
    // Keys the Firebase CLI's schema (firebase-tools schema/firebase-config.json) allows there.
    let allowed = |object: &serde_json::Value, keys: &[&str], at: &str| {
        for key in object
            .as_object()
            .unwrap_or_else(|| panic!("{at} is an object"))
            .keys()
        {
            assert!(
                keys.contains(&key.as_str()),
                "{at}.{key} is not a firebase.json key"
            );
        }
    };
    allowed(&file, &["firestore", "emulators"], "firebase.json");
    let firestore = &file["firestore"];
    allowed(
        firestore,
        &[
            "rules",
            "indexes",
            "database",
            "location",
            "edition",
            "predeploy",
            "postdeploy",
        ],
        "firestore",
    );
    assert_eq!(firestore["rules"], "migrations/firestore.rules");
    assert_eq!(firestore["indexes"], "migrations/firestore.indexes.json");
    for key in ["rules", "indexes"] {
        let relative = firestore[key].as_str().unwrap();
        assert!(path(relative).is_file(), "{relative} does not exist");
    }
    let emulators = &file["emulators"];
    allowed(
        emulators,
        &["firestore", "ui", "singleProjectMode"],
        "emulators",
    );
    allowed(
        &emulators["firestore"],
        &["host", "port", "websocketPort", "edition"],
        "emulators.firestore",
    );
    // The port `ffpush dev` expects an already running emulator on (its --firestore-port).
    assert_eq!(emulators["firestore"]["port"], 8681);
    assert_eq!(emulators["firestore"]["host"], "127.0.0.1");
}

#[test]
fn dockerfile_is_multi_stage_and_runs_ffpush_run_as_non_root() {
    let text = read("Dockerfile");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("FROM ") && l.to_lowercase().ends_with(" as builder")),
        "a `FROM … AS builder` stage"
    );
    assert!(lines.iter().any(|l| l.starts_with("COPY --from=builder")));
    assert!(lines.contains(&r#"ENTRYPOINT ["ffpush", "run"]"#));
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    let user = user.trim().split(':').next().unwrap_or_default();
    assert!(!["root", "0", ""].contains(&user), "USER {user}");
}

#[test]
fn deploy_scripts_parse_and_dry_run_renders_the_manifest() {
    for script in [
        "deploy/deploy.sh",
        "deploy/rollback.sh",
        "deploy/lib.sh",
        "deploy/gce.sh",
        "deploy/gce-startup.sh",
    ] {
        let status = Command::new("bash")
            .arg("-n")
            .arg(path(script))
            .status()
            .expect("running bash");
        assert!(status.success(), "bash -n {script}");
    }
    let out = Command::new("bash")
        .arg(path("deploy/deploy.sh"))
        .args(["--dry-run", "--tag", "t1", "--delete-functions"])
        .args([
            "--alert-channel",
            "projects/demo-project/notificationChannels/42",
        ])
        .args(["demo-project", "europe-west1"])
        .output()
        .expect("running deploy.sh --dry-run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "gcloud builds submit --tag europe-west1-docker.pkg.dev/demo-project/ffpush/ffpush:t1",
        "gcloud run services replace",
        "gcloud functions delete sendScheduledPushNotifications",
        "serviceAccountName: ffpush@demo-project.iam.gserviceaccount.com",
        // The collector: its API, its permission, its config.
        "monitoring.googleapis.com",
        "--role roles/monitoring.metricWriter",
        "gcloud secrets create ffpush-gmp-config --project demo-project --replication-policy automatic --data-file deploy/gmp-config.yaml",
        "gcloud secrets add-iam-policy-binding ffpush-gmp-config --project demo-project --member serviceAccount:ffpush@demo-project.iam.gserviceaccount.com --role roles/secretmanager.secretAccessor",
        "cloud-run-gmp-sidecar",
        // The dashboard and every alert policy, with the channel.
        "gcloud monitoring dashboards create --project demo-project --config-from-file",
        "gcloud monitoring dashboards update ffpush --project demo-project --config-from-file",
        "\"notificationChannels\": [\"projects/demo-project/notificationChannels/42\"]",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in\n{stdout}");
    }
    for file in std::fs::read_dir(path("deploy/alerts")).expect("deploy/alerts") {
        let name = file.unwrap().file_name().to_string_lossy().into_owned();
        let id = name.strip_suffix(".json").expect("only .json files");
        for verb in ["create", "update NAME"] {
            let command = format!(
                "gcloud alpha monitoring policies {verb} --project demo-project --policy-from-file"
            );
            assert!(
                stdout.lines().any(|l| l.starts_with(&command)
                    && l.ends_with(&format!("alert-{id}.json --format none"))),
                "{command} … {id} not in\n{stdout}"
            );
        }
    }
    // The secret is written before the service that mounts it is deployed.
    let at = |s: &str| {
        stdout
            .find(s)
            .unwrap_or_else(|| panic!("{s} not in\n{stdout}"))
    };
    assert!(at("gcloud secrets create") < at("gcloud run services replace"));
    // The app registers its device tokens through FlutterFlow's callable: it must stay.
    assert!(
        !stdout
            .lines()
            .any(|l| l.contains("functions delete") && l.contains("addFcmToken")),
        "--delete-functions must never delete addFcmToken:\n{stdout}"
    );
    assert!(
        stdout.contains("addFcmToken is kept"),
        "--delete-functions says addFcmToken stays:\n{stdout}"
    );
    let help = Command::new("bash")
        .arg(path("deploy/deploy.sh"))
        .arg("--help")
        .output()
        .expect("running deploy.sh --help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("addFcmToken"));
    let guide = read("docs/operations.md");
    let step = guide
        .split("**Switch off FlutterFlow's send functions.**")
        .nth(1)
        .and_then(|rest| rest.split("4. **").next())
        .unwrap_or_default();
    assert!(
        step.contains("addFcmToken") && step.to_lowercase().contains("keep"),
        "the docs/operations.md step that deletes the send functions says addFcmToken stays: {step}"
    );
    let rendered: String = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("#   "))
        .collect();
    for placeholder in ["PROJECT_ID", "REGION", "TAG"] {
        assert!(!rendered.contains(placeholder), "{placeholder} left in");
    }

    let bad = Command::new("bash")
        .arg(path("deploy/deploy.sh"))
        .args([
            "--dry-run",
            "--alert-channel",
            "my-email",
            "demo-project",
            "europe-west1",
        ])
        .output()
        .expect("running deploy.sh");
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--alert-channel my-email"));
}

/// `--retention` is opt-in: without it nothing about expiry is printed; with it the service
/// gets `FFPUSH_RETENTION` and both collection groups a TTL policy on `ffpush_expires_at`.
#[test]
fn deploy_sh_retention_sets_the_setting_and_the_ttl_policies_only_when_given() {
    let dry_run = |extra: &[&str]| {
        let out = Command::new("bash")
            .arg(path("deploy/deploy.sh"))
            .args(["--dry-run", "--tag", "t1"])
            .args(extra)
            .args(["demo-project", "europe-west1"])
            .output()
            .expect("running deploy.sh --dry-run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = dry_run(&[]);
    assert_eq!(code, Some(0));
    assert!(
        !stdout.contains("ttls") && !stdout.contains("value: 2160h"),
        "{stdout}"
    );

    let (code, stdout, stderr) = dry_run(&["--retention", "2160h"]);
    assert_eq!(code, Some(0), "{stderr}");
    for group in ["ff_push_notifications", "ff_user_push_notifications"] {
        let command = format!(
            "gcloud firestore fields ttls update ffpush_expires_at --collection-group {group} --enable-ttl --async --project demo-project"
        );
        assert!(
            stdout.lines().any(|l| l == command),
            "{command} not in\n{stdout}"
        );
    }
    let rendered: String = stdout
        .lines()
        .skip_while(|l| *l != "# rendered deploy/service.yaml:")
        .skip(1)
        .map_while(|l| l.strip_prefix("#   "))
        .collect::<Vec<_>>()
        .join("\n");
    let manifest: Value =
        serde_yaml_ng::from_str(&rendered).expect("the rendered manifest is YAML");
    let env = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .expect("ffpush's env");
    assert!(
        env.iter()
            .any(|e| e["name"] == "FFPUSH_RETENTION" && e["value"] == "2160h"),
        "{rendered}"
    );
    // What ffpush itself accepts.
    assert_eq!(
        ffpush::config::parse_duration("2160h"),
        Some(std::time::Duration::from_secs(2160 * 3600))
    );

    let (code, _, stderr) = dry_run(&["--retention", "90d"]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("--retention 90d"), "{stderr}");
}

#[test]
fn the_dashboard_file_is_what_deploy_sh_expects() {
    let text = read("deploy/dashboard.json");
    // deploy.sh adds the etag for an update by replacing the first line.
    assert_eq!(text.lines().next(), Some("{"));
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    // deploy.sh creates it under this id and finds it again by it.
    assert_eq!(dashboard["name"], "projects/PROJECT_ID/dashboards/ffpush");
    assert!(read("deploy/lib.sh").contains("DASHBOARD=ffpush\n"));
    for file in std::fs::read_dir(path("deploy/alerts")).unwrap() {
        let file = file.unwrap().path();
        let text = std::fs::read_to_string(&file).unwrap();
        // deploy.sh puts the channels in with sed, and finds the policy again by its labels.
        assert_eq!(
            text.matches("\"notificationChannels\": []").count(),
            1,
            "{}",
            file.display()
        );
        let policy: serde_json::Value = serde_json::from_str(&text).unwrap();
        let id = file.file_stem().unwrap().to_string_lossy();
        assert_eq!(policy["userLabels"]["app"], "ffpush", "{id}");
        assert_eq!(policy["userLabels"]["policy"], *id, "{id}");
    }
}

/// `bash SCRIPT ARGS…`: exit code, stdout, stderr.
fn script(name: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("bash")
        .arg(path(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The roles a dry run grants the service account on the project, in order.
fn project_roles(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("gcloud projects add-iam-policy-binding"))
        .filter_map(|l| {
            l.split(" --role ")
                .nth(1)?
                .split(' ')
                .next()
                .map(String::from)
        })
        .collect()
}

/// The body of the heredoc that `opener` starts in `text` (up to the line `EOF`).
fn heredoc<'a>(text: &'a str, opener: &str) -> &'a str {
    let start = text.find(opener).unwrap_or_else(|| panic!("no {opener:?}")) + opener.len();
    let body = text[start..].trim_start_matches('\n');
    &body[..body
        .find("\nEOF\n")
        .unwrap_or_else(|| panic!("{opener:?} never ends"))]
}

#[test]
fn gce_dry_run_sets_up_the_free_vm_like_cloud_run() {
    let (code, stdout, stderr) = script(
        "deploy/gce.sh",
        &[
            "--dry-run",
            "--tag",
            "t1",
            "--delete-functions",
            "--alert-channel",
            "projects/demo-project/notificationChannels/42",
            "demo-project",
        ],
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stderr.is_empty(),
        "an e2-micro in us-central1 is free: no note expected, got {stderr}"
    );
    let create = stdout
        .lines()
        .find(|l| l.starts_with("gcloud compute instances create ffpush "))
        .unwrap_or_else(|| panic!("no VM created in\n{stdout}"));
    for flag in [
        "--zone us-central1-a",
        "--machine-type e2-micro",
        // Only standard persistent disk is in the free tier.
        "--boot-disk-type pd-standard",
        "--service-account ffpush@demo-project.iam.gserviceaccount.com",
        "--scopes cloud-platform",
        "--metadata-from-file startup-script=deploy/gce-startup.sh",
        "ffpush-image=us-central1-docker.pkg.dev/demo-project/ffpush/ffpush:t1",
    ] {
        assert!(create.contains(flag), "{flag:?} not in {create}");
    }
    for expected in [
        "gcloud services enable compute.googleapis.com",
        "gcloud builds submit --tag us-central1-docker.pkg.dev/demo-project/ffpush/ffpush:t1",
        // The VM pulls with its own account: this one repository, read only.
        "gcloud artifacts repositories add-iam-policy-binding ffpush --location us-central1 --project demo-project --member serviceAccount:ffpush@demo-project.iam.gserviceaccount.com --role roles/artifactregistry.reader",
        "gcloud monitoring dashboards create --project demo-project --config-from-file",
        "\"notificationChannels\": [\"projects/demo-project/notificationChannels/42\"]",
        "gcloud functions delete sendScheduledPushNotifications",
        "addFcmToken is kept",
        "ffpush: ready (deploy ",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in\n{stdout}");
    }
    assert!(
        !stdout
            .lines()
            .any(|l| l.contains("functions delete") && l.contains("addFcmToken")),
        "addFcmToken must never be deleted:\n{stdout}"
    );
    // Nothing may reach the VM from outside: no firewall rule, no secret to read.
    assert!(!stdout.contains("firewall-rules"), "{stdout}");
    assert!(!stdout.contains("secretmanager"), "{stdout}");
    // The same least roles as on Cloud Run.
    let (_, cloud_run, _) = script(
        "deploy/deploy.sh",
        &["--dry-run", "--tag", "t1", "demo-project", "europe-west1"],
    );
    let roles = project_roles(&stdout);
    assert!(!roles.is_empty(), "no roles granted:\n{stdout}");
    assert_eq!(roles, project_roles(&cloud_run));
    // Every alert policy, as deploy.sh does.
    for file in std::fs::read_dir(path("deploy/alerts")).expect("deploy/alerts") {
        let name = file.unwrap().file_name().to_string_lossy().into_owned();
        let id = name.strip_suffix(".json").expect("only .json files");
        assert!(
            stdout.lines().any(|l| l
                .starts_with("gcloud alpha monitoring policies create --project demo-project")
                && l.ends_with(&format!("alert-{id}.json --format none"))),
            "{id} not in\n{stdout}"
        );
    }

    // An image built elsewhere (deploy.sh's) is run, not rebuilt; without --alerts or a channel
    // the (billed) alert policies are left out, the (free) dashboard is not.
    let image = "europe-west1-docker.pkg.dev/demo-project/ffpush/ffpush:t0";
    let (code, stdout, stderr) = script(
        "deploy/gce.sh",
        &["--dry-run", "--image", image, "demo-project", "us-east1-b"],
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("gcloud builds submit"), "{stdout}");
    assert!(!stdout.contains("monitoring policies create"), "{stdout}");
    assert!(stdout.contains("Alert policies: not created"), "{stdout}");
    assert!(
        stdout.contains("gcloud monitoring dashboards create"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("ffpush-image={image}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "gcloud artifacts repositories add-iam-policy-binding ffpush --location europe-west1"
        ),
        "{stdout}"
    );

    // Outside the free tier it says so; a zone that is not one is refused.
    let (code, _, stderr) = script(
        "deploy/gce.sh",
        &["--dry-run", "demo-project", "europe-west1-b"],
    );
    assert_eq!(code, Some(0));
    assert!(stderr.contains("is billed"), "{stderr}");
    let (code, _, stderr) = script(
        "deploy/gce.sh",
        &["--dry-run", "demo-project", "us-central1"],
    );
    assert_eq!(code, Some(64));
    assert!(stderr.contains("not a zone"), "{stderr}");
    let (code, _, stderr) = script(
        "deploy/gce.sh",
        &[
            "--dry-run",
            "--image",
            "docker.io/library/ffpush:1",
            "demo-project",
        ],
    );
    assert_eq!(code, Some(64));
    assert!(stderr.contains("--image"), "{stderr}");
}

#[test]
fn the_vm_runs_ffpush_supervised_logged_and_scraped() {
    let text = read("deploy/gce-startup.sh");
    // The settings: only ones `ffpush run` knows, with values it accepts.
    let env: Vec<(String, String)> = heredoc(&text, "cat >/etc/ffpush.env <<EOF")
        .lines()
        .map(|l| {
            let (name, value) = l.split_once('=').expect("NAME=value");
            (name.to_string(), value.replace("$PROJECT", "demo-project"))
        })
        .collect();
    let known = known_env();
    for (name, _) in &env {
        assert!(
            known.contains_key(name),
            "gce-startup.sh sets {name}, which ffpush run does not read"
        );
    }
    let port: Vec<_> = env.iter().filter(|(n, _)| n == "PORT").collect();
    assert_eq!(
        port.len(),
        1,
        "the port the Ops Agent scrapes is set: {env:?}"
    );
    let port = port[0].1.clone();
    let settings = settings_from(&env).unwrap_or_else(|e| panic!("gce-startup.sh: {e}"));
    assert_eq!(settings.project, "demo-project");
    assert_eq!(
        settings.log_format,
        LogFormat::Json,
        "the Ops Agent parses JSON lines"
    );
    // The same settings as on Cloud Run, where they differ from the defaults.
    let cloud_run = manifest_env(&manifest());
    for (name, value) in &cloud_run {
        if name != "GOOGLE_CLOUD_PROJECT" {
            assert!(
                env.contains(&(name.clone(), value.clone())),
                "{name}={value} not on the VM"
            );
        }
    }

    // systemd: started at boot, restarted whenever it exits, SIGTERM with time for the grace.
    let unit = heredoc(&text, "cat >/etc/systemd/system/ffpush.service <<EOF");
    for line in [
        "Restart=always",
        "StartLimitIntervalSec=0",
        "WantedBy=multi-user.target",
        "--env-file /etc/ffpush.env",
        "--network host",
        "--log-driver json-file",
    ] {
        assert!(unit.contains(line), "{line:?} not in the unit:\n{unit}");
    }
    assert!(text.contains("systemctl enable ffpush.service"));
    let stop_secs: u64 = unit
        .split("docker stop --time ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .expect("ExecStop=… docker stop --time N");
    assert!(
        settings.shutdown_grace < Duration::from_secs(stop_secs),
        "docker kills {stop_secs} s after SIGTERM; FFPUSH_SHUTDOWN_GRACE must end before"
    );
    let systemd_stop: u64 = unit
        .split("TimeoutStopSec=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .expect("TimeoutStopSec");
    assert!(systemd_stop > stop_secs);

    // The Ops Agent: the container's log lines, twice parsed (docker's wrapper, then ffpush's
    // JSON) with their severity kept; /metrics scraped where ffpush serves it.
    let agent: Value = serde_yaml_ng::from_str(heredoc(
        &text,
        "cat >/etc/google-cloud-ops-agent/config.yaml <<'EOF'",
    ))
    .expect("the Ops Agent config is YAML");
    let logging = &agent["logging"];
    let pipeline = &logging["service"]["pipelines"]["ffpush"];
    let receiver = &logging["receivers"][pipeline["receivers"][0].as_str().expect("a receiver")];
    assert_eq!(receiver["type"], "files");
    assert_eq!(
        receiver["include_paths"][0],
        "/var/lib/docker/containers/*/*-json.log"
    );
    let processors: Vec<&Value> = pipeline["processors"]
        .as_sequence()
        .expect("processors")
        .iter()
        .map(|p| &logging["processors"][p.as_str().expect("a processor name")])
        .collect();
    assert_eq!(processors.len(), 3, "{processors:?}");
    assert_eq!(processors[0]["type"], "parse_json");
    assert_eq!(processors[0]["field"], "message");
    assert_eq!(processors[1]["type"], "parse_json");
    assert_eq!(
        processors[1]["field"], "log",
        "docker's json-file puts the line in `log`"
    );
    assert_eq!(
        processors[2]["fields"]["severity"]["move_from"],
        "jsonPayload.severity"
    );
    let metrics = &agent["metrics"];
    let scrape = &metrics["receivers"]["ffpush"];
    assert_eq!(scrape["type"], "prometheus");
    let job = &scrape["config"]["scrape_configs"][0];
    // The same path and interval as the Cloud Run collector's (deploy/gmp-config.yaml).
    let gmp: Value = serde_yaml_ng::from_str(&read("deploy/gmp-config.yaml")).unwrap();
    let endpoint = &gmp["spec"]["endpoints"][0];
    assert_eq!(job["metrics_path"], endpoint["path"]);
    assert_eq!(job["scrape_interval"], endpoint["interval"]);
    assert_eq!(job["job_name"], gmp["metadata"]["name"], "the `job` label");
    assert_eq!(
        job["static_configs"][0]["targets"][0].as_str(),
        Some(format!("localhost:{port}").as_str())
    );
    assert_eq!(
        metrics["service"]["pipelines"]["ffpush"]["receivers"][0],
        "ffpush"
    );
}

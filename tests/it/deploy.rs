//! The deployment files checked against the code: `deploy/service.yaml` sets only settings
//! `ffpush run` knows, with values it accepts; the Dockerfile runs `ffpush run` as non-root;
//! the scripts parse and `deploy.sh --dry-run` renders a complete manifest.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::builder::Resettable;
use clap::{Args as _, FromArgMatches as _};
use ffpush::config::{ConfigError, LogFormat, Settings, SettingsArgs};
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
fn settings_from(env: &[(String, String)]) -> Result<Settings, ConfigError> {
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

fn container(manifest: &Value) -> &Value {
    let containers = manifest["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("spec.template.spec.containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
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
    assert_eq!(bad.unwrap_err().setting, "FFPUSH_CONCURRENCY");
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

    let c = container(&m);
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    for probe in ["startupProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], 8080, "{probe}");
    }
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
    for script in ["deploy/deploy.sh", "deploy/rollback.sh"] {
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
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in\n{stdout}");
    }
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
    let readme = read("README.md");
    let step = readme
        .split("**Switch off FlutterFlow's send functions.**")
        .nth(1)
        .and_then(|rest| rest.split("4. **").next())
        .unwrap_or_default();
    assert!(
        step.contains("addFcmToken") && step.to_lowercase().contains("keep"),
        "the README step that deletes the send functions says addFcmToken stays: {step}"
    );
    let rendered: String = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("#   "))
        .collect();
    for placeholder in ["PROJECT_ID", "REGION", "TAG"] {
        assert!(!rendered.contains(placeholder), "{placeholder} left in");
    }
}

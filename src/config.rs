//! Settings: environment first (Cloud Run is configured by env vars), each also a flag.
//!
//! Clap only collects raw strings; [`Settings::from_args`] validates them, so a bad value
//! becomes one [`ConfigError`] line naming the setting and the fix (exit code 64), never a
//! clap usage dump or a panic.

use std::path::PathBuf;
use std::time::Duration;

/// Exit code for invalid settings (EX_CONFIG in sysexits.h terms is 78; linkerd and we use
/// EX_USAGE, 64, as the "you configured me wrong" code).
pub const EXIT_INVALID_SETTINGS: i32 = 64;

pub const DEFAULT_FCM_ENDPOINT: &str = "https://fcm.googleapis.com";
pub const DEFAULT_COLLECTION: &str = "ff_push_notifications";
pub const DEFAULT_USER_COLLECTION: &str = "ff_user_push_notifications";
// --- Limits on app documents, and the schedule window (begin) ---
/// The same number as `maxRecipients()` in `migrations/firestore.rules`: a person picks the
/// recipients of an in-app notification by hand (a chat, a group, followers); larger
/// audiences are the console's or a back end's job (`ff_push_notifications`).
pub const DEFAULT_MAX_APP_RECIPIENTS: usize = 100;
/// One every two seconds, sustained: above what a person triggers by using an app (chat
/// messages, likes), far below a script's bulk writes.
pub const DEFAULT_SENDER_RATE: u32 = 30;
/// Timers for the next hour cost ≈ 1 KiB per document; later documents cost nothing.
pub const DEFAULT_SCHEDULE_WINDOW: Duration = Duration::from_secs(3600);
// --- Limits on app documents, and the schedule window (end) ---

/// Raw settings as given by flags or environment. Every value is a string here on purpose.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SettingsArgs {
    /// Firebase/GCP project id. Falls back to `project_id` in the credentials file.
    #[arg(long = "project", env = "GOOGLE_CLOUD_PROJECT")]
    pub project: Option<String>,
    /// Firestore database id.
    #[arg(long = "database", env = "FIRESTORE_DATABASE")]
    pub database: Option<String>,
    /// host:port of a Firestore emulator; when set, Firestore needs no Google credentials.
    #[arg(long = "firestore-emulator-host", env = "FIRESTORE_EMULATOR_HOST")]
    pub firestore_emulator_host: Option<String>,
    /// Service-account JSON key; its `token_uri` is honoured. Unset: the metadata server.
    #[arg(long = "credentials", env = "GOOGLE_APPLICATION_CREDENTIALS")]
    pub credentials: Option<String>,
    /// Base URL of the FCM API.
    #[arg(long = "fcm-endpoint", env = "FCM_ENDPOINT")]
    pub fcm_endpoint: Option<String>,
    /// Extra root CA certificate(s), PEM, trusted for FCM and its OAuth2 token endpoint next to
    /// the system roots (a TLS-inspecting egress proxy, a local HTTPS emulator).
    #[arg(long = "fcm-ca-cert", env = "FFPUSH_FCM_CA_CERT")]
    pub fcm_ca_cert: Option<String>,
    /// HTTP port for health and metrics.
    #[arg(long = "port", env = "PORT")]
    pub port: Option<String>,
    /// Collection the console and trusted back ends write.
    #[arg(long = "collection", env = "FFPUSH_COLLECTION")]
    pub collection: Option<String>,
    /// Collection app users write (never broadcast).
    #[arg(long = "user-collection", env = "FFPUSH_USER_COLLECTION")]
    pub user_collection: Option<String>,
    /// Concurrent FCM requests per notification.
    #[arg(long = "concurrency", env = "FFPUSH_CONCURRENCY")]
    pub concurrency: Option<String>,
    /// Attempts per token for retryable FCM answers (429/500/503/timeouts).
    #[arg(long = "max-attempts", env = "FFPUSH_MAX_ATTEMPTS")]
    pub max_attempts: Option<String>,
    /// How long one token may keep being retried in all, e.g. `10m`.
    #[arg(long = "retry-budget", env = "FFPUSH_RETRY_BUDGET")]
    pub retry_budget: Option<String>,
    /// How often a running fan-out writes its progress (and extends its lease).
    #[arg(long = "progress-interval", env = "FFPUSH_PROGRESS_INTERVAL")]
    pub progress_interval: Option<String>,
    /// Longest backoff between two attempts, e.g. `60s`.
    #[arg(long = "max-backoff", env = "FFPUSH_MAX_BACKOFF")]
    pub max_backoff: Option<String>,
    /// Timeout of one FCM request, e.g. `10s`.
    #[arg(long = "fcm-timeout", env = "FFPUSH_FCM_TIMEOUT")]
    pub fcm_timeout: Option<String>,
    /// How long a claim holds a document before another worker may take it over.
    #[arg(long = "lease", env = "FFPUSH_LEASE")]
    pub lease: Option<String>,
    /// Documents due longer ago than this are failed as expired instead of sent, e.g. `24h`.
    #[arg(long = "max-lateness", env = "FFPUSH_MAX_LATENESS")]
    pub max_lateness: Option<String>,
    /// Least wait after FCM's 429 QUOTA_EXCEEDED, e.g. `60s`.
    #[arg(long = "quota-backoff", env = "FFPUSH_QUOTA_BACKOFF")]
    pub quota_backoff: Option<String>,
    /// On SIGTERM, how long in-flight sends may take before the process exits anyway.
    #[arg(long = "shutdown-grace", env = "FFPUSH_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// How often to query for due or abandoned documents that no timer or listener holds.
    #[arg(long = "sweep-interval", env = "FFPUSH_SWEEP_INTERVAL")]
    pub sweep_interval: Option<String>,
    // --- Limits on app documents, and the schedule window (begin) ---
    /// Most users one `ff_user_push_notifications` document may name in `user_refs`.
    #[arg(long = "max-app-recipients", env = "FFPUSH_MAX_APP_RECIPIENTS")]
    pub max_app_recipients: Option<String>,
    /// `ff_user_push_notifications` documents sent per minute per `sender`; the rest fail.
    #[arg(long = "sender-rate", env = "FFPUSH_SENDER_RATE")]
    pub sender_rate: Option<String>,
    /// Timers are kept only for documents due within this window; later ones are found by the
    /// sweep when they come close, e.g. `1h`.
    #[arg(long = "schedule-window", env = "FFPUSH_SCHEDULE_WINDOW")]
    pub schedule_window: Option<String>,
    // --- Limits on app documents, and the schedule window (end) ---
    /// `text` or `json` (Cloud Logging). Default: json on Cloud Run (K_SERVICE set), else text.
    #[arg(long = "log-format", env = "LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Set by Cloud Run; only read to pick the log format.
    #[arg(skip = std::env::var("K_SERVICE").ok())]
    pub k_service: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated settings. Construct with [`Settings::from_args`] or, in tests,
/// [`Settings::for_emulators`].
#[derive(Clone, Debug)]
pub struct Settings {
    pub project: String,
    pub database: String,
    pub firestore_emulator_host: Option<String>,
    pub credentials: Option<PathBuf>,
    /// Without trailing slash.
    pub fcm_endpoint: String,
    /// Extra trusted root(s) for FCM and OAuth2, already read and checked.
    pub fcm_ca_cert: Option<CaCert>,
    pub port: u16,
    pub collection: String,
    pub user_collection: String,
    pub concurrency: usize,
    pub max_attempts: u32,
    pub max_backoff: Duration,
    pub retry_budget: Duration,
    pub progress_interval: Duration,
    pub fcm_timeout: Duration,
    pub lease: Duration,
    pub max_lateness: Duration,
    pub quota_floor: Duration,
    pub shutdown_grace: Duration,
    pub sweep_interval: Duration,
    // --- Limits on app documents, and the schedule window (begin) ---
    /// Most unique users in an app document's `user_refs`.
    pub max_app_recipients: usize,
    /// App documents per minute per `sender` (per instance).
    pub sender_rate: u32,
    /// Documents due further ahead hold no timer.
    pub schedule_window: Duration,
    // --- Limits on app documents, and the schedule window (end) ---
    pub log_format: LogFormat,
    /// Identifies this process on the documents it claims.
    pub worker_id: String,
}

/// Root certificate(s) from a PEM file, read once at start so a bad file stops the program
/// with one line instead of failing every send.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCert {
    pub path: PathBuf,
    /// The file's text: one or more `CERTIFICATE` blocks.
    pub pem: Vec<u8>,
}

impl CaCert {
    /// Reads `path` and checks it holds at least one well-formed PEM certificate. The error
    /// says what is wrong, for [`ConfigError::fix`].
    pub fn read(path: &std::path::Path) -> Result<CaCert, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let pem = std::fs::read(path).map_err(|e| {
            format!("cannot read it ({e}); point it at a PEM file with the CA certificate")
        })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                format!("not PEM ({e}); export the CA certificate in PEM (base64) form")
            })?;
        if certs.is_empty() {
            return Err(
                "no -----BEGIN CERTIFICATE----- block in it; export the CA certificate in PEM form"
                    .into(),
            );
        }
        Ok(CaCert {
            path: path.to_path_buf(),
            pem,
        })
    }
}

impl std::fmt::Debug for CaCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CaCert").field(&self.path).finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid setting {setting} = {value:?}: {fix}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub value: String,
    pub fix: String,
}

impl ConfigError {
    fn new(setting: &'static str, value: &str, fix: impl Into<String>) -> Self {
        Self {
            setting,
            value: value.to_string(),
            fix: fix.into(),
        }
    }
}

impl Settings {
    pub fn from_args(args: &SettingsArgs) -> Result<Self, ConfigError> {
        let credentials = non_empty(&args.credentials).map(PathBuf::from);
        let key = credentials.as_deref().map(read_key).transpose()?;
        let project = match (non_empty(&args.project), &key) {
            (Some(p), _) => p.to_string(),
            (None, Some(key)) => key
                .get("project_id")
                .and_then(|p| p.as_str())
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .ok_or_else(missing_project)?,
            (None, None) => return Err(missing_project()),
        };
        if !project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == ':')
        {
            return Err(ConfigError::new(
                "GOOGLE_CLOUD_PROJECT",
                &project,
                "a project id has only letters, digits, '-', '.', ':' (see Firebase console → Project settings)",
            ));
        }
        let fcm_endpoint = non_empty(&args.fcm_endpoint).unwrap_or(DEFAULT_FCM_ENDPOINT);
        if !(fcm_endpoint.starts_with("https://") || fcm_endpoint.starts_with("http://")) {
            return Err(ConfigError::new(
                "FCM_ENDPOINT",
                fcm_endpoint,
                "use a URL such as https://fcm.googleapis.com",
            ));
        }
        let fcm_ca_cert = match non_empty(&args.fcm_ca_cert) {
            Some(raw) => Some(
                CaCert::read(std::path::Path::new(raw))
                    .map_err(|fix| ConfigError::new("FFPUSH_FCM_CA_CERT", raw, fix))?,
            ),
            None => None,
        };
        let emulator = non_empty(&args.firestore_emulator_host).map(str::to_string);
        if let Some(host) = &emulator
            && (host.contains('/') || !host.contains(':'))
        {
            return Err(ConfigError::new(
                "FIRESTORE_EMULATOR_HOST",
                host,
                "use host:port, e.g. 127.0.0.1:8681",
            ));
        }
        let log_format = match non_empty(&args.log_format) {
            None if args.k_service.is_some() => LogFormat::Json,
            None => LogFormat::Text,
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    other,
                    "use `text` or `json`",
                ));
            }
        };
        let settings = Settings {
            project,
            database: non_empty(&args.database).unwrap_or("(default)").to_string(),
            firestore_emulator_host: emulator,
            credentials,
            fcm_endpoint: fcm_endpoint.trim_end_matches('/').to_string(),
            fcm_ca_cert,
            port: parse_number(&args.port, "PORT", 8080, 0, u16::MAX as u64)? as u16,
            collection: collection_name(&args.collection, "FFPUSH_COLLECTION", DEFAULT_COLLECTION)?,
            user_collection: collection_name(
                &args.user_collection,
                "FFPUSH_USER_COLLECTION",
                DEFAULT_USER_COLLECTION,
            )?,
            concurrency: parse_number(&args.concurrency, "FFPUSH_CONCURRENCY", 256, 1, 10_000)?
                as usize,
            max_attempts: parse_number(&args.max_attempts, "FFPUSH_MAX_ATTEMPTS", 10, 1, 100)?
                as u32,
            max_backoff: parse_setting_duration(
                &args.max_backoff,
                "FFPUSH_MAX_BACKOFF",
                Duration::from_secs(60),
            )?,
            retry_budget: parse_setting_duration(
                &args.retry_budget,
                "FFPUSH_RETRY_BUDGET",
                Duration::from_secs(600),
            )?,
            progress_interval: parse_setting_duration(
                &args.progress_interval,
                "FFPUSH_PROGRESS_INTERVAL",
                Duration::from_secs(1),
            )?,
            fcm_timeout: parse_setting_duration(
                &args.fcm_timeout,
                "FFPUSH_FCM_TIMEOUT",
                Duration::from_secs(10),
            )?,
            lease: parse_setting_duration(&args.lease, "FFPUSH_LEASE", Duration::from_secs(60))?,
            max_lateness: parse_setting_duration(
                &args.max_lateness,
                "FFPUSH_MAX_LATENESS",
                Duration::from_secs(24 * 3600),
            )?,
            quota_floor: parse_setting_duration(
                &args.quota_backoff,
                "FFPUSH_QUOTA_BACKOFF",
                Duration::from_secs(60),
            )?,
            shutdown_grace: parse_setting_duration(
                &args.shutdown_grace,
                "FFPUSH_SHUTDOWN_GRACE",
                Duration::from_secs(8),
            )?,
            sweep_interval: parse_setting_duration(
                &args.sweep_interval,
                "FFPUSH_SWEEP_INTERVAL",
                Duration::from_secs(30),
            )?,
            // --- Limits on app documents, and the schedule window (begin) ---
            max_app_recipients: parse_number(
                &args.max_app_recipients,
                "FFPUSH_MAX_APP_RECIPIENTS",
                DEFAULT_MAX_APP_RECIPIENTS as u64,
                1,
                10_000,
            )? as usize,
            sender_rate: parse_number(
                &args.sender_rate,
                "FFPUSH_SENDER_RATE",
                DEFAULT_SENDER_RATE as u64,
                1,
                1_000_000,
            )? as u32,
            schedule_window: parse_setting_duration(
                &args.schedule_window,
                "FFPUSH_SCHEDULE_WINDOW",
                DEFAULT_SCHEDULE_WINDOW,
            )?,
            // --- Limits on app documents, and the schedule window (end) ---
            log_format,
            worker_id: default_worker_id(),
        };
        // --- Limits on app documents, and the schedule window (begin) ---
        if settings.schedule_window < settings.sweep_interval * 2 {
            return Err(ConfigError::new(
                "FFPUSH_SCHEDULE_WINDOW",
                &format!("{:?}", settings.schedule_window),
                format!(
                    "must be at least twice FFPUSH_SWEEP_INTERVAL ({:?}): the sweep finds documents as they enter the window",
                    settings.sweep_interval
                ),
            ));
        }
        // --- Limits on app documents, and the schedule window (end) ---
        if settings.progress_interval * 2 > settings.lease {
            return Err(ConfigError::new(
                "FFPUSH_PROGRESS_INTERVAL",
                &format!("{:?}", settings.progress_interval),
                format!(
                    "must be at most half of FFPUSH_LEASE ({:?}) so the lease is extended in time",
                    settings.lease
                ),
            ));
        }
        Ok(settings)
    }

    /// Settings for a local stack or a test: no process environment is read.
    pub fn for_emulators(
        project: &str,
        firestore_emulator_host: &str,
        fcm_endpoint: &str,
        credentials: PathBuf,
    ) -> Self {
        Settings {
            project: project.to_string(),
            database: "(default)".to_string(),
            firestore_emulator_host: Some(firestore_emulator_host.to_string()),
            credentials: Some(credentials),
            fcm_endpoint: fcm_endpoint.trim_end_matches('/').to_string(),
            fcm_ca_cert: None,
            port: 0,
            collection: DEFAULT_COLLECTION.to_string(),
            user_collection: DEFAULT_USER_COLLECTION.to_string(),
            concurrency: 64,
            max_attempts: 10,
            max_backoff: Duration::from_secs(60),
            retry_budget: Duration::from_secs(600),
            progress_interval: Duration::from_secs(1),
            fcm_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(60),
            max_lateness: Duration::from_secs(24 * 3600),
            quota_floor: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(8),
            sweep_interval: Duration::from_secs(30),
            // --- Limits on app documents, and the schedule window (begin) ---
            max_app_recipients: DEFAULT_MAX_APP_RECIPIENTS,
            sender_rate: DEFAULT_SENDER_RATE,
            schedule_window: DEFAULT_SCHEDULE_WINDOW,
            // --- Limits on app documents, and the schedule window (end) ---
            log_format: LogFormat::Text,
            worker_id: default_worker_id(),
        }
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn default_worker_id() -> String {
    let host = std::env::var("K_REVISION")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "ffpush".to_string());
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

fn missing_project() -> ConfigError {
    ConfigError::new(
        "GOOGLE_CLOUD_PROJECT",
        "",
        "set GOOGLE_CLOUD_PROJECT (or --project) to your Firebase project id",
    )
}

/// The service-account key, checked at start so a wrong path is a settings error, not a
/// failure at the first send.
fn read_key(path: &std::path::Path) -> Result<serde_json::Value, ConfigError> {
    let shown = path.display().to_string();
    let bad = |fix: String| ConfigError::new("GOOGLE_APPLICATION_CREDENTIALS", &shown, fix);
    let text = std::fs::read_to_string(path).map_err(|e| {
        bad(format!(
            "cannot read the key file ({e}); point it at a service-account JSON key"
        ))
    })?;
    let key: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "not JSON ({e}); download the key again from IAM → Service accounts"
        ))
    })?;
    let has = |field: &str| {
        key.get(field)
            .and_then(|v| v.as_str())
            .is_some_and(|v| !v.is_empty())
    };
    if !(has("private_key") && has("client_email") && has("token_uri")) {
        return Err(bad(
            "not a service-account key (needs private_key, client_email, token_uri); create one under IAM → Service accounts → Keys"
                .into(),
        ));
    }
    Ok(key)
}

fn collection_name(
    value: &Option<String>,
    setting: &'static str,
    default: &str,
) -> Result<String, ConfigError> {
    let name = non_empty(value).unwrap_or(default);
    if name.contains('/') || name.starts_with("__") {
        return Err(ConfigError::new(
            setting,
            name,
            "use a top-level collection id without '/' (e.g. ff_push_notifications)",
        ));
    }
    Ok(name.to_string())
}

fn parse_number(
    value: &Option<String>,
    setting: &'static str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(raw) = non_empty(value) else {
        return Ok(default);
    };
    match raw.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(
            setting,
            raw,
            format!("use a whole number from {min} to {max} (default {default})"),
        )),
    }
}

fn parse_setting_duration(
    value: &Option<String>,
    setting: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(raw) = non_empty(value) else {
        return Ok(default);
    };
    parse_duration(raw).ok_or_else(|| {
        ConfigError::new(
            setting,
            raw,
            format!(
                "use a duration such as 500ms, 30s, 5m or 24h (default {}s)",
                default.as_secs()
            ),
        )
    })
}

/// `500ms`, `30s`, `5m`, `24h`; a bare number means seconds.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number.parse().ok()?;
    let millis = match unit {
        "ms" => n,
        "" | "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> SettingsArgs {
        SettingsArgs {
            project: Some("demo-project".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_the_design() {
        let s = Settings::from_args(&args()).unwrap();
        assert_eq!(s.database, "(default)");
        assert_eq!(s.fcm_endpoint, "https://fcm.googleapis.com");
        assert_eq!(s.port, 8080);
        assert_eq!(s.collection, "ff_push_notifications");
        assert_eq!(s.user_collection, "ff_user_push_notifications");
        assert_eq!(s.log_format, LogFormat::Text);
        assert!(s.firestore_emulator_host.is_none());
    }

    #[test]
    fn a_bad_port_names_the_setting_and_the_fix() {
        let err = Settings::from_args(&SettingsArgs {
            port: Some("eighty".into()),
            ..args()
        })
        .unwrap_err();
        assert_eq!(err.setting, "PORT");
        let line = err.to_string();
        assert!(
            line.contains("PORT") && line.contains("whole number"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn missing_project_says_how_to_set_it() {
        let err = Settings::from_args(&SettingsArgs::default()).unwrap_err();
        assert_eq!(err.setting, "GOOGLE_CLOUD_PROJECT");
        assert!(err.to_string().contains("--project"));
    }

    #[test]
    fn project_falls_back_to_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.json");
        std::fs::write(
            &key,
            r#"{"type":"service_account","project_id":"from-key","private_key":"k","client_email":"e","token_uri":"u"}"#,
        )
        .unwrap();
        let s = Settings::from_args(&SettingsArgs {
            credentials: Some(key.display().to_string()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.project, "from-key");
    }

    #[test]
    fn a_key_that_is_not_a_service_account_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.json");
        std::fs::write(&key, r#"{"type":"authorized_user","client_id":"x"}"#).unwrap();
        let err = Settings::from_args(&SettingsArgs {
            credentials: Some(key.display().to_string()),
            ..args()
        })
        .unwrap_err();
        assert_eq!(err.setting, "GOOGLE_APPLICATION_CREDENTIALS");
        assert!(err.fix.contains("service-account key"));
    }

    #[test]
    fn unreadable_key_file_is_named() {
        let err = Settings::from_args(&SettingsArgs {
            credentials: Some("/nonexistent/key.json".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.setting, "GOOGLE_APPLICATION_CREDENTIALS");
    }

    #[test]
    fn invalid_values_are_rejected() {
        let cases: Vec<(SettingsArgs, &str)> = vec![
            (
                SettingsArgs {
                    fcm_endpoint: Some("fcm.googleapis.com".into()),
                    ..args()
                },
                "FCM_ENDPOINT",
            ),
            (
                SettingsArgs {
                    concurrency: Some("0".into()),
                    ..args()
                },
                "FFPUSH_CONCURRENCY",
            ),
            (
                SettingsArgs {
                    lease: Some("soon".into()),
                    ..args()
                },
                "FFPUSH_LEASE",
            ),
            (
                SettingsArgs {
                    log_format: Some("xml".into()),
                    ..args()
                },
                "LOG_FORMAT",
            ),
            (
                SettingsArgs {
                    firestore_emulator_host: Some("localhost".into()),
                    ..args()
                },
                "FIRESTORE_EMULATOR_HOST",
            ),
            (
                SettingsArgs {
                    collection: Some("a/b".into()),
                    ..args()
                },
                "FFPUSH_COLLECTION",
            ),
            (
                SettingsArgs {
                    max_app_recipients: Some("0".into()),
                    ..args()
                },
                "FFPUSH_MAX_APP_RECIPIENTS",
            ),
            (
                SettingsArgs {
                    sender_rate: Some("many".into()),
                    ..args()
                },
                "FFPUSH_SENDER_RATE",
            ),
            (
                // Shorter than two sweeps: documents entering it could be missed.
                SettingsArgs {
                    schedule_window: Some("50s".into()),
                    ..args()
                },
                "FFPUSH_SCHEDULE_WINDOW",
            ),
        ];
        for (a, setting) in cases {
            assert_eq!(Settings::from_args(&a).unwrap_err().setting, setting);
        }
    }

    #[test]
    fn an_extra_ca_certificate_is_read_and_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, cert.cert.pem()).unwrap();
        let s = Settings::from_args(&SettingsArgs {
            fcm_ca_cert: Some(good.display().to_string()),
            ..args()
        })
        .unwrap();
        let ca = s.fcm_ca_cert.expect("the CA is kept");
        assert_eq!(ca.path, good);
        assert_eq!(ca.pem, cert.cert.pem().into_bytes());
        assert!(
            !format!("{ca:?}").contains("BEGIN"),
            "Debug shows the path only"
        );

        let not_pem = dir.path().join("ca.der");
        std::fs::write(&not_pem, cert.cert.der().as_ref()).unwrap();
        for (path, says) in [
            ("/nonexistent/ca.pem".to_string(), "cannot read"),
            (not_pem.display().to_string(), "PEM"),
        ] {
            let err = Settings::from_args(&SettingsArgs {
                fcm_ca_cert: Some(path),
                ..args()
            })
            .unwrap_err();
            assert_eq!(err.setting, "FFPUSH_FCM_CA_CERT");
            let line = err.to_string();
            assert!(
                line.contains("FFPUSH_FCM_CA_CERT") && line.contains(says),
                "{line}"
            );
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn json_logs_on_cloud_run() {
        let s = Settings::from_args(&SettingsArgs {
            k_service: Some("ffpush".into()),
            ..args()
        })
        .unwrap();
        assert_eq!(s.log_format, LogFormat::Json);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1d"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}

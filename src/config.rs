//! Settings: environment first (Cloud Run is configured by env vars), each also a flag.
//!
//! Clap only collects raw strings; [`Settings::from_args`] validates them, so each bad value
//! becomes one [`ConfigError`] line naming the setting and the fix, all of them reported
//! together (exit code 64), never a clap usage dump or a panic.

use std::path::PathBuf;
use std::time::Duration;

/// Exit code for invalid settings (EX_CONFIG in sysexits.h terms is 78; linkerd and we use
/// EX_USAGE, 64, as the "you configured me wrong" code).
pub const EXIT_INVALID_SETTINGS: i32 = 64;

pub const DEFAULT_FCM_ENDPOINT: &str = "https://fcm.googleapis.com";
pub const DEFAULT_COLLECTION: &str = "ff_push_notifications";
pub const DEFAULT_USER_COLLECTION: &str = "ff_user_push_notifications";
pub const DEFAULT_USERS_COLLECTION: &str = "users";
/// The user document field with the user's language code, as apps commonly name it.
pub const DEFAULT_LANGUAGE_FIELD: &str = "language";

/// What a setting's value is, and the values it may take. Bounds keep absurd values (a zero
/// sweep interval, a one-millisecond lease) from starting the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Free text, checked by its own rule in [`Settings::from_args`].
    Text,
    /// A whole number in `min..=max`.
    Number { min: u64, max: u64 },
    /// A duration (`500ms`, `30s`, `5m`, `24h`) in `min..=max` milliseconds.
    Duration { min_ms: u64, max_ms: u64 },
}

/// One setting: its environment variable, flag, default, bounds and help. [`SETTINGS`] is the
/// one table `run`, `send`, `doctor`, `migrate`, the README and the tests all read.
pub struct Spec {
    pub env: &'static str,
    /// The long flag, without `--`.
    pub flag: &'static str,
    pub kind: Kind,
    /// The value used when the setting is unset, as one would type it; `""`: unset.
    pub default: &'static str,
    /// How the README shows the default when it is not simply [`Spec::default`].
    pub shown_default: Option<&'static str>,
    /// One line: the flag's help and the README's meaning column.
    pub help: &'static str,
    slot: fn(&SettingsArgs) -> &Option<String>,
    slot_mut: fn(&mut SettingsArgs) -> &mut Option<String>,
}

impl Spec {
    const BASE: Spec = Spec {
        env: "",
        flag: "",
        kind: Kind::Text,
        default: "",
        shown_default: None,
        help: "",
        slot: |a| &a.k_service,
        slot_mut: |a| &mut a.k_service,
    };

    /// The raw value given, trimmed; `None` when unset or blank.
    pub fn raw<'a>(&self, args: &'a SettingsArgs) -> Option<&'a str> {
        (self.slot)(args)
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// The raw value given, or the default.
    fn raw_or_default<'a>(&self, args: &'a SettingsArgs) -> &'a str {
        self.raw(args).unwrap_or(self.default)
    }

    fn error(&self, value: &str, fix: impl Into<String>) -> ConfigError {
        ConfigError::new(self.env, value, fix)
    }

    fn number(&self, args: &SettingsArgs) -> Result<u64, ConfigError> {
        let raw = self.raw_or_default(args);
        let Kind::Number { min, max } = self.kind else {
            return Err(self.error(raw, "not a number setting"));
        };
        match raw.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.error(
                raw,
                format!(
                    "use a whole number from {min} to {max} (default {})",
                    self.default
                ),
            )),
        }
    }

    fn duration(&self, args: &SettingsArgs) -> Result<Duration, ConfigError> {
        let raw = self.raw_or_default(args);
        let Kind::Duration { min_ms, max_ms } = self.kind else {
            return Err(self.error(raw, "not a duration setting"));
        };
        let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(max_ms));
        match parse_duration(raw) {
            Some(d) if d >= min && d <= max => Ok(d),
            _ => Err(self.error(
                raw,
                format!(
                    "use a duration from {} to {} such as 500ms, 30s, 5m or 24h (default {})",
                    show_duration(min),
                    show_duration(max),
                    self.default
                ),
            )),
        }
    }

    /// The README row: `| variable | flag | default | meaning |`.
    pub fn markdown_row(&self) -> String {
        let default = match (self.shown_default, self.default) {
            (Some(shown), _) => shown.to_string(),
            (None, "") => "unset".to_string(),
            (None, value) => format!("`{value}`"),
        };
        format!(
            "| `{}` | `--{}` | {} | {} |",
            self.env, self.flag, default, self.help
        )
    }
}

/// Declares the raw settings struct (one `Option<String>` per setting, so callers and tests
/// write `SettingsArgs { project: Some(..), ..Default::default() }`) and the table in one go.
macro_rules! settings_table {
    ($( $field:ident : $konst:ident { $($key:ident : $value:expr),* $(,)? } )*) => {
        /// Raw settings as given by flags or environment. Every value is a string here on
        /// purpose: [`Settings::from_args`] validates them against [`SETTINGS`].
        #[derive(Clone, Debug, Default)]
        pub struct SettingsArgs {
            $( pub $field: Option<String>, )*
            /// Set by Cloud Run; only read to pick the log format.
            pub k_service: Option<String>,
        }

        $(
            pub const $konst: Spec = Spec {
                $($key: $value,)*
                slot: |a| &a.$field,
                slot_mut: |a| &mut a.$field,
                ..Spec::BASE
            };
        )*

        /// Every setting, in the README's order.
        pub const SETTINGS: &[&Spec] = &[ $( &$konst ),* ];
    };
}

const SECOND: u64 = 1000;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

settings_table! {
    project: PROJECT {
        env: "GOOGLE_CLOUD_PROJECT", flag: "project",
        shown_default: Some("`project_id` of the credentials file"),
        help: "Firebase/GCP project id",
    }
    database: DATABASE {
        env: "FIRESTORE_DATABASE", flag: "database", default: "(default)",
        help: "Firestore database id",
    }
    firestore_emulator_host: FIRESTORE_EMULATOR_HOST {
        env: "FIRESTORE_EMULATOR_HOST", flag: "firestore-emulator-host",
        help: "`host:port` of a Firestore emulator; no Google credentials are then needed for Firestore",
    }
    credentials: CREDENTIALS {
        env: "GOOGLE_APPLICATION_CREDENTIALS", flag: "credentials",
        help: "service-account JSON key (its `token_uri` is honoured); unset: the metadata server (Cloud Run)",
    }
    fcm_endpoint: FCM_ENDPOINT {
        env: "FCM_ENDPOINT", flag: "fcm-endpoint", default: DEFAULT_FCM_ENDPOINT,
        help: "base URL of the FCM API. `https://` offers HTTP/2 and HTTP/1.1 by ALPN and speaks what the server picks; `http://` tries HTTP/2 with prior knowledge (h2c), else HTTP/1.1 (a mock server, a proxy). The protocol in use is logged at start; an endpoint that answers in neither (or not in TLS for `https://`) stops the start with the reason",
    }
    fcm_ca_cert: FCM_CA_CERT {
        env: "FFPUSH_FCM_CA_CERT", flag: "fcm-ca-cert",
        help: "PEM file of extra root certificate(s) trusted for FCM and its OAuth2 token endpoint, next to the system roots: a TLS-inspecting egress proxy's CA, or a local HTTPS FCM emulator's. Read and checked at start",
    }
    port: PORT {
        env: "PORT", flag: "port", kind: Kind::Number { min: 0, max: u16::MAX as u64 }, default: "8080",
        help: "HTTP port for `/healthz`, `/readyz`, `/metrics`",
    }
    collection: COLLECTION {
        env: "FFPUSH_COLLECTION", flag: "collection", default: DEFAULT_COLLECTION,
        help: "console / back-end collection",
    }
    user_collection: USER_COLLECTION {
        env: "FFPUSH_USER_COLLECTION", flag: "user-collection", default: DEFAULT_USER_COLLECTION,
        help: "app users' collection (never broadcast)",
    }
    users_collection: USERS_COLLECTION {
        env: "FFPUSH_USERS_COLLECTION", flag: "users-collection", default: DEFAULT_USERS_COLLECTION,
        help: "the project's users collection (`users`, `Users`, `user_data`, …): FlutterFlow's batch bounds, and where `send`, `doctor --user` and `dev --seed` look for a bare user id",
    }
    language_field: LANGUAGE_FIELD {
        env: "FFPUSH_LANGUAGE_FIELD", flag: "language-field", default: DEFAULT_LANGUAGE_FIELD,
        help: "field of a user document holding the user's language code (`de`, `pt-BR`; a dotted path reaches into a map): it picks the text of `notification_title_i18n` / `notification_text_i18n`. Read only for documents that carry those maps",
    }
    concurrency: CONCURRENCY {
        env: "FFPUSH_CONCURRENCY", flag: "concurrency", kind: Kind::Number { min: 1, max: 10_000 },
        // FCM's default quota (10 000 messages/s) at up to 100 ms per send, in 10 connections
        // of Google's 100 streams.
        default: "1000",
        help: "FCM requests in flight at once for the whole instance (one notification may use all of them); the connection pool is sized from it (1–10000)",
    }
    max_documents: MAX_DOCUMENTS {
        env: "FFPUSH_MAX_DOCUMENTS", flag: "max-documents", kind: Kind::Number { min: 1, max: 100_000 },
        shown_default: Some("`FFPUSH_CONCURRENCY` ÷ 10, at most one per 4 MiB of the instance's memory (cgroup limit, else RAM), at least 1: 100 by default, also on a 512 MiB Cloud Run instance"),
        help: "documents this instance claims and sends at once. Due documents beyond it wait in a queue in due order (name and due time only, ≈ 150 bytes each, nothing claimed: other instances may take them) and are read again from Firestore when a slot frees (1–100000)",
    }
    fcm_connections: FCM_CONNECTIONS {
        env: "FFPUSH_FCM_CONNECTIONS", flag: "fcm-connections", kind: Kind::Number { min: 1, max: 256 },
        shown_default: Some("concurrency ÷ the server's stream limit (100 at Google), rounded up"),
        help: "HTTP/2 connections to FCM, opened warm; each carries at most the streams the server allows. Over HTTP/1.1, the most connections, opened as requests wait, one request each (unset: the concurrency, at most 100) (1–256)",
    }
    fcm_rate: FCM_RATE {
        env: "FFPUSH_FCM_RATE", flag: "fcm-rate", kind: Kind::Number { min: 0, max: 1_000_000 },
        // 95 % of FCM's default project quota (600 000 a minute): see the help.
        default: "9500",
        help: "messages per second all instances of the project send together at most: each paces at its share, agreed through `ffpush_instances` (ARCHITECTURE.md, Pacing); 0: unpaced. The default is 95 % of FCM's default project quota (600 000 per minute = 10 000/s): the 5 % left is for sends the pacer does not see (another sender in the project, `ffpush doctor`, requests on the wire while shares change, the pacer's 55 ms burst). After a quota increase, set 95 % of the new quota per second (0–1000000)",
    }
    heartbeat_interval: HEARTBEAT_INTERVAL {
        env: "FFPUSH_HEARTBEAT_INTERVAL", flag: "heartbeat-interval",
        kind: Kind::Duration { min_ms: 100, max_ms: MINUTE }, default: "2s",
        help: "how often an instance renews its heartbeat in `ffpush_instances` and recomputes its share of `FFPUSH_FCM_RATE`; one that misses 5 renewals (by Firestore's clock) counts as gone and its share returns to the others (100ms–1m)",
    }
    max_attempts: MAX_ATTEMPTS {
        env: "FFPUSH_MAX_ATTEMPTS", flag: "max-attempts", kind: Kind::Number { min: 1, max: 100 },
        default: "10",
        help: "attempts per token for 429/500/503/timeouts (1–100)",
    }
    retry_budget: RETRY_BUDGET {
        env: "FFPUSH_RETRY_BUDGET", flag: "retry-budget",
        kind: Kind::Duration { min_ms: SECOND, max_ms: DAY }, default: "10m",
        help: "longest time one token keeps being retried in all (1s–24h)",
    }
    max_backoff: MAX_BACKOFF {
        env: "FFPUSH_MAX_BACKOFF", flag: "max-backoff",
        kind: Kind::Duration { min_ms: 100, max_ms: HOUR }, default: "60s",
        help: "longest wait between attempts, unless FCM's `Retry-After` asks for more (100ms–1h)",
    }
    quota_backoff: QUOTA_BACKOFF {
        env: "FFPUSH_QUOTA_BACKOFF", flag: "quota-backoff",
        kind: Kind::Duration { min_ms: SECOND, max_ms: HOUR }, default: "60s",
        help: "least wait after 429 QUOTA_EXCEEDED (1s–1h)",
    }
    fcm_timeout: FCM_TIMEOUT {
        env: "FFPUSH_FCM_TIMEOUT", flag: "fcm-timeout",
        kind: Kind::Duration { min_ms: 100, max_ms: 10 * MINUTE }, default: "10s",
        help: "timeout of one FCM request (100ms–10m)",
    }
    lease: LEASE {
        env: "FFPUSH_LEASE", flag: "lease",
        kind: Kind::Duration { min_ms: 3 * SECOND, max_ms: HOUR }, default: "60s",
        help: "how long a claim holds a document without renewal before another worker may take it over (3s–1h)",
    }
    progress_interval: PROGRESS_INTERVAL {
        env: "FFPUSH_PROGRESS_INTERVAL", flag: "progress-interval",
        kind: Kind::Duration { min_ms: 100, max_ms: 30 * MINUTE }, default: "1s",
        help: "how often a running send writes its progress and extends its lease (100ms up to half the lease)",
    }
    max_lateness: MAX_LATENESS {
        env: "FFPUSH_MAX_LATENESS", flag: "max-lateness",
        kind: Kind::Duration { min_ms: MINUTE, max_ms: 365 * DAY }, default: "24h",
        help: "documents due longer ago are failed as `expired` instead of sent (1m–365 days)",
    }
    shutdown_grace: SHUTDOWN_GRACE {
        env: "FFPUSH_SHUTDOWN_GRACE", flag: "shutdown-grace",
        kind: Kind::Duration { min_ms: 0, max_ms: HOUR }, default: "8s",
        help: "on SIGTERM, time for in-flight sends before exiting; Cloud Run allows 10 s (0s–1h)",
    }
    sweep_interval: SWEEP_INTERVAL {
        env: "FFPUSH_SWEEP_INTERVAL", flag: "sweep-interval",
        kind: Kind::Duration { min_ms: SECOND, max_ms: HOUR }, default: "30s",
        help: "how often abandoned or due documents are looked for by query (1s–1h)",
    }
    max_app_recipients: MAX_APP_RECIPIENTS {
        env: "FFPUSH_MAX_APP_RECIPIENTS", flag: "max-app-recipients",
        kind: Kind::Number { min: 1, max: 10_000 },
        // The same number as `maxRecipients()` in migrations/firestore.rules: a person picks
        // an in-app notification's recipients by hand; larger audiences are the console's or
        // a back end's job (ff_push_notifications).
        default: "100",
        help: "most users one `ff_user_push_notifications` document may name in `user_refs`; more fails the document before any read (1–10000)",
    }
    sender_rate: SENDER_RATE {
        env: "FFPUSH_SENDER_RATE", flag: "sender-rate",
        kind: Kind::Number { min: 1, max: 1_000_000 },
        // One every two seconds sustained: above what a person triggers by using an app, far
        // below a script's bulk writes.
        default: "30",
        help: "`ff_user_push_notifications` documents per minute per `sender`, per instance; the excess fails, nothing is sent (1–1000000)",
    }
    schedule_window: SCHEDULE_WINDOW {
        env: "FFPUSH_SCHEDULE_WINDOW", flag: "schedule-window",
        kind: Kind::Duration { min_ms: 2 * SECOND, max_ms: 7 * DAY }, default: "1h",
        help: "timers are kept only for documents due within this window (≈ 1 KiB each); later ones cost no memory and are found by the sweep as they come close; at least twice the sweep interval (2s–168h)",
    }
    retention: RETENTION {
        env: "FFPUSH_RETENTION", flag: "retention",
        kind: Kind::Duration { min_ms: DAY, max_ms: 3650 * DAY },
        shown_default: Some("off: finished documents are kept"),
        help: "finished documents get `ffpush_expires_at` = `completed_at` + this, for a Firestore TTL policy (`deploy.sh --retention`) to delete them; bounds what each start replays. Off by default because the FlutterFlow console lists past notifications from these collections (24h–87600h)",
    }
    log_format: LOG_FORMAT {
        env: "LOG_FORMAT", flag: "log-format",
        shown_default: Some("`json` on Cloud Run (`K_SERVICE` set), else `text`"),
        help: "log format: `text` or `json` (Cloud Logging)",
    }
}

/// The README's settings table, generated from [`SETTINGS`] (a test keeps the two equal).
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | flag | default | meaning |\n|---|---|---|---|\n");
    for spec in SETTINGS {
        out.push_str(&spec.markdown_row());
        out.push('\n');
    }
    out
}

fn show_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    match ms {
        0 => "0s".to_string(),
        ms if ms % HOUR == 0 => format!("{}h", ms / HOUR),
        ms if ms % MINUTE == 0 => format!("{}m", ms / MINUTE),
        ms if ms % SECOND == 0 => format!("{}s", ms / SECOND),
        ms => format!("{ms}ms"),
    }
}

/// Flags and environment variables from the table: each setting is `--flag` or `ENV`.
impl clap::Args for SettingsArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        SETTINGS.iter().fold(cmd, |cmd, spec| {
            cmd.arg(
                clap::Arg::new(spec.env)
                    .long(spec.flag)
                    .env(spec.env)
                    .help(spec.help)
                    .value_name(match spec.kind {
                        Kind::Text => "TEXT",
                        Kind::Number { .. } => "N",
                        Kind::Duration { .. } => "DURATION",
                    })
                    .action(clap::ArgAction::Set),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for SettingsArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut args = SettingsArgs {
            k_service: std::env::var("K_SERVICE").ok(),
            ..Default::default()
        };
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for spec in SETTINGS {
            if let Ok(Some(value)) = matches.try_get_one::<String>(spec.env) {
                *(spec.slot_mut)(self) = Some(value.clone());
            }
        }
        Ok(())
    }
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
    /// The project's users collection (`FFPUSH_USERS_COLLECTION`, default `users`).
    pub users_collection: String,
    /// The user document's field with the user's language (`FFPUSH_LANGUAGE_FIELD`).
    pub language_field: String,
    pub concurrency: usize,
    /// Documents claimed and sent at once (`FFPUSH_MAX_DOCUMENTS`); due ones beyond wait.
    pub max_documents: usize,
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
    /// Most unique users in an app document's `user_refs`.
    pub max_app_recipients: usize,
    /// App documents per minute per `sender` (per instance).
    pub sender_rate: u32,
    /// Documents due further ahead hold no timer.
    pub schedule_window: Duration,
    pub log_format: LogFormat,
    /// Identifies this process on the documents it claims.
    pub worker_id: String,
    /// Fixed number of HTTP/2 connections to FCM; `None`: sized from `concurrency` and the
    /// server's stream limit.
    pub fcm_connections: Option<usize>,
    /// Messages per second at most, for all instances of the project together (each paces
    /// at its share); 0: unpaced.
    pub fcm_rate: u32,
    /// How often the instance's heartbeat is renewed and its share recomputed.
    pub heartbeat_interval: Duration,
    /// How long a finished document is kept: `ffpush_expires_at` is written this long after
    /// `completed_at`, for a Firestore TTL policy. `None`: no expiry field, kept for ever.
    pub retention: Option<Duration>,
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

/// Every invalid setting of one start (at least one), in the order of [`SETTINGS`]: shown one
/// line each.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigErrors(Vec<ConfigError>);

impl std::ops::Deref for ConfigErrors {
    type Target = [ConfigError];

    fn deref(&self) -> &[ConfigError] {
        &self.0
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The invalid settings found so far while [`Settings::from_args`] reads them all. A value
/// that failed stands in as its type's default, never used: [`Problems::finish`] then returns
/// the errors instead of the settings.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn push(&mut self, error: ConfigError) {
        self.0.push(error);
    }

    fn check<T: Default>(&mut self, result: Result<T, ConfigError>) -> T {
        result.unwrap_or_else(|error| {
            self.push(error);
            T::default()
        })
    }

    /// Whether one of `specs` was found invalid already.
    fn any(&self, specs: &[&Spec]) -> bool {
        self.0
            .iter()
            .any(|e| specs.iter().any(|spec| spec.env == e.setting))
    }

    fn finish<T>(mut self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            return Ok(value);
        }
        self.0.sort_by_key(|e| {
            SETTINGS
                .iter()
                .position(|spec| spec.env == e.setting)
                .unwrap_or(SETTINGS.len())
        });
        Err(ConfigErrors(self.0))
    }
}

impl Settings {
    /// Validates every setting; all the invalid ones are reported together, so a deployment
    /// with several mistakes is fixed in one round instead of one start per mistake.
    pub fn from_args(args: &SettingsArgs) -> Result<Self, ConfigErrors> {
        let mut problems = Problems::default();
        let credentials = CREDENTIALS.raw(args).map(PathBuf::from);
        let key = problems.check(credentials.as_deref().map(read_key).transpose());
        let project = match (PROJECT.raw(args), &key) {
            (Some(p), _) => p.to_string(),
            (None, Some(key)) => problems.check(
                key.get("project_id")
                    .and_then(|p| p.as_str())
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .ok_or_else(missing_project),
            ),
            // The project would have come from the key, whose problem is reported already.
            (None, None) if problems.any(&[&CREDENTIALS]) => String::new(),
            (None, None) => {
                problems.push(missing_project());
                String::new()
            }
        };
        if !project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == ':')
        {
            problems.push(PROJECT.error(
                &project,
                "a project id has only letters, digits, '-', '.', ':' (see Firebase console → Project settings)",
            ));
        }
        let fcm_endpoint = FCM_ENDPOINT.raw_or_default(args);
        if !(fcm_endpoint.starts_with("https://") || fcm_endpoint.starts_with("http://")) {
            problems.push(
                FCM_ENDPOINT.error(fcm_endpoint, "use a URL such as https://fcm.googleapis.com"),
            );
        }
        let fcm_ca_cert = problems.check(
            FCM_CA_CERT
                .raw(args)
                .map(|raw| {
                    CaCert::read(std::path::Path::new(raw))
                        .map_err(|fix| FCM_CA_CERT.error(raw, fix))
                })
                .transpose(),
        );
        let emulator = FIRESTORE_EMULATOR_HOST.raw(args).map(str::to_string);
        if let Some(host) = &emulator
            && (host.contains('/') || !host.contains(':'))
        {
            problems
                .push(FIRESTORE_EMULATOR_HOST.error(host, "use host:port, e.g. 127.0.0.1:8681"));
        }
        let log_format = match LOG_FORMAT.raw(args) {
            None if args.k_service.is_some() => LogFormat::Json,
            None => LogFormat::Text,
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                problems.push(LOG_FORMAT.error(other, "use `text` or `json`"));
                LogFormat::Text
            }
        };
        let concurrency = problems.check(CONCURRENCY.number(args)) as usize;
        let settings = Settings {
            project,
            database: DATABASE.raw_or_default(args).to_string(),
            firestore_emulator_host: emulator,
            credentials,
            fcm_endpoint: fcm_endpoint.trim_end_matches('/').to_string(),
            fcm_ca_cert,
            port: problems.check(PORT.number(args)) as u16,
            collection: problems.check(collection_name(&COLLECTION, args)),
            user_collection: problems.check(collection_name(&USER_COLLECTION, args)),
            users_collection: problems.check(collection_name(&USERS_COLLECTION, args)),
            language_field: problems.check(field_path(&LANGUAGE_FIELD, args)),
            concurrency,
            max_documents: match MAX_DOCUMENTS.raw(args) {
                Some(_) => problems.check(MAX_DOCUMENTS.number(args)) as usize,
                None => default_max_documents(concurrency, memory_limit_bytes()),
            },
            max_attempts: problems.check(MAX_ATTEMPTS.number(args)) as u32,
            max_backoff: problems.check(MAX_BACKOFF.duration(args)),
            retry_budget: problems.check(RETRY_BUDGET.duration(args)),
            progress_interval: problems.check(PROGRESS_INTERVAL.duration(args)),
            fcm_timeout: problems.check(FCM_TIMEOUT.duration(args)),
            lease: problems.check(LEASE.duration(args)),
            max_lateness: problems.check(MAX_LATENESS.duration(args)),
            quota_floor: problems.check(QUOTA_BACKOFF.duration(args)),
            shutdown_grace: problems.check(SHUTDOWN_GRACE.duration(args)),
            sweep_interval: problems.check(SWEEP_INTERVAL.duration(args)),
            max_app_recipients: problems.check(MAX_APP_RECIPIENTS.number(args)) as usize,
            sender_rate: problems.check(SENDER_RATE.number(args)) as u32,
            schedule_window: problems.check(SCHEDULE_WINDOW.duration(args)),
            log_format,
            worker_id: default_worker_id(),
            fcm_connections: problems
                .check(
                    FCM_CONNECTIONS
                        .raw(args)
                        .map(|_| FCM_CONNECTIONS.number(args))
                        .transpose(),
                )
                .map(|n| n as usize),
            fcm_rate: problems.check(FCM_RATE.number(args)) as u32,
            heartbeat_interval: problems.check(HEARTBEAT_INTERVAL.duration(args)),
            retention: problems.check(
                RETENTION
                    .raw(args)
                    .map(|_| RETENTION.duration(args))
                    .transpose(),
            ),
        };
        // Rules between two settings are checked only when both are valid on their own.
        if !problems.any(&[&SCHEDULE_WINDOW, &SWEEP_INTERVAL])
            && settings.schedule_window < settings.sweep_interval * 2
        {
            problems.push(SCHEDULE_WINDOW.error(
                &format!("{:?}", settings.schedule_window),
                format!(
                    "must be at least twice FFPUSH_SWEEP_INTERVAL ({:?}): the sweep finds documents as they enter the window",
                    settings.sweep_interval
                ),
            ));
        }
        if !problems.any(&[&PROGRESS_INTERVAL, &LEASE])
            && settings.progress_interval * 2 > settings.lease
        {
            problems.push(PROGRESS_INTERVAL.error(
                &format!("{:?}", settings.progress_interval),
                format!(
                    "must be at most half of FFPUSH_LEASE ({:?}) so the lease is extended in time",
                    settings.lease
                ),
            ));
        }
        problems.finish(settings)
    }

    /// Settings for a local stack or a test: the production defaults, pointed at the
    /// emulators. No process environment is read; change only what the test needs.
    pub fn for_emulators(
        project: &str,
        firestore_emulator_host: &str,
        fcm_endpoint: &str,
        credentials: PathBuf,
    ) -> Result<Self, ConfigErrors> {
        let mut settings = Settings::from_args(&SettingsArgs {
            project: Some(project.to_string()),
            firestore_emulator_host: Some(firestore_emulator_host.to_string()),
            fcm_endpoint: Some(fcm_endpoint.to_string()),
            // Many workers share one machine: any free port for health and metrics.
            port: Some("0".to_string()),
            ..Default::default()
        })?;
        // The key may be written after the settings are made; `ffpush run` checks it at start.
        settings.credentials = Some(credentials);
        Ok(settings)
    }
}

/// Memory one document in progress is allowed in the default of `FFPUSH_MAX_DOCUMENTS`: its
/// task, claim and lease renewal, and for a broadcast its read-ahead of 4 token pages of 500
/// (a few hundred KiB), counted four times over so that documents in progress take at most a
/// quarter of the instance.
const MEMORY_PER_DOCUMENT: u64 = 4 << 20;

/// `FFPUSH_MAX_DOCUMENTS` when unset: one document per ten FCM requests in flight (a document
/// in progress holds a lease renewed every progress interval, so beyond that more documents at
/// once add Firestore writes, not sends), and no more than `memory` holds at
/// [`MEMORY_PER_DOCUMENT`] each.
fn default_max_documents(concurrency: usize, memory: Option<u64>) -> usize {
    let by_concurrency = concurrency / 10;
    let by_memory = memory.map_or(usize::MAX, |m| (m / MEMORY_PER_DOCUMENT) as usize);
    by_concurrency.min(by_memory).max(1)
}

/// The memory this process may use: its cgroup's limit (a container's, Cloud Run's), else the
/// machine's RAM; `None` if neither can be read.
fn memory_limit_bytes() -> Option<u64> {
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    });
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
    match (cgroup, ram) {
        (Some(c), Some(r)) => Some(c.min(r)),
        (c, r) => c.or(r),
    }
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
    PROJECT.error(
        "",
        "set GOOGLE_CLOUD_PROJECT (or --project) to your Firebase project id",
    )
}

/// The service-account key, checked at start so a wrong path is a settings error, not a
/// failure at the first send.
fn read_key(path: &std::path::Path) -> Result<serde_json::Value, ConfigError> {
    let shown = path.display().to_string();
    let bad = |fix: String| CREDENTIALS.error(&shown, fix);
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

pub(crate) fn collection_name(spec: &Spec, args: &SettingsArgs) -> Result<String, ConfigError> {
    let name = spec.raw_or_default(args);
    if name.contains('/') || name.starts_with("__") {
        return Err(spec.error(
            name,
            "use a top-level collection id without '/' (e.g. ff_push_notifications)",
        ));
    }
    Ok(name.to_string())
}

/// A field of a document, or a dotted path into its maps, in the plain form a field mask
/// takes without quoting: letters, digits and `_`, not starting with a digit.
fn field_path(spec: &Spec, args: &SettingsArgs) -> Result<String, ConfigError> {
    let path = spec.raw_or_default(args);
    let plain = |segment: &str| {
        segment
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !segment.starts_with("__")
    };
    if !path.split('.').all(plain) {
        return Err(spec.error(
            path,
            "use a field name of letters, digits and _ (e.g. language), or a dotted path into a map (e.g. settings.language)",
        ));
    }
    Ok(path.to_string())
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

    /// The one error these settings have.
    #[track_caller]
    fn the_error(a: &SettingsArgs) -> ConfigError {
        let errors = Settings::from_args(a).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors}");
        let ConfigErrors(mut all) = errors;
        all.remove(0)
    }

    #[test]
    fn defaults_follow_the_design() {
        let s = Settings::from_args(&args()).unwrap();
        assert_eq!(s.database, "(default)");
        assert_eq!(s.fcm_endpoint, "https://fcm.googleapis.com");
        assert_eq!(s.port, 8080);
        assert_eq!(s.collection, "ff_push_notifications");
        assert_eq!(s.user_collection, "ff_user_push_notifications");
        assert_eq!(s.users_collection, "users");
        assert_eq!(s.language_field, "language");
        assert_eq!(s.log_format, LogFormat::Text);
        assert!(s.firestore_emulator_host.is_none());
        assert_eq!(s.concurrency, 1000);
        assert_eq!(s.fcm_connections, None, "sized from the concurrency");
        assert_eq!(
            s.fcm_rate, 9_500,
            "95 % of FCM's default quota, 600 000 a minute"
        );
        assert_eq!(s.heartbeat_interval, Duration::from_secs(2));
    }

    #[test]
    fn a_bad_port_names_the_setting_and_the_fix() {
        let err = the_error(&SettingsArgs {
            port: Some("eighty".into()),
            ..args()
        });
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
        let err = the_error(&SettingsArgs::default());
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
        let err = the_error(&SettingsArgs {
            credentials: Some(key.display().to_string()),
            ..args()
        });
        assert_eq!(err.setting, "GOOGLE_APPLICATION_CREDENTIALS");
        assert!(err.fix.contains("service-account key"));
    }

    #[test]
    fn unreadable_key_file_is_named() {
        let err = the_error(&SettingsArgs {
            credentials: Some("/nonexistent/key.json".into()),
            ..Default::default()
        });
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
                    users_collection: Some("tenants/t1/users".into()),
                    ..args()
                },
                "FFPUSH_USERS_COLLECTION",
            ),
            (
                SettingsArgs {
                    language_field: Some("settings.`lang`".into()),
                    ..args()
                },
                "FFPUSH_LANGUAGE_FIELD",
            ),
            (
                SettingsArgs {
                    fcm_connections: Some("0".into()),
                    ..args()
                },
                "FFPUSH_FCM_CONNECTIONS",
            ),
            (
                SettingsArgs {
                    fcm_rate: Some("fast".into()),
                    ..args()
                },
                "FFPUSH_FCM_RATE",
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
            assert_eq!(the_error(&a).setting, setting);
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
            let err = the_error(&SettingsArgs {
                fcm_ca_cert: Some(path),
                ..args()
            });
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
    fn the_readme_settings_table_is_the_table() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("| variable | flag | default | meaning |")
            .expect("the README has a settings table");
        let documented: Vec<&str> = readme[start..]
            .lines()
            .take_while(|l| l.starts_with('|'))
            .collect();
        let generated = markdown_table();
        let expected: Vec<&str> = generated.lines().collect();
        assert_eq!(
            documented, expected,
            "README.md's settings table differs from config::SETTINGS; replace it with:\n{generated}"
        );
    }

    #[test]
    fn the_table_is_consistent() {
        let mut envs = std::collections::HashSet::new();
        let mut flags = std::collections::HashSet::new();
        for spec in SETTINGS {
            assert!(envs.insert(spec.env), "{} twice", spec.env);
            assert!(flags.insert(spec.flag), "--{} twice", spec.flag);
            assert!(!spec.help.is_empty(), "{} has no help", spec.env);
            // Each default is itself a valid value (a setting without one is derived).
            let args = SettingsArgs::default();
            if spec.default.is_empty() {
                // Unset stays unset (README: "unset"), or the README says what it derives from.
                assert!(
                    spec.kind == Kind::Text || spec.shown_default.is_some(),
                    "{}: say what unset means",
                    spec.env
                );
                continue;
            }
            match spec.kind {
                Kind::Number { .. } => assert!(spec.number(&args).is_ok(), "{}", spec.env),
                Kind::Duration { .. } => assert!(spec.duration(&args).is_ok(), "{}", spec.env),
                Kind::Text => {}
            }
        }
    }

    #[test]
    fn absurd_values_are_refused_with_one_line() {
        for (spec, value) in [
            (&SWEEP_INTERVAL, "0s"),
            (&FCM_TIMEOUT, "0s"),
            (&FCM_TIMEOUT, "5ms"),
            (&LEASE, "1s"),
            (&PROGRESS_INTERVAL, "0ms"),
            (&RETRY_BUDGET, "0s"),
            (&MAX_LATENESS, "1s"),
            (&QUOTA_BACKOFF, "100ms"),
            (&MAX_BACKOFF, "0s"),
            (&LEASE, "30d"),
            (&CONCURRENCY, "0"),
            (&MAX_ATTEMPTS, "1000"),
            (&MAX_DOCUMENTS, "0"),
            (&HEARTBEAT_INTERVAL, "0s"),
            (&HEARTBEAT_INTERVAL, "5m"),
        ] {
            let mut a = args();
            *(spec.slot_mut)(&mut a) = Some(value.to_string());
            let err = the_error(&a);
            assert_eq!(err.setting, spec.env, "{value}");
            let line = err.to_string();
            assert!(line.contains(spec.env) && !line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn every_invalid_setting_is_reported_at_once_in_the_table_order() {
        let errors = Settings::from_args(&SettingsArgs {
            log_format: Some("xml".into()),
            port: Some("http".into()),
            lease: Some("soon".into()),
            collection: Some("a/b".into()),
            ..args()
        })
        .unwrap_err();
        let named: Vec<&str> = errors.iter().map(|e| e.setting).collect();
        assert_eq!(
            named,
            ["PORT", "FFPUSH_COLLECTION", "FFPUSH_LEASE", "LOG_FORMAT"]
        );
        let text = errors.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        for (line, error) in lines.iter().zip(errors.iter()) {
            assert_eq!(*line, error.to_string());
        }
    }

    #[test]
    fn a_rule_between_two_settings_waits_for_both_to_be_valid() {
        // An invalid lease is not also a lease too short for the progress interval.
        let err = the_error(&SettingsArgs {
            lease: Some("soon".into()),
            ..args()
        });
        assert_eq!(err.setting, "FFPUSH_LEASE");
        // An invalid window is reported once, not again as shorter than two sweeps.
        let err = the_error(&SettingsArgs {
            schedule_window: Some("soon".into()),
            ..args()
        });
        assert!(err.fix.contains("such as"), "{err}");
        // Both valid: the rule holds.
        let err = the_error(&SettingsArgs {
            progress_interval: Some("40s".into()),
            ..args()
        });
        assert_eq!(err.setting, "FFPUSH_PROGRESS_INTERVAL");
        assert!(err.fix.contains("half of FFPUSH_LEASE"), "{err}");
    }

    #[test]
    fn flags_and_environment_come_from_the_table() {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = SettingsArgs::augment_args(clap::Command::new("t"));
        let matches = cmd
            .try_get_matches_from(["t", "--project", "p1", "--lease", "90s"])
            .unwrap();
        let a = SettingsArgs::from_arg_matches(&matches).unwrap();
        assert_eq!(a.project.as_deref(), Some("p1"));
        assert_eq!(a.lease.as_deref(), Some("90s"));
        let s = Settings::from_args(&a).unwrap();
        assert_eq!(s.lease, Duration::from_secs(90));
        assert_eq!(s.concurrency, 1000);
    }

    #[test]
    fn emulator_settings_are_the_production_defaults() {
        let s = Settings::for_emulators("p", "127.0.0.1:1", "http://127.0.0.1:2", "k.json".into())
            .unwrap();
        let production = Settings::from_args(&args()).unwrap();
        assert_eq!(s.concurrency, production.concurrency);
        assert_eq!(s.lease, production.lease);
        assert_eq!(s.max_lateness, production.max_lateness);
        assert_eq!(s.port, 0);
    }

    #[test]
    fn documents_at_once_default_to_a_tenth_of_the_concurrency_within_memory() {
        const MIB: u64 = 1 << 20;
        assert_eq!(default_max_documents(1000, Some(16 * 1024 * MIB)), 100);
        assert_eq!(default_max_documents(1000, Some(512 * MIB)), 100);
        assert_eq!(default_max_documents(1000, Some(256 * MIB)), 64);
        assert_eq!(default_max_documents(1000, None), 100);
        assert_eq!(default_max_documents(10_000, Some(2048 * MIB)), 512);
        assert_eq!(default_max_documents(5, Some(16 * 1024 * MIB)), 1);
        assert_eq!(default_max_documents(1000, Some(MIB)), 1);
        let s = Settings::from_args(&SettingsArgs {
            max_documents: Some("7".into()),
            ..args()
        })
        .unwrap();
        assert_eq!(s.max_documents, 7);
        let unset = Settings::from_args(&args()).unwrap();
        assert!((1..=100).contains(&unset.max_documents));
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

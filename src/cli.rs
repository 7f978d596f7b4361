//! The command line: `run`, `dev`, `send`, `status`, `doctor`, `migrate`, `fcm-emulator`. Exit codes: 0 ok, 1 failure,
//! 64 invalid settings or arguments.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{EXIT_INVALID_SETTINGS, LogFormat, Settings, SettingsArgs, parse_duration};
use crate::daemon;
use crate::dev::fcm_emulator::{EmulatorOptions, FcmEmulator};
use crate::dev::firestore_emulator::FirestoreEmulator;
use crate::dev::seed;
use crate::model::pb::value::ValueType;
use crate::model::user_doc_path;
use crate::store::{self, Store};

#[derive(Parser, Debug)]
#[command(
    name = "ffpush",
    version,
    about = "Sends FlutterFlow push notifications from Firestore through FCM HTTP v1"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the worker: listen to the notification collections and send (the Cloud Run entry point).
    Run(Box<SettingsArgs>),
    /// Run everything locally: Firestore emulator, FCM emulator, a key for it, and the worker.
    Dev(DevArgs),
    /// Write a notification document the way FlutterFlow does.
    Send(Box<SendArgs>),
    /// List the latest notifications of both collections: status, counts, time taken, errors.
    Status(Box<StatusArgs>),
    /// Check settings, credentials, Firestore, FCM permission, and optionally one user's tokens.
    Doctor(Box<DoctorArgs>),
    /// Run the data migrations (dry run first: `--dry-run`).
    Migrate(Box<MigrateArgs>),
    /// Serve the FCM emulator (HTTP v1 send API and OAuth2 token endpoint) for tests and local runs.
    FcmEmulator(EmulatorArgs),
}

#[derive(clap::Args, Debug)]
struct DevArgs {
    /// Create demo users with device tokens (users/alice, users/bob, users/carol without tokens).
    #[arg(long)]
    seed: bool,
    /// The users collection the demo users go into and batches are bounded by.
    #[arg(long = "users-collection", env = "FFPUSH_USERS_COLLECTION")]
    users_collection: Option<String>,
    /// Port of the Firestore emulator started here (ignored when FIRESTORE_EMULATOR_HOST is set).
    #[arg(long, default_value_t = 8681)]
    firestore_port: u16,
    /// Port of the FCM emulator.
    #[arg(long, default_value_t = 8682)]
    fcm_port: u16,
    /// Project id used on the emulators.
    #[arg(long, default_value = "demo-ffpush")]
    project: String,
    /// Port for health and metrics.
    #[arg(long, default_value_t = 8080)]
    port: u16,
}

#[derive(clap::Args, Debug)]
struct SendArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// notification_title (optional with --silent)
    #[arg(long)]
    title: Option<String>,
    /// notification_text (optional with --silent)
    #[arg(long)]
    text: Option<String>,
    /// A recipient: a user document path (`users/ID`), or `ID` in the users collection; repeat
    /// for more. None: a broadcast.
    #[arg(long = "user")]
    users: Vec<String>,
    /// Broadcast only: "All", "iOS", "Android".
    #[arg(long)]
    audience: Option<String>,
    /// Broadcast only: `INDEX/COUNT` of FlutterFlow batch notifications, e.g. 3/10.
    #[arg(long)]
    batch: Option<String>,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    sound: Option<String>,
    /// initial_page_name
    #[arg(long)]
    page: Option<String>,
    /// parameter_data (JSON text)
    #[arg(long)]
    params: Option<String>,
    /// Send at this time (RFC 3339, e.g. 2026-11-25T17:00:00Z) instead of now.
    #[arg(long)]
    at: Option<String>,
    /// notification_badge: the app icon's badge count (0 or more).
    #[arg(long)]
    badge: Option<i64>,
    /// android_channel_id: the Android notification channel.
    #[arg(long)]
    channel: Option<String>,
    /// priority: "high" or "normal".
    #[arg(long)]
    priority: Option<String>,
    /// ttl_seconds: how long FCM and APNs keep trying an offline device (0-2419200).
    #[arg(long)]
    ttl: Option<i64>,
    /// collapse_key: a newer message with this key replaces an undelivered older one.
    #[arg(long)]
    collapse_key: Option<String>,
    /// silent: a background data message; nothing is shown.
    #[arg(long)]
    silent: bool,
    /// A `data` entry, KEY=VALUE; repeat for more.
    #[arg(long = "data")]
    data: Vec<String>,
    /// analytics_label: FCM's label for delivery reports (^[a-zA-Z0-9-_.~%]{1,50}$).
    #[arg(long)]
    analytics_label: Option<String>,
    /// The title in a language, LANG=TEXT (notification_title_i18n); repeat for more.
    #[arg(long = "title-i18n")]
    title_i18n: Vec<String>,
    /// The text in a language, LANG=TEXT (notification_text_i18n); repeat for more.
    #[arg(long = "text-i18n")]
    text_i18n: Vec<String>,
    /// dry_run: count the recipients and have FCM validate the message; deliver nothing.
    #[arg(long)]
    dry_run: bool,
    /// target_topic: send to the subscribers of this topic (one request) instead of users.
    #[arg(long)]
    topic: Option<String>,
    /// target_condition: send to the devices matching this condition of topics, e.g.
    /// "'a' in topics && 'b' in topics".
    #[arg(long)]
    condition: Option<String>,
    /// Write into the app users' collection (ff_user_push_notifications) instead.
    #[arg(long)]
    app: bool,
    /// Wait for the worker and print the outcome.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "60s")]
    wait_timeout: String,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// How many notifications to list (1-1000), most recent activity first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Only failed notifications.
    #[arg(long)]
    failed: bool,
    /// Only notifications created, started or finished this recently, e.g. 1h, 30m.
    #[arg(long)]
    since: Option<String>,
    /// Print a JSON array instead of the table: every field, the whole error and warning.
    #[arg(long)]
    json: bool,
    /// Refresh until Ctrl-C, like top.
    #[arg(long)]
    watch: bool,
    /// How often --watch refreshes.
    #[arg(long, default_value = "5s")]
    interval: String,
}

#[derive(clap::Args, Debug)]
struct DoctorArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// Also check this user's device tokens: `users/UID` or `UID`.
    #[arg(long)]
    user: Option<String>,
}

#[derive(clap::Args, Debug)]
struct MigrateArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// Print the plan (what would be created or deleted) without writing anything.
    #[arg(long)]
    dry_run: bool,
    /// Allow migrations that delete data (e.g. 002_remove_duplicate_tokens).
    #[arg(long)]
    allow_destructive: bool,
    /// Run only this migration (full id or its number, e.g. 002).
    #[arg(long)]
    only: Option<String>,
    /// List the migrations and exit.
    #[arg(long)]
    list: bool,
}

#[derive(clap::Args, Debug)]
struct EmulatorArgs {
    #[arg(long, default_value_t = 8682)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Lifetime of issued access tokens.
    #[arg(long, default_value = "3600s")]
    token_lifetime: String,
    /// Also write a service-account key for this emulator here (use with --project).
    #[arg(long)]
    write_key: Option<PathBuf>,
    #[arg(long, default_value = "demo-ffpush")]
    project: String,
    /// Serve HTTPS (h2 and http/1.1 by ALPN) with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Keep no messages, only counts (GET /emulator/stats): for load tests.
    #[arg(long)]
    no_record: bool,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised per HTTP/2 connection (Google's: 100).
    /// Streams beyond it are refused with RST_STREAM(REFUSED_STREAM).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_streams: u32,
    /// Milliseconds each send takes to be answered (Google's: tens).
    #[arg(long, default_value_t = 0)]
    latency: u64,
    /// Each send's latency is drawn uniformly from --latency ± this many milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter: u64,
    /// Send requests allowed per project per minute (FCM's default quota: 600000); beyond it,
    /// 429 QUOTA_EXCEEDED with Retry-After.
    #[arg(long)]
    quota: Option<u64>,
    /// The quota's window (FCM's is a minute), e.g. 60s or 2s.
    #[arg(long, default_value = "60s", requires = "quota")]
    quota_window: String,
    /// Close each connection gracefully (GOAWAY) after this many sends on it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    goaway_after: Option<u64>,
    /// Serve HTTP/1.1 only, like most mock servers and many proxies: no h2c, and with
    /// --tls-cert ALPN offers only http/1.1.
    #[arg(long)]
    http1_only: bool,
}

/// Runs the command line; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ffpush: cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Run(args) => match Settings::from_args(&args) {
            Ok(settings) => {
                crate::logging::init(&settings.log_format);
                run(settings).await
            }
            Err(e) => return invalid(e),
        },
        Command::Dev(args) => {
            crate::logging::init(&LogFormat::Text);
            dev(args).await
        }
        Command::Send(args) => match Settings::from_args(&args.settings) {
            Ok(settings) => send(settings, *args).await,
            Err(e) => return invalid(e),
        },
        Command::Status(args) => match Settings::from_args(&args.settings) {
            Ok(settings) => status(settings, *args).await,
            Err(e) => return invalid(e),
        },
        Command::Doctor(args) => {
            let checks = crate::doctor::run(&args.settings, args.user.as_deref()).await;
            for check in &checks {
                println!("{check}");
            }
            let failed = checks.iter().filter(|c| !c.passed).count();
            println!("{} passed, {failed} failed", checks.len() - failed);
            return if failed == 0 { 0 } else { 1 };
        }
        Command::Migrate(args) => {
            if args.list {
                for (id, description, destructive) in crate::migrate::list() {
                    let mark = if destructive { " (destructive)" } else { "" };
                    println!("{id}{mark}: {description}");
                }
                return 0;
            }
            match Settings::from_args(&args.settings) {
                Ok(settings) => migrate(settings, *args).await,
                Err(e) => return invalid(e),
            }
        }
        Command::FcmEmulator(args) => {
            crate::logging::init(&LogFormat::Text);
            fcm_emulator(args).await
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ffpush: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                EXIT_INVALID_SETTINGS
            } else {
                1
            }
        }
    }
}

fn invalid(e: crate::config::ConfigError) -> i32 {
    eprintln!("ffpush: {e}");
    EXIT_INVALID_SETTINGS
}

/// A mistake in the command's arguments (exit code 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("shutdown requested; draining");
        trigger.cancel();
    });
    let daemon = daemon::start(settings, shutdown).await?;
    daemon.run_until_stopped().await;
    Ok(())
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let users_collection = crate::config::collection_name(
        &crate::config::USERS_COLLECTION,
        &SettingsArgs {
            users_collection: args.users_collection.clone(),
            ..Default::default()
        },
    )
    .map_err(|e| Usage(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!("ffpush-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let external = std::env::var("FIRESTORE_EMULATOR_HOST")
        .ok()
        .filter(|h| !h.is_empty());
    let (firestore_host, _firestore) = match external {
        Some(host) => (host, None),
        None => {
            eprintln!(
                "starting the Firestore emulator on 127.0.0.1:{} …",
                args.firestore_port
            );
            let port = args.firestore_port;
            let emulator =
                tokio::task::spawn_blocking(move || FirestoreEmulator::start(Some(port))).await??;
            (emulator.host_port().to_string(), Some(emulator))
        }
    };
    let fcm = FcmEmulator::start(
        SocketAddr::from(([127, 0, 0, 1], args.fcm_port)),
        EmulatorOptions::default(),
    )
    .await
    .with_context(|| format!("starting the FCM emulator on port {}", args.fcm_port))?;
    let key = dir.join("service-account.json");
    fcm.write_service_account(&key, &args.project)?;
    let mut settings =
        Settings::for_emulators(&args.project, &firestore_host, &fcm.url(), key.clone())?;
    settings.port = args.port;
    settings.users_collection = users_collection.clone();
    if args.seed {
        let store = Store::connect(&settings).await?;
        seed::demo(&store).await?;
    }
    let shutdown = CancellationToken::new();
    let daemon = daemon::start(settings, shutdown.clone()).await?;
    eprintln!(
        "\nffpush dev is running (Ctrl-C stops everything):\n  Firestore emulator   {firestore_host} (project {project})\n  FCM emulator         {fcm_url}  — sent messages: {fcm_url}/emulator/messages\n  health / metrics     http://{http}/readyz  http://{http}/metrics\n  service-account key  {key}\n\nSend a notification from another terminal:\n  FIRESTORE_EMULATOR_HOST={firestore_host} GOOGLE_CLOUD_PROJECT={project} ffpush send --title Hello --text 'From ffpush' --user {users}/alice --wait\n",
        project = args.project,
        fcm_url = fcm.url(),
        http = std::net::SocketAddr::from(([127, 0, 0, 1], daemon.http_addr.port())),
        key = key.display(),
        users = users_collection,
    );
    terminated().await;
    eprintln!("stopping …");
    shutdown.cancel();
    daemon.run_until_stopped().await;
    fcm.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn migrate(settings: Settings, args: MigrateArgs) -> anyhow::Result<()> {
    let store = Store::connect(&settings)
        .await
        .context("connecting to Firestore")?;
    let options = crate::migrate::MigrateOptions {
        dry_run: args.dry_run,
        allow_destructive: args.allow_destructive,
        only: args.only,
    };
    let reports = crate::migrate::run(&store, &options)
        .await
        .map_err(|e| match e {
            crate::migrate::Error::UnknownMigration(..) => anyhow::Error::new(Usage(e.to_string())),
            e => anyhow::Error::new(e),
        })?;
    let mut refused = false;
    for report in &reports {
        println!("{report}");
        refused |= matches!(
            report.status,
            crate::migrate::MigrationStatus::RefusedDestructive
                | crate::migrate::MigrationStatus::Blocked
        );
    }
    if refused {
        bail!(
            "some migrations did not run: re-run with --allow-destructive after reading the plan above"
        );
    }
    Ok(())
}

async fn status(settings: Settings, args: StatusArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    if !(1..=1000).contains(&args.limit) {
        return Err(Usage(format!("--limit {}: give 1 to 1000", args.limit)).into());
    }
    let since = match &args.since {
        Some(raw) => Some(
            parse_duration(raw)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    Usage(format!(
                        "--since {raw:?}: use a duration such as 1h, 30m or 90s"
                    ))
                })?,
        ),
        None => None,
    };
    let interval = parse_duration(&args.interval)
        .filter(|d| *d >= Duration::from_secs(1))
        .ok_or_else(|| {
            Usage(format!(
                "--interval {:?}: use a duration of 1s or more, such as 5s",
                args.interval
            ))
        })?;
    let options = crate::recent::Options {
        limit: args.limit,
        failed_only: args.failed,
        since,
    };
    let store = Store::connect(&settings)
        .await
        .context("connecting to Firestore")?;
    let collections = [
        settings.collection.as_str(),
        settings.user_collection.as_str(),
    ];
    let render = |entries: &[crate::recent::Entry], now| -> anyhow::Result<String> {
        Ok(if args.json {
            serde_json::to_string_pretty(entries)? + "\n"
        } else {
            crate::recent::table(entries, now)
        })
    };
    if !args.watch {
        let now = Utc::now();
        let entries = crate::recent::latest(&store, &collections, &options, now)
            .await
            .context("reading the notifications")?;
        print!("{}", render(&entries, now)?);
        return Ok(());
    }
    let stop = terminated();
    tokio::pin!(stop);
    loop {
        let now = Utc::now();
        // Like top: clear the screen and redraw (JSON is printed one array after another).
        let mut screen = if args.json {
            String::new()
        } else {
            format!(
                "\x1b[H\x1b[2Jffpush status · project {} · {} UTC · every {}s · Ctrl-C stops\n\n",
                settings.project,
                now.format("%H:%M:%S"),
                interval.as_secs()
            )
        };
        match crate::recent::latest(&store, &collections, &options, now).await {
            Ok(entries) => screen.push_str(&render(&entries, now)?),
            // Keep watching: Firestore being briefly unavailable is what one may be watching for.
            Err(e) => screen.push_str(&format!(
                "reading the notifications failed: {e}; trying again in {}s\n",
                interval.as_secs()
            )),
        }
        print!("{screen}");
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn fcm_emulator(args: EmulatorArgs) -> anyhow::Result<()> {
    let lifetime = parse_duration(&args.token_lifetime).ok_or_else(|| {
        Usage(format!(
            "--token-lifetime {:?}: use a duration such as 3600s",
            args.token_lifetime
        ))
    })?;
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .map_err(|_| Usage(format!("--host {:?} is not an IP address", args.host)))?;
    let quota_window = parse_duration(&args.quota_window)
        .filter(|window| !window.is_zero())
        .ok_or_else(|| {
            Usage(format!(
                "--quota-window {:?}: use a duration such as 60s or 2s",
                args.quota_window
            ))
        })?;
    let options = EmulatorOptions {
        token_lifetime: lifetime,
        record: !args.no_record,
        max_streams: args.max_streams,
        latency: Duration::from_millis(args.latency),
        jitter: Duration::from_millis(args.jitter),
        quota: args.quota,
        quota_window,
        goaway_after: args.goaway_after,
        http1_only: args.http1_only,
    };
    let emulator = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|e| Usage(format!("{}: {e}", path.display())))
            };
            let (cert, key) = (read(cert)?, read(key)?);
            FcmEmulator::start_tls(addr, options, &cert, &key).await
        }
        _ => FcmEmulator::start(addr, options).await,
    }
    .with_context(|| format!("starting the FCM emulator on {addr}"))?;
    if let Some(path) = &args.write_key {
        emulator.write_service_account(path, &args.project)?;
        eprintln!(
            "wrote a service-account key for this emulator to {}",
            path.display()
        );
    }
    eprintln!(
        "FCM emulator listening on {} (send: POST /v1/projects/{{p}}/messages:send, tokens: POST /token)",
        emulator.url()
    );
    let quota = match args.quota {
        Some(n) => format!("{n} sends per project per {}", args.quota_window),
        None => "none".into(),
    };
    let http = if args.http1_only {
        "HTTP/1.1 only".to_string()
    } else {
        format!("{} HTTP/2 streams per connection", args.max_streams)
    };
    eprintln!(
        "  {http}, latency {} ms ± {} ms, quota {quota}",
        args.latency, args.jitter
    );
    terminated().await;
    emulator.shutdown();
    Ok(())
}

async fn send(settings: Settings, args: SendArgs) -> anyhow::Result<()> {
    let fields = notification_fields(&args, &settings.users_collection)?;
    let wait_limit = parse_duration(&args.wait_timeout).ok_or_else(|| {
        Usage(format!(
            "--wait-timeout {:?}: use a duration such as 60s",
            args.wait_timeout
        ))
    })?;
    let store = Store::connect(&settings)
        .await
        .context("connecting to Firestore")?;
    let collection = if args.app {
        &settings.user_collection
    } else {
        &settings.collection
    };
    let name = store
        .create(collection, fields)
        .await
        .context("writing the notification")?;
    let relative = store.relative(&name).to_string();
    println!("{relative}");
    if !args.wait {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + wait_limit;
    loop {
        if let Some(doc) = store.get(&relative).await?
            && let status = crate::model::Status::of(&doc)
            && status.is_finished()
        {
            println!("{}", outcome_json(&doc, status.as_str()));
            if matches!(
                status,
                crate::model::Status::Succeeded | crate::model::Status::Validated
            ) {
                return Ok(());
            }
            bail!("the notification {status}");
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no outcome after {wait_limit:?}: is `ffpush run` (or `ffpush dev`) running against this project?"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn outcome_json(doc: &crate::model::pb::Document, status: &str) -> String {
    let mut out = serde_json::Map::new();
    out.insert("status".into(), status.into());
    for field in [
        "num_sent",
        "num_tokens",
        "num_failed",
        "num_tokens_removed",
        "num_users_without_tokens",
    ] {
        if let Some(n) = store::integer_field(doc, field) {
            out.insert(field.into(), n.into());
        }
    }
    for field in ["error", "warning"] {
        if let Some(s) = doc.fields.get(field).and_then(crate::model::string_value) {
            out.insert(field.into(), s.into());
        }
    }
    if let Some(counts) = doc.fields.get("error_counts") {
        let counts: serde_json::Map<String, serde_json::Value> =
            crate::claim::read_error_counts(counts)
                .iter()
                .map(|(code, n)| (code.as_str().to_string(), n.into()))
                .collect();
        out.insert("error_counts".into(), counts.into());
    }
    for field in ["started_at", "completed_at"] {
        if let Some(t) = store::timestamp_field(doc, field) {
            out.insert(field.into(), t.to_rfc3339().into());
        }
    }
    serde_json::Value::Object(out).to_string()
}

/// The document FlutterFlow would write for these arguments; a bare `--user` id is a document
/// of the `users` collection.
fn notification_fields(
    args: &SendArgs,
    users: &str,
) -> Result<HashMap<String, crate::model::pb::Value>, Usage> {
    let mut f = HashMap::new();
    // As FlutterFlow: only empty fails; a title of spaces makes a body-only notification. A
    // silent message shows nothing: its text is optional.
    for (name, flag, text) in [
        ("notification_title", "--title", &args.title),
        ("notification_text", "--text", &args.text),
    ] {
        match text.as_deref() {
            Some("") if !args.silent => {
                return Err(Usage(format!("{flag} must not be empty")));
            }
            None if !args.silent => {
                return Err(Usage(format!("{flag} is required (except with --silent)")));
            }
            Some(text) => {
                f.insert(name.to_string(), store::string(text));
            }
            None => {}
        }
    }
    message_options(args, &mut f)?;
    let optional = [
        ("notification_image_url", &args.image),
        ("notification_sound", &args.sound),
        ("initial_page_name", &args.page),
        ("parameter_data", &args.params),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            f.insert(name.to_string(), store::string(v));
        }
    }
    if let Some(params) = &args.params
        && serde_json::from_str::<serde_json::Value>(params).is_err()
    {
        return Err(Usage(format!(
            "--params {params:?} is not JSON text (the app parses it as JSON)"
        )));
    }
    let target = match (&args.topic, &args.condition) {
        (Some(topic), None) => Some(("target_topic", topic)),
        (None, Some(condition)) => Some(("target_condition", condition)),
        (None, None) => None,
        (Some(_), Some(_)) => return Err(Usage("give --topic or --condition, not both".into())),
    };
    if let Some((field, value)) = target {
        if !args.users.is_empty() || args.audience.is_some() || args.batch.is_some() || args.app {
            return Err(Usage(
                "--topic and --condition are their own audience: leave out --user, --audience, --batch and --app".into(),
            ));
        }
        f.insert(field.to_string(), store::string(value));
    } else if !args.users.is_empty() {
        let mut paths = Vec::new();
        for user in &args.users {
            let path = if user.contains('/') {
                user.clone()
            } else {
                format!("{users}/{user}")
            };
            paths.push(user_doc_path(&path).map_err(|e| Usage(format!("--user: {e}")))?);
        }
        f.insert("user_refs".into(), store::string(&paths.join(",")));
        if args.audience.is_some() || args.batch.is_some() {
            return Err(Usage(
                "--audience and --batch are for broadcasts; leave out --user".into(),
            ));
        }
    } else {
        if args.app {
            return Err(Usage(
                "--app notifications need at least one --user (they are never broadcast)".into(),
            ));
        }
        f.insert(
            "target_audience".into(),
            store::string(args.audience.as_deref().unwrap_or("All")),
        );
        if let Some(batch) = &args.batch {
            let parsed = batch
                .split_once('/')
                .and_then(|(i, n)| {
                    Some((i.trim().parse::<i64>().ok()?, n.trim().parse::<i64>().ok()?))
                })
                .filter(|(i, n)| *n > 0 && (0..*n).contains(i));
            let (index, count) = parsed.ok_or_else(|| {
                Usage(format!(
                    "--batch {batch:?}: use INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 3/10"
                ))
            })?;
            f.insert("batch_index".into(), store::integer(index));
            f.insert("num_batches".into(), store::integer(count));
        }
    }
    if let Some(at) = &args.at {
        let at: DateTime<Utc> = DateTime::parse_from_rfc3339(at)
            .map_err(|_| {
                Usage(format!(
                    "--at {at:?}: use RFC 3339, e.g. 2026-11-25T17:00:00Z"
                ))
            })?
            .with_timezone(&Utc);
        f.insert("scheduled_time".into(), store::timestamp(at));
    }
    f.insert("timestamp".into(), store::timestamp(Utc::now()));
    // What the worker would fail the document for, said now instead.
    let source = if args.app {
        crate::model::Source::App
    } else {
        crate::model::Source::Console
    };
    crate::model::Notification::parse(source, &f).map_err(|e| Usage(e.0))?;
    Ok(f)
}

fn pb_value(value: ValueType) -> crate::model::pb::Value {
    crate::model::pb::Value {
        value_type: Some(value),
    }
}

/// The message options' fields from their flags; the values are checked with the document.
fn message_options(
    args: &SendArgs,
    f: &mut HashMap<String, crate::model::pb::Value>,
) -> Result<(), Usage> {
    let texts = [
        ("android_channel_id", &args.channel),
        ("priority", &args.priority),
        ("collapse_key", &args.collapse_key),
        ("analytics_label", &args.analytics_label),
    ];
    for (name, value) in texts {
        if let Some(v) = value {
            f.insert(name.to_string(), store::string(v));
        }
    }
    for (name, value) in [
        ("notification_badge", args.badge),
        ("ttl_seconds", args.ttl),
    ] {
        if let Some(n) = value {
            f.insert(name.to_string(), store::integer(n));
        }
    }
    if args.dry_run {
        f.insert("dry_run".into(), pb_value(ValueType::BooleanValue(true)));
    }
    if args.silent {
        f.insert("silent".into(), pb_value(ValueType::BooleanValue(true)));
    }
    for (field, flag, entries, example) in [
        ("data", "data", &args.data, "kind=chat"),
        (
            "notification_title_i18n",
            "title-i18n",
            &args.title_i18n,
            "de=Hallo",
        ),
        (
            "notification_text_i18n",
            "text-i18n",
            &args.text_i18n,
            "pt-BR=Olá",
        ),
    ] {
        if !entries.is_empty() {
            f.insert(field.into(), string_map(flag, entries, example)?);
        }
    }
    Ok(())
}

/// A map field from repeated `--flag KEY=VALUE` entries.
fn string_map(
    flag: &str,
    entries: &[String],
    example: &str,
) -> Result<crate::model::pb::Value, Usage> {
    let mut map = HashMap::new();
    for entry in entries {
        let (key, value) = entry.split_once('=').ok_or_else(|| {
            Usage(format!(
                "--{flag} {entry:?}: use KEY=VALUE, e.g. --{flag} {example}"
            ))
        })?;
        map.insert(key.to_string(), store::string(value));
    }
    Ok(pb_value(ValueType::MapValue(crate::model::pb::MapValue {
        fields: map,
    })))
}

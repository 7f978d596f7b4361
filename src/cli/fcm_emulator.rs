//! `ffpush fcm-emulator`: the FCM emulator served for tests and local runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::{Usage, terminated};
use crate::config::parse_duration;
use crate::dev::fcm_emulator::{EmulatorOptions, FcmEmulator};

#[derive(clap::Args, Debug)]
pub(super) struct EmulatorArgs {
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

pub(super) async fn fcm_emulator(args: EmulatorArgs) -> anyhow::Result<()> {
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

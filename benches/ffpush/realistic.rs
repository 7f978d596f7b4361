//! Cells against an FCM that behaves like Google's front end (HTTPS, 100 streams per HTTP/2
//! connection, tens of ms per send), with ffpush at its default settings, and the quota cells.
//!
//! Each cell runs the production pipeline in a fresh child process (this bench binary again,
//! `--child-fanout`): token pages generated from memory, one page at a time, into the same
//! bounded page channel the Firestore reader fills (4 pages), then the production
//! `fanout::fan_out` (de-duplication, pacing, the connection pool, retries) and its `Ledger`,
//! snapshotted once a second as the lease keeper does. So the child's CPU and its `VmHWM`
//! (the kernel's peak resident memory) are the pipeline's alone, cell by cell.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ffpush::audience::PAGE_SIZE;
use ffpush::config::{CaCert, Settings};
use ffpush::fanout::{Context, RetryPolicy, SendGate};
use ffpush::fcm::Sender;
use ffpush::metrics::Metrics;
use ffpush::store::{DeviceToken, Store};
use serde::{Deserialize, Serialize};

use crate::fanout::{Driven, Target, drive, token};
use crate::procs::{self, FcmProcess};

/// What a child cell does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildSpec {
    pub tokens: usize,
    pub fcm_url: String,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
    pub firestore: String,
    pub project: String,
    /// Overrides of the production defaults (`None`: the default).
    pub rate: Option<u32>,
    pub concurrency: Option<usize>,
    pub quota_backoff_ms: Option<u64>,
    /// Stop after this long if not done.
    pub limit_secs: u64,
}

/// What a child cell measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChildResult {
    pub tokens: usize,
    pub sent: u64,
    pub undelivered: u64,
    pub secs: f64,
    /// CPU seconds of the child from just before the fan-out to its end.
    pub cpu: f64,
    /// VmHWM once the sender was warm (connections open), before the first page, and at the
    /// end; kB.
    pub hwm_ready_kb: u64,
    pub hwm_kb: u64,
    pub rate_setting: u32,
    pub concurrency: usize,
    pub connections: u64,
    pub streams_refused: u64,
    pub quota_pauses: u64,
    pub retries: u64,
    /// Summed over sends: time spent waiting for the pacer.
    pub pace_wait_secs: f64,
    /// Mean time of one FCM request as ffpush saw it (a stream slot, the round trip, the
    /// answer read), ms.
    pub request_ms: f64,
    pub capped: bool,
}

impl ChildResult {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.secs
    }
    pub fn cpu_ms_per_1000(&self) -> f64 {
        self.cpu * 1e6 / self.sent.max(1) as f64
    }
}

/// The child's side: runs one cell and prints its [`ChildResult`] as one JSON line.
pub fn child_main(spec: &str) -> ! {
    let spec: ChildSpec = serde_json::from_str(spec).expect("a child spec");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // On a worker thread, as the daemon runs fan-outs.
    let result = runtime
        .block_on(runtime.spawn(child_cell(spec)))
        .expect("the child cell");
    println!("{}", serde_json::to_string(&result).expect("JSON"));
    std::process::exit(0)
}

async fn child_cell(spec: ChildSpec) -> ChildResult {
    let mut settings = Settings::for_emulators(
        &spec.project,
        &spec.firestore,
        &spec.fcm_url,
        spec.key.clone(),
    )
    .expect("emulator settings");
    settings.fcm_ca_cert = spec
        .ca
        .as_ref()
        .map(|p| CaCert::read(p).expect("reading the bench CA"));
    if let Some(rate) = spec.rate {
        settings.fcm_rate = rate;
    }
    if let Some(concurrency) = spec.concurrency {
        settings.concurrency = concurrency;
    }
    if let Some(ms) = spec.quota_backoff_ms {
        settings.quota_floor = Duration::from_millis(ms);
    }
    let store = Store::connect(&settings)
        .await
        .expect("connecting to the Firestore emulator");
    let sender = Sender::new(&settings).await.expect("building the sender");
    sender
        .warm_up()
        .await
        .expect("connecting to the FCM emulator");
    let metrics = Metrics::with_fcm(sender.metrics());
    let gate = SendGate::new(tokio::time::Instant::now() + std::time::Duration::from_secs(86_400));
    let ctx = Context {
        sender: &sender,
        store: &store,
        metrics: &metrics,
        concurrency: settings.concurrency,
        retry: RetryPolicy::from_settings(&settings),
        // As a claim's gate while its progress writes succeed: looked at before every send.
        gate: Some(&gate),
    };
    // Pages are made one at a time as the channel takes them: the child never holds the
    // audience, only what the pipeline holds.
    let documents = store.documents_path().to_string();
    let tokens = spec.tokens;
    let pages = (0..tokens).step_by(PAGE_SIZE).map(move |start| {
        (start..(start + PAGE_SIZE).min(tokens))
            .map(|i| DeviceToken {
                doc_name: format!("{documents}/users/u{i:08}/fcm_tokens/t0"),
                token: token(i),
            })
            .collect()
    });
    let me = std::process::id();
    let hwm_ready_kb = procs::status_kb(me, "VmHWM");
    let cpu0 = procs::cpu_seconds(me);
    let Driven {
        tally,
        secs,
        capped,
    } = drive(&ctx, pages, Duration::from_secs(spec.limit_secs)).await;
    let cpu = procs::cpu_seconds(me) - cpu0;
    let fcm = sender.metrics();
    let rendered = metrics.render();
    let series = |name: &str| {
        rendered
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let request_ms = series("ffpush_fcm_request_duration_seconds_sum ") * 1000.0
        / series("ffpush_fcm_request_duration_seconds_count ").max(1.0);
    ChildResult {
        tokens,
        sent: tally.sent,
        undelivered: tally.undelivered,
        secs,
        cpu,
        hwm_ready_kb,
        hwm_kb: procs::status_kb(me, "VmHWM"),
        rate_setting: settings.fcm_rate,
        concurrency: settings.concurrency,
        connections: fcm.connections_opened.get(),
        streams_refused: fcm.streams_refused.get(),
        quota_pauses: fcm.quota_pauses.get(),
        retries: metrics.retries.get(),
        pace_wait_secs: fcm.pace_wait_micros.get() as f64 / 1e6,
        request_ms,
        capped,
    }
}

/// Runs one cell in a child process; also returns the emulator's CPU seconds meanwhile.
pub fn run_child(spec: &ChildSpec, fcm: &FcmProcess, log: &std::path::Path) -> (ChildResult, f64) {
    let exe = std::env::current_exe().expect("the bench binary");
    let emu0 = procs::cpu_seconds(fcm.pid());
    let output = Command::new(exe)
        .arg("--child-fanout")
        .arg(serde_json::to_string(spec).expect("JSON"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).expect("child log"))
        .output()
        .expect("running the child cell");
    let emu = procs::cpu_seconds(fcm.pid()) - emu0;
    assert!(
        output.status.success(),
        "the child cell failed ({}): see {}",
        output.status,
        log.display()
    );
    let line = String::from_utf8_lossy(&output.stdout);
    let result: ChildResult = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        panic!("the child's answer {line:?}: {e}");
    });
    (result, emu)
}

fn spec_for(bench: &crate::Bench, target: &Target, project: &str, tokens: usize) -> ChildSpec {
    ChildSpec {
        tokens,
        fcm_url: target.fcm.url.clone(),
        key: target.fcm.key.clone(),
        ca: Some(bench.certs.ca.clone()),
        firestore: bench.firestore_host.clone(),
        project: project.to_string(),
        rate: None,
        concurrency: None,
        quota_backoff_ms: None,
        limit_secs: if bench.options.quick { 30 } else { 200 },
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// 100 streams per connection, `latency` ms per send, TLS; ffpush at its defaults.
pub async fn realistic(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-realistic";
    let defaults =
        Settings::for_emulators(project, "127.0.0.1:1", "https://127.0.0.1:1", "k".into())
            .expect("default settings");
    println!(
        "## Realistic FCM: HTTPS, 100 streams per connection, latency per send; ffpush at its defaults\n"
    );
    println!(
        "The FCM emulator runs as `ffpush fcm-emulator --tls-cert … --max-streams 100 --latency MS` (its own process). \
         ffpush runs the production pipeline in a fresh child process per cell with its default settings \
         (FFPUSH_FCM_RATE {}, FFPUSH_CONCURRENCY {}, the pool sized from them and the advertised limit): \
         token pages made from memory into the bounded page channel (4 pages), `fan_out` (de-duplication, \
         pacing, pool, retries) and its ledger. msgs/s is over the fan-out (first page to last answer). CPU and \
         VmHWM are the child's (`/proc/PID`): VmHWM when the connections are open and after the last send. \
         Repeated cells: median (min–max) of {} runs; 1 000 000-token cells run once.\n",
        defaults.fcm_rate,
        defaults.concurrency,
        o.repeat.max(1)
    );
    println!(
        "| latency ms | tokens | msgs/s | CPU-ms/1000 | VmHWM ready MB | VmHWM peak MB | connections | mean wait for the pacer ms | mean FCM request ms | emulator CPU-ms/1000 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &latency in &o.latencies {
        let fcm = FcmProcess::start_with(
            bench.dir.path(),
            project,
            Some(&bench.certs),
            false,
            &[
                "--max-streams".to_string(),
                "100".to_string(),
                "--latency".to_string(),
                latency.to_string(),
            ],
        );
        let target = Target::new(fcm, &bench.firestore_host, project, Some(&bench.certs.ca));
        for &tokens in &o.realistic_sizes {
            let runs = if tokens >= 1_000_000 {
                1
            } else {
                o.repeat.max(1)
            };
            let mut results = Vec::new();
            let mut emulator = Vec::new();
            for run in 0..runs {
                tokio::task::block_in_place(procs::settle);
                let before = target.stats().await;
                let spec = spec_for(bench, &target, project, tokens);
                let log = bench
                    .dir
                    .path()
                    .join(format!("realistic-{latency}-{tokens}-{run}.log"));
                let (r, emu) = tokio::task::block_in_place(|| run_child(&spec, &target.fcm, &log));
                let after = target.stats().await;
                assert_eq!(
                    after.accepted - before.accepted,
                    r.sent,
                    "FCM accepted what was sent"
                );
                assert!(
                    r.capped || r.sent == tokens as u64,
                    "{} of {tokens} sent",
                    r.sent
                );
                eprintln!(
                    "realistic {latency} ms {tokens}: {} sent in {:.2}s = {:.0}/s, {:.1} CPU-ms/1000, VmHWM {:.1} → {:.1} MB, {} connections, pacer wait {:.1}s, request {:.1} ms, emulator {:.1} CPU-ms/1000",
                    r.sent,
                    r.secs,
                    r.rate(),
                    r.cpu_ms_per_1000(),
                    mb(r.hwm_ready_kb),
                    mb(r.hwm_kb),
                    r.connections,
                    r.pace_wait_secs,
                    r.request_ms,
                    emu * 1e6 / r.sent.max(1) as f64
                );
                emulator.push(emu * 1e6 / r.sent.max(1) as f64);
                results.push(r);
            }
            let show = |f: &dyn Fn(&ChildResult) -> f64, d| {
                crate::show(results.iter().map(f).collect(), d)
            };
            let capped = if results.iter().any(|r| r.capped) {
                " †"
            } else {
                ""
            };
            println!(
                "| {latency} | {tokens} | {}{capped} | {} | {} | {} | {} | {} | {} | {} |",
                show(&|r| r.rate(), 0),
                show(&|r| r.cpu_ms_per_1000(), 1),
                show(&|r| mb(r.hwm_ready_kb), 1),
                show(&|r| mb(r.hwm_kb), 1),
                show(&|r| r.connections as f64, 0),
                show(&|r| r.pace_wait_secs * 1000.0 / r.sent.max(1) as f64, 1),
                show(&|r| r.request_ms, 1),
                crate::show(emulator, 1),
            );
        }
    }
    println!();
}

/// A quota cell.
struct QuotaCell {
    what: String,
    tokens: usize,
    /// The emulator's quota arguments.
    quota: Vec<String>,
    /// FFPUSH_FCM_RATE and FFPUSH_QUOTA_BACKOFF (ms) overrides.
    rate: Option<u32>,
    backoff_ms: Option<u64>,
}

/// FCM's quota on the emulator (`--quota`), 30 ms per send: every token delivered?
pub async fn quota(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-quota";
    let tokens = if o.quick { 20_000 } else { 100_000 };
    let args = |quota: usize, window: Option<&str>| {
        let mut v = vec!["--quota".to_string(), quota.to_string()];
        if let Some(w) = window {
            v.extend(["--quota-window".to_string(), w.to_string()]);
        }
        v
    };
    // FCM's 600 000 a minute, and the same rate as 10 000 per 1 s window.
    let scaled = 10_000;
    let mut cells = vec![QuotaCell {
        what: "FCM's default quota: 600 000 per 60 s window; ffpush defaults".into(),
        tokens,
        quota: args(600_000, None),
        rate: None,
        backoff_ms: None,
    }];
    if !o.quick {
        // 100 s at the default rate: crosses a window boundary with a full window behind it.
        cells.push(QuotaCell {
            what: "FCM's default quota, an audience that needs two windows; ffpush defaults".into(),
            tokens: 1_000_000,
            quota: args(600_000, None),
            rate: None,
            backoff_ms: None,
        });
    }
    cells.push(QuotaCell {
        what: format!(
            "the same 10 000/s in 1 s windows ({scaled} per window); ffpush defaults, FFPUSH_QUOTA_BACKOFF=1s"
        ),
        tokens,
        quota: args(scaled, Some("1s")),
        rate: None,
        backoff_ms: Some(1000),
    });
    cells.push(QuotaCell {
        what: format!(
            "{scaled} per 1 s window; ffpush over it: FFPUSH_FCM_RATE={}, FFPUSH_QUOTA_BACKOFF=1s",
            2 * scaled
        ),
        tokens,
        quota: args(scaled, Some("1s")),
        rate: Some(2 * scaled as u32),
        backoff_ms: Some(1000),
    });
    println!("## Quota: the emulator's `--quota` (HTTPS, 100 streams, 30 ms per send)\n");
    println!(
        "One child process per cell, as in the realistic cells, against a fresh emulator. Windows are the emulator's \
         (`GET /emulator/quota`): consecutive from its start, so a cell's first and last windows are partial. *Refused* \
         are attempts answered 429 `QUOTA_EXCEEDED`; *pauses* are the instance-wide quota pauses \
         (`ffpush_fcm_quota_pauses_total`); *retries* count refused sends sent again after the pause.\n"
    );
    println!(
        "| cell | tokens | sent | undelivered | seconds | msgs/s | windows | most admitted in a window | refused (429) | pauses | retries |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, cell) in cells.into_iter().enumerate() {
        let QuotaCell {
            what,
            tokens,
            quota: args,
            rate,
            backoff_ms: backoff,
        } = cell;
        let mut extra = vec![
            "--max-streams".to_string(),
            "100".to_string(),
            "--latency".to_string(),
            "30".to_string(),
        ];
        extra.extend(args);
        let fcm =
            FcmProcess::start_with(bench.dir.path(), project, Some(&bench.certs), false, &extra);
        let target = Target::new(fcm, &bench.firestore_host, project, Some(&bench.certs.ca));
        tokio::task::block_in_place(procs::settle);
        let mut spec = spec_for(bench, &target, project, tokens);
        spec.rate = rate;
        spec.quota_backoff_ms = backoff;
        spec.limit_secs = 600;
        let log = bench.dir.path().join(format!("quota-{i}.log"));
        let (r, _) = tokio::task::block_in_place(|| run_child(&spec, &target.fcm, &log));
        let windows: Vec<serde_json::Value> = target
            .get_json(&format!("/emulator/quota?project={project}"))
            .await;
        let field = |w: &serde_json::Value, f: &str| w[f].as_u64().unwrap_or(0);
        let refused: u64 = windows.iter().map(|w| field(w, "refused")).sum();
        let most = windows
            .iter()
            .map(|w| field(w, "admitted"))
            .max()
            .unwrap_or(0);
        eprintln!("quota {what}: {r:?}; windows {windows:?}");
        println!(
            "| {what} | {tokens} | {} | {} | {:.2} | {:.0} | {} | {most} | {refused} | {} | {} |",
            r.sent,
            r.undelivered,
            r.secs,
            r.rate(),
            windows.len(),
            r.quota_pauses,
            r.retries
        );
        assert!(!r.capped, "the quota cell did not finish");
    }
    println!();
}

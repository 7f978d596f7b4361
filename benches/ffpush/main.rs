//! ffpush's benchmark suite (BENCHMARKS.md holds a run's results).
//!
//! ```sh
//! cargo bench --bench ffpush                    # everything (≈ 13 min on 2 cores)
//! cargo bench --bench ffpush -- --quick         # a smoke run of every scenario (≈ 1 min)
//! cargo bench --bench ffpush -- fanout latency  # some scenarios
//! ```
//!
//! Scenarios:
//! - `realistic`: the production pipeline at its default settings (a child process per cell)
//!   against the FCM emulator over TLS at 100 streams per connection and 0/30/60 ms per send,
//!   10k/100k/1M tokens: messages/s, CPU-ms per 1000 messages, peak RSS (VmHWM).
//! - `quota`: 100 000 and 1 000 000 tokens against the emulator's `--quota` (FCM's 600 000 a
//!   minute, and the same rate in 1 s windows): delivered, refused, instance-wide pauses.
//! - `instances`: three `ffpush run` on one project, a broadcast in 12 batch documents against
//!   the emulator's `--quota` (10 000/s in 10 s windows): messages/s together, 429s, each
//!   instance's documents, messages and share; then how fast the shares follow an instance
//!   joining, stopping and crashing.
//! - `fanout`: messages/s and CPU-ms per 1000 messages of the production fan-out (this process)
//!   against the FCM emulator (another process), h2c and HTTPS (h2 by ALPN), for 10k/100k/1M
//!   tokens from memory at concurrency 1/64/256/1024. Each cell stops at its token count or its
//!   time limit, whichever comes first.
//! - `ceiling`: the FCM emulator's own ceiling under a raw `h2` load generator.
//! - `latency`: document creation → first FCM request and → `status: succeeded`, one user,
//!   with `ffpush run` as a child process on the Firestore emulator.
//! - `broadcast`: a 20 000-token broadcast end to end (FCM emulator at 30 ms per send), where
//!   its time goes, and tokens/s read by the streamed reader and by cursor pages of 500 (the
//!   reader before) at 20 000 and 100 000 tokens.
//! - `targeted`: one notification to 1 000 `user_refs` end to end, and the users' tokens read
//!   alone at several read-aheads.
//! - `flutterflow`: the targeted and broadcast notifications above by ffpush and by
//!   FlutterFlow's generated function (`benches/flutterflow`, Node.js + firebase-admin 12;
//!   skipped unless `npm ci --prefix benches/flutterflow` was run) on the same emulators.
//! - `rss`: the worker's peak RSS (VmHWM) during broadcasts of growing audiences.
//! - `far-future`: the worker's RSS with 200 000 app notifications scheduled 30 days ahead.
//! - `backlog`: 10 000 and 100 000 unsent notifications present when the worker starts: drain
//!   time, duplicates, lease trouble, peak RSS, beside the Firestore emulator's update ceiling.
//! - `idle`: an idle worker's CPU time and wake-ups over a minute (at the default sweep
//!   interval and with the sweep pushed out), and its start → ready and SIGTERM → exit times.
//!
//! Options: `--quick`, `--repeat N` (runs of each repeated cell, default 3), `--cell-secs S`
//! (time limit of a fan-out cell, default 20), `--sizes 10000,…` and `--concurrency 1,…` (the
//! fan-out matrix), `--transport h2c,tls`, `--rate N` (`FFPUSH_FCM_RATE` of the fan-out cells;
//! default 0, unpaced: the matrix measures the sender's own ceiling), `--latency MS` (the FCM
//! emulator answers each send of the fan-out matrix after MS, as Google's front end takes
//! tens of ms; default 0), `--rss-sizes 10000,…`,
//! `--pin` (this process and its children on CPU 0, the FCM emulator on CPU 1: steadier
//! numbers for comparing two builds), `--far-future N` (documents of the `far-future`
//! scenario, default 200000), `--backlog-sizes 10000,…` and `--backlog-secs S` (the `backlog`
//! cells and the longest drain of one, default 3600), `--backlog-max-documents N` (the worker's
//! `FFPUSH_MAX_DOCUMENTS` there; default: its own), `--idle-secs S` (the `idle` window, default 60),
//! `--latencies 0,30,60` and `--realistic-sizes 10000,…` (the
//! realistic cells), `--read-sizes 20000,100000` (the broadcast's read comparison).
//! `FFPUSH_BENCH_WORKER=path` runs another `ffpush` binary as the worker (e.g. an earlier
//! build, for a before/after comparison).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a harness: a panic stops the run with its reason

mod ceiling;
mod fanout;
mod firestore;
mod idle;
mod instances;
mod procs;
mod realistic;

use std::time::Duration;

use ffpush::dev::firestore_emulator::FirestoreEmulator;

pub struct Options {
    pub quick: bool,
    pub repeat: usize,
    pub cell_secs: u64,
    pub rss_sizes: Vec<usize>,
    /// Documents of the `far-future` scenario.
    pub far_future: usize,
    /// Documents present at start in the `backlog` cells.
    pub backlog_sizes: Vec<usize>,
    /// Seconds an idle worker is watched (`idle`).
    pub idle_secs: u64,
    /// Finished documents of the `start` scenario.
    pub history: usize,
    /// Longest drain of a `backlog` cell, seconds.
    pub backlog_secs: u64,
    /// `FFPUSH_MAX_DOCUMENTS` of the `backlog` worker (`None`: its default).
    pub backlog_max_documents: Option<usize>,
    /// Fan-out matrix rows and columns.
    pub sizes: Vec<usize>,
    pub concurrencies: Vec<usize>,
    /// `h2c`, `tls` or both.
    pub transports: Vec<String>,
    /// `FFPUSH_FCM_RATE` of the fan-out cells (0: unpaced).
    pub rate: u32,
    /// The FCM emulator's latency in the fan-out matrix, ms.
    pub latency: u64,
    pub pin: bool,
    /// The realistic cells: FCM latencies (ms) and token counts.
    pub latencies: Vec<u64>,
    pub realistic_sizes: Vec<usize>,
    /// Token counts of the broadcast scenario's read comparison.
    pub read_sizes: Vec<usize>,
    /// The worker binary of the broadcast and targeted scenarios (default: this build's).
    pub worker_bin: Option<String>,
    pub scenarios: Vec<String>,
}

const SCENARIOS: [&str; 14] = [
    "realistic",
    "quota",
    "instances",
    "fanout",
    "ceiling",
    "latency",
    "broadcast",
    "targeted",
    "flutterflow",
    "rss",
    "far-future",
    "backlog",
    "idle",
    "start",
];

impl Options {
    fn parse() -> Options {
        let mut o = Options {
            quick: false,
            repeat: 3,
            cell_secs: 20,
            rss_sizes: vec![10_000, 25_000, 50_000, 100_000],
            far_future: 200_000,
            backlog_sizes: vec![10_000, 100_000],
            idle_secs: 60,
            history: 100_000,
            backlog_secs: 3600,
            backlog_max_documents: None,
            sizes: vec![10_000, 100_000, 1_000_000],
            concurrencies: vec![1, 64, 256, 1024],
            transports: vec!["h2c".into(), "tls".into()],
            rate: 0,
            latency: 0,
            pin: false,
            latencies: vec![0, 30, 60],
            realistic_sizes: vec![10_000, 100_000, 1_000_000],
            read_sizes: vec![20_000, 100_000],
            worker_bin: std::env::var("FFPUSH_BENCH_WORKER").ok(),
            scenarios: Vec::new(),
        };
        let list = |v: Option<String>, what: &str| -> Vec<usize> {
            v.unwrap_or_default()
                .split(',')
                .map(|n| number(Some(n.to_string()), what))
                .collect()
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                "--quick" => o.quick = true,
                "--pin" => o.pin = true,
                "--repeat" => o.repeat = number(args.next(), "--repeat"),
                "--cell-secs" => o.cell_secs = number(args.next(), "--cell-secs") as u64,
                "--rate" => o.rate = number(args.next(), "--rate") as u32,
                "--latency" => o.latency = number(args.next(), "--latency") as u64,
                "--rss-sizes" => o.rss_sizes = list(args.next(), "--rss-sizes"),
                "--far-future" => o.far_future = number(args.next(), "--far-future"),
                "--backlog-sizes" => o.backlog_sizes = list(args.next(), "--backlog-sizes"),
                "--idle-secs" => o.idle_secs = number(args.next(), "--idle-secs") as u64,
                "--history" => o.history = number(args.next(), "--history"),
                "--backlog-secs" => o.backlog_secs = number(args.next(), "--backlog-secs") as u64,
                "--backlog-max-documents" => {
                    o.backlog_max_documents = Some(number(args.next(), "--backlog-max-documents"))
                }
                "--sizes" => o.sizes = list(args.next(), "--sizes"),
                "--concurrency" => o.concurrencies = list(args.next(), "--concurrency"),
                "--latencies" => {
                    o.latencies = list(args.next(), "--latencies")
                        .into_iter()
                        .map(|n| n as u64)
                        .collect()
                }
                "--realistic-sizes" => o.realistic_sizes = list(args.next(), "--realistic-sizes"),
                "--read-sizes" => o.read_sizes = list(args.next(), "--read-sizes"),
                "--transport" => {
                    o.transports = args
                        .next()
                        .unwrap_or_default()
                        .split(',')
                        .filter(|t| ["h2c", "tls"].contains(t))
                        .map(str::to_string)
                        .collect()
                }
                s if SCENARIOS.contains(&s) => o.scenarios.push(s.to_string()),
                other => {
                    eprintln!(
                        "unknown argument {other:?}; scenarios: {}; options: --quick --repeat N --cell-secs S --sizes A,B --concurrency A,B --transport h2c,tls --rate N --latency MS --pin --rss-sizes A,B --latencies A,B --realistic-sizes A,B --read-sizes A,B --far-future N --backlog-sizes A,B --idle-secs S --backlog-secs S --backlog-max-documents N",
                        SCENARIOS.join(" ")
                    );
                    std::process::exit(64);
                }
            }
        }
        if o.quick {
            o.repeat = o.repeat.min(1);
            o.cell_secs = o.cell_secs.min(3);
            o.rss_sizes = vec![5_000, 10_000];
            o.sizes = vec![10_000];
            o.concurrencies = vec![1, 256];
            o.latencies = vec![0, 30];
            o.realistic_sizes = vec![10_000];
            o.read_sizes = vec![2_000];
            o.idle_secs = o.idle_secs.min(10);
        }
        if o.scenarios.is_empty() {
            o.scenarios = SCENARIOS.iter().map(|s| s.to_string()).collect();
        }
        o
    }

    pub fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }
}

fn number(v: Option<String>, what: &str) -> usize {
    v.and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| {
        eprintln!("{what} needs a whole number");
        std::process::exit(64)
    })
}

/// Everything a scenario shares: the Firestore emulator, certificates, a scratch directory.
pub struct Bench {
    pub options: Options,
    pub firestore_host: String,
    pub dir: tempfile::TempDir,
    pub certs: procs::Certs,
}

fn main() {
    // A realistic or quota cell in its own process (see `realistic`).
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--child-fanout" {
            realistic::child_main(&args.next().unwrap_or_default());
        }
    }
    let options = Options::parse();
    machine();
    let firestore = match std::env::var("FIRESTORE_EMULATOR_HOST") {
        Ok(host) if !host.is_empty() => (host, None),
        _ => {
            eprintln!("starting the Firestore emulator …");
            let emulator = FirestoreEmulator::start(None).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(1)
            });
            (emulator.host_port().to_string(), Some(emulator))
        }
    };
    if options.pin {
        procs::pin_self();
    }
    let dir = tempfile::tempdir().expect("scratch directory");
    let certs = procs::Certs::generate(dir.path());
    let bench = Bench {
        options,
        firestore_host: firestore.0.clone(),
        dir,
        certs,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Spawned, not run in `block_on`: the daemon runs fan-outs on the runtime's worker
    // threads, so the measured code does too.
    let work = runtime.spawn(async move {
        if bench.options.wants("realistic") {
            realistic::realistic(&bench).await;
        }
        if bench.options.wants("quota") {
            realistic::quota(&bench).await;
        }
        if bench.options.wants("instances") {
            instances::run(&bench).await;
        }
        if bench.options.wants("fanout") {
            fanout_matrix(&bench).await;
        }
        if bench.options.wants("ceiling") {
            ceiling::run(&bench).await;
        }
        if bench.options.wants("latency") {
            firestore::latency(&bench).await;
        }
        if bench.options.wants("broadcast") {
            firestore::broadcast(&bench).await;
        }
        if bench.options.wants("targeted") {
            firestore::targeted(&bench).await;
        }
        if bench.options.wants("flutterflow") {
            firestore::flutterflow(&bench).await;
        }
        if bench.options.wants("rss") {
            firestore::rss(&bench).await;
        }
        if bench.options.wants("far-future") {
            firestore::far_future(&bench).await;
        }
        if bench.options.wants("backlog") {
            firestore::backlog(&bench).await;
        }
        if bench.options.wants("idle") {
            idle::idle(&bench).await;
        }
        if bench.options.wants("start") {
            firestore::start_with_history(&bench).await;
        }
    });
    if let Err(e) = runtime.block_on(work) {
        eprintln!("the benchmark failed: {e}");
        std::process::exit(1);
    }
    drop(firestore);
}

/// What this ran on, for the report.
fn machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let mem_gib = procs::status_kb_of("/proc/meminfo", "MemTotal") as f64 / 1024.0 / 1024.0;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("# ffpush benchmark\n");
    println!(
        "machine: {cores} cores ({cpu}), {mem_gib:.0} GiB; commit {commit}; {}\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
}

/// Median, min and max of some runs.
pub fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

/// `median (min–max)` when there are several runs.
pub fn show(values: Vec<f64>, decimals: usize) -> String {
    let n = values.len();
    if n == 0 {
        return "–".into();
    }
    let (median, min, max) = spread(values);
    if n > 1 {
        format!("{median:.decimals$} ({min:.decimals$}–{max:.decimals$})")
    } else {
        format!("{median:.decimals$}")
    }
}

/// The p-th percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn fanout_matrix(bench: &Bench) {
    let o = &bench.options;
    let project = "bench-fanout";
    let emulator_args = if o.latency > 0 {
        vec!["--latency".to_string(), o.latency.to_string()]
    } else {
        Vec::new()
    };
    let h2c = fanout::Target::new(
        procs::FcmProcess::start_with(bench.dir.path(), project, None, false, &emulator_args),
        &bench.firestore_host,
        project,
        None,
    );
    let tls = fanout::Target::new(
        procs::FcmProcess::start_with(
            bench.dir.path(),
            project,
            Some(&bench.certs),
            false,
            &emulator_args,
        ),
        &bench.firestore_host,
        project,
        Some(&bench.certs.ca),
    );
    let store = ffpush::store::Store::connect(&h2c.settings)
        .await
        .expect("connecting to the Firestore emulator");
    let limit = Duration::from_secs(o.cell_secs);
    println!(
        "## Fan-out from memory (production `fan_out` + `Sender`; FCM emulator in another process, {} streams per connection, {} ms per send; FFPUSH_FCM_RATE {})\n",
        100,
        o.latency,
        if o.rate == 0 {
            "unpaced".to_string()
        } else {
            o.rate.to_string()
        }
    );
    println!(
        "Each cell stops after its tokens or {}s, whichever first († = stopped by time: the rate is over what was sent). \
         Repeated cells: median (min–max) of {} runs. CPU is the ffpush side only (this process), per 1000 messages.\n",
        o.cell_secs, o.repeat
    );
    println!(
        "| tokens | concurrency | h2c msg/s | h2c CPU-ms/1000 | TLS msg/s | TLS CPU-ms/1000 | emulator CPU-ms/1000 (h2c / TLS) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &tokens in &o.sizes {
        for &concurrency in &o.concurrencies {
            // The 1M row is time-bound anyway; repeat the rows that finish.
            let runs = if tokens >= 1_000_000 {
                1
            } else {
                o.repeat.max(1)
            };
            let mut row = Vec::new();
            tokio::task::block_in_place(procs::settle);
            for target in [&h2c, &tls] {
                let mut results = Vec::new();
                let name = if target.fcm.tls { "tls" } else { "h2c" };
                if !o.transports.iter().any(|t| t == name) {
                    row.push(results);
                    continue;
                }
                for _ in 0..runs {
                    let r = fanout::cell(target, &store, tokens, concurrency, o.rate, limit).await;
                    eprintln!(
                        "fanout {tokens} c={concurrency} {name}: {} sent in {:.2}s = {:.0}/s, {:.1} CPU-ms/1000 (emulator {:.1})",
                        r.sent,
                        r.secs,
                        r.rate(),
                        r.cpu_ms_per_1000(),
                        r.emulator_cpu_ms_per_1000()
                    );
                    results.push(r);
                }
                row.push(results);
            }
            let cap = |rs: &[fanout::CellResult]| {
                if rs.iter().any(|r| r.capped) {
                    " †"
                } else {
                    ""
                }
            };
            println!(
                "| {tokens} | {concurrency} | {}{} | {} | {}{} | {} | {} / {} |",
                show(row[0].iter().map(|r| r.rate()).collect(), 0),
                cap(&row[0]),
                show(row[0].iter().map(|r| r.cpu_ms_per_1000()).collect(), 1),
                show(row[1].iter().map(|r| r.rate()).collect(), 0),
                cap(&row[1]),
                show(row[1].iter().map(|r| r.cpu_ms_per_1000()).collect(), 1),
                show(
                    row[0]
                        .iter()
                        .map(|r| r.emulator_cpu_ms_per_1000())
                        .collect(),
                    1
                ),
                show(
                    row[1]
                        .iter()
                        .map(|r| r.emulator_cpu_ms_per_1000())
                        .collect(),
                    1
                ),
            );
        }
    }
    println!();
}

//! `idle`: what a worker with nothing to send costs, and how long a restart takes.
//!
//! An always-on instance is billed for every second whatever it does, and a small VM shares
//! its cores, so the worker must sleep when there is no work: its timers are the sweep (every
//! `FFPUSH_SWEEP_INTERVAL`, a few queries) and the FCM connections' keep-alive checks (every
//! 30 s; a PING only while requests are in flight). This scenario starts `ffpush run` on
//! empty collections and watches it from outside through `/proc`: its CPU time (`schedstat`,
//! exact, and `utime + stime`, 10 ms ticks) and its wake-ups (context switches, every thread),
//! second by second, once at the default settings and once with the sweep pushed out of the
//! window, so that what the sweep costs is the difference. It also times start → ready and
//! SIGTERM → exit, the cost of a restart on a single VM.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::fanout::Target;
use crate::procs::{self, FcmProcess, ThreadCounters, WorkerEnv, WorkerProcess};

/// How often the worker's counters are read.
const SAMPLE: Duration = Duration::from_millis(100);

pub async fn idle(bench: &crate::Bench) {
    tokio::task::block_in_place(|| run(bench));
}

fn run(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-idle";
    let args = ["--max-streams", "100"].map(String::from);
    let fcm = FcmProcess::start_with(bench.dir.path(), project, Some(&bench.certs), false, &args);
    let target = Target::new(fcm, &bench.firestore_host, project, Some(&bench.certs.ca));
    let start = |extra: Vec<(&'static str, String)>| {
        WorkerProcess::start(
            bench.dir.path(),
            &WorkerEnv {
                project,
                firestore_host: &bench.firestore_host,
                fcm: &target.fcm,
                ca: Some(&bench.certs.ca),
                extra,
            },
        )
    };

    // Restarts: spawn → ready, and SIGTERM → exit of an idle worker.
    let mut ready = Vec::new();
    let mut ready_cpu = Vec::new();
    let mut stop = Vec::new();
    let mut samples = 0;
    for _ in 0..o.repeat.max(1) {
        procs::settle();
        let worker = start(vec![]);
        ready.push(worker.ready_after.as_secs_f64() * 1000.0);
        // What one scrape of /metrics writes to Managed Service for Prometheus (billed per
        // sample): one sample per series line.
        let (_, body) = procs::http_get(worker.port, "/metrics");
        samples = body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count();
        ready_cpu.push(ThreadCounters::default().update(worker.pid()).cpu_ns as f64 / 1e6);
        stop.push(worker.terminate().as_secs_f64() * 1000.0);
    }
    eprintln!("idle: ready after {ready:?} ms, exit after SIGTERM {stop:?} ms");

    let window = Duration::from_secs(o.idle_secs);
    let rows = [
        ("default settings (`FFPUSH_SWEEP_INTERVAL` 30s)", vec![]),
        (
            "`FFPUSH_SWEEP_INTERVAL` 1h: no sweep in the window",
            vec![
                ("FFPUSH_SWEEP_INTERVAL", "1h".to_string()),
                ("FFPUSH_SCHEDULE_WINDOW", "2h".to_string()),
            ],
        ),
    ];
    let mut measured = Vec::new();
    for (label, extra) in rows {
        procs::settle();
        let worker = start(extra);
        // The start's own work (listen streams replaying, the OAuth token) is over by then.
        std::thread::sleep(Duration::from_secs(3));
        let m = watch(&worker, window);
        eprintln!(
            "idle {label}: {:.2} CPU-ms, {} ticks, {} wake-ups in {:?}",
            m.cpu_ms, m.ticks, m.wakeups, m.by_second
        );
        drop(worker);
        measured.push((label, m));
    }

    println!(
        "## An idle worker (`ffpush run` as a child process, empty collections, Firestore emulator, HTTPS FCM emulator)\n"
    );
    println!(
        "Start → ready is the worker's spawn to its first `/readyz` 200 (polled every 5 ms): connecting to Firestore, \
         opening the FCM connections, the OAuth token, both listen streams current. SIGTERM → exit is how Cloud Run \
         and systemd stop it, with nothing in flight. Median (min–max) of {} starts.\n",
        ready.len()
    );
    println!("| | ms |");
    println!("|---|---:|");
    println!("| spawn → `/readyz` 200 | {} |", crate::show(ready, 0));
    println!(
        "| CPU used to get there (`schedstat`) | {} |",
        crate::show(ready_cpu, 1)
    );
    println!("| SIGTERM → exit | {} |", crate::show(stop, 0));
    println!();
    println!(
        "One scrape of `/metrics` is {samples} samples (series lines), the unit Managed Service for Prometheus bills.\n"
    );
    println!(
        "Then a fresh worker is left alone for {} s (from 3 s after spawn), its threads read from `/proc/PID/task` \
         every {} ms: CPU time from `schedstat` (nanoseconds) and `utime + stime` from `/proc/PID/stat` (10 ms \
         ticks), and wake-ups as context switches summed over every thread (each voluntary switch is a thread \
         going to sleep until something wakes it). *Seconds* lists every second after spawn in which any thread \
         ran, with its wake-ups.\n",
        window.as_secs(),
        SAMPLE.as_millis()
    );
    println!(
        "| worker | CPU ms | CPU ticks | wake-ups | wake-ups/min | seconds with a wake-up (s after spawn: wake-ups) | VmRSS MB |"
    );
    println!("|---|---:|---:|---:|---:|---|---:|");
    for (label, m) in &measured {
        let seconds = m
            .by_second
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {label} | {:.2} | {} | {} | {:.1} | {seconds} | {:.1} |",
            m.cpu_ms,
            m.ticks,
            m.wakeups,
            m.wakeups as f64 * 60.0 / window.as_secs_f64(),
            m.rss_kb as f64 / 1024.0
        );
    }
    println!();
}

/// One idle window of a worker.
struct Watched {
    cpu_ms: f64,
    /// `utime + stime` over the window, in 10 ms ticks.
    ticks: u64,
    wakeups: u64,
    /// Second after spawn → wake-ups in it, for the seconds with any.
    by_second: BTreeMap<u64, u64>,
    rss_kb: u64,
}

fn watch(worker: &WorkerProcess, window: Duration) -> Watched {
    let pid = worker.pid();
    let mut counters = ThreadCounters::default();
    let first = counters.update(pid);
    let ticks0 = procs::cpu_seconds(pid);
    let mut last = first;
    let mut by_second = BTreeMap::new();
    let end = Instant::now() + window;
    while Instant::now() < end {
        std::thread::sleep(SAMPLE);
        let now = counters.update(pid);
        let woke = now.wakeups() - last.wakeups();
        if woke > 0 {
            *by_second
                .entry(worker.spawned.elapsed().as_secs())
                .or_insert(0) += woke;
        }
        last = now;
    }
    Watched {
        cpu_ms: (last.cpu_ns - first.cpu_ns) as f64 / 1e6,
        ticks: ((procs::cpu_seconds(pid) - ticks0) * 100.0).round() as u64,
        wakeups: last.wakeups() - first.wakeups(),
        by_second,
        rss_kb: procs::status_kb(pid, "VmRSS"),
    }
}

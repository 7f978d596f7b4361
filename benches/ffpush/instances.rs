//! `instances`: three `ffpush run` processes on one project share FCM's quota. A broadcast in
//! FlutterFlow's batch documents against the FCM emulator with `--quota` (HTTPS, 100 streams,
//! 30 ms per send): messages/s together, 429s, each instance's documents, messages and share
//! of `FFPUSH_FCM_RATE`; then how fast the shares follow an instance joining, stopping and
//! crashing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use ffpush::model::{Audience, Slice, Status, pb};
use ffpush::store::{self, Store};

use crate::fanout::{Target, token};
use crate::procs::{self, FcmProcess, WorkerEnv, WorkerProcess};

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// User ids spread over the alphabet FlutterFlow's batch bounds cut, as Firestore's auto-ids are.
fn user_id(i: usize) -> String {
    let prefix = i % (62 * 62);
    format!(
        "{}{}{i:08}",
        ALPHABET[prefix / 62] as char,
        ALPHABET[prefix % 62] as char
    )
}

/// A broadcast slice as the FlutterFlow console writes it.
async fn batch_document(store: &Store, index: i64, count: i64) -> String {
    let mut f = HashMap::new();
    f.insert("notification_title".to_string(), store::string("Everyone"));
    f.insert("notification_text".to_string(), store::string("Batched"));
    f.insert("target_audience".to_string(), store::string("All"));
    f.insert("batch_index".to_string(), store::integer(index));
    f.insert("num_batches".to_string(), store::integer(count));
    f.insert("timestamp".to_string(), store::timestamp(Utc::now()));
    let name = store
        .create(ffpush::config::DEFAULT_COLLECTION, f)
        .await
        .expect("writing a notification");
    store.relative(&name).to_string()
}

/// One sample of every instance: its share and the messages it has sent.
#[derive(Clone, Debug)]
struct Sample {
    at: f64,
    shares: Vec<f64>,
}

/// Samples the instances' `/metrics` every 250 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(ports: Vec<u16>, from: Instant) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let shares = ports
                    .iter()
                    .map(|&port| metric(port, "ffpush_fcm_rate_share"))
                    .collect();
                samples.push(Sample {
                    at: from.elapsed().as_secs_f64(),
                    shares,
                });
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

fn metric(port: u16, series: &str) -> f64 {
    let (_, body) = procs::http_get(port, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `check` holds for the instances on `ports`; returns how long it took.
fn until(ports: &[u16], limit: Duration, check: impl Fn(&[f64], &[f64]) -> bool) -> f64 {
    let started = Instant::now();
    loop {
        let shares: Vec<f64> = ports
            .iter()
            .map(|&p| metric(p, "ffpush_fcm_rate_share"))
            .collect();
        let seen: Vec<f64> = ports
            .iter()
            .map(|&p| metric(p, "ffpush_instances"))
            .collect();
        if check(&shares, &seen) {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < limit,
            "shares {shares:?}, instances seen {seen:?} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One broadcast cell's setting.
struct Cell {
    project: &'static str,
    tokens: usize,
    /// The emulator's quota per 10 s window.
    quota: u64,
    /// FFPUSH_FCM_RATE, when not the default.
    rate: Option<u32>,
}

const WINDOW: &str = "10s";
const BATCHES: i64 = 12;

pub async fn run(bench: &crate::Bench) {
    let o = &bench.options;
    println!("## Instances: three `ffpush run` on one project, one quota (`instances`)\n");
    println!(
        "Three workers (`ffpush run`, each its own process, default settings but for the rate where a row says \
         so) on the Firestore emulator; the FCM emulator in HTTPS with 100 streams, 30 ms per send and \
         `--quota N --quota-window {WINDOW}` (10 s windows instead of FCM's minute, so that half a minute of \
         sending fills whole windows). One broadcast written as {BATCHES} FlutterFlow batch documents at once, \
         to users whose ids spread over the batch bounds. Seconds: first claim to last completion (the documents' \
         `started_at`, `completed_at`). Full windows: the quota windows between the first and the last the \
         broadcast touched. *Waiting for token pages*: the fan-outs' time with free send slots but no token \
         (`ffpush_fanout_token_wait_seconds_total`, summed over the instance's fan-outs): the Firestore \
         emulator's reads are then the limit, not the pace.\n"
    );
    let cells = [
        Cell {
            project: "bench-instances",
            tokens: if o.quick { 30_000 } else { 60_000 },
            quota: 100_000,
            rate: None,
        },
        Cell {
            project: "bench-instances-fed",
            tokens: if o.quick { 6_000 } else { 24_000 },
            quota: 6_000,
            rate: Some(570),
        },
    ];
    let mut last = None;
    for cell in cells {
        last = Some(broadcast(bench, cell).await);
    }
    if let Some((workers, target, project)) = last {
        rebalancing(bench, workers, &target, &project);
    }
}

/// Runs one broadcast cell and prints its tables; returns its workers for what follows.
async fn broadcast(bench: &crate::Bench, cell: Cell) -> (Vec<WorkerProcess>, Target, String) {
    let Cell {
        project,
        tokens,
        quota,
        rate: rate_setting,
    } = cell;
    let args = [
        "--max-streams",
        "100",
        "--latency",
        "30",
        "--quota",
        &quota.to_string(),
        "--quota-window",
        WINDOW,
    ]
    .map(String::from);
    let fcm = FcmProcess::start_with(bench.dir.path(), project, Some(&bench.certs), false, &args);
    let mut target = Target::new(fcm, &bench.firestore_host, project, Some(&bench.certs.ca));
    if let Some(r) = rate_setting {
        target.settings.fcm_rate = r;
    }
    let rate = f64::from(target.settings.fcm_rate);
    let store = Store::connect(&target.settings)
        .await
        .expect("connecting to the Firestore emulator");
    let documents = store.documents_path().to_string();
    let now = store::timestamp(Utc::now());
    let seeded = crate::firestore::write_all(&store, 0..tokens, "token", |i| {
        let fields = HashMap::from([
            ("fcm_token".to_string(), store::string(&token(i))),
            ("device_type".to_string(), store::string("Android")),
            ("created_at".to_string(), now.clone()),
        ]);
        (
            format!("{documents}/users/{}/fcm_tokens/t0", user_id(i)),
            fields,
        )
    })
    .await;
    eprintln!("instances: seeded {tokens} tokens at {seeded:.0}/s");
    // Every slice read once first (the emulator's first queries run cold), timed: what the
    // Firestore emulator alone needs for the audience, one slice after another.
    let reading = Instant::now();
    let mut read = 0;
    for index in 0..BATCHES as u32 {
        let slice = Audience::Broadcast {
            device_type: None,
            slice: Some(Slice {
                index,
                count: BATCHES as u32,
            }),
        };
        let mut pages = ffpush::audience::read(store.clone(), slice);
        while let Some(page) = pages.pages.recv().await {
            read += page.expect("a token page").tokens.len();
        }
    }
    assert_eq!(read, tokens, "the slices cover every user once");
    let reading = reading.elapsed().as_secs_f64();

    tokio::task::block_in_place(procs::settle);
    let extra: Vec<(&'static str, String)> = rate_setting
        .map(|r| vec![("FFPUSH_FCM_RATE", r.to_string())])
        .unwrap_or_default();
    let workers: Vec<WorkerProcess> = (0..3)
        .map(|_| {
            WorkerProcess::start(
                bench.dir.path(),
                &WorkerEnv {
                    project,
                    firestore_host: &bench.firestore_host,
                    fcm: &target.fcm,
                    ca: Some(&bench.certs.ca),
                    extra: extra.clone(),
                },
            )
        })
        .collect();
    let ports: Vec<u16> = workers.iter().map(|w| w.port).collect();
    tokio::task::block_in_place(|| {
        until(&ports, Duration::from_secs(60), |shares, seen| {
            seen.iter().all(|&n| n == 3.0) && shares.iter().sum::<f64>() >= rate - 3.0
        })
    });
    let sent_before: Vec<f64> = ports
        .iter()
        .map(|&p| metric(p, "ffpush_fcm_messages_total{outcome=\"sent\"}"))
        .collect();
    let wait_before: Vec<f64> = ports
        .iter()
        .map(|&p| metric(p, "ffpush_fanout_token_wait_seconds_total"))
        .collect();

    let started = Instant::now();
    let sampler = Sampler::start(ports.clone(), started);
    let mut docs = Vec::new();
    for i in 0..BATCHES {
        docs.push(batch_document(&store, i, BATCHES).await);
    }
    let mut finished: Vec<pb::Document> = Vec::new();
    for relative in &docs {
        loop {
            let doc = store
                .get(relative)
                .await
                .expect("reading a notification")
                .expect("the notification exists");
            if Status::of(&doc).is_finished() {
                assert_eq!(Status::of(&doc), Status::Succeeded, "{relative}");
                finished.push(doc);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "{relative} did not finish"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let samples = sampler.finish();
    let sent: u64 = finished
        .iter()
        .filter_map(|d| store::integer_field(d, "num_sent"))
        .sum::<i64>() as u64;
    assert_eq!(sent, tokens as u64, "every token once");
    let first = finished
        .iter()
        .filter_map(|d| store::timestamp_field(d, "started_at"))
        .min()
        .expect("started_at");
    let last = finished
        .iter()
        .filter_map(|d| store::timestamp_field(d, "completed_at"))
        .max()
        .expect("completed_at");
    let secs = (last - first).num_milliseconds() as f64 / 1000.0;
    let windows: Vec<serde_json::Value> = target
        .get_json(&format!("/emulator/quota?project={project}"))
        .await;
    let field = |w: &serde_json::Value, f: &str| w[f].as_u64().unwrap_or(0);
    let refused: u64 = windows.iter().map(|w| field(w, "refused")).sum();
    let full: Vec<u64> = windows
        .iter()
        .skip(1)
        .take(windows.len().saturating_sub(2))
        .map(|w| field(w, "admitted"))
        .collect();
    let pauses: f64 = ports
        .iter()
        .map(|&p| metric(p, "ffpush_fcm_quota_pauses_total"))
        .sum();
    eprintln!("instances {project}: windows {windows:?}");

    let per_second = quota as f64 / 10.0;
    println!(
        "### {tokens} tokens, quota {quota} per {WINDOW} ({per_second:.0}/s), FFPUSH_FCM_RATE {}{}\n",
        target.settings.fcm_rate,
        if rate_setting.is_some() {
            " (95 % of it)"
        } else {
            " (the default)"
        }
    );
    println!(
        "| tokens | documents | seconds | msgs/s together | of the quota | full windows: least admitted | refused (429) | quota pauses | the slices read alone, one after another, s |"
    );
    println!("|---:|---:|---:|---:|---:|---|---:|---:|---:|");
    let together = sent as f64 / secs;
    println!(
        "| {tokens} | {BATCHES} | {secs:.2} | {together:.0} | {:.1} % | {} | {refused} | {pauses} | {reading:.1} |",
        together * 100.0 / per_second,
        match full.iter().min() {
            Some(least) => format!(
                "{least} of {quota} ({:.1} %) in {} window(s)",
                *least as f64 * 100.0 / quota as f64,
                full.len()
            ),
            None => "none (too short)".into(),
        }
    );
    println!();
    println!(
        "| instance | documents | messages sent | of all | mean share while sending (msgs/s) | least – most sampled | waiting for token pages, s |"
    );
    println!("|---|---:|---:|---:|---:|---|---:|");
    let busy: Vec<&Sample> = samples.iter().filter(|s| s.at <= secs).collect();
    for (i, worker) in workers.iter().enumerate() {
        let pid = format!("/{}/", worker.pid());
        let claimed = finished
            .iter()
            .filter(|d| {
                d.fields
                    .get("ffpush_worker")
                    .and_then(ffpush::model::string_value)
                    .is_some_and(|w| w.contains(&pid))
            })
            .count();
        let sent_here =
            metric(worker.port, "ffpush_fcm_messages_total{outcome=\"sent\"}") - sent_before[i];
        let shares: Vec<f64> = busy.iter().map(|s| s.shares[i]).collect();
        let mean = shares.iter().sum::<f64>() / shares.len().max(1) as f64;
        let least = shares.iter().copied().fold(f64::INFINITY, f64::min);
        let most = shares.iter().copied().fold(0.0, f64::max);
        let waited = metric(worker.port, "ffpush_fanout_token_wait_seconds_total") - wait_before[i];
        println!(
            "| {} | {claimed} | {sent_here:.0} | {:.1} % | {mean:.0} | {least:.0} – {most:.0} | {waited:.1} |",
            i + 1,
            sent_here * 100.0 / sent as f64
        );
    }
    println!();
    (workers, target, project.to_string())
}

/// An instance joins, one stops (SIGTERM), one crashes (SIGKILL): how long until the shares
/// add up to the rate again among the instances left.
fn rebalancing(
    bench: &crate::Bench,
    mut workers: Vec<WorkerProcess>,
    target: &Target,
    project: &str,
) {
    let rate = f64::from(target.settings.fcm_rate);
    let limit = Duration::from_secs(60);
    let ports: Vec<u16> = workers.iter().map(|w| w.port).collect();
    let extra = vec![("FFPUSH_FCM_RATE", target.settings.fcm_rate.to_string())];
    let joined = tokio::task::block_in_place(|| {
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
    });
    let mut ports4 = ports.clone();
    ports4.push(joined.port);
    let join = tokio::task::block_in_place(|| {
        until(&ports4, limit, |shares, seen| {
            seen.iter().all(|&n| n == 4.0)
                && shares
                    .iter()
                    .all(|&s| (s - (rate / 4.0).floor()).abs() <= 1.0)
        })
    });
    workers.push(joined);
    let stopping = workers.remove(0);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &stopping.pid().to_string()])
        .status();
    let ports3: Vec<u16> = workers.iter().map(|w| w.port).collect();
    let graceful = tokio::task::block_in_place(|| {
        until(&ports3, limit, |shares, seen| {
            seen.iter().all(|&n| n == 3.0) && shares.iter().sum::<f64>() >= rate - 3.0
        })
    });
    drop(stopping);
    let crashed = workers.remove(0);
    drop(crashed); // SIGKILL
    let ports2: Vec<u16> = workers.iter().map(|w| w.port).collect();
    let crash = tokio::task::block_in_place(|| {
        until(&ports2, limit, |shares, seen| {
            seen.iter().all(|&n| n == 2.0) && shares.iter().sum::<f64>() >= rate - 2.0
        })
    });
    println!(
        "### Shares following the instances\n\nIdle instances at default settings (FFPUSH_HEARTBEAT_INTERVAL {:?}): time from the event until every instance's `/metrics` shows the new count and the shares add up to FFPUSH_FCM_RATE again.\n",
        target.settings.heartbeat_interval
    );
    println!("| event | seconds |");
    println!("|---|---:|");
    println!("| a fourth instance starts (from its `/readyz`) | {join:.1} |");
    println!("| one stops gracefully (SIGTERM: drains, deletes its heartbeat) | {graceful:.1} |");
    println!("| one crashes (SIGKILL: its heartbeat expires after 5 intervals) | {crash:.1} |");
    println!();
}

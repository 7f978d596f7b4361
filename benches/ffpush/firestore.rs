//! Scenarios on the real Firestore emulator with `ffpush run` as a child process (configured by
//! environment, as on Cloud Run): latency of single-user notifications, a 20 000-token
//! broadcast end to end, and the worker's peak RSS as the audience grows.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ffpush::model::{Audience, Status, pb};
use ffpush::store::{self, Store};
use futures::{StreamExt, TryStreamExt};

use crate::fanout::{Target, token};
use crate::procs::{self, FcmProcess, RssSampler, WorkerEnv, WorkerProcess};

/// Writes token documents `users/u{i}/fcm_tokens/t0` for `range`, 500 writes per BatchWrite,
/// four requests in flight. Returns documents per second.
pub async fn seed(store: &Store, range: std::ops::Range<usize>) -> f64 {
    let started = Instant::now();
    let n = range.len();
    let database = store.database_path().to_string();
    let documents = store.documents_path().to_string();
    let now = store::timestamp(Utc::now());
    let requests: Vec<pb::BatchWriteRequest> = range
        .clone()
        .step_by(500)
        .map(|start| {
            let writes = (start..(start + 500).min(range.end))
                .map(|i| {
                    let mut fields = HashMap::new();
                    fields.insert("fcm_token".to_string(), store::string(&token(i)));
                    let device = if i % 3 == 0 { "iOS" } else { "Android" };
                    fields.insert("device_type".to_string(), store::string(device));
                    fields.insert("created_at".to_string(), now.clone());
                    pb::Write {
                        operation: Some(pb::write::Operation::Update(pb::Document {
                            name: format!("{documents}/users/u{i:08}/fcm_tokens/t0"),
                            fields,
                            ..Default::default()
                        })),
                        ..Default::default()
                    }
                })
                .collect();
            pb::BatchWriteRequest {
                database: database.clone(),
                writes,
                ..Default::default()
            }
        })
        .collect();
    futures::stream::iter(requests)
        .map(|request| {
            let mut client = store.client();
            async move {
                let response = client.batch_write(request).await?.into_inner();
                let failed = response.status.iter().filter(|s| s.code != 0).count();
                assert_eq!(failed, 0, "{failed} token writes failed");
                Ok::<_, firestore::gcloud_sdk::tonic::Status>(())
            }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await
        .expect("seeding tokens");
    n as f64 / started.elapsed().as_secs_f64()
}

async fn connect(target: &Target) -> Store {
    Store::connect(&target.settings)
        .await
        .expect("connecting to the Firestore emulator")
}

/// A FlutterFlow notification document: `user_refs` for one user, or a broadcast.
async fn create(store: &Store, user: Option<usize>) -> String {
    let mut f = HashMap::new();
    let n = crate::fanout::notification();
    f.insert("notification_title".to_string(), store::string(&n.title));
    f.insert("notification_text".to_string(), store::string(&n.body));
    f.insert(
        "notification_image_url".to_string(),
        store::string(n.image.as_deref().unwrap_or_default()),
    );
    f.insert("notification_sound".to_string(), store::string("default"));
    f.insert(
        "initial_page_name".to_string(),
        store::string("ProductPage"),
    );
    f.insert(
        "parameter_data".to_string(),
        store::string(n.parameter_data.as_deref().unwrap_or_default()),
    );
    match user {
        Some(i) => f.insert(
            "user_refs".to_string(),
            store::string(&format!("users/u{i:08}")),
        ),
        None => f.insert("target_audience".to_string(), store::string("All")),
    };
    f.insert("timestamp".to_string(), store::timestamp(Utc::now()));
    let name = store
        .create(ffpush::config::DEFAULT_COLLECTION, f)
        .await
        .expect("writing a notification");
    store.relative(&name).to_string()
}

/// Polls until the document's status is final.
async fn finished(store: &Store, relative: &str, every: Duration, limit: Duration) -> pb::Document {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(doc) = store.get(relative).await.expect("reading a notification")
            && let status = Status::of(&doc)
            && status.is_finished()
        {
            assert_eq!(
                status,
                Status::Succeeded,
                "{relative}: {:?}",
                doc.fields.get("error")
            );
            return doc;
        }
        assert!(
            Instant::now() < deadline,
            "{relative} did not finish in {limit:?}"
        );
        tokio::time::sleep(every).await;
    }
}

fn time_of(t: &Option<store::prost_types_timestamp::Timestamp>) -> DateTime<Utc> {
    t.as_ref()
        .and_then(store::from_timestamp)
        .expect("a timestamp")
}

fn millis(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0) as f64 / 1000.0
}

pub async fn latency(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-latency";
    let (warm, n) = if o.quick { (3, 20) } else { (10, 250) };
    let fcm = FcmProcess::start(bench.dir.path(), project, Some(&bench.certs), true);
    let target = Target::new(fcm, &bench.firestore_host, project, Some(&bench.certs.ca));
    let store = connect(&target).await;
    seed(&store, 0..warm + n).await;
    let worker = WorkerProcess::start(
        bench.dir.path(),
        &WorkerEnv {
            project,
            firestore_host: &bench.firestore_host,
            fcm: &target.fcm,
            ca: Some(&bench.certs.ca),
            extra: vec![],
        },
    );
    tokio::task::block_in_place(procs::settle);
    let mut docs = Vec::new();
    for i in 0..warm + n {
        let relative = create(&store, Some(i)).await;
        let doc = finished(
            &store,
            &relative,
            Duration::from_millis(5),
            Duration::from_secs(30),
        )
        .await;
        if i >= warm {
            docs.push((i, doc));
        }
        // A little air between notifications, as independent app events would have.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let messages: Vec<serde_json::Value> = target
        .get_json(&format!("/emulator/messages?project={project}"))
        .await;
    let received: HashMap<String, DateTime<Utc>> = messages
        .iter()
        .filter_map(|m| {
            let token = m["token"].as_str()?.to_string();
            let at = m["received_at"].as_str()?.parse().ok()?;
            Some((token, at))
        })
        .collect();
    let mut first_send = Vec::new();
    let mut done = Vec::new();
    for (i, doc) in &docs {
        let created = time_of(&doc.create_time);
        let sent = received
            .get(&token(*i))
            .expect("FCM received the user's token");
        first_send.push(millis(created, *sent));
        done.push(millis(created, time_of(&doc.update_time)));
    }
    drop(worker);
    first_send.sort_by(f64::total_cmp);
    done.sort_by(f64::total_cmp);
    let p = crate::percentile;
    println!(
        "## Latency, one user (worker `ffpush run` as a child process, Firestore emulator, HTTPS FCM emulator)\n"
    );
    println!(
        "{n} notifications one after another (after {warm} not counted), each to one user with one token. \
         Times are Firestore's create time of the document → the FCM emulator's receipt of the request, and → \
         Firestore's update time of the write that set `status: succeeded`. One clock (same machine).\n"
    );
    println!("| | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for (name, v) in [
        ("create → first FCM request", &first_send),
        ("create → `succeeded`", &done),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            p(v, 50.0),
            p(v, 90.0),
            p(v, 99.0),
            v.last().copied().unwrap_or(0.0)
        );
    }
    println!();
}

pub async fn broadcast(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-broadcast";
    let tokens = if o.quick { 2_000 } else { 20_000 };
    let fcm = FcmProcess::start(bench.dir.path(), project, Some(&bench.certs), false);
    let target = Target::new(fcm, &bench.firestore_host, project, Some(&bench.certs.ca));
    let store = connect(&target).await;
    let seeded = seed(&store, 0..tokens).await;
    eprintln!("broadcast: seeded {tokens} tokens at {seeded:.0}/s");
    let read_all = || async {
        let started = Instant::now();
        let mut pages = ffpush::audience::read(
            store.clone(),
            Audience::Broadcast {
                device_type: None,
                slice: None,
            },
        );
        let mut n = 0;
        while let Some(page) = pages.pages.recv().await {
            n += page.expect("a token page").len();
        }
        assert_eq!(n, tokens);
        started.elapsed().as_secs_f64()
    };
    // Once unmeasured: the emulator's JIT warms up on the query.
    read_all().await;
    let worker = WorkerProcess::start(
        bench.dir.path(),
        &WorkerEnv {
            project,
            firestore_host: &bench.firestore_host,
            fcm: &target.fcm,
            ca: Some(&bench.certs.ca),
            extra: vec![],
        },
    );
    let mut runs = Vec::new();
    for _ in 0..o.repeat.max(1) {
        tokio::task::block_in_place(procs::settle);
        let wait0 = worker.metric("ffpush_fanout_token_wait_seconds_total");
        let cpu0 = procs::cpu_seconds(worker.pid());
        let relative = create(&store, None).await;
        let doc = finished(
            &store,
            &relative,
            Duration::from_millis(20),
            Duration::from_secs(300),
        )
        .await;
        let cpu = procs::cpu_seconds(worker.pid()) - cpu0;
        let wait = worker.metric("ffpush_fanout_token_wait_seconds_total") - wait0;
        assert_eq!(store::integer_field(&doc, "num_sent"), Some(tokens as i64));
        let created = time_of(&doc.create_time);
        let started = store::timestamp_field(&doc, "started_at").expect("started_at");
        let completed = store::timestamp_field(&doc, "completed_at").expect("completed_at");
        let updated = time_of(&doc.update_time);
        let run = Run {
            total: millis(created, updated) / 1000.0,
            claim: millis(created, started) / 1000.0,
            fan_out: millis(started, completed) / 1000.0,
            report: millis(completed, updated) / 1000.0,
            waiting_for_tokens: wait,
            cpu,
        };
        eprintln!("broadcast {tokens}: {run:?}");
        runs.push(run);
    }
    drop(worker);
    let reads: Vec<f64> = {
        let mut v = Vec::new();
        for _ in 0..o.repeat.max(1) {
            v.push(read_all().await);
        }
        v
    };
    let show = |f: &dyn Fn(&Run) -> f64, d| crate::show(runs.iter().map(f).collect(), d);
    println!(
        "## Broadcast of {tokens} tokens end to end (worker as a child process, Firestore emulator, HTTPS FCM emulator)\n"
    );
    println!(
        "Median (min–max) of {} broadcasts. Claim, fan-out and report come from the document's own timestamps \
         (create time, `started_at`, `completed_at`, update time). *Waiting for tokens* is the worker's \
         `ffpush_fanout_token_wait_seconds_total`: time the fan-out had free send slots but no token, i.e. was \
         bound by Firestore reads; the rest of the fan-out was bound by sending.\n",
        runs.len()
    );
    println!("| | seconds |");
    println!("|---|---:|");
    println!("| create → `succeeded` | {} |", show(&|r| r.total, 2));
    println!(
        "| create → claimed (`started_at`) | {} |",
        show(&|r| r.claim, 3)
    );
    println!(
        "| fan-out (`started_at` → `completed_at`) | {} |",
        show(&|r| r.fan_out, 2)
    );
    println!(
        "| … of which waiting for tokens (reading) | {} |",
        show(&|r| r.waiting_for_tokens, 2)
    );
    println!(
        "| … of which sending | {} |",
        show(&|r| r.fan_out - r.waiting_for_tokens, 2)
    );
    println!(
        "| report write (`completed_at` → update time) | {} |",
        show(&|r| r.report, 3)
    );
    println!(
        "| for reference: reading the {tokens} tokens alone (same reader, no sends) | {} |",
        crate::show(reads, 2)
    );
    println!("| worker CPU | {} |", show(&|r| r.cpu, 2));
    println!(
        "\nRate: {} messages/s end to end.\n",
        crate::show(runs.iter().map(|r| tokens as f64 / r.total).collect(), 0)
    );
}

#[derive(Debug)]
struct Run {
    total: f64,
    claim: f64,
    fan_out: f64,
    report: f64,
    waiting_for_tokens: f64,
    cpu: f64,
}

pub async fn rss(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-rss";
    let fcm = FcmProcess::start(bench.dir.path(), project, Some(&bench.certs), false);
    let target = Target::new(fcm, &bench.firestore_host, project, Some(&bench.certs.ca));
    let store = connect(&target).await;
    let mut sizes = o.rss_sizes.clone();
    sizes.sort_unstable();
    println!(
        "## Worker memory during a broadcast read from Firestore (worker as a child process)\n"
    );
    println!(
        "The audience grows between rows (tokens are added to the same project); each row starts a fresh \
         `ffpush run` and sends one broadcast to every token. RSS is the worker's `/proc/PID/status`: VmHWM \
         (the kernel's peak) when ready and after the broadcast, and the largest VmRSS sampled every 50 ms.\n"
    );
    println!(
        "| tokens | seeding docs/s | broadcast s | msg/s | VmHWM ready MB | VmHWM after MB | max sampled VmRSS MB | worker CPU s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut seeded = 0;
    for size in sizes {
        let rate = seed(&store, seeded..size).await;
        seeded = size;
        tokio::task::block_in_place(procs::settle);
        let worker = WorkerProcess::start(
            bench.dir.path(),
            &WorkerEnv {
                project,
                firestore_host: &bench.firestore_host,
                fcm: &target.fcm,
                ca: Some(&bench.certs.ca),
                extra: vec![],
            },
        );
        let pid = worker.pid();
        let ready = procs::status_kb(pid, "VmHWM");
        let sampler = RssSampler::start(pid, Duration::from_millis(50));
        let cpu0 = procs::cpu_seconds(pid);
        let started = Instant::now();
        let relative = create(&store, None).await;
        let doc = finished(
            &store,
            &relative,
            Duration::from_millis(200),
            Duration::from_secs(1800),
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        let hwm = procs::status_kb(pid, "VmHWM");
        let cpu = procs::cpu_seconds(pid) - cpu0;
        let samples = sampler.finish();
        assert_eq!(store::integer_field(&doc, "num_sent"), Some(size as i64));
        drop(worker);
        let mb = |kb: u64| kb as f64 / 1024.0;
        eprintln!("rss {size}: ready {ready} kB, after {hwm} kB, {secs:.1}s");
        println!(
            "| {size} | {rate:.0} | {secs:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {cpu:.1} |",
            size as f64 / secs,
            mb(ready),
            mb(hwm),
            mb(samples.iter().copied().max().unwrap_or(0)),
        );
    }
    println!();
}

/// Writes `ff_user_push_notifications/far{i}` for `range`: app documents as FlutterFlow's
/// action writes them, each to one user, all scheduled at `at`. 500 writes per BatchWrite,
/// four requests in flight. Returns documents per second.
async fn seed_scheduled(store: &Store, range: std::ops::Range<usize>, at: DateTime<Utc>) -> f64 {
    let started = Instant::now();
    let n = range.len();
    let database = store.database_path().to_string();
    let documents = store.documents_path().to_string();
    let collection = ffpush::config::DEFAULT_USER_COLLECTION;
    let now = store::timestamp(Utc::now());
    let scheduled = store::timestamp(at);
    let requests: Vec<pb::BatchWriteRequest> = range
        .clone()
        .step_by(500)
        .map(|start| {
            let writes = (start..(start + 500).min(range.end))
                .map(|i| {
                    let mut fields = HashMap::new();
                    let text = |s: &str| store::string(s);
                    fields.insert("notification_title".to_string(), text("Reminder"));
                    fields.insert(
                        "notification_text".to_string(),
                        text("Your appointment is tomorrow"),
                    );
                    fields.insert("user_refs".to_string(), text(&format!("users/u{i:08}")));
                    fields.insert(
                        "sender".to_string(),
                        store::reference(format!("{documents}/users/s{:04}", i % 1000)),
                    );
                    fields.insert("timestamp".to_string(), now.clone());
                    fields.insert("scheduled_time".to_string(), scheduled.clone());
                    pb::Write {
                        operation: Some(pb::write::Operation::Update(pb::Document {
                            name: format!("{documents}/{collection}/far{i:08}"),
                            fields,
                            ..Default::default()
                        })),
                        ..Default::default()
                    }
                })
                .collect();
            pb::BatchWriteRequest {
                database: database.clone(),
                writes,
                ..Default::default()
            }
        })
        .collect();
    futures::stream::iter(requests)
        .map(|request| {
            let mut client = store.client();
            async move {
                let response = client.batch_write(request).await?.into_inner();
                let failed = response.status.iter().filter(|s| s.code != 0).count();
                assert_eq!(failed, 0, "{failed} notification writes failed");
                Ok::<_, firestore::gcloud_sdk::tonic::Status>(())
            }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await
        .expect("seeding scheduled notifications");
    n as f64 / started.elapsed().as_secs_f64()
}

/// Worker memory with many documents scheduled far ahead: a worker on the empty project, and
/// a fresh worker started on the documents (its listen stream replays them all before ready).
/// The documents are written while no worker listens: the emulator resends a listened-to
/// collection on every write, which makes writing 200 000 under a listener take hours.
pub async fn far_future(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-far-future";
    let n = if o.quick { 20_000 } else { o.far_future };
    let fcm = FcmProcess::start(bench.dir.path(), project, None, false);
    let target = Target::new(fcm, &bench.firestore_host, project, None);
    let store = connect(&target).await;
    let start = || {
        WorkerProcess::start_within(
            bench.dir.path(),
            &WorkerEnv {
                project,
                firestore_host: &bench.firestore_host,
                fcm: &target.fcm,
                ca: None,
                extra: vec![],
            },
            Duration::from_secs(1800),
        )
    };
    let measure = |worker: &WorkerProcess| {
        let pid = worker.pid();
        (
            procs::status_kb(pid, "VmRSS"),
            procs::status_kb(pid, "VmHWM"),
            worker.metric("ffpush_documents_waiting{state=\"scheduled\"}"),
        )
    };
    tokio::task::block_in_place(procs::settle);
    let worker = start();
    tokio::task::block_in_place(procs::settle);
    let empty = measure(&worker);
    drop(worker);
    let rate = seed_scheduled(&store, 0..n, Utc::now() + chrono::Duration::days(30)).await;
    tokio::task::block_in_place(procs::settle);
    let started = Instant::now();
    let worker = start();
    let ready = started.elapsed().as_secs_f64();
    tokio::task::block_in_place(procs::settle);
    let loaded = measure(&worker);
    let cpu = procs::cpu_seconds(worker.pid());
    drop(worker);
    eprintln!("far-future {n}: seeded at {rate:.0}/s, worker ready in {ready:.1}s");
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!(
        "## Worker memory with {n} app notifications scheduled 30 days ahead (worker as a child process)\n"
    );
    println!(
        "`ff_user_push_notifications` documents as FlutterFlow's action writes them (one user each, 1000 senders), \
         `scheduled_time` 30 days ahead, written with BatchWrite ({rate:.0} documents/s) while no worker runs. A worker is \
         started on the empty project, then a fresh one on the {n} documents: ready means its listen streams have \
         replayed the collections, i.e. it has been offered every document ({ready:.1} s, {cpu:.1} CPU-s). RSS is \
         `/proc/PID/status` once the machine is quiet; the gauge is the worker's count of documents holding a timer.\n"
    );
    println!(
        "| worker | far-future documents | VmRSS MB | VmHWM MB | `ffpush_documents_waiting{{state=\"scheduled\"}}` |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (what, docs, (rss, hwm, scheduled)) in [
        ("started on the empty project", 0, empty),
        ("started on the documents, ready", n, loaded),
    ] {
        println!(
            "| {what} | {docs} | {:.1} | {:.1} | {scheduled:.0} |",
            mb(rss),
            mb(hwm)
        );
    }
    println!();
}

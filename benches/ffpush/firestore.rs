//! Scenarios on the real Firestore emulator with `ffpush run` as a child process (configured by
//! environment, as on Cloud Run): latency of single-user notifications, a 20 000-token
//! broadcast end to end and how fast tokens are read, a notification to 1 000 `user_refs`,
//! and the worker's peak RSS as the audience grows.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ffpush::model::{Audience, Status, pb};
use ffpush::store::{self, Store};
use futures::{StreamExt, TryStreamExt};

use crate::fanout::{Target, token};
use crate::procs::{self, FcmProcess, RssSampler, WorkerEnv, WorkerProcess};

/// Writes token documents `users/u{i}/fcm_tokens/t0` for `range`. Returns documents per second.
pub async fn seed(store: &Store, range: std::ops::Range<usize>) -> f64 {
    let documents = store.documents_path().to_string();
    let now = store::timestamp(Utc::now());
    write_all(store, range, "token", |i| {
        let mut fields = HashMap::new();
        fields.insert("fcm_token".to_string(), store::string(&token(i)));
        let device = if i % 3 == 0 { "iOS" } else { "Android" };
        fields.insert("device_type".to_string(), store::string(device));
        fields.insert("created_at".to_string(), now.clone());
        (format!("{documents}/users/u{i:08}/fcm_tokens/t0"), fields)
    })
    .await
}

/// Writes the document `doc(i)` names and fills for each `i` of `range`, 500 writes per
/// BatchWrite, four requests in flight. Returns documents per second.
pub async fn write_all(
    store: &Store,
    range: std::ops::Range<usize>,
    what: &str,
    doc: impl Fn(usize) -> (String, HashMap<String, pb::Value>),
) -> f64 {
    let started = Instant::now();
    let n = range.len();
    let database = store.database_path().to_string();
    let requests: Vec<pb::BatchWriteRequest> = range
        .clone()
        .step_by(500)
        .map(|start| {
            let writes = (start..(start + 500).min(range.end))
                .map(|i| {
                    let (name, fields) = doc(i);
                    pb::Write {
                        operation: Some(pb::write::Operation::Update(pb::Document {
                            name,
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
                assert_eq!(failed, 0, "{failed} {what} writes failed");
                Ok::<_, firestore::gcloud_sdk::tonic::Status>(())
            }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await
        .unwrap_or_else(|e| panic!("seeding {what} documents: {e}"));
    n as f64 / started.elapsed().as_secs_f64()
}

async fn connect(target: &Target) -> Store {
    Store::connect(&target.settings)
        .await
        .expect("connecting to the Firestore emulator")
}

/// Who a notification document addresses.
#[derive(Clone)]
enum To {
    User(usize),
    /// `user_refs` listing users `0, stride, 2 × stride, …` (`n` of them), comma-separated, as
    /// FlutterFlow writes it.
    Users {
        n: usize,
        stride: usize,
    },
    All,
}

fn user_path(i: usize) -> String {
    format!("users/u{i:08}")
}

/// A FlutterFlow notification document: `user_refs` for one user, or a broadcast.
async fn create(store: &Store, to: To) -> String {
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
    match to {
        To::User(i) => f.insert("user_refs".to_string(), store::string(&user_path(i))),
        To::Users { n, stride } => f.insert(
            "user_refs".to_string(),
            store::string(
                &(0..n)
                    .map(|i| user_path(i * stride))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ),
        To::All => f.insert("target_audience".to_string(), store::string("All")),
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
        let relative = create(&store, To::User(i)).await;
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

/// The FCM emulator of the broadcast and targeted scenarios: HTTPS, 100 streams per
/// connection, 30 ms per send, as Google's front end.
fn realistic_fcm(bench: &crate::Bench, project: &str) -> Target {
    let args = ["--max-streams", "100", "--latency", "30"].map(String::from);
    let fcm = FcmProcess::start_with(bench.dir.path(), project, Some(&bench.certs), false, &args);
    Target::new(fcm, &bench.firestore_host, project, Some(&bench.certs.ca))
}

fn start_worker(bench: &crate::Bench, project: &str, target: &Target) -> WorkerProcess {
    WorkerProcess::start(
        bench.dir.path(),
        &WorkerEnv {
            project,
            firestore_host: &bench.firestore_host,
            fcm: &target.fcm,
            ca: Some(&bench.certs.ca),
            extra: vec![],
        },
    )
}

/// Notifications to `to`, one after another, each until `succeeded`.
async fn end_to_end(
    bench: &crate::Bench,
    store: &Store,
    worker: &WorkerProcess,
    to: To,
    tokens: usize,
) -> Vec<Run> {
    let mut runs = Vec::new();
    for _ in 0..bench.options.repeat.max(1) {
        tokio::task::block_in_place(procs::settle);
        let wait0 = worker.metric("ffpush_fanout_token_wait_seconds_total");
        let cpu0 = procs::cpu_seconds(worker.pid());
        let relative = create(store, to.clone()).await;
        // Polled gently: the times come from the document, and reads compete with the worker.
        let doc = finished(
            store,
            &relative,
            Duration::from_millis(100),
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
        eprintln!("{tokens} tokens end to end: {run:?}");
        runs.push(run);
    }
    runs
}

/// The table of [`end_to_end`] runs; `reading` is the reference row (reading alone).
fn print_runs(runs: &[Run], tokens: usize, reading: (&str, Vec<f64>)) {
    let show = |f: &dyn Fn(&Run) -> f64, d| crate::show(runs.iter().map(f).collect(), d);
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
    println!("| {} | {} |", reading.0, crate::show(reading.1, 2));
    println!("| worker CPU | {} |", show(&|r| r.cpu, 2));
    println!(
        "\nRate: {} messages/s end to end.\n",
        crate::show(runs.iter().map(|r| tokens as f64 / r.total).collect(), 0)
    );
}

/// Names the worker binary when it is not this build's (`FFPUSH_BENCH_WORKER`).
fn worker_note(o: &crate::Options) -> String {
    match &o.worker_bin {
        Some(bin) => format!(" Worker binary: `{bin}`."),
        None => String::new(),
    }
}

/// Seconds to read a broadcast's tokens with the production reader (one streamed query).
async fn read_streamed(store: &Store, tokens: usize) -> f64 {
    let everyone = Audience::Broadcast {
        device_type: None,
        slice: None,
    };
    read_production(store, everyone, tokens).await
}

/// Seconds the production reader (`audience::read`) takes for `audience`'s `tokens` tokens.
async fn read_production(store: &Store, audience: Audience, tokens: usize) -> f64 {
    let started = Instant::now();
    let mut pages = ffpush::audience::read(store.clone(), audience);
    let mut n = 0;
    while let Some(page) = pages.pages.recv().await {
        n += page.expect("a token page").tokens.len();
    }
    assert_eq!(n, tokens);
    started.elapsed().as_secs_f64()
}

/// Seconds to read a broadcast's tokens as the reader before did: a cursor query per page of
/// 500 (`Store::token_page`, the same query with a limit and a start cursor).
async fn read_paged(store: &Store, tokens: usize) -> f64 {
    let started = Instant::now();
    let query = store::TokenQuery {
        page_size: ffpush::audience::PAGE_SIZE,
        ..Default::default()
    };
    let mut after: Option<String> = None;
    let mut n = 0;
    loop {
        let page = store
            .token_page(&query, after.as_deref())
            .await
            .expect("a token page");
        n += page.len();
        if page.len() < query.page_size {
            break;
        }
        after = page.last().map(|t| t.doc_name.clone());
    }
    assert_eq!(n, tokens);
    started.elapsed().as_secs_f64()
}

pub async fn broadcast(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-broadcast";
    let tokens = if o.quick { 2_000 } else { 20_000 };
    let target = realistic_fcm(bench, project);
    let store = connect(&target).await;
    let seeded = seed(&store, 0..tokens).await;
    eprintln!("broadcast: seeded {tokens} tokens at {seeded:.0}/s");
    // Once unmeasured: the emulator's JIT warms up on the query.
    read_streamed(&store, tokens).await;
    let worker = start_worker(bench, project, &target);
    let runs = end_to_end(bench, &store, &worker, To::All, tokens).await;
    drop(worker);
    tokio::task::block_in_place(procs::settle);
    let mut reads = Vec::new();
    for _ in 0..o.repeat.max(1) {
        reads.push(read_streamed(&store, tokens).await);
    }
    println!(
        "## Broadcast of {tokens} tokens end to end (worker as a child process, Firestore emulator, HTTPS FCM emulator at 100 streams and 30 ms per send)\n"
    );
    println!(
        "Median (min–max) of {} broadcasts. Claim, fan-out and report come from the document's own timestamps \
         (create time, `started_at`, `completed_at`, update time). *Waiting for tokens* is the worker's \
         `ffpush_fanout_token_wait_seconds_total`: time the fan-out had free send slots but no token, i.e. was \
         bound by Firestore reads; the rest of the fan-out was bound by sending (at most FFPUSH_FCM_RATE, \
         10 000/s by default).{}\n",
        runs.len(),
        worker_note(o)
    );
    print_runs(
        &runs,
        tokens,
        (
            &format!("for reference: reading the {tokens} tokens alone (streamed query, no sends)"),
            reads,
        ),
    );

    // How fast tokens are read, by the streamed query and by cursor pages, as the collection
    // grows (the emulator's cost per cursor page grows with it).
    let mut sizes: Vec<usize> = o.read_sizes.iter().copied().filter(|&n| n > 0).collect();
    sizes.sort_unstable();
    if sizes.is_empty() {
        return;
    }
    println!("### Reading a broadcast's tokens (Firestore emulator, no sends)\n");
    println!(
        "The same collection-group query over `fcm_tokens` (`select fcm_token`, ordered by name), read to the end: \
         *streamed* is the production reader (`audience::read`: one query, cut into pages of 500 that a 4-page \
         channel paces); *cursor pages* is the reader before it (one query per 500 tokens, each starting after the \
         last token of the previous page). Streamed: median (min–max) of {} reads after one unmeasured; cursor pages: \
         {} at 100 000 tokens and more (each read takes minutes).\n",
        o.repeat.max(1),
        if o.repeat > 1 { "once" } else { "one read" }
    );
    println!(
        "| tokens | streamed s | streamed tokens/s | cursor pages s | cursor pages tokens/s |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let mut have = tokens;
    for size in sizes {
        if size > have {
            let rate = seed(&store, have..size).await;
            eprintln!("broadcast reads: seeded {have}..{size} at {rate:.0}/s");
            have = size;
        }
        if size < have {
            eprintln!("broadcast reads: {size} < the {have} tokens seeded; skipped");
            continue;
        }
        tokio::task::block_in_place(procs::settle);
        read_streamed(&store, size).await;
        let mut streamed = Vec::new();
        for _ in 0..o.repeat.max(1) {
            streamed.push(read_streamed(&store, size).await);
        }
        let paged_runs = if size >= 100_000 { 1 } else { o.repeat.max(1) };
        let mut paged = Vec::new();
        for _ in 0..paged_runs {
            paged.push(read_paged(&store, size).await);
        }
        eprintln!("broadcast reads {size}: streamed {streamed:?}, cursor pages {paged:?}");
        let per_sec = |v: &[f64]| v.iter().map(|s| size as f64 / s).collect::<Vec<_>>();
        println!(
            "| {size} | {} | {} | {} | {} |",
            crate::show(streamed.clone(), 2),
            crate::show(per_sec(&streamed), 0),
            crate::show(paged.clone(), 2),
            crate::show(per_sec(&paged), 0),
        );
    }
    println!();
}

/// Seconds to read the tokens of users `0, stride, …` (`n` of them), `read_ahead` users at a
/// time, each user's first page as the production reader reads it (`Store::token_page`, the
/// user's `fcm_tokens`).
async fn read_users(store: &Store, n: usize, stride: usize, read_ahead: usize) -> f64 {
    let started = Instant::now();
    let tokens: usize = futures::stream::iter(0..n)
        .map(|i| {
            let query = store::TokenQuery {
                user: Some(user_path(i * stride)),
                page_size: ffpush::audience::PAGE_SIZE,
                ..Default::default()
            };
            async move {
                store
                    .token_page(&query, None)
                    .await
                    .expect("a user's tokens")
                    .len()
            }
        })
        .buffered(read_ahead)
        .fold(0, |sum, n| async move { sum + n })
        .await;
    assert_eq!(tokens, n);
    started.elapsed().as_secs_f64()
}

/// Seconds the production reader takes for users `0, stride, …` (`n` of them).
async fn read_users_production(store: &Store, n: usize, stride: usize) -> f64 {
    let users = (0..n).map(|i| user_path(i * stride)).collect();
    read_production(store, Audience::Users(users), n).await
}

pub async fn targeted(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-targeted";
    let users = if o.quick { 200 } else { 1_000 };
    let target = realistic_fcm(bench, project);
    let store = connect(&target).await;
    let mut seeded = 0;
    // First the app has exactly the addressed users; then 20 000 users with a token each, of
    // which the notification addresses every 20th. The emulator scans the collection group on
    // every per-user query, so the second costs it about 20 times more per query.
    for stride in [1, 20] {
        let app_users = users * stride;
        seed(&store, seeded..app_users).await;
        seeded = app_users;
        // Once unmeasured: the emulator's JIT warms up on the queries.
        read_users_production(&store, users, stride).await;
        let worker = start_worker(bench, project, &target);
        let to = To::Users { n: users, stride };
        let runs = end_to_end(bench, &store, &worker, to, users).await;
        drop(worker);
        tokio::task::block_in_place(procs::settle);
        let mut reads = Vec::new();
        for _ in 0..o.repeat.max(1) {
            reads.push(read_users_production(&store, users, stride).await);
        }
        println!(
            "## A notification to {users} `user_refs` among {app_users} users end to end (worker as a child process, Firestore emulator, HTTPS FCM emulator at 100 streams and 30 ms per send)\n"
        );
        println!(
            "The project has {app_users} users with one token each; `user_refs` lists {}, comma-separated, as \
             FlutterFlow writes it. Median (min–max) of {} notifications; the rows are as in the broadcast.{}\n",
            if stride == 1 {
                "all of them".to_string()
            } else {
                format!("every {stride}th")
            },
            runs.len(),
            worker_note(o)
        );
        print_runs(
            &runs,
            users,
            (
                &format!(
                    "for reference: reading the {users} users' tokens alone (production reader, no sends)"
                ),
                reads,
            ),
        );
        println!(
            "### Reading {users} users' tokens among {app_users} at several read-aheads (Firestore emulator, no sends)\n"
        );
        println!(
            "Each user's `fcm_tokens` is one query; *read-ahead* is how many run at once (the production reader's \
             `USER_READ_AHEAD`). Median (min–max) of {} reads.\n",
            o.repeat.max(1)
        );
        println!("| read-ahead | seconds | users/s |");
        println!("|---:|---:|---:|");
        for read_ahead in [1, 4, 16, 64, 256] {
            tokio::task::block_in_place(procs::settle);
            let mut secs = Vec::new();
            for _ in 0..o.repeat.max(1) {
                secs.push(read_users(&store, users, stride, read_ahead).await);
            }
            eprintln!("targeted reads among {app_users}, read-ahead {read_ahead}: {secs:?}");
            println!(
                "| {read_ahead} | {} | {} |",
                crate::show(secs.clone(), 2),
                crate::show(secs.iter().map(|s| users as f64 / s).collect(), 0)
            );
        }
        tokio::task::block_in_place(procs::settle);
        let mut secs = Vec::new();
        for _ in 0..o.repeat.max(1) {
            secs.push(read_users_production(&store, users, stride).await);
        }
        println!(
            "| the production reader (`audience::read`) | {} | {} |",
            crate::show(secs.clone(), 2),
            crate::show(secs.iter().map(|s| users as f64 / s).collect(), 0)
        );
        println!();
    }
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
        let relative = create(&store, To::All).await;
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
/// action writes them, each to one user, all scheduled at `at`. Returns documents per second.
async fn seed_scheduled(store: &Store, range: std::ops::Range<usize>, at: DateTime<Utc>) -> f64 {
    let documents = store.documents_path().to_string();
    let collection = ffpush::config::DEFAULT_USER_COLLECTION;
    let now = store::timestamp(Utc::now());
    let scheduled = store::timestamp(at);
    write_all(store, range, "notification", |i| {
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
        (format!("{documents}/{collection}/far{i:08}"), fields)
    })
    .await
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

/// `benches/flutterflow`: FlutterFlow's generated function, when its npm packages are
/// installed (`npm ci --prefix benches/flutterflow`).
fn flutterflow_dir() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/flutterflow");
    dir.join("node_modules/firebase-admin")
        .exists()
        .then_some(dir)
}

/// Runs FlutterFlow's function on the document `relative`; its seconds from reading the
/// document to writing the outcome, after checking it sent to `tokens`.
fn run_function(
    dir: &std::path::Path,
    bench: &crate::Bench,
    target: &Target,
    relative: &str,
    tokens: usize,
) -> f64 {
    let output = std::process::Command::new("node")
        .arg(dir.join("function.js"))
        .arg(relative)
        .env("FIRESTORE_EMULATOR_HOST", &bench.firestore_host)
        .env("FFPUSH_BENCH_FCM_URL", &target.fcm.url)
        .env("FFPUSH_BENCH_KEY", &target.fcm.key)
        .env("FFPUSH_BENCH_CA", &bench.certs.ca)
        .env("NODE_EXTRA_CA_CERTS", &bench.certs.ca)
        .env("FFPUSH_BENCH_PROJECT", &target.settings.project)
        .output()
        .expect("running node");
    assert!(
        output.status.success(),
        "FlutterFlow's function failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8_lossy(&output.stdout);
    let answer: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("the function's answer {line:?}: {e}"));
    assert_eq!(
        answer["num_sent"].as_u64(),
        Some(tokens as u64),
        "FlutterFlow's function sent to every token: {line} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    answer["ms"].as_f64().expect("ms") / 1000.0
}

/// The same notifications by ffpush (`ffpush run`) and by FlutterFlow's generated function
/// (firebase-admin 12 under Node), on the same emulators and data.
pub async fn flutterflow(bench: &crate::Bench) {
    let Some(dir) = flutterflow_dir() else {
        println!(
            "## ffpush and FlutterFlow's function\n\nSkipped: FlutterFlow's function needs Node.js and `npm ci --prefix benches/flutterflow`.\n"
        );
        return;
    };
    let o = &bench.options;
    let project = "bench-flutterflow";
    let (tokens, users) = if o.quick {
        (2_000, 200)
    } else {
        (20_000, 1_000)
    };
    let target = realistic_fcm(bench, project);
    let store = connect(&target).await;
    println!(
        "## ffpush and FlutterFlow's function on the same emulators (Firestore emulator, HTTPS FCM emulator at 100 streams and 30 ms per send)\n"
    );
    println!(
        "*ffpush*: `ffpush run` (a child process, default settings), document created → `status: succeeded` (Firestore's \
         create and update times). *FlutterFlow*: `benches/flutterflow/function.js`, the generated `sendPushNotifications` \
         under Node {} with firebase-admin 12, warm (connected and authenticated), document read → outcome written; a \
         trigger's delivery and cold start are not counted. Median (min–max) of {} runs each, one after the other.\n",
        String::from_utf8_lossy(
            &std::process::Command::new("node")
                .arg("--version")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .trim(),
        o.repeat.max(1)
    );
    println!("| notification | tokens | ffpush s | FlutterFlow's function s |");
    println!("|---|---:|---:|---:|");
    // The project grows between cases: 1 000 users, then 20 000.
    let cases = [
        (
            format!("{users} `user_refs` among {users} users"),
            users,
            To::Users {
                n: users,
                stride: 1,
            },
        ),
        (
            format!("broadcast (`All`) to {tokens} users"),
            tokens,
            To::All,
        ),
        (
            format!(
                "{users} `user_refs` among {tokens} users (every {}th)",
                tokens / users
            ),
            tokens,
            To::Users {
                n: users,
                stride: tokens / users,
            },
        ),
    ];
    let mut seeded = 0;
    for (what, app_users, to) in cases {
        if app_users > seeded {
            seed(&store, seeded..app_users).await;
            seeded = app_users;
        }
        let sent = match to {
            To::All => app_users,
            To::Users { n, .. } => n,
            To::User(_) => 1,
        };
        let worker = start_worker(bench, project, &target);
        let ffpush: Vec<f64> = end_to_end(bench, &store, &worker, to.clone(), sent)
            .await
            .iter()
            .map(|r| r.total)
            .collect();
        drop(worker);
        let mut function = Vec::new();
        for _ in 0..o.repeat.max(1) {
            tokio::task::block_in_place(procs::settle);
            let relative = create(&store, to.clone()).await;
            function.push(tokio::task::block_in_place(|| {
                run_function(&dir, bench, &target, &relative, sent)
            }));
        }
        eprintln!("flutterflow {what}: ffpush {ffpush:?}, function {function:?}");
        println!(
            "| {what} | {sent} | {} | {} |",
            crate::show(ffpush, 2),
            crate::show(function, 2)
        );
    }
    println!();
}

/// Writes `ff_push_notifications/b{i}` for `range`: console notifications, each to the one
/// user `users/u{i}` (whose token [`seed`] wrote). Returns documents per second.
async fn seed_backlog(store: &Store, range: std::ops::Range<usize>) -> f64 {
    let documents = store.documents_path().to_string();
    let collection = ffpush::config::DEFAULT_COLLECTION;
    write_all(store, range, "notification", |i| {
        let mut fields = HashMap::new();
        fields.insert("notification_title".to_string(), store::string("Back"));
        fields.insert(
            "notification_text".to_string(),
            store::string("We are back online"),
        );
        fields.insert("user_refs".to_string(), store::string(&user_path(i)));
        (format!("{documents}/{collection}/b{i:08}"), fields)
    })
    .await
}

/// Single-document updates per second the emulator takes, `in_flight` at a time, started for
/// 20 s (those in flight then are waited for): each a field-masked update of one of
/// `collection`'s documents `c{i}` (written first), as a claim or a report is.
async fn update_ceiling(store: &Store, collection: &str, n: usize, in_flight: usize) -> f64 {
    let started = Instant::now();
    let done = futures::stream::iter(0..n)
        .take_while(|_| futures::future::ready(started.elapsed() < Duration::from_secs(20)))
        .map(|i| async move {
            let mut f = HashMap::new();
            f.insert("touched".to_string(), store::integer(i as i64));
            let name = store.doc_name(&format!("{collection}/c{i:08}"));
            store
                .update_existing(&name, f, &[])
                .await
                .expect("updating a document");
        })
        .buffer_unordered(in_flight)
        .count()
        .await;
    done as f64 / started.elapsed().as_secs_f64()
}

/// A Listen stream on `collection` whose answers are read and dropped, as a worker's listener
/// is there; stops when dropped.
fn listen_to(store: &Store, collection: &str) -> tokio::task::JoinHandle<()> {
    use firestore::gcloud_sdk::google::firestore::v1::{
        ListenRequest, StructuredQuery, Target as ListenTarget, listen_request,
        structured_query as sq, target,
    };
    let request = ListenRequest {
        database: store.database_path().to_string(),
        target_change: Some(listen_request::TargetChange::AddTarget(ListenTarget {
            target_id: 1,
            target_type: Some(target::TargetType::Query(target::QueryTarget {
                parent: store.documents_path().to_string(),
                query_type: Some(target::query_target::QueryType::StructuredQuery(
                    StructuredQuery {
                        from: vec![sq::CollectionSelector {
                            collection_id: collection.to_string(),
                            all_descendants: false,
                        }],
                        ..Default::default()
                    },
                )),
            })),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut client = store.client();
    tokio::spawn(async move {
        let requests = futures::stream::iter([request]).chain(futures::stream::pending());
        if let Ok(responses) = client.listen(requests).await {
            let mut responses = responses.into_inner();
            while let Some(Ok(_)) = responses.next().await {}
        }
    })
}

/// A backlog at start: `n` unsent notifications (one user with one token each) in the
/// collection when the worker starts, as after an outage. The worker drains them; measured:
/// time to the last final status, duplicates (FCM messages beyond one per token), lease
/// trouble in its log, its peak RSS, and beside it the emulator's own ceiling for the
/// single-document updates a claim and a report are.
pub async fn backlog(bench: &crate::Bench) {
    let o = &bench.options;
    let sizes = if o.quick {
        vec![2_000]
    } else {
        o.backlog_sizes.clone()
    };
    println!("## A backlog at start (worker as a child process)\n");
    println!(
        "Unsent console notifications, each to one user with one token, written with BatchWrite while no worker runs \
         (what a project has after an outage); then `ffpush run` starts with its default settings (`FFPUSH_MAX_DOCUMENTS` \
         {}) against an h2c FCM emulator answering at once. Drain: from the worker's start to the last final status. \
         Duplicates: FCM messages accepted beyond one per token. Lease trouble: the worker's log lines about a lost or \
         unextended lease or a document changed under it. RSS: the worker's VmHWM at the end. Beside it, the Firestore \
         emulator's ceiling on the same machine: field-masked single-document updates per second (100 in flight, as a \
         claim or a report is) to a collection of the same size, with no listener and with one listen stream on it \
         (the emulator resends a listened-to collection on writes). A row stopped by `--backlog-secs` says how \
         far it got.\n",
        o.backlog_max_documents
            .map_or("100, its default".to_string(), |m| m.to_string()),
    );
    println!(
        "| documents | drain s | documents/s | duplicates | lease trouble | other warnings | most queued | most in progress | VmHWM MB | worker CPU s | emulator updates/s, no listener | emulator updates/s, one listener |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        let project = format!("bench-backlog-{n}");
        let fcm = FcmProcess::start(bench.dir.path(), &project, None, false);
        let target = Target::new(fcm, &bench.firestore_host, &project, None);
        let store = connect(&target).await;

        // The emulator's ceiling, on a collection of its own of the same size.
        let ceiling = "bench_ceiling";
        let documents = store.documents_path().to_string();
        write_all(&store, 0..n, "ceiling", |i| {
            let mut fields = HashMap::new();
            fields.insert("touched".to_string(), store::integer(0));
            (format!("{documents}/{ceiling}/c{i:08}"), fields)
        })
        .await;
        tokio::task::block_in_place(procs::settle);
        let alone = update_ceiling(&store, ceiling, n, 100).await;
        // On a connection of its own, as the worker's listener is.
        let listener = listen_to(&connect(&target).await, ceiling);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let listened = update_ceiling(&store, ceiling, n, 100).await;
        listener.abort();
        eprintln!(
            "backlog {n}: the emulator takes {alone:.0} updates/s, {listened:.0} with a listener"
        );

        let token_rate = seed(&store, 0..n).await;
        let rate = seed_backlog(&store, 0..n).await;
        eprintln!("backlog {n}: seeded tokens at {token_rate:.0}/s, notifications at {rate:.0}/s");
        tokio::task::block_in_place(procs::settle);

        let started = Instant::now();
        let worker = WorkerProcess::start_within(
            bench.dir.path(),
            &WorkerEnv {
                project: &project,
                firestore_host: &bench.firestore_host,
                fcm: &target.fcm,
                ca: None,
                extra: o
                    .backlog_max_documents
                    .map(|m| ("FFPUSH_MAX_DOCUMENTS", m.to_string()))
                    .into_iter()
                    .collect(),
            },
            Duration::from_secs(3600),
        );
        let (mut most_queued, mut most_in_progress) = (0.0f64, 0.0f64);
        let limit = Duration::from_secs(o.backlog_secs);
        let (finished, in_progress) = loop {
            let finished = worker.metric("ffpush_notifications_total{status=\"succeeded\"}")
                + worker.metric("ffpush_notifications_total{status=\"failed\"}");
            let in_progress = worker.metric("ffpush_documents_waiting{state=\"in_progress\"}");
            most_queued =
                most_queued.max(worker.metric("ffpush_documents_waiting{state=\"queued\"}"));
            most_in_progress = most_in_progress.max(in_progress);
            // Done, or out of time (`--backlog-secs`): then the row says how far it got.
            if finished >= n as f64 || started.elapsed() >= limit {
                break (finished as usize, in_progress as usize);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let drain = started.elapsed().as_secs_f64();
        let failed = worker.metric("ffpush_notifications_total{status=\"failed\"}");
        let hwm = procs::status_kb(worker.pid(), "VmHWM");
        let cpu = procs::cpu_seconds(worker.pid());
        // Anything still in flight reaches FCM before it is counted.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let accepted = target.stats().await.accepted;
        let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
        drop(worker);
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
        let lease_trouble = warnings
            .iter()
            .filter(|l| l.contains("lease") || l.contains("changed before the report"))
            .count();
        assert_eq!(failed, 0.0, "backlog {n}: notifications failed");
        eprintln!(
            "backlog {n}: {finished} finished in {drain:.1}s, {accepted} accepted, VmHWM {hwm} kB, ceiling {alone:.0}/{listened:.0} updates/s"
        );
        // Stopped early: messages accepted beyond the finished documents are duplicates or
        // sends of the documents still in progress.
        let (documents, duplicates) = if finished >= n {
            (n.to_string(), (accepted as i64 - n as i64).to_string())
        } else {
            (
                format!("{n} ({finished} finished when stopped)"),
                format!(
                    "≤ {} ({in_progress} in progress)",
                    accepted as i64 - finished as i64
                ),
            )
        };
        println!(
            "| {documents} | {drain:.1} | {:.1} | {duplicates} | {lease_trouble} | {} | {most_queued:.0} | {most_in_progress:.0} | {:.1} | {cpu:.1} | {alone:.0} | {listened:.0} |",
            finished as f64 / drain,
            warnings.len() - lease_trouble,
            hwm as f64 / 1024.0,
        );
    }
    println!();
}

/// Writes `ff_push_notifications/old{i}` for `range`: console notifications as ffpush leaves
/// them, finished. Returns documents per second.
async fn seed_finished(store: &Store, range: std::ops::Range<usize>) -> f64 {
    let documents = store.documents_path().to_string();
    let collection = ffpush::config::DEFAULT_COLLECTION;
    let now = store::timestamp(Utc::now());
    write_all(store, range, "notification", |i| {
        let mut fields = HashMap::new();
        fields.insert("notification_title".to_string(), store::string("Old news"));
        fields.insert(
            "notification_text".to_string(),
            store::string("Sent long ago"),
        );
        fields.insert("user_refs".to_string(), store::string(&user_path(i)));
        fields.insert("timestamp".to_string(), now.clone());
        fields.insert("status".to_string(), store::string("succeeded"));
        fields.insert("num_sent".to_string(), store::integer(1));
        fields.insert("completed_at".to_string(), now.clone());
        (format!("{documents}/{collection}/old{i:08}"), fields)
    })
    .await
}

/// What a start costs with history: `ffpush run` start → `/readyz` 200 (both collections
/// replayed and handed over), then a notification written once ready → `succeeded`; on an
/// empty project and with `--history` finished console notifications.
pub async fn start_with_history(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-start";
    let n = if o.quick { 10_000 } else { o.history };
    let fcm = FcmProcess::start(bench.dir.path(), project, None, false);
    let target = Target::new(fcm, &bench.firestore_host, project, None);
    let store = connect(&target).await;
    seed(&store, 0..1).await;
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
    let once = |history: usize| {
        let store = &store;
        async move {
            let started = Instant::now();
            let worker = start();
            let ready = started.elapsed().as_secs_f64();
            let cpu = procs::cpu_seconds(worker.pid());
            let written = Instant::now();
            let doc = create(store, To::User(0)).await;
            finished(
                store,
                &doc,
                Duration::from_millis(20),
                Duration::from_secs(600),
            )
            .await;
            let sent = written.elapsed().as_secs_f64();
            drop(worker);
            eprintln!(
                "start with {history} finished documents: ready in {ready:.1}s, then sent in {sent:.1}s"
            );
            (history, ready, cpu, sent)
        }
    };
    let empty = once(0).await;
    let rate = seed_finished(&store, 0..n).await;
    tokio::task::block_in_place(procs::settle);
    let loaded = once(n).await;
    println!("## A start with history (worker as a child process)\n");
    println!(
        "`ff_push_notifications` holding finished console notifications (written with BatchWrite, {rate:.0} documents/s, \
         while no worker runs). *ready*: `ffpush run` started → `/readyz` 200, i.e. both listen streams have handed their \
         replay to the worker. *then sent*: a notification written once ready → `status: succeeded`; on the Firestore \
         emulator this includes the emulator resending the whole collection after the write (real Firestore sends \
         the one change).\n"
    );
    println!("| finished documents | ready s | worker CPU-s to ready | then sent s |");
    println!("|---:|---:|---:|---:|");
    for (history, ready, cpu, sent) in [empty, loaded] {
        println!("| {history} | {ready:.1} | {cpu:.1} | {sent:.1} |");
    }
    println!();
}

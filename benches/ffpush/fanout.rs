//! Fan-out throughput: the production [`fan_out`] and [`Sender`] in this process, tokens fed
//! from memory through the same bounded page channel the Firestore reader fills, the FCM
//! emulator in another process. CPU is read per process, so "ffpush CPU" is this process
//! (fan-out, HTTP/2, TLS, the page feeder) and never the emulator's.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ffpush::audience::{PAGE_SIZE, TokenPages, UsersWithoutTokens};
use ffpush::config::{CaCert, Settings};
use ffpush::fanout::{self, Abort, Context, Ledger, RetryPolicy, SendGate, Tally};
use ffpush::fcm::{MessageTemplate, Sender};
use ffpush::metrics::Metrics;
use ffpush::model::{Audience, Notification};
use ffpush::store::{DeviceToken, Store};
use tokio_util::sync::CancellationToken;

use crate::procs::{self, FcmProcess};

/// A notification like the fixtures: every optional part set, so the body is realistic
/// (≈ 480 bytes with the token).
pub fn notification() -> Notification {
    Notification {
        title: "Flash sale: 40% off everything".into(),
        body: "Only until midnight. Tap to see today's deals picked for you.".into(),
        image: Some("https://example.com/images/flash-sale-banner.png".into()),
        sound: Some("default".into()),
        initial_page: Some("ProductPage".into()),
        parameter_data: Some(r#"{"productRef":"products/p42","campaign":"flash"}"#.into()),
        audience: Audience::Broadcast {
            device_type: None,
            slice: None,
        },
        scheduled_time: None,
        options: Default::default(),
    }
}

/// A registration token of real length (FCM's are 142–163 characters), unique per `i`.
pub fn token(i: usize) -> String {
    let head = format!("{i:010}");
    format!(
        "{head}:APA91bE{}",
        "x7Kq2mZp9vRt4LwYb8NcHd3FgJs6QeUa1oTi5XyVn0".repeat(4)[..145].to_owned()
    )
}

/// `n` token documents in pages of [`PAGE_SIZE`], as the Firestore reader yields them.
fn pages(documents: &str, n: usize) -> Vec<Vec<DeviceToken>> {
    (0..n)
        .map(|i| DeviceToken {
            doc_name: format!("{documents}/users/u{i:08}/fcm_tokens/t0"),
            token: token(i),
        })
        .collect::<Vec<_>>()
        .chunks(PAGE_SIZE)
        .map(|c| c.to_vec())
        .collect()
}

/// One FCM emulator (h2c or HTTPS) and what the sender needs to use it.
pub struct Target {
    pub fcm: FcmProcess,
    pub settings: Settings,
}

impl Target {
    pub fn new(
        fcm: FcmProcess,
        firestore_host: &str,
        project: &str,
        ca: Option<&std::path::Path>,
    ) -> Target {
        let mut settings =
            Settings::for_emulators(project, firestore_host, &fcm.url, fcm.key.clone())
                .expect("emulator settings");
        settings.fcm_ca_cert = ca.map(|p| CaCert::read(p).expect("reading the bench CA"));
        Target { fcm, settings }
    }

    /// The emulator's `/emulator/stats` (outside any timed section).
    pub async fn stats(&self) -> Stats {
        self.get_json("/emulator/stats").await
    }

    /// GET `path` on the emulator, through the same trust settings as the sender.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let mut client = reqwest::Client::builder().tls_backend_rustls();
        if let Some(ca) = &self.settings.fcm_ca_cert {
            for c in reqwest::Certificate::from_pem_bundle(&ca.pem).expect("CA") {
                client = client.add_root_certificate(c);
            }
        }
        client
            .build()
            .expect("emulator client")
            .get(format!("{}{path}", self.fcm.url))
            .send()
            .await
            .expect("GET on the emulator")
            .json()
            .await
            .expect("JSON from the emulator")
    }
}

/// The emulator's counters.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize)]
pub struct Stats {
    pub accepted: u64,
    pub attempts: u64,
    pub http2: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct CellResult {
    pub sent: u64,
    pub secs: f64,
    /// CPU seconds of this process (ffpush's side) during the cell.
    pub cpu: f64,
    /// CPU seconds of the emulator process during the cell.
    pub emulator_cpu: f64,
    /// Stopped by the time limit before every token was sent.
    pub capped: bool,
}

impl CellResult {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.secs
    }
    pub fn cpu_ms_per_1000(&self) -> f64 {
        self.cpu * 1e6 / self.sent.max(1) as f64
    }
    pub fn emulator_cpu_ms_per_1000(&self) -> f64 {
        self.emulator_cpu * 1e6 / self.sent.max(1) as f64
    }
}

/// Sends `tokens` messages at `concurrency` (and at most `rate` per second, 0: unpaced)
/// through the production path, stopping after `limit` if not done (in-flight sends finish;
/// the rate counts what was accepted).
pub async fn cell(
    target: &Target,
    store: &Store,
    tokens: usize,
    concurrency: usize,
    rate: u32,
    limit: Duration,
) -> CellResult {
    let mut settings = target.settings.clone();
    settings.concurrency = concurrency;
    settings.fcm_rate = rate;
    let sender = Sender::new(&settings).await.expect("building the sender");
    // As the daemon does at start: the connection and the OAuth token are ready before a burst.
    sender.warm_up().await.expect("warming up the sender");
    let metrics = Metrics::default();
    let gate = SendGate::new(tokio::time::Instant::now() + std::time::Duration::from_secs(86_400));
    let ctx = Context {
        sender: &sender,
        store,
        metrics: &metrics,
        concurrency,
        retry: RetryPolicy::from_settings(&settings),
        // As a claim's gate while its progress writes succeed: looked at before every send.
        gate: Some(&gate),
    };
    let all = pages(store.documents_path(), tokens);
    let before = target.stats().await;
    let me = std::process::id();
    let (cpu0, emu0) = (procs::cpu_seconds(me), procs::cpu_seconds(target.fcm.pid()));
    let Driven {
        tally,
        secs,
        capped,
    } = drive(&ctx, all.into_iter(), limit).await;
    let (cpu1, emu1) = (procs::cpu_seconds(me), procs::cpu_seconds(target.fcm.pid()));
    let after = target.stats().await;
    assert_eq!(
        after.accepted - before.accepted,
        tally.sent,
        "the emulator accepted what was counted sent"
    );
    assert_eq!(
        after.http2 - before.http2,
        after.attempts - before.attempts,
        "every request went over HTTP/2"
    );
    assert!(
        capped || tally.sent == tokens as u64,
        "{} of {tokens} sent",
        tally.sent
    );
    CellResult {
        sent: tally.sent,
        secs,
        cpu: cpu1 - cpu0,
        emulator_cpu: emu1 - emu0,
        capped,
    }
}

/// What one run of [`drive`] did.
pub struct Driven {
    pub tally: Tally,
    /// From the first page offered to the last answer.
    pub secs: f64,
    /// Stopped by the time limit before every token was sent.
    pub capped: bool,
}

/// The production fan-out over `pages`, fed through the same bounded page channel (4 pages)
/// the Firestore reader fills, with the lease keeper's progress snapshot once a second as in
/// production; stops after `limit` if not done (in-flight sends finish, the tally counts
/// what was sent). A fan-out that fails stops the benchmark.
pub async fn drive(
    ctx: &Context<'_>,
    pages: impl Iterator<Item = Vec<DeviceToken>> + Send + 'static,
    limit: Duration,
) -> Driven {
    let template = MessageTemplate::new(&notification()).expect("template");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let feeder = tokio::spawn(async move {
        for page in pages {
            if tx.send(Ok(page.into())).await.is_err() {
                break;
            }
        }
    });
    let token_pages = TokenPages {
        pages: rx,
        without_tokens: Arc::new(Mutex::new(UsersWithoutTokens::default())),
    };
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let keeper = {
        let ledger = ledger.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let snapshot = ledger.lock().map(|l| l.snapshot()).unwrap_or_default();
                        std::hint::black_box(snapshot);
                    }
                }
            }
        })
    };
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            stop.cancel();
        })
    };
    let started = Instant::now();
    let result = fanout::fan_out(
        ctx,
        &template.into(),
        token_pages,
        ledger.clone(),
        stop.clone(),
    )
    .await;
    let secs = started.elapsed().as_secs_f64();
    let capped = stop.is_cancelled();
    stop.cancel();
    timer.abort();
    let _ = keeper.await;
    feeder.abort();
    let tally = match result {
        Ok(tally) => tally,
        Err(Abort::Interrupted) => ledger
            .lock()
            .map(|l| l.snapshot().tally)
            .unwrap_or_default(),
        Err(e) => panic!("fan-out failed: {e}"),
    };
    Driven {
        tally,
        secs,
        capped,
    }
}

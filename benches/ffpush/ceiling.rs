//! The FCM emulator's own ceiling: a bare `h2` client (no pool, no timeouts, no retries, bodies
//! built before the clock starts) drives the emulator as hard as it can. Its messages/s and the
//! emulator's CPU per message say which side limits the fan-out numbers; its own CPU per
//! message is the floor any HTTP/2 client would pay on this machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Method, Request, header};
use bytes::Bytes;
use ffpush::fcm::{MessageTemplate, Sender};
use tokio::net::TcpStream;

use crate::fanout::{Target, notification, token};
use crate::procs::{self, FcmProcess};

pub async fn run(bench: &crate::Bench) {
    let o = &bench.options;
    let project = "bench-ceiling";
    let secs = if o.quick { 2 } else { 5 };
    println!("## FCM emulator ceiling (bare `h2` load generator, no client logic)\n");
    println!(
        "{secs}s per run, pre-built bodies, {} runs: median (min–max). The emulator validates each message as FCM does \
         (JSON parse, field checks) and counts it. `generator CPU-ms/1000` is the bare client's own cost: the floor \
         for any HTTP/2 client here.\n",
        o.repeat
    );
    println!(
        "| transport | connections × streams | msg/s | emulator CPU-ms/1000 | generator CPU-ms/1000 |"
    );
    println!("|---|---:|---:|---:|---:|");
    for tls in [false, true] {
        if !o
            .transports
            .iter()
            .any(|t| t == if tls { "tls" } else { "h2c" })
        {
            continue;
        }
        let certs = tls.then_some(&bench.certs);
        let fcm = FcmProcess::start(bench.dir.path(), project, certs, false);
        let target = Target::new(
            fcm,
            &bench.firestore_host,
            project,
            tls.then_some(bench.certs.ca.as_path()),
        );
        for (connections, streams) in [(1, 64), (1, 200), (4, 64)] {
            tokio::task::block_in_place(procs::settle);
            let mut runs = Vec::new();
            for _ in 0..o.repeat.max(1) {
                runs.push(load(&target, connections, streams, Duration::from_secs(secs)).await);
            }
            let name = if tls { "TLS (h2, ALPN)" } else { "h2c" };
            eprintln!("ceiling {name} {connections}x{streams}: {runs:?}");
            println!(
                "| {name} | {connections} × {streams} | {} | {} | {} |",
                crate::show(runs.iter().map(|r| r.0).collect(), 0),
                crate::show(runs.iter().map(|r| r.1).collect(), 1),
                crate::show(runs.iter().map(|r| r.2).collect(), 1),
            );
        }
    }
    println!();
}

/// (messages/s, emulator CPU-ms per 1000, generator CPU-ms per 1000)
async fn load(
    target: &Target,
    connections: usize,
    streams: usize,
    limit: Duration,
) -> (f64, f64, f64) {
    // The production sender only fetches the OAuth token the emulator wants.
    let sender = Sender::new(&target.settings).await.expect("sender");
    let auth = sender.access_token().await.expect("access token");
    let template = MessageTemplate::new(&notification()).expect("template");
    let bodies: Arc<Vec<Bytes>> =
        Arc::new((0..4096).map(|i| template.body_for(&token(i))).collect());
    let url: axum::http::Uri = format!(
        "{}/v1/projects/{}/messages:send",
        target.fcm.url, target.settings.project
    )
    .parse()
    .expect("URI");
    let tls = target.settings.fcm_ca_cert.as_ref().map(|ca| {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca.pem) {
            roots.add(c.expect("CA PEM")).expect("CA");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    });
    let addr = url.authority().expect("authority").as_str().to_string();

    let done = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..connections {
        let tcp = TcpStream::connect(&addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let send = match &tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                let stream = connector.connect(name, tcp).await.expect("TLS handshake");
                assert_eq!(
                    stream.get_ref().1.alpn_protocol(),
                    Some(&b"h2"[..]),
                    "ALPN chose h2"
                );
                let (send, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
                tokio::spawn(conn);
                send
            }
            None => {
                let (send, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
                tokio::spawn(conn);
                send
            }
        };
        for s in 0..streams {
            let mut send = send.clone();
            let (done, ok, bodies, url, auth) = (
                done.clone(),
                ok.clone(),
                bodies.clone(),
                url.clone(),
                auth.clone(),
            );
            clients.push(tokio::spawn(async move {
                let mut i = s;
                while !done.load(Ordering::Relaxed) {
                    let request = Request::builder()
                        .method(Method::POST)
                        .uri(url.clone())
                        .header(header::AUTHORIZATION, auth.clone())
                        .header(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        )
                        .body(())
                        .expect("request");
                    send = match send.ready().await {
                        Ok(send) => send,
                        Err(_) => return,
                    };
                    let Ok((response, mut body)) = send.send_request(request, false) else {
                        return;
                    };
                    if body
                        .send_data(bodies[i % bodies.len()].clone(), true)
                        .is_err()
                    {
                        return;
                    }
                    i += streams;
                    let Ok(response) = response.await else { return };
                    let status = response.status();
                    let mut data = response.into_body();
                    while let Some(chunk) = data.data().await {
                        if let Ok(chunk) = chunk {
                            let _ = data.flow_control().release_capacity(chunk.len());
                        }
                    }
                    if status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    let me = std::process::id();
    let (cpu0, emu0, n0) = (
        procs::cpu_seconds(me),
        procs::cpu_seconds(target.fcm.pid()),
        ok.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    tokio::time::sleep(limit).await;
    let (cpu1, emu1, n1) = (
        procs::cpu_seconds(me),
        procs::cpu_seconds(target.fcm.pid()),
        ok.load(Ordering::Relaxed),
    );
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let n = (n1 - n0).max(1) as f64;
    (n / secs, (emu1 - emu0) * 1e6 / n, (cpu1 - cpu0) * 1e6 / n)
}

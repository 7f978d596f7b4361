//! Child processes the benchmark measures from outside: the FCM emulator (`ffpush
//! fcm-emulator`) and the worker (`ffpush run`), each the release binary, so the CPU and memory
//! read from `/proc` are theirs alone and never the harness's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The release `ffpush` binary cargo built for this bench.
pub fn ffpush_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ffpush")
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `--pin`: this process on CPU 0, the FCM emulator on CPU 1 (the worker and the Firestore
/// emulator are not pinned). Steadier numbers for comparing two builds; not the default,
/// which lets both sides share both cores as a 2-core machine would.
pub static PIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Pins this process (call before any thread is started: threads inherit it) to CPU 0.
pub fn pin_self() {
    PIN.store(true, std::sync::atomic::Ordering::Relaxed);
    let ok = Command::new("taskset")
        .args(["-pc", "0", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset failed: --pin needs util-linux's taskset");
}

fn command(pin_to: &str) -> Command {
    if PIN.load(std::sync::atomic::Ordering::Relaxed) {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", pin_to, ffpush_bin()]);
        cmd
    } else {
        Command::new(ffpush_bin())
    }
}

/// Clock ticks per second of `/proc/PID/stat` times (USER_HZ; 100 on Linux everywhere).
const TICKS: f64 = 100.0;

/// User + system CPU seconds a process has used, all its threads (live and exited) included.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is 0, utime 11, stime 12.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / TICKS
}

/// Waits (up to 30 s) until the machine is nearly idle, so one measurement does not pay for
/// the previous one's leftovers (the Firestore emulator's JIT compiler, a child exiting).
pub fn settle() {
    fn busy_idle() -> (u64, u64) {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        (cpu.iter().sum::<u64>() - idle, idle)
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let (b0, i0) = busy_idle();
        std::thread::sleep(Duration::from_millis(500));
        let (b1, i1) = busy_idle();
        let (busy, idle) = ((b1 - b0) as f64, (i1 - i0) as f64);
        if busy / (busy + idle).max(1.0) < 0.05 {
            return;
        }
    }
}

/// A `/proc/PID/status` memory line in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    status_kb_of(&format!("/proc/{pid}/status"), field)
}

/// A `Name: value kB` line of a `/proc` file.
pub fn status_kb_of(path: &str, field: &str) -> u64 {
    field_of(&std::fs::read_to_string(path).unwrap_or_default(), field)
}

/// The number after `Name:` in a `/proc` text.
fn field_of(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Certificates for the HTTPS emulator: a CA (what `FFPUSH_FCM_CA_CERT` points at) and a leaf
/// for `localhost` and `127.0.0.1` signed by it, as a TLS-inspecting proxy would have. ECDSA
/// P-256, like Google's front ends.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "ffpush bench CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf = leaf_params
            .signed_by(&leaf_key, &Issuer::from_params(&ca_params, &ca_key))
            .expect("leaf certificate");
        let certs = Certs {
            ca: dir.join("ca.pem"),
            cert: dir.join("emulator.pem"),
            key: dir.join("emulator-key.pem"),
        };
        std::fs::write(&certs.ca, ca.pem()).expect("writing ca.pem");
        std::fs::write(&certs.cert, leaf.pem()).expect("writing emulator.pem");
        std::fs::write(&certs.key, leaf_key.serialize_pem()).expect("writing the key");
        certs
    }
}

/// `ffpush fcm-emulator` in its own process.
pub struct FcmProcess {
    child: Child,
    pub url: String,
    /// Service-account key whose `token_uri` is this emulator.
    pub key: PathBuf,
    pub tls: bool,
}

impl FcmProcess {
    /// Starts the emulator; `certs` makes it HTTPS; `record` keeps every message (for
    /// latency), otherwise only counts.
    pub fn start(dir: &Path, project: &str, certs: Option<&Certs>, record: bool) -> FcmProcess {
        FcmProcess::start_with(dir, project, certs, record, &[])
    }

    /// [`FcmProcess::start`] with more `ffpush fcm-emulator` arguments (`--latency 30` …).
    pub fn start_with(
        dir: &Path,
        project: &str,
        certs: Option<&Certs>,
        record: bool,
        extra: &[String],
    ) -> FcmProcess {
        let port = free_port();
        let name = format!(
            "fcm-{port}{}",
            if certs.is_some() { "-tls" } else { "-h2c" }
        );
        let key = dir.join(format!("{name}-key.json"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = command("1");
        cmd.args(["fcm-emulator", "--host", "127.0.0.1", "--project", project])
            .arg("--port")
            .arg(port.to_string())
            .arg("--write-key")
            .arg(&key)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("emulator log"));
        if let Some(c) = certs {
            cmd.arg("--tls-cert")
                .arg(&c.cert)
                .arg("--tls-key")
                .arg(&c.key);
        }
        if !record {
            cmd.arg("--no-record");
        }
        cmd.args(extra);
        let child = cmd.spawn().expect("starting ffpush fcm-emulator");
        let scheme = if certs.is_some() { "https" } else { "http" };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
        {
            assert!(
                Instant::now() < deadline,
                "the FCM emulator did not start: see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        FcmProcess {
            child,
            url: format!("{scheme}://127.0.0.1:{port}"),
            key,
            tls: certs.is_some(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FcmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ffpush run` in its own process, configured by environment as on Cloud Run.
pub struct WorkerProcess {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    /// When the process was spawned.
    pub spawned: Instant,
    /// Spawn → the first `/readyz` 200 (polled every 5 ms).
    pub ready_after: Duration,
}

pub struct WorkerEnv<'a> {
    pub project: &'a str,
    pub firestore_host: &'a str,
    pub fcm: &'a FcmProcess,
    pub ca: Option<&'a Path>,
    pub extra: Vec<(&'static str, String)>,
}

impl WorkerProcess {
    /// Starts the worker and waits until `/readyz` says it listens and has an FCM token.
    pub fn start(dir: &Path, env: &WorkerEnv<'_>) -> WorkerProcess {
        WorkerProcess::start_within(dir, env, Duration::from_secs(60))
    }

    /// [`WorkerProcess::start`], waiting up to `limit` for ready (a listen stream replaying a
    /// large collection from the emulator takes minutes).
    pub fn start_within(dir: &Path, env: &WorkerEnv<'_>, limit: Duration) -> WorkerProcess {
        let port = free_port();
        let log = dir.join(format!("worker-{port}.log"));
        // Another build as the worker, for before/after comparisons.
        let bin = std::env::var("FFPUSH_BENCH_WORKER").unwrap_or_else(|_| ffpush_bin().into());
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GOOGLE_CLOUD_PROJECT", env.project)
            .env("FIRESTORE_EMULATOR_HOST", env.firestore_host)
            .env("GOOGLE_APPLICATION_CREDENTIALS", &env.fcm.key)
            .env("FCM_ENDPOINT", &env.fcm.url)
            .env("PORT", port.to_string())
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log"));
        if let Some(ca) = env.ca {
            cmd.env("FFPUSH_FCM_CA_CERT", ca);
        }
        for (k, v) in &env.extra {
            cmd.env(k, v);
        }
        let spawned = Instant::now();
        let child = cmd.spawn().expect("starting ffpush run");
        let mut worker = WorkerProcess {
            child,
            port,
            log,
            spawned,
            ready_after: Duration::ZERO,
        };
        let deadline = spawned + limit;
        while http_get(port, "/readyz").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the worker did not become ready: see {}",
                worker.log.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        worker.ready_after = spawned.elapsed();
        worker
    }

    /// Stops the worker as Cloud Run and systemd do (SIGTERM) and waits for it to exit:
    /// how long that took.
    pub fn terminate(mut self) -> Duration {
        let asked = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -TERM failed");
        let _ = self.child.wait();
        asked.elapsed()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A value of the worker's Prometheus `/metrics`.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = http_get(self.port, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on loopback: status and body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Samples a process's resident memory until stopped; the peak the kernel saw is `VmHWM`.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                samples.push(status_kb(pid, "VmRSS"));
                std::thread::sleep(every);
            }
            samples
        });
        RssSampler { stop, handle }
    }

    /// The VmRSS samples taken, in kB.
    pub fn finish(self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// What a process's threads have done so far, from `/proc/PID/task/*`: CPU time in
/// nanoseconds (`schedstat`, exact, where `/proc/PID/stat` counts 10 ms ticks) and context
/// switches (`status`): each voluntary one is a thread going to sleep, i.e. one wake-up
/// later. A thread that exits keeps the counts it had at the last look.
#[derive(Default)]
pub struct ThreadCounters {
    seen: std::collections::HashMap<String, (u64, u64, u64)>,
}

/// Totals over every thread seen.
#[derive(Clone, Copy, Default, Debug)]
pub struct ThreadTotals {
    pub cpu_ns: u64,
    pub voluntary: u64,
    pub involuntary: u64,
}

impl ThreadTotals {
    pub fn wakeups(&self) -> u64 {
        self.voluntary + self.involuntary
    }
}

impl ThreadCounters {
    pub fn update(&mut self, pid: u32) -> ThreadTotals {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let dir = task.path();
            let run_ns = std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok());
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            let voluntary = field_of(&status, "voluntary_ctxt_switches");
            let involuntary = field_of(&status, "nonvoluntary_ctxt_switches");
            if let Some(run_ns) = run_ns {
                let tid = task.file_name().to_string_lossy().into_owned();
                self.seen.insert(tid, (run_ns, voluntary, involuntary));
            }
        }
        self.seen
            .values()
            .fold(ThreadTotals::default(), |t, &(cpu, v, i)| ThreadTotals {
                cpu_ns: t.cpu_ns + cpu,
                voluntary: t.voluntary + v,
                involuntary: t.involuntary + i,
            })
    }
}

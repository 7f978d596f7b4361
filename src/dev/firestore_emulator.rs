//! Runs the real Cloud Firestore emulator (`gcloud emulators firestore start`) as a child
//! process, for `ffpush dev` and the integration tests.
//!
//! The emulator runs under a small bash guard that reads our end of a pipe: when this process
//! goes away for any reason (even SIGKILL, or a test binary whose statics are never dropped),
//! the pipe closes, the guard's `read` returns and it kills the emulator's process group. No
//! orphaned java.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GUARD: &str = r#"
set -m
gcloud emulators firestore start --host-port="$1" --quiet "${@:3}" >"$2" 2>&1 &
child=$!
trap 'kill -TERM -- -$child 2>/dev/null; kill -TERM $child 2>/dev/null; wait $child 2>/dev/null' EXIT
read -r _ || true
"#;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the Cloud Firestore emulator is not installed: install Google Cloud CLI with `apt-get install google-cloud-cli google-cloud-cli-firestore-emulator` and a Java 17+ runtime (or set FIRESTORE_EMULATOR_HOST to a running emulator)"
    )]
    NotInstalled,
    #[error("the Firestore emulator did not start within {0:?}; its log ({1}) ends with:\n{2}")]
    DidNotStart(Duration, String, String),
    #[error("cannot start the Firestore emulator: {0}")]
    Io(#[from] std::io::Error),
}

/// A running emulator; dropping it stops it.
pub struct FirestoreEmulator {
    host_port: String,
    guard: Child,
    log: PathBuf,
}

impl FirestoreEmulator {
    /// Starts the emulator on `port` (a free loopback port when `None`) and waits until it
    /// answers.
    pub fn start(port: Option<u16>) -> Result<FirestoreEmulator, Error> {
        FirestoreEmulator::start_with_args(port, Vec::new())
    }

    /// Like [`FirestoreEmulator::start`], but every project on this emulator is held to the
    /// security rules in `rules` (`--rules`) for requests that are not made as the owner.
    pub fn start_with_rules(port: Option<u16>, rules: &Path) -> Result<FirestoreEmulator, Error> {
        // The emulator is started from our working directory, but an absolute path also
        // makes a missing file fail here, with its name, rather than in the emulator's log.
        let rules = std::fs::canonicalize(rules).map_err(|e| {
            std::io::Error::new(e.kind(), format!("rules file {}: {e}", rules.display()))
        })?;
        let mut flag = OsString::from("--rules=");
        flag.push(rules);
        FirestoreEmulator::start_with_args(port, vec![flag])
    }

    fn start_with_args(
        port: Option<u16>,
        extra_args: Vec<OsString>,
    ) -> Result<FirestoreEmulator, Error> {
        if Command::new("gcloud")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err(Error::NotInstalled);
        }
        let port = match port {
            Some(port) => port,
            None => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        };
        let host_port = format!("127.0.0.1:{port}");
        let log = std::env::temp_dir().join(format!("ffpush-firestore-emulator-{port}.log"));
        let guard = Command::new("bash")
            .args(["-c", GUARD, "ffpush-firestore-emulator", &host_port])
            .arg(&log)
            .args(extra_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut emulator = FirestoreEmulator {
            host_port,
            guard,
            log,
        };
        emulator.wait_ready(Duration::from_secs(90))?;
        Ok(emulator)
    }

    /// `127.0.0.1:PORT`, the value for `FIRESTORE_EMULATOR_HOST`.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), Error> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.guard.try_wait() {
                break;
            }
            if answers_ok(&self.host_port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        if log.contains("not installed")
            || log.contains("Invalid choice")
            || log.contains("command not found")
        {
            return Err(Error::NotInstalled);
        }
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(Error::DidNotStart(
            limit,
            self.log.display().to_string(),
            tail.join("\n"),
        ))
    }
}

/// The emulator answers `GET /` with "Ok".
fn answers_ok(host_port: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(host_port) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.contains("Ok")
}

impl Drop for FirestoreEmulator {
    fn drop(&mut self) {
        // Closing the guard's stdin makes it kill the emulator group and exit.
        drop(self.guard.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.guard.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.guard.kill();
    }
}

//! A TCP proxy the tests put between ffpush and the Firestore emulator, to make the network
//! fail on purpose: [`Proxy::cut`] closes every connection and refuses new ones (a process or
//! machine restart on the path, a dropped NAT mapping), [`Proxy::blackhole`] keeps the
//! connections but forwards no byte (a partition: calls hang until they time out), and
//! [`Proxy::heal`] lets traffic through again. Bytes held back by a blackhole are forwarded on
//! healing, as TCP retransmission would deliver them.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Open,
    Cut,
    Blackhole,
}

pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`
    /// (`host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, _) = watch::channel(Mode::Open);
        let upstream = upstream.to_string();
        let modes = mode.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *modes.borrow() == Mode::Cut {
                    // Refused: closed at once, before a byte is read.
                    drop(client);
                    continue;
                }
                let modes = modes.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, modes.clone()),
                        pump(server_read, client_write, modes),
                    );
                });
            }
        });
        Proxy { addr, mode, accept }
    }

    /// `host:port` to give ffpush as `FIRESTORE_EMULATOR_HOST`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Closes every open connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Keeps the connections (and accepts new ones) but forwards nothing until healed.
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    pub fn heal(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies `from` to `to` while the proxy is open; holds bytes while it is a blackhole; returns
/// (closing its half) at end of stream, on an error, or when the proxy is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !open(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = mode.wait_for(|m| *m == Mode::Cut) => return,
        };
        // Read before a blackhole began: held until healed, like a packet in a dead link.
        if !open(&mut mode).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits while the proxy is a blackhole; false once it is cut.
async fn open(mode: &mut watch::Receiver<Mode>) -> bool {
    match mode.wait_for(|m| *m != Mode::Blackhole).await {
        Ok(m) => *m == Mode::Open,
        Err(_) => false,
    }
}

//! Shared helpers of the integration tests: a server on 127.0.0.1:0 over
//! in-memory exports, real client tools, and a raw protocol client for
//! sending exactly the bytes a test wants (including hostile ones).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use basalt_nbd::proto::{self, OptionHeader, RequestHeader};
use basalt_nbd::testing::{MemBackend, MemRegistry};
use basalt_nbd::{NbdConfig, NbdError, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long any single step of a test may take before it counts as hung.
pub const STEP: Duration = Duration::from_secs(60);

/// A running server and handles on its exports.
pub struct TestServer {
    pub port: u16,
    pub registry: Arc<MemRegistry>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), NbdError>>,
}

impl TestServer {
    /// Starts a server exporting one in-memory disk per `(name, size)`.
    pub async fn start(exports: &[(&str, u64)]) -> (TestServer, Vec<Arc<MemBackend>>) {
        Self::start_with(exports, NbdConfig::default()).await
    }

    pub async fn start_with(
        exports: &[(&str, u64)],
        config: NbdConfig,
    ) -> (TestServer, Vec<Arc<MemBackend>>) {
        let registry = Arc::new(MemRegistry::new());
        let mut backends = Vec::new();
        for (name, size) in exports {
            let backend = MemBackend::new(*size);
            registry.insert(name, &format!("test export {name}"), backend.clone());
            backends.push(backend);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (stop, shutdown) = watch::channel(false);
        let server = NbdServer::with_config(registry.clone(), config);
        let task = tokio::spawn(async move { server.serve(listener, shutdown).await });
        (
            TestServer {
                port,
                registry,
                stop,
                task,
            },
            backends,
        )
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// Asks the server to shut down and waits for `serve` to return.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let result = tokio::time::timeout(STEP, self.task)
            .await
            .expect("server did not stop in time")
            .expect("server task panicked");
        result.expect("serve returned an error");
    }

    /// Signals shutdown without waiting.
    pub fn signal_stop(&self) {
        let _ = self.stop.send(true);
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub async fn join(self) -> Result<(), NbdError> {
        tokio::time::timeout(STEP, self.task)
            .await
            .expect("server did not stop in time")
            .expect("server task panicked")
    }
}

/// Absolute path of a client tool; fails the test (never skips it) when missing.
pub fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/local/bin"])
    {
        let candidate = PathBuf::from(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the NBD integration tests need `{name}`, which is not installed \
         (Debian: apt-get install -y qemu-utils libnbd-bin fio)"
    );
}

/// Runs a tool to completion (with a time limit) and returns its output.
/// Tools run in a scratch directory so that nothing they write (fio's
/// verify state, for one) lands in the source tree.
pub async fn run(name: &str, args: &[&str]) -> Output {
    let scratch = tempfile::tempdir().expect("scratch directory");
    let mut cmd = tokio::process::Command::new(tool(name));
    cmd.args(args)
        .current_dir(scratch.path())
        .kill_on_drop(true);
    tokio::time::timeout(STEP, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{name} {args:?} did not finish in time"))
        .unwrap_or_else(|e| panic!("could not run {name}: {e}"))
}

/// Runs a tool and fails the test unless it exits successfully; returns stdout.
pub async fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} {args:?} failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// Deterministic, non-repeating test bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// A raw protocol client
// ---------------------------------------------------------------------------

/// One structured reply chunk as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    pub fn done(&self) -> bool {
        self.flags & proto::NBD_REPLY_FLAG_DONE != 0
    }

    pub fn error(&self) -> Option<(u32, String)> {
        if self.kind & 0x8000 == 0 {
            return None;
        }
        let errno = u32::from_be_bytes(self.payload[..4].try_into().ok()?);
        let len = u16::from_be_bytes(self.payload[4..6].try_into().ok()?) as usize;
        Some((
            errno,
            String::from_utf8_lossy(&self.payload[6..6 + len]).into_owned(),
        ))
    }
}

/// A reply as the raw client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple { errno: u32, cookie: u64 },
    Chunk(Chunk),
}

pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    /// Connects and checks the greeting; sends nothing.
    pub async fn connect(port: u16) -> RawClient {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut greeting = [0u8; proto::GREETING_LEN];
        stream
            .read_exact(&mut greeting)
            .await
            .expect("read greeting");
        assert_eq!(greeting, proto::greeting());
        RawClient { stream }
    }

    /// Connects and sends fixed-newstyle client flags (with NO_ZEROES).
    pub async fn handshake(port: u16) -> RawClient {
        let mut c = RawClient::connect(port).await;
        c.send(&3u32.to_be_bytes()).await;
        c
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    pub async fn option(&mut self, option: u32, payload: &[u8]) {
        let header = OptionHeader {
            option,
            length: payload.len() as u32,
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(payload);
        self.send(&bytes).await;
    }

    /// Reads one option reply: (option, reply type, payload).
    pub async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.read_exact(&mut h).await;
        assert_eq!(&h[..8], &proto::OPTION_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
        let mut payload = vec![0u8; len];
        self.read_exact(&mut payload).await;
        (option, kind, payload)
    }

    /// Reads option replies up to and including the final one (ACK or error).
    pub async fn option_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let r = self.option_reply().await;
            let last = r.1 == proto::NBD_REP_ACK || r.1 & 0x8000_0000 != 0;
            all.push(r);
            if last {
                return all;
            }
        }
    }

    /// NBD_OPT_GO with the given name and info requests; returns all replies.
    pub async fn go(&mut self, name: &str) -> Vec<(u32, u32, Vec<u8>)> {
        self.option(proto::NBD_OPT_GO, &info_payload(name, &[]))
            .await;
        self.option_replies().await
    }

    /// Negotiates (optionally) structured replies and base:allocation, then GO.
    /// Panics unless transmission is entered.
    pub async fn open(port: u16, name: &str, structured: bool, block_status: bool) -> RawClient {
        let mut c = RawClient::handshake(port).await;
        if structured {
            c.option(proto::NBD_OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(c.option_reply().await.1, proto::NBD_REP_ACK);
        }
        if block_status {
            c.option(
                proto::NBD_OPT_SET_META_CONTEXT,
                &meta_payload(name, &["base:allocation"]),
            )
            .await;
            let r = c.option_replies().await;
            assert_eq!(r.len(), 2, "{r:?}");
        }
        let r = c.go(name).await;
        assert_eq!(r.last().map(|r| r.1), Some(proto::NBD_REP_ACK), "{r:?}");
        c
    }

    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) {
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.send(&h.encode()).await;
    }

    pub async fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let h = RequestHeader {
            flags,
            command: proto::NBD_CMD_WRITE,
            cookie,
            offset,
            length: data.len() as u32,
        };
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(data);
        self.send(&bytes).await;
    }

    pub async fn read_exact(&mut self, buf: &mut [u8]) {
        tokio::time::timeout(STEP, self.stream.read_exact(buf))
            .await
            .expect("server reply timed out")
            .expect("server closed the connection");
    }

    /// Reads a reply header: a simple reply (payload not read) or a whole chunk.
    pub async fn reply(&mut self) -> Reply {
        let mut magic = [0u8; 4];
        self.read_exact(&mut magic).await;
        match u32::from_be_bytes(magic) {
            proto::NBD_SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                self.read_exact(&mut rest).await;
                Reply::Simple {
                    errno: u32::from_be_bytes(rest[..4].try_into().expect("4")),
                    cookie: u64::from_be_bytes(rest[4..].try_into().expect("8")),
                }
            }
            proto::NBD_STRUCTURED_REPLY_MAGIC => {
                let mut rest = [0u8; 16];
                self.read_exact(&mut rest).await;
                let len = u32::from_be_bytes(rest[12..16].try_into().expect("4")) as usize;
                let mut payload = vec![0u8; len];
                self.read_exact(&mut payload).await;
                Reply::Chunk(Chunk {
                    flags: u16::from_be_bytes([rest[0], rest[1]]),
                    kind: u16::from_be_bytes([rest[2], rest[3]]),
                    cookie: u64::from_be_bytes(rest[4..12].try_into().expect("8")),
                    payload,
                })
            }
            other => panic!("unexpected reply magic {other:#x}"),
        }
    }

    /// Expects a simple reply; returns (errno, cookie).
    pub async fn simple(&mut self) -> (u32, u64) {
        match self.reply().await {
            Reply::Simple { errno, cookie } => (errno, cookie),
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// Reads structured chunks until the one marked done.
    pub async fn chunks(&mut self) -> Vec<Chunk> {
        let mut all = Vec::new();
        loop {
            match self.reply().await {
                Reply::Chunk(c) => {
                    let done = c.done();
                    all.push(c);
                    if done {
                        return all;
                    }
                }
                other => panic!("expected a structured chunk, got {other:?}"),
            }
        }
    }

    /// Reads a structured read reply into a buffer of `len` bytes at `offset`.
    pub async fn structured_read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        let mut out = vec![0xeeu8; len];
        let mut error = None;
        for c in self.chunks().await {
            if let Some((errno, _)) = c.error() {
                error = Some(errno);
                continue;
            }
            let at = u64::from_be_bytes(c.payload[..8].try_into().expect("8"));
            let start = (at - offset) as usize;
            match c.kind {
                proto::NBD_REPLY_TYPE_OFFSET_DATA => {
                    out[start..start + c.payload.len() - 8].copy_from_slice(&c.payload[8..]);
                }
                proto::NBD_REPLY_TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().expect("4")) as usize;
                    out[start..start + n].fill(0);
                }
                proto::NBD_REPLY_TYPE_NONE => {}
                other => panic!("unexpected chunk type {other}"),
            }
        }
        match error {
            Some(errno) => Err(errno),
            None => Ok(out),
        }
    }

    /// True once the server has closed the connection (reads EOF or a reset).
    pub async fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        p.extend_from_slice(&i.to_be_bytes());
    }
    p
}

pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

/// Proves the server still serves: a fresh client writes and reads back.
pub async fn assert_server_healthy(port: u16, export: &str) {
    let mut c = RawClient::open(port, export, false, false).await;
    let data = pattern(4096, 99);
    c.write(0, 1, 0, &data).await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(proto::NBD_CMD_READ, 0, 2, 0, 4096).await;
    assert_eq!(c.simple().await, (0, 2));
    let mut back = vec![0u8; 4096];
    c.read_exact(&mut back).await;
    assert_eq!(back, data);
    c.request(proto::NBD_CMD_DISC, 0, 3, 0, 0).await;
    assert!(c.closed_by_server().await);
}

/// Compares byte buffers, reporting the first difference instead of both buffers.
#[track_caller]
pub fn assert_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    if let Some(at) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: first difference at byte {at}: got {:#04x}, expected {:#04x}",
            actual[at], expected[at]
        );
    }
}

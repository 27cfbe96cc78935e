//! Shared helpers of basaltd's end-to-end tests: real `basaltd` processes on
//! free 127.0.0.1 ports with their own data directories under `/var/tmp`, the
//! `basalt` CLI, external client tools with time limits, a small NBD client
//! ([`nbd`]) and deterministic test data.
//!
//! Every process a test starts is killed by PID when its guard drops, also
//! when the test panics. Required tools that are missing fail the test with a
//! message saying what to install; nothing is skipped.

#![allow(dead_code)]

pub mod nbd;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_api::NodeStatus;
use rand::Rng;
use serde_json::Value;

/// How long a daemon may take to answer `/api/v1/health` (recovery included).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an external tool may run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Size of the file disk each daemon gets by default.
pub const DISK_SIZE: &str = "2G";

/// Bytes in a vdisk block.
pub const BLOCK: usize = 4096;
/// Bytes in an extent.
pub const EXTENT: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Binaries and tools
// ---------------------------------------------------------------------------

/// The daemon under test.
pub fn basaltd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_basaltd"))
}

/// The CLI, which `cargo build --workspace --bins` puts next to `basaltd`.
pub fn basalt_bin() -> PathBuf {
    let daemon = basaltd_bin();
    let dir = daemon
        .parent()
        .expect("CARGO_BIN_EXE_basaltd has a parent directory");
    let cli = dir.join("basalt");
    assert!(
        cli.is_file(),
        "the CLI binary {} is missing: the end-to-end tests drive the real `basalt` CLI, \
         which is not a binary of the basaltd package; build it first with \
         `cargo build --workspace --bins` (scripts/test.sh does)",
        cli.display()
    );
    cli
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists")
}

fn install_hint(name: &str) -> &'static str {
    match name {
        "qemu-img" | "qemu-io" | "qemu-nbd" => "Debian package qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" => "Debian package libnbd-bin",
        "fio" => "Debian package fio (3.x, built with the nbd engine)",
        "qemu-system-x86_64" => "Debian package qemu-system-x86",
        "qemu-storage-daemon" => "Debian package qemu-system-common",
        "busybox" => "Debian package busybox-static",
        "cp" | "sh" => "coreutils / a POSIX shell",
        _ => "see scripts/install-test-deps.sh",
    }
}

/// Absolute path of an external tool. A missing tool fails the test (it is
/// never skipped).
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let fallbacks = ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"].map(PathBuf::from);
    for dir in std::env::split_paths(&path).chain(fallbacks) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "this test needs `{name}`, which is not installed ({}); \
         scripts/install-test-deps.sh installs every test dependency",
        install_hint(name)
    );
}

/// Kills a child process by PID when dropped (unless it already exited).
pub struct ChildGuard {
    /// The process.
    pub child: Child,
    /// Name for messages.
    pub name: String,
}

impl ChildGuard {
    /// Waits up to `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() >= deadline => return None,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
    }

    /// SIGKILL (by PID) and reap.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a pipe to the end on a thread.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut out);
        }
        out
    })
}

/// Runs `cmd` to completion with a time limit (killed by PID on timeout,
/// which fails the test) and returns its output.
pub fn run_command(mut cmd: Command, what: &str, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut guard = ChildGuard {
        child,
        name: what.to_string(),
    };
    let stdout = drain(guard.child.stdout.take());
    let stderr = drain(guard.child.stderr.take());
    let Some(status) = guard.wait_timeout(timeout) else {
        guard.kill();
        let out = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
        let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
        panic!(
            "{what} did not finish within {timeout:?}; killed it\nstdout:\n{out}\nstderr:\n{err}"
        );
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Runs an external tool in a scratch directory (fio leaves state files
/// behind) with a time limit.
pub fn run_tool(name: &str, args: &[&str]) -> Output {
    let scratch = tempfile::Builder::new()
        .prefix("basalt-e2e-tool-")
        .tempdir_in(scratch_root())
        .expect("scratch directory for a tool");
    let mut cmd = Command::new(tool(name));
    cmd.args(args).current_dir(scratch.path());
    run_command(cmd, &format!("{name} {}", args.join(" ")), TOOL_TIMEOUT)
}

/// Runs a tool and fails the test unless it succeeds; returns its stdout.
pub fn run_tool_ok(name: &str, args: &[&str]) -> String {
    let out = run_tool(name, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} {} failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------
// Directories, ports, seeds, data
// ---------------------------------------------------------------------------

/// Where test directories go: `/var/tmp` (a real filesystem, so the daemon
/// can use O_DIRECT), or `$BASALT_TEST_TMPDIR`.
pub fn scratch_root() -> PathBuf {
    let root = std::env::var_os("BASALT_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&root)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
    root
}

/// A fresh directory of its own for one test.
pub fn test_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("basalt-e2e-{prefix}-"))
        .tempdir_in(scratch_root())
        .expect("test directory under /var/tmp")
}

/// A 127.0.0.1 port that was free a moment ago (below the ephemeral range,
/// so outgoing connections do not take it). A daemon that still finds it
/// taken is restarted on other ports by [`Daemon`].
pub fn pick_port() -> u16 {
    let mut rng = rand::thread_rng();
    loop {
        let port = rng.gen_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The seed of a randomized test: `$BASALT_TEST_SEED`, or fresh (printed so
/// a failure can be reproduced).
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("BASALT_TEST_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("BASALT_TEST_SEED={text:?} is not a number")),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    eprintln!("{test}: seed {seed} (reproduce with BASALT_TEST_SEED={seed})");
    seed
}

/// A tiny fast PRNG for bulk test data (debug builds of cryptographic RNGs
/// are slow for hundreds of MiB).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator; any seed works.
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// `len` random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    XorShift::new(seed).fill(&mut buf);
    buf
}

/// FNV-1a, 64 bits: the checksum of self-describing blocks.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Magic of a self-describing test block.
pub const TAG_MAGIC: &[u8; 8] = b"BSLTE2E1";

/// A self-describing 4 KiB block: magic, vdisk block number, sequence
/// number, filler derived from both, FNV-1a of everything before it.
///
/// | bytes | field |
/// |---|---|
/// | 0..8 | `BSLTE2E1` |
/// | 8..16 | block number (u64 LE) |
/// | 16..24 | sequence number of the write (u64 LE) |
/// | 24..4088 | filler from XorShift(block, seq) |
/// | 4088..4096 | FNV-1a 64 of bytes 0..4088 |
pub fn tagged_block(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(TAG_MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    XorShift::new(block.rotate_left(32) ^ seq ^ 0x5eed).fill(&mut b[24..BLOCK - 8]);
    let sum = fnv64(&b[..BLOCK - 8]);
    b[BLOCK - 8..].copy_from_slice(&sum.to_le_bytes());
    b
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockContent {
    /// All zeros (never written, or discarded).
    Zero,
    /// A valid self-describing block.
    Tagged {
        /// Block number written in it.
        block: u64,
        /// Sequence number written in it.
        seq: u64,
    },
    /// Anything else: torn, corrupted or foreign data.
    Garbage,
}

/// Classifies 4 KiB read back from a vdisk.
pub fn parse_block(data: &[u8]) -> BlockContent {
    assert_eq!(data.len(), BLOCK);
    if data.iter().all(|&b| b == 0) {
        return BlockContent::Zero;
    }
    if &data[0..8] != TAG_MAGIC {
        return BlockContent::Garbage;
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&data[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let (block, seq) = (word(8), word(16));
    if word(BLOCK - 8) != fnv64(&data[..BLOCK - 8]) || tagged_block(block, seq) != data {
        return BlockContent::Garbage;
    }
    BlockContent::Tagged { block, seq }
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// `--engine` (`auto` when `None`).
    pub engine: Option<&'static str>,
    /// Size of the file disk created in the test directory.
    pub disk_size: &'static str,
    /// Use this disk file instead (no size given).
    pub disk_path: Option<PathBuf>,
    /// No `--disk` flag at all: the node's known disks, or its default disk.
    pub no_disk_flag: bool,
    /// `--memory-budget`.
    pub memory_budget: Option<&'static str>,
    /// More flags.
    pub extra: Vec<String>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            engine: None,
            disk_size: DISK_SIZE,
            disk_path: None,
            no_disk_flag: false,
            memory_budget: None,
            extra: Vec::new(),
        }
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Content-Type header, if any.
    pub content_type: Option<String>,
    /// Body text.
    pub body: String,
}

impl HttpAnswer {
    /// The body as JSON (fails the test if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {:?}", self.body))
    }
}

/// What the CLI did.
#[derive(Debug)]
pub struct CliOutput {
    /// Command line, for messages.
    pub args: Vec<String>,
    /// Exit status.
    pub status: ExitStatus,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

impl CliOutput {
    /// Fails unless the command failed with exactly one error line on stderr
    /// that contains every one of `needles`.
    pub fn assert_error(&self, needles: &[&str]) {
        assert!(
            !self.status.success(),
            "basalt {:?} should have failed but succeeded:\n{}",
            self.args,
            self.stdout
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "basalt {:?} should print one error line, printed:\n{}",
            self.args,
            self.stderr
        );
        assert!(
            lines[0].starts_with("error: "),
            "basalt {:?}: error line does not start with `error: `: {}",
            self.args,
            lines[0]
        );
        for needle in needles {
            assert!(
                lines[0].contains(needle),
                "basalt {:?}: error line lacks {needle:?}: {}",
                self.args,
                lines[0]
            );
        }
    }
}

/// A running `basaltd` with its own directory and ports. Dropping it kills
/// the process (SIGKILL by PID); its directory is removed.
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// The disk file.
    pub disk: PathBuf,
    /// Port of the REST API.
    pub api_port: u16,
    /// Port of the NBD server.
    pub nbd_port: u16,
    /// Port of the node-to-node listener.
    pub listen_port: u16,
    options: DaemonOptions,
    log: PathBuf,
    starts: u32,
}

impl Daemon {
    /// A daemon with default options, serving.
    pub fn start() -> Daemon {
        Daemon::start_with(DaemonOptions::default())
    }

    /// A daemon with `options`, serving.
    pub fn start_with(options: DaemonOptions) -> Daemon {
        let dir = test_dir("daemon");
        let data_dir = dir.path().join("data");
        let disk = options
            .disk_path
            .clone()
            .unwrap_or_else(|| dir.path().join("d0.img"));
        let log = dir.path().join("basaltd.log");
        let mut daemon = Daemon {
            child: None,
            data_dir,
            disk,
            api_port: pick_port(),
            nbd_port: pick_port(),
            listen_port: pick_port(),
            options,
            log,
            starts: 0,
            dir,
        };
        daemon.launch();
        daemon
    }

    /// The test directory (data dir and disk live in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Command-line arguments of this daemon.
    pub fn args(&self) -> Vec<String> {
        let disk = match &self.options.disk_path {
            Some(path) => path.display().to_string(),
            None => format!("{}:{}", self.disk.display(), self.options.disk_size),
        };
        let mut args = vec![
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
        ];
        if !self.options.no_disk_flag {
            args.extend(["--disk".to_string(), disk]);
        }
        args.extend([
            "--api".to_string(),
            format!("127.0.0.1:{}", self.api_port),
            "--nbd".to_string(),
            format!("127.0.0.1:{}", self.nbd_port),
            "--listen".to_string(),
            format!("127.0.0.1:{}", self.listen_port),
        ]);
        if let Some(engine) = self.options.engine {
            args.extend(["--engine".to_string(), engine.to_string()]);
        }
        if let Some(budget) = self.options.memory_budget {
            args.extend(["--memory-budget".to_string(), budget.to_string()]);
        }
        args.extend(self.options.extra.iter().cloned());
        args
    }

    fn spawn(&mut self) -> u64 {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log file");
        let args = self.args();
        let _ = writeln!(log, "=== start {}: basaltd {}", self.starts, args.join(" "));
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let err = log.try_clone().expect("daemon log file");
        let child = daemon_command(&args)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", basaltd_bin().display()));
        self.child = Some(child);
        offset
    }

    /// Starts the process and waits until it serves; picks new ports when
    /// one turned out to be taken.
    fn launch(&mut self) {
        if let Err(text) = self.try_launch() {
            panic!("{text}");
        }
    }

    /// Like `launch`, but a daemon that exits before serving is an `Err`
    /// with what it logged.
    fn try_launch(&mut self) -> Result<(), String> {
        for _attempt in 0..5 {
            let offset = self.spawn();
            match self.wait_healthy() {
                Ok(()) => return Ok(()),
                Err(status) => {
                    let text = self.log_since(offset);
                    if text.contains("Address already in use") {
                        eprintln!("port taken, retrying on other ports:\n{text}");
                        self.api_port = pick_port();
                        self.nbd_port = pick_port();
                        self.listen_port = pick_port();
                        continue;
                    }
                    return Err(format!(
                        "basaltd exited with {status} before serving:\n{text}"
                    ));
                }
            }
        }
        Err("basaltd found its ports taken five times".into())
    }

    /// Waits for `/api/v1/health` to answer 200; `Err` if the process exits.
    fn wait_healthy(&mut self) -> Result<(), ExitStatus> {
        let deadline = Instant::now() + START_TIMEOUT;
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        let url = format!("{}/api/v1/health", self.api_url());
        loop {
            let child = self.child.as_mut().expect("daemon was started");
            if let Some(status) = child.try_wait().expect("try_wait on basaltd") {
                self.child = None;
                return Err(status);
            }
            if let Ok(response) = agent.get(&url).call()
                && response.status() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!(
                    "basaltd did not answer {url} within {START_TIMEOUT:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; waits for the exit and returns its status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon is running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on the PID of a child we have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM {pid}");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait on basaltd") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "basaltd did not exit within {STOP_TIMEOUT:?} of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and check the daemon stopped cleanly (exit 0).
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "basaltd exited with {status} after SIGTERM:\n{}",
            self.log_text()
        );
    }

    /// Changes the options used by the next restart.
    pub fn options_mut(&mut self) -> &mut DaemonOptions {
        &mut self.options
    }

    /// Starts the daemon again on the same data dir and disk (and ports, if
    /// still free) and waits until it serves.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running daemon");
        self.launch();
    }

    /// Restarts; `Err` with its log when the daemon refuses to start.
    pub fn try_restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "restart of a running daemon");
        self.try_launch()
    }

    /// Base URL of the REST API.
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// NBD URI of a vdisk.
    pub fn nbd_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.nbd_port)
    }

    /// Everything the daemon logged (all starts).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_since(&self, offset: u64) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(text.len());
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let api = self.api_url();
        let mut full = vec!["--api", api.as_str()];
        full.extend_from_slice(args);
        run_cli(&full)
    }

    /// Runs the CLI and fails the test unless it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "basalt {args:?} failed with {}:\n{}\ndaemon log:\n{}",
            out.status,
            out.stderr,
            self.log_text()
        );
        out.stdout
    }

    /// Runs the CLI with `--json` and parses what it printed.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let stdout = self.cli_ok(&full);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("basalt --json {args:?} printed no JSON ({e}):\n{stdout}"))
    }

    /// Creates a vdisk through the CLI; returns its JSON description.
    pub fn create_vdisk(&self, name: &str, size: &str) -> Value {
        let v = self.cli_json(&["vdisk", "create", name, "--size", size]);
        assert_eq!(v["name"], name, "created vdisk: {v}");
        v
    }

    /// Waits (up to 30 s) until `name` is exported over vhost-user, as a
    /// restarted daemon does again for exports made by hand; its socket.
    pub fn wait_for_vhost_export(&self, name: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.cli_json(&["vdisk", "show", name]);
            if let Some(socket) = v["vhost_socket"].as_str() {
                return socket.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{name} was not exported again after the restart: {v}\n{}",
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A counter or gauge from `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> u64 {
        let answer = self.http("GET", "/metrics", None);
        assert_eq!(answer.status, 200, "{answer:?}");
        answer
            .body
            .lines()
            .filter_map(|line| line.strip_prefix(name))
            .filter_map(|rest| rest.trim().strip_prefix("_total ").or(Some(rest.trim())))
            .filter_map(|value| value.trim().parse::<f64>().ok())
            .map(|value| value as u64)
            .next()
            .unwrap_or(0)
    }

    /// One HTTP request to the daemon.
    pub fn http(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> HttpAnswer {
        http_request(method, &format!("{}{path}", self.api_url()), body)
    }

    /// `GET /api/v1/status`.
    pub fn status(&self) -> NodeStatus {
        let answer = self.http("GET", "/api/v1/status", None);
        assert_eq!(answer.status, 200, "status: {answer:?}");
        serde_json::from_str(&answer.body)
            .unwrap_or_else(|e| panic!("status is not a NodeStatus ({e}): {}", answer.body))
    }

    /// An NBD connection to a vdisk.
    pub fn nbd(&self, name: &str) -> nbd::NbdClient {
        nbd::NbdClient::connect(self.nbd_port, name)
            .unwrap_or_else(|e| panic!("NBD connection to {name}: {e}\n{}", self.log_tail(40)))
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Daemon {
    /// PIDs of the QEMU processes this node's supervisor started (from the
    /// run directories' `instance.json`), alive or not.
    pub fn qemu_pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.data_dir.join("vms")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("instance.json")).ok())
            .filter_map(|text| serde_json::from_slice::<Value>(&text).ok())
            .filter_map(|v| v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
            .collect()
    }

    /// Kills (SIGKILL, by PID) the QEMU processes of this node's VMs, as a
    /// dying host would take them along.
    pub fn kill_qemus(&self) {
        self.signal_qemus(libc::SIGKILL);
    }

    /// Sends `signal` (by PID) to the QEMU processes of this node's VMs.
    pub fn signal_qemus(&self, signal: i32) {
        for pid in self.qemu_pids() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let marker = self.data_dir.display().to_string();
            if String::from_utf8_lossy(&cmdline).contains(&marker)
                && let Ok(pid) = i32::try_from(pid)
            {
                // SAFETY: kill(2) with plain integers; the pid was checked
                // to be a QEMU of this test's data directory just now.
                unsafe { libc::kill(pid, signal) };
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // QEMU outlives basaltd by design: the test's VMs go too.
        self.kill_qemus();
        if std::thread::panicking() {
            eprintln!(
                "--- basaltd log ({}) ---\n{}\n--- end of log ---",
                self.log.display(),
                self.log_tail(80)
            );
        }
    }
}

/// A `basaltd` command with the environment tests want: no anyhow
/// backtraces in error messages, and killed if the thread that started it
/// dies (a test process killed by a harness timeout does not leak daemons).
/// Start a daemon on the thread that drops it: `PR_SET_PDEATHSIG` fires
/// when the *thread* that forked exits.
pub fn daemon_command(args: &[String]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(basaltd_bin());
    cmd.args(args)
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Starts `basaltd` with `args` and expects it to refuse: it must exit with
/// a failure within 30 s. Returns what it printed.
pub fn daemon_must_refuse(args: &[String]) -> String {
    let mut cmd = daemon_command(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("start basaltd");
    let mut guard = ChildGuard {
        child,
        name: "basaltd".into(),
    };
    let stdout = drain(guard.child.stdout.take());
    let stderr = drain(guard.child.stderr.take());
    let status = guard.wait_timeout(Duration::from_secs(30));
    guard.kill();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout.join().unwrap_or_default()),
        String::from_utf8_lossy(&stderr.join().unwrap_or_default())
    );
    match status {
        None => panic!("basaltd {args:?} should have refused to start but kept running:\n{text}"),
        Some(status) => assert!(
            !status.success(),
            "basaltd {args:?} should have failed but exited 0:\n{text}"
        ),
    }
    text
}

/// Runs the CLI with exactly `args`.
pub fn run_cli(args: &[&str]) -> CliOutput {
    let mut cmd = Command::new(basalt_bin());
    cmd.args(args).env_remove("BASALT_API");
    let out = run_command(cmd, &format!("basalt {}", args.join(" ")), TOOL_TIMEOUT);
    CliOutput {
        args: args.iter().map(|s| s.to_string()).collect(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One HTTP request; `body` is (content type, text).
pub fn http_request(method: &str, url: &str, body: Option<(&str, &str)>) -> HttpAnswer {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let request = agent.request(method, url);
    let result = match body {
        Some((content_type, text)) => request.set("Content-Type", content_type).send_string(text),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let content_type = response.header("content-type").map(str::to_string);
    let body = response.into_string().expect("HTTP body is text");
    HttpAnswer {
        status,
        content_type,
        body,
    }
}

/// Compares two files byte for byte; the message names the first difference.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let mut fa = File::open(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let mut fb = File::open(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    let (la, lb) = (
        fa.metadata().expect("metadata").len(),
        fb.metadata().expect("metadata").len(),
    );
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < la {
        let n = usize::try_from((la - at).min(1 << 20)).expect("chunk fits usize");
        fa.read_exact(&mut ba[..n]).expect("read");
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0);
            panic!(
                "{} and {} differ first at byte {}",
                a.display(),
                b.display(),
                at + i as u64
            );
        }
        at += n as u64;
    }
}

/// A cluster member with a `disk_size` file disk: bootstraps a cluster, or
/// joins the member whose `--listen` port is `join`; `extra` flags follow.
pub fn cluster_member(
    join: Option<u16>,
    disk_size: &'static str,
    dead_after_seconds: u32,
    extra: &[&str],
) -> Daemon {
    let mut flags = vec!["--dead-after".to_string(), dead_after_seconds.to_string()];
    flags.extend(extra.iter().map(|flag| flag.to_string()));
    if let Some(port) = join {
        flags.extend(["--join".to_string(), format!("127.0.0.1:{port}")]);
    }
    Daemon::start_with(DaemonOptions {
        disk_size,
        extra: flags,
        ..DaemonOptions::default()
    })
}

/// Polls `check` every 200 ms; fails the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Builds (or reuses) the tiny test guest (`tests/guest/build-guest.sh`)
/// under an exclusive lock; returns (kernel, initrd). Cached in
/// `/var/tmp/basalt-guest` or `$BASALT_GUEST_DIR`.
pub fn guest_image() -> (PathBuf, PathBuf) {
    use std::os::fd::AsRawFd;
    let dir = std::env::var_os("BASALT_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/basalt-guest"));
    let parent = dir.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).expect("guest cache parent directory");
    let lock_path = dir.with_extension("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("{}: {e}", lock_path.display()));
    // SAFETY: flock(2) on a descriptor this function owns; released when
    // `lock` is closed at the end of the function.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}", lock_path.display());
    let mut cmd = Command::new(tool("sh"));
    cmd.arg(workspace_root().join("tests/guest/build-guest.sh"))
        .arg(&dir);
    let out = run_command(cmd, "tests/guest/build-guest.sh", Duration::from_secs(900));
    assert!(
        out.status.success(),
        "building the test guest failed ({}); it needs apt-get, dpkg-deb and busybox-static:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(lock);
    (dir.join("vmlinuz"), dir.join("initrd"))
}

// Kept in sync with the test guest's /init (tests/guest/build-guest.sh).
/// Byte offset of the pattern the guest's `write-pattern` writes.
pub const GUEST_PATTERN_OFFSET: u64 = 1 << 20;
/// Blocks of that pattern.
pub const GUEST_PATTERN_BLOCKS: u64 = 256;

/// Block `i` of the guest's patterns: "basalt WORD block i", padded with
/// spaces to 4095 bytes, then a newline.
pub fn guest_pattern_block(word: &str, i: u64) -> Vec<u8> {
    let mut block = format!("{:<4095}\n", format!("basalt {word} block {i}")).into_bytes();
    block.truncate(4096);
    block
}

/// Reads the pattern the guest's `write-pattern` wrote to `vdisk` over NBD
/// through `daemon`, failing on the first block that differs.
pub fn assert_guest_pattern(daemon: &Daemon, vdisk: &str) {
    let mut client = daemon.nbd(vdisk);
    let data = client
        .read_all(GUEST_PATTERN_OFFSET, GUEST_PATTERN_BLOCKS * 4096)
        .expect("read the guest's pattern over NBD");
    for (i, got) in data.chunks(4096).enumerate() {
        assert!(
            got == guest_pattern_block("guest", i as u64),
            "guest block {i} of {vdisk} reads {:?} over NBD",
            String::from_utf8_lossy(&got[..40])
        );
    }
    client.disconnect();
}

/// The last count a test guest printed as `TAG: n` on its console (0 if
/// none): `BASALT-SEQ` (sequence blocks written), `BASALT-READS`.
pub fn guest_count(console: &str, tag: &str) -> u64 {
    let prefix = format!("{tag}: ");
    console
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(prefix.as_str()))
        .filter_map(|n| n.parse().ok())
        .next_back()
        .unwrap_or(0)
}

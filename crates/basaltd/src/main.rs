//! `basaltd`: the Basalt node daemon.
//!
//! Composition root: parses flags, opens the store on the node's disks, and
//! starts the NBD server, the REST API (with metrics and console) and the
//! vhost-user exports. SIGTERM or SIGINT drains everything and exits cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use std::time::Duration;

use basalt_control::{Node, NodeConfig};
use basalt_core::size::parse_size;
use basalt_disk::EngineChoice;
use basalt_meta::{MetaConfig, MetaNode, NodeAnnouncement};
use basalt_net::{Identity, Transport, TransportConfig};

use basalt_store::{DiskSpec, Store, StoreConfig};
use clap::{Parser, ValueEnum};
use tokio::sync::watch;

/// The Basalt node daemon: owns this node's disks and serves vdisks over NBD
/// and vhost-user-blk, with a REST API and web console.
#[derive(Debug, Parser)]
#[command(name = "basaltd", version, about)]
struct Args {
    /// Directory for node metadata (and the default disk).
    #[arg(long, default_value = "./basalt-data", value_name = "DIR")]
    data_dir: PathBuf,

    /// A disk to claim: a block device or a file, created sparse at SIZE
    /// (e.g. 64G) when missing. Repeat for more disks. Without any, the disks
    /// already known to the node are used, or one 16 GiB file disk is created
    /// under the data directory.
    #[arg(long = "disk", value_name = "PATH[:SIZE]")]
    disks: Vec<String>,

    /// Address of the REST API and web console.
    #[arg(long, default_value = "127.0.0.1:7480", value_name = "HOST:PORT")]
    api: SocketAddr,

    /// Address of the NBD server.
    #[arg(long, default_value = "127.0.0.1:10809", value_name = "HOST:PORT")]
    nbd: SocketAddr,

    /// Directory for vhost-user sockets [default: DATA_DIR/vhost].
    #[arg(long, value_name = "DIR")]
    vhost_dir: Option<PathBuf>,

    /// Address for node-to-node traffic (Raft, replication); other members
    /// reach this node here, so it must be an address they can connect to.
    #[arg(long, default_value = "127.0.0.1:7481", value_name = "HOST:PORT")]
    listen: SocketAddr,

    /// Join the cluster of the member listening at HOST:PORT (its --listen).
    /// Ignored once the node belongs to a cluster. Without it, a node with no
    /// cluster state bootstraps a new one-node cluster.
    #[arg(long, value_name = "HOST:PORT")]
    join: Option<String>,

    /// Seconds a silent node or disk waits before it is declared dead (and
    /// its replicas rebuilt elsewhere).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    dead_after: u64,

    /// Do not move existing replicas onto less loaded members (e.g. one that
    /// just joined). Give it to every node: the Raft leader decides.
    #[arg(long)]
    no_rebalance: bool,

    /// Serve fault-injection endpoints (network partitions) for tests.
    #[arg(long, hide = true)]
    fault_injection: bool,

    /// Claim disks labelled for another node or holding other data,
    /// destroying their contents.
    #[arg(long)]
    force_claim: bool,

    /// Disk engine.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,

    /// Threads serving I/O and the API [default: half the CPUs, at least
    /// one: on a hyperconverged host the rest belong to the guests].
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,

    /// The QEMU binary that runs VMs.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    qemu: PathBuf,

    /// Accelerator of VMs: `auto` uses KVM when a timed probe runs guest
    /// code faster under it than under TCG, else TCG.
    #[arg(long, value_enum, default_value_t = VmAccel::Auto)]
    vm_accel: VmAccel,

    /// vCPUs offered to VMs per host CPU.
    #[arg(long, default_value_t = 4.0, value_name = "RATIO")]
    vm_cpu_overcommit: f64,

    /// Memory offered to VMs [default: the host's memory minus 1 GiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    vm_memory: Option<u64>,

    /// Memory offered to VMs per byte of --vm-memory.
    #[arg(long, default_value_t = 1.0, value_name = "RATIO")]
    vm_memory_overcommit: f64,

    /// Written data held in memory before writers wait for it to drain.
    #[arg(long, default_value = "128M", value_name = "SIZE", value_parser = parse_size_arg)]
    memory_budget: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Engine {
    /// io_uring with O_DIRECT where the filesystem allows it, else pread/pwrite.
    Auto,
    /// io_uring with O_DIRECT only.
    Uring,
    /// pread/pwrite through the page cache.
    Sync,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum VmAccel {
    /// KVM if it works here, else TCG.
    Auto,
    /// Hardware virtualization.
    Kvm,
    /// QEMU's binary translation.
    Tcg,
}

/// The host's memory in bytes (`MemTotal` of /proc/meminfo).
fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib << 10)
}

/// How this node runs VMs, from the flags.
fn vm_config(args: &Args) -> basalt_control::vms::VmConfig {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let memory = args
        .vm_memory
        .unwrap_or_else(|| host_memory().saturating_sub(1 << 30));
    basalt_control::vms::VmConfig {
        qemu: args.qemu.clone(),
        accel: match args.vm_accel {
            VmAccel::Auto => basalt_control::vms::AccelChoice::Auto,
            VmAccel::Kvm => basalt_control::vms::AccelChoice::Kvm,
            VmAccel::Tcg => basalt_control::vms::AccelChoice::Tcg,
        },
        run_dir: args.data_dir.join("vms"),
        migration_host: args.listen.ip().to_string(),
        vcpus: (cpus * args.vm_cpu_overcommit.max(0.0)) as u64,
        memory_mib: ((memory >> 20) as f64 * args.vm_memory_overcommit.max(0.0)) as u64,
    }
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// Splits `PATH[:SIZE]`; a suffix that is not a size belongs to the path.
fn parse_disk(spec: &str) -> anyhow::Result<DiskSpec> {
    if spec.is_empty() {
        bail!("--disk needs a path");
    }
    if let Some((path, size)) = spec.rsplit_once(':')
        && let Ok(bytes) = parse_size(size)
    {
        if path.is_empty() {
            bail!("--disk {spec:?} has a size but no path");
        }
        return Ok(DiskSpec {
            path: PathBuf::from(path),
            size: Some(bytes),
        });
    }
    Ok(DiskSpec {
        path: PathBuf::from(spec),
        size: None,
    })
}

/// mimalloc instead of glibc malloc: every request allocates and frees I/O
/// buffers and small bookkeeping; glibc spent a tenth of the daemon's CPU on
/// that under load and returned 1 MiB buffers to the kernel after each use
/// (an mmap/munmap pair and fresh page faults per request).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = Args::parse();

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    builder.worker_threads(args.worker_threads.unwrap_or(cpus / 2).max(1));
    let runtime = builder.enable_all().thread_name("basaltd").build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("basaltd: error: starting the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };

    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line, the whole chain of causes, no backtrace.
            tracing::error!("{error:#}");
            eprintln!("basaltd: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = StoreConfig::new(&args.data_dir);
    config.disks = disks;
    config.force_claim = args.force_claim;
    config.memory_budget = args.memory_budget;
    config.engine = match args.engine {
        Engine::Auto => EngineChoice::Auto,
        Engine::Uring => EngineChoice::Uring,
        Engine::Sync => EngineChoice::Sync,
    };
    if args.dead_after == 0 {
        bail!("--dead-after must be at least 1 second");
    }

    // Bind the frontends before opening the store so a taken port fails fast.
    let nbd_listener = tokio::net::TcpListener::bind(args.nbd)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", args.nbd))?;
    let api_listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| format!("cannot listen for the API on {}", args.api))?;
    let peer_listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen for peers on {}", args.listen))?;

    let store = Store::open(config).await.context("opening the store")?;
    let transport = Transport::new(
        Identity {
            cluster_id: uuid::Uuid::nil(),
            node_id: 0,
        },
        TransportConfig::default(),
    );
    let peer_task = transport.serve(peer_listener);
    let meta_config = MetaConfig {
        dead_after: Duration::from_secs(args.dead_after),
        rebalance: !args.no_rebalance,
        ..MetaConfig::default()
    };
    let cluster = MetaNode::open(
        &args.data_dir.join("cluster"),
        transport.clone(),
        meta_config,
    )
    .await
    .context("opening the cluster metadata")?;
    let me = NodeAnnouncement {
        uuid: store.node_id(),
        listen: args.listen.to_string(),
        api: args.api.to_string(),
        nbd: args.nbd.to_string(),
    };
    match (cluster.membership(), &args.join) {
        (Some(membership), join) => {
            if let Some(member) = join {
                tracing::warn!(%member, "this node already belongs to a cluster; --join is ignored");
            }
            tracing::info!(
                cluster = %membership.cluster_id,
                node = membership.node_id,
                "rejoining the cluster"
            );
            // Restarted with another --listen (or --api, --nbd): tell the
            // cluster, in the background (the others may not be up yet).
            let cluster = cluster.clone();
            let me = me.clone();
            tokio::spawn(async move {
                if let Err(error) = cluster.announce_addresses(me).await {
                    tracing::error!(%error, "cannot tell the cluster this node's new addresses");
                }
            });
        }
        (None, Some(member)) => {
            let local = store.list_vdisks();
            if !local.is_empty() {
                bail!(
                    "this node holds {} vdisk(s) ({}) and cannot join a cluster: a joining node must be empty",
                    local.len(),
                    local
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            cluster
                .join(member, me)
                .await
                .with_context(|| format!("joining the cluster at {member}"))?;
        }
        (None, None) => {
            let membership = cluster
                .bootstrap(me)
                .await
                .context("bootstrapping a new cluster")?;
            // A single node's existing vdisks become the cluster's, ids kept.
            for vdisk in store.list_vdisks() {
                let result = cluster
                    .propose(basalt_meta::Command::ImportVdisk {
                        id: vdisk.id,
                        name: vdisk.name.clone(),
                        size: vdisk.size,
                        created: vdisk.created,
                        node: membership.node_id,
                    })
                    .await
                    .with_context(|| format!("importing vdisk {} into the cluster", vdisk.name))?;
                if let basalt_meta::CommandResult::Refused { reason, .. } = result {
                    bail!("importing vdisk {} into the cluster: {reason}", vdisk.name);
                }
            }
        }
    }
    let vhost_dir = args
        .vhost_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("vhost"));
    let node = Node::new(
        store.clone(),
        NodeConfig {
            data_dir: args.data_dir.clone(),
            nbd_address: args.nbd.to_string(),
            vhost_dir,
            fault_injection: args.fault_injection,
            dead_after: Duration::from_secs(args.dead_after),
            vm: vm_config(&args),
        },
        cluster.clone(),
        transport.clone(),
    )?;

    {
        let node = node.clone();
        tokio::spawn(async move { node.offer_vm_capacity().await });
    }
    // Caught from before the first request is served: a SIGTERM that
    // follows the first healthy answer must stop basaltd cleanly, not
    // kill it by the signal's default action.
    let signals = StopSignals::install()?;
    let (stop, stopped) = watch::channel(false);
    let registry: Arc<dyn basalt_core::ExportRegistry> = Arc::new(node.exports());
    let nbd = basalt_nbd::NbdServer::new(registry);
    let nbd_stop = stopped.clone();
    let nbd_task = tokio::spawn(async move { nbd.serve(nbd_listener, nbd_stop).await });

    let app = basalt_control::api::router(node.clone());
    let mut api_stop = stopped.clone();
    let api_task = tokio::spawn(async move {
        axum::serve(api_listener, app)
            .with_graceful_shutdown(async move {
                let _ = api_stop.wait_for(|s| *s).await;
            })
            .await
    });
    tracing::info!(api = %args.api, nbd = %args.nbd, listen = %args.listen, data_dir = %args.data_dir.display(), "basaltd serving");

    signals.wait().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    match nbd_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "NBD server stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "NBD server task failed"),
        Ok(Ok(())) => {}
    }
    if let Ok(Err(e)) = api_task.await {
        tracing::warn!(error = %e, "API server stopped with an error");
    }
    cluster.shutdown().await;
    transport.shutdown();
    let _ = peer_task.await;
    node.shutdown().await.context("shutting the store down")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The signals that stop basaltd (SIGTERM, SIGINT), caught once installed.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Waits for either signal (one that arrived since `install` counts).
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d = parse_disk("/a/b.img:10G").expect("spec");
        assert_eq!(d.path, PathBuf::from("/a/b.img"));
        assert_eq!(d.size, Some(10 << 30));
        let d = parse_disk("/dev/sdb").expect("spec");
        assert_eq!(d.size, None);
        let d = parse_disk("/weird:name").expect("spec");
        assert_eq!(d.path, PathBuf::from("/weird:name"));
        assert!(parse_disk("").is_err());
        assert!(parse_disk(":5G").is_err());
    }
}

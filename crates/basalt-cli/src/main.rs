//! `basalt`: the command-line client of a Basalt node's REST API.
//!
//! Human tables by default, `--json` for scripts. Every error is one line on
//! stderr and a non-zero exit status.

use std::process::ExitCode;

use anyhow::{Context, anyhow};
use basalt_api::{
    ClusterStatus, ConsoleChunk, CreateVdisk, CreateVm, Disk, ErrorBody, MigrateVm, NodeStatus,
    ResizeVdisk, StopVm, StoredFile, Vdisk, VhostExport, Vm,
};
use basalt_core::size::{format_size, parse_size};
use clap::{Args, Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Manage a Basalt node.
#[derive(Debug, Parser)]
#[command(name = "basalt", version, about)]
struct Cli {
    /// URL of the node's API (`http://HOST:PORT`; a bare `HOST:PORT`, as
    /// `cluster status` shows a node's API, means http).
    #[arg(
        long,
        env = "BASALT_API",
        default_value = "http://127.0.0.1:7480",
        global = true
    )]
    api: String,

    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the node's health, capacity and counters.
    Status,
    /// The cluster the node belongs to.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Disks owned by the node.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Virtual disks.
    #[command(subcommand)]
    Vdisk(VdiskCommand),
    /// Disk images: raw or qcow2 files turned into vdisks.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import a raw or qcow2 file as a vdisk (needs qemu-img; written over NBD).
    Import {
        /// Name of the new vdisk.
        name: String,
        /// The image file.
        file: std::path::PathBuf,
        /// Replication factor of the vdisk.
        #[arg(long)]
        rf: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Define a VM (stopped; `vm start` runs it).
    Create(Box<VmCreateArgs>),
    /// Start a VM on a node with room for it.
    Start {
        /// VM name.
        name: String,
    },
    /// Stop a VM: the guest is asked to power off, then forced after the timeout.
    Stop {
        /// VM name.
        name: String,
        /// Stop at once, without asking the guest.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Stop and start a VM.
    Restart {
        /// VM name.
        name: String,
        /// Stop at once, without asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Delete a stopped VM (its vdisks stay, its uploaded kernel and initrd go).
    Delete {
        /// VM name.
        name: String,
    },
    /// Show one VM.
    Show {
        /// VM name.
        name: String,
    },
    /// List VMs.
    List,
    /// Print a VM's serial console.
    Console {
        /// VM name.
        name: String,
        /// Keep printing new output until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Live-migrate a running VM to another node.
    Migrate {
        /// VM name.
        name: String,
        /// Destination node id (see `basalt cluster status`).
        #[arg(long)]
        to: u64,
    },
}

#[derive(Debug, Args)]
struct VmCreateArgs {
    /// VM name.
    name: String,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Memory, e.g. 512M or 2G.
    #[arg(long, value_parser = size_arg, default_value = "512M")]
    memory: u64,
    /// A vdisk for the guest, in order (the first is its first virtio disk).
    #[arg(long = "disk", value_name = "VDISK")]
    disks: Vec<String>,
    /// Boot from this vdisk (BIOS); it is added to the disks if missing.
    #[arg(long, value_name = "VDISK", conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    boot_disk: Option<String>,
    /// Direct kernel boot: the kernel file (uploaded into the cluster).
    #[arg(long, value_name = "FILE", required_unless_present = "boot_disk")]
    kernel: Option<std::path::PathBuf>,
    /// Direct kernel boot: the initrd file (uploaded into the cluster).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<std::path::PathBuf>,
    /// Direct kernel boot: the kernel command line.
    #[arg(long, value_name = "STR", requires = "kernel")]
    cmdline: Option<String>,
    /// NICs with user-mode networking.
    #[arg(long, default_value_t = 0)]
    nics: u32,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// List the members with their state and Raft role, and the vdisks that
    /// are not healthy.
    Status {
        /// Follow resyncs with live progress bars until every vdisk is healthy.
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DiskCommand {
    /// List the node's disks.
    List,
}

#[derive(Debug, Subcommand)]
enum VdiskCommand {
    /// Create a thin-provisioned vdisk.
    Create {
        /// Name (also the NBD export name).
        name: String,
        /// Size, e.g. 512M or 10G [default with --from: the source's size].
        #[arg(long, value_parser = size_arg, required_unless_present = "from")]
        size: Option<u64>,
        /// Replication factor: nodes holding a full copy, 1 to 3
        /// [default: 2 on clusters of two or more nodes, else 1].
        #[arg(long)]
        rf: Option<u32>,
        /// Clone this vdisk or image (its data is copied).
        #[arg(long, value_name = "IMAGE")]
        from: Option<String>,
    },
    /// List vdisks.
    List,
    /// Show one vdisk.
    Show {
        /// Vdisk name.
        name: String,
        /// Follow a resync with a live progress bar until the vdisk is healthy.
        #[arg(long)]
        watch: bool,
    },
    /// Grow a vdisk.
    Resize {
        /// Vdisk name.
        name: String,
        /// New size, e.g. 20G (vdisks only grow).
        #[arg(long, value_parser = size_arg)]
        size: u64,
    },
    /// Delete a vdisk and its data.
    Delete {
        /// Vdisk name.
        name: String,
    },
    /// Export a vdisk to a local VM and print the socket path.
    Export(ExportArgs),
    /// Stop an export.
    Unexport(ExportArgs),
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Vdisk name.
    name: String,
    /// Over vhost-user-blk (a unix socket for QEMU).
    #[arg(long, required = true)]
    vhost: bool,
}

fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// The API's base URL from `--api`: `http://` in front of a bare
/// `HOST:PORT`, no trailing slash.
fn api_base(text: &str) -> String {
    let text = text.trim().trim_end_matches('/');
    if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    }
}

/// A thin HTTP client that turns API errors into one readable line.
struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(base: &str) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(120))
            .build();
        Client {
            base: api_base(base),
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{}", self.base, path)
    }

    fn call<T: DeserializeOwned>(
        &self,
        request: ureq::Request,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Option<T>> {
        let url = request.url().to_string();
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        self.answer(&url, result)
    }

    /// Turns an HTTP outcome into the decoded answer (`None` for 204) or
    /// one readable error line.
    fn answer<T: DeserializeOwned>(
        &self,
        url: &str,
        result: Result<ureq::Response, ureq::Error>,
    ) -> anyhow::Result<Option<T>> {
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(code, response)) => {
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<ErrorBody>(&text)
                    .map(|e| e.error)
                    .unwrap_or(text);
                return Err(anyhow!("{message} (HTTP {code})"));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(anyhow!(
                    "cannot reach the Basalt API at {}: {} (is basaltd running?)",
                    self.base,
                    t
                ));
            }
        };
        if response.status() == 204 {
            return Ok(None);
        }
        let text = response
            .into_string()
            .with_context(|| format!("reading the answer of {url}"))?;
        let value =
            serde_json::from_str(&text).with_context(|| format!("unexpected answer from {url}"))?;
        Ok(Some(value))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(self.agent.get(&self.url(path)), None)?
            .ok_or_else(|| anyhow!("empty answer from {path}"))
    }

    fn post<T: DeserializeOwned, B: Serialize>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        let body = serde_json::to_value(body)?;
        self.call(self.agent.post(&self.url(path)), Some(body))?
            .ok_or_else(|| anyhow!("empty answer from {path}"))
    }

    fn put_bytes<T: DeserializeOwned>(&self, path: &str, data: &[u8]) -> anyhow::Result<T> {
        let url = self.url(path);
        let result = self
            .agent
            .put(&url)
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data);
        self.answer(&url, result)?
            .ok_or_else(|| anyhow!("empty answer from {path}"))
    }

    /// POST whose answer may be empty (204).
    fn post_maybe<T: DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<Option<T>> {
        let body = serde_json::to_value(body)?;
        self.call(self.agent.post(&self.url(path)), Some(body))
    }

    fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.call::<serde_json::Value>(self.agent.delete(&self.url(path)), None)
            .map(|_| ())
    }
}

fn escape(name: &str) -> String {
    // Vdisk names are restricted to URL-safe characters; anything else is
    // percent-encoded so the server can reject it with a clear message.
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(header.to_vec());
    t
}

/// Follows a vdisk until it is healthy: a progress bar while a resync runs.
fn watch_vdisk(client: &Client, path: &str, json: bool) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .map_err(|e| anyhow!("progress bar: {e}"))?
        .progress_chars("=> "),
    );
    loop {
        let v: Vdisk = client.get(path)?;
        if json {
            println!("{}", serde_json::to_string(&v)?);
        }
        match &v.resync {
            Some(r) => {
                bar.set_length(r.total_bytes);
                bar.set_position(r.done_bytes);
                bar.set_message(format!(
                    "{} {}: resync on node {}, {} copied",
                    v.name,
                    v.state,
                    r.node,
                    format_size(r.copied_bytes)
                ));
            }
            None => bar.set_message(format!("{} {}", v.name, v.state)),
        }
        if v.state == "healthy" {
            bar.finish_with_message(format!("{} healthy", v.name));
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn show_vdisk(v: &Vdisk) {
    let mut t = table(&["Field", "Value"]);
    t.add_row(vec!["name".to_string(), v.name.clone()]);
    t.add_row(vec!["state".to_string(), v.state.clone()]);
    t.add_row(vec![
        "size".to_string(),
        format!("{} ({} bytes)", format_size(v.size), v.size),
    ]);
    t.add_row(vec!["allocated".to_string(), format_size(v.allocated)]);
    t.add_row(vec!["rf".to_string(), v.rf.to_string()]);
    let replicas: Vec<String> = v
        .replicas
        .iter()
        .map(|r| {
            let down = if r.node_up { "" } else { ", node down" };
            let moving = if v.moving_from == Some(r.node) {
                ", moving away (rebalance)"
            } else {
                ""
            };
            format!("node {} ({}{down}{moving})", r.node, r.state)
        })
        .collect();
    t.add_row(vec!["replicas".to_string(), replicas.join("\n")]);
    let owner = v.owner.map_or_else(
        || "-".to_string(),
        |o| format!("node {o} (epoch {})", v.epoch),
    );
    t.add_row(vec!["served by".to_string(), owner]);
    t.add_row(vec!["nbd".to_string(), v.nbd_uri.clone()]);
    t.add_row(vec![
        "vhost-user".to_string(),
        v.vhost_socket.clone().unwrap_or_else(|| "-".into()),
    ]);
    println!("{t}");
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.api);
    match cli.command {
        Command::Status => {
            let s: NodeStatus = client.get("/status")?;
            if cli.json {
                return print_json(&s);
            }
            let mut t = table(&["Node", "Value"]);
            let rows = [
                ("id", s.node_id.clone()),
                ("health", s.health.clone()),
                ("version", s.version.clone()),
                ("uptime", format!("{} s", s.uptime_seconds)),
                ("disks", s.disks.to_string()),
                ("capacity", format_size(s.capacity)),
                ("allocated", format_size(s.allocated)),
                ("vdisks", s.vdisks.to_string()),
                ("nbd", s.nbd_address.clone()),
                (
                    "reads",
                    format!("{} ({})", s.io.reads, format_size(s.io.read_bytes)),
                ),
                (
                    "writes",
                    format!("{} ({})", s.io.writes, format_size(s.io.write_bytes)),
                ),
                ("checksum errors", s.io.checksum_errors.to_string()),
                (
                    "VMs run under",
                    s.vm_accelerator
                        .clone()
                        .unwrap_or_else(|| "not decided yet (at the first VM start)".into()),
                ),
            ];
            for (k, v) in rows {
                t.add_row(vec![k.to_string(), v]);
            }
            println!("{t}");
        }
        Command::Cluster(ClusterCommand::Status { watch }) => {
            let c: ClusterStatus = client.get("/cluster")?;
            if cli.json {
                return print_json(&c);
            }
            let unhealthy = c.unhealthy_vdisks.clone();
            println!("cluster {} (answered by node {})", c.cluster_id, c.node_id);
            let mut t = table(&["Id", "Address", "State", "Reachable", "Role", "API", "NBD"]);
            for n in c.nodes {
                let role = if n.leader {
                    format!("{} (leader)", n.role)
                } else {
                    n.role
                };
                t.add_row(vec![
                    n.id.to_string(),
                    n.address,
                    n.state,
                    if n.reachable { "yes" } else { "no" }.to_string(),
                    role,
                    n.api,
                    n.nbd,
                ]);
            }
            println!("{t}");
            for v in &unhealthy {
                let progress = v.resync.as_ref().map_or(String::new(), |r| {
                    format!(
                        ", resync on node {}: {} of {} compared, {} copied",
                        r.node,
                        format_size(r.done_bytes),
                        format_size(r.total_bytes),
                        format_size(r.copied_bytes)
                    )
                });
                println!("vdisk {}: {}{progress}", v.name, v.state);
            }
            // Rebalance moves keep a vdisk healthy; say which are under way.
            let vdisks: Vec<Vdisk> = client.get("/vdisks")?;
            for (v, from) in vdisks
                .iter()
                .filter_map(|v| v.moving_from.map(|from| (v, from)))
            {
                let to: Vec<String> = v
                    .replicas
                    .iter()
                    .filter(|r| r.state == "stale")
                    .map(|r| format!("node {}", r.node))
                    .collect();
                println!(
                    "vdisk {}: rebalancing, copy moving from node {} to {}",
                    v.name,
                    from,
                    to.join(", ")
                );
            }
            if watch {
                for v in &unhealthy {
                    watch_vdisk(&client, &format!("/vdisks/{}", escape(&v.name)), false)?;
                }
            }
        }
        Command::Disk(DiskCommand::List) => {
            let disks: Vec<Disk> = client.get("/disks")?;
            if cli.json {
                return print_json(&disks);
            }
            let mut t = table(&["Path", "State", "Size", "Free", "Oplog used", "Engine"]);
            for d in disks {
                let state = match &d.error {
                    Some(e) => format!("{} ({e})", d.state),
                    None => d.state.clone(),
                };
                t.add_row(vec![
                    d.path,
                    state,
                    format_size(d.size),
                    format!(
                        "{} of {}",
                        format_size(d.slots_free << 20),
                        format_size(d.slots_total << 20)
                    ),
                    format!(
                        "{} of {}",
                        format_size(d.log_used),
                        format_size(d.log_bytes)
                    ),
                    d.engine,
                ]);
            }
            println!("{t}");
        }
        Command::Vdisk(command) => vdisk(&client, cli.json, command)?,
        Command::Image(command) => image(&client, cli.json, command)?,
        Command::Vm(command) => vm(&client, cli.json, command)?,
    }
    Ok(())
}

fn vdisk(client: &Client, json: bool, command: VdiskCommand) -> anyhow::Result<()> {
    match command {
        VdiskCommand::Create {
            name,
            size,
            rf,
            from: Some(from),
        } => {
            let v: Vdisk = client.post(
                "/vdisks",
                &CreateVdisk {
                    name,
                    size: size.unwrap_or(0),
                    rf,
                    from: Some(from.clone()),
                },
            )?;
            if json {
                return print_json(&v);
            }
            println!(
                "created vdisk {} ({}) from {from}, NBD {}",
                v.name,
                format_size(v.size),
                v.nbd_uri
            );
        }
        VdiskCommand::Create {
            name,
            size,
            rf,
            from: None,
        } => {
            let size = size.ok_or_else(|| anyhow!("--size is required (or --from IMAGE)"))?;
            let v: Vdisk = client.post(
                "/vdisks",
                &CreateVdisk {
                    name,
                    size,
                    rf,
                    from: None,
                },
            )?;
            if json {
                return print_json(&v);
            }
            println!(
                "created vdisk {} ({}), NBD {}",
                v.name,
                format_size(v.size),
                v.nbd_uri
            );
        }
        VdiskCommand::List => {
            let list: Vec<Vdisk> = client.get("/vdisks")?;
            if json {
                return print_json(&list);
            }
            let mut t = table(&["Name", "State", "Size", "Allocated", "NBD", "vhost-user"]);
            for v in list {
                t.add_row(vec![
                    v.name,
                    v.state,
                    format_size(v.size),
                    format_size(v.allocated),
                    v.nbd_uri,
                    v.vhost_socket.unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
        }
        VdiskCommand::Show { name, watch } => {
            let path = format!("/vdisks/{}", escape(&name));
            let v: Vdisk = client.get(&path)?;
            if json && !watch {
                return print_json(&v);
            }
            if !json {
                show_vdisk(&v);
            }
            if watch {
                watch_vdisk(client, &path, json)?;
            }
        }
        VdiskCommand::Resize { name, size } => {
            let v: Vdisk = client.post(
                &format!("/vdisks/{}/resize", escape(&name)),
                &ResizeVdisk { size },
            )?;
            if json {
                return print_json(&v);
            }
            println!("resized vdisk {} to {}", v.name, format_size(v.size));
        }
        VdiskCommand::Delete { name } => {
            client.delete(&format!("/vdisks/{}", escape(&name)))?;
            if json {
                return print_json(&serde_json::json!({ "deleted": name }));
            }
            println!("deleted vdisk {name}");
        }
        VdiskCommand::Export(args) => {
            let e: VhostExport = client.post(
                &format!("/vdisks/{}/vhost", escape(&args.name)),
                &serde_json::json!({}),
            )?;
            if json {
                return print_json(&e);
            }
            println!("{}", e.socket);
        }
        VdiskCommand::Unexport(args) => {
            client.delete(&format!("/vdisks/{}/vhost", escape(&args.name)))?;
            if json {
                return print_json(&serde_json::json!({ "unexported": args.name }));
            }
            println!("stopped the vhost-user export of {}", args.name);
        }
    }
    Ok(())
}

/// A vdisk name for a VM's boot file (`web1-kernel`).
fn boot_file_vdisk(vm: &str, what: &str) -> String {
    format!("{vm}-{what}")
}

/// Uploads `path` into a new vdisk `vdisk` sized to hold it.
fn upload_file(client: &Client, vdisk: &str, path: &std::path::Path) -> anyhow::Result<StoredFile> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if data.is_empty() {
        return Err(anyhow!("{} is empty", path.display()));
    }
    let size = (data.len() as u64).div_ceil(4096) * 4096;
    let _: Vdisk = client.post(
        "/vdisks",
        &CreateVdisk {
            name: vdisk.to_string(),
            size,
            rf: None,
            from: None,
        },
    )?;
    let stored = client.put_bytes(&format!("/vdisks/{}/content", escape(vdisk)), &data);
    if stored.is_err() {
        let _ = client.delete(&format!("/vdisks/{}", escape(vdisk)));
    }
    stored
}

fn create_vm(client: &Client, json: bool, args: VmCreateArgs) -> anyhow::Result<()> {
    let mut disks = args.disks.clone();
    if let Some(boot) = &args.boot_disk
        && !disks.contains(boot)
    {
        disks.push(boot.clone());
    }
    // Local files first: a missing kernel changes nothing in the cluster.
    for file in args.kernel.iter().chain(args.initrd.iter()) {
        let meta =
            std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
        if !meta.is_file() {
            return Err(anyhow!("{} is not a file", file.display()));
        }
    }
    let placeholder = |path: &Option<std::path::PathBuf>| {
        path.as_ref().map(|_| StoredFile {
            vdisk: String::new(),
            length: 0,
        })
    };
    let mut request = CreateVm {
        name: args.name.clone(),
        vcpus: args.vcpus,
        memory: args.memory,
        disks,
        boot_disk: args.boot_disk.clone(),
        kernel: placeholder(&args.kernel),
        initrd: placeholder(&args.initrd),
        cmdline: args.cmdline.clone(),
        nics: args.nics,
        owned_vdisks: Vec::new(),
        dry_run: true,
    };
    // Check everything but the boot files before uploading them.
    let _: Option<Vm> = client.post_maybe("/vms", &request)?;
    let mut uploaded = Vec::new();
    let result = (|| -> anyhow::Result<Vm> {
        if let Some(kernel) = &args.kernel {
            let vdisk = boot_file_vdisk(&args.name, "kernel");
            request.kernel = Some(upload_file(client, &vdisk, kernel)?);
            uploaded.push(vdisk);
        }
        if let Some(initrd) = &args.initrd {
            let vdisk = boot_file_vdisk(&args.name, "initrd");
            request.initrd = Some(upload_file(client, &vdisk, initrd)?);
            uploaded.push(vdisk);
        }
        request.owned_vdisks = uploaded.clone();
        request.dry_run = false;
        client
            .post_maybe("/vms", &request)?
            .ok_or_else(|| anyhow!("empty answer to the VM creation"))
    })();
    let vm = match result {
        Ok(vm) => vm,
        Err(error) => {
            for vdisk in &uploaded {
                let _ = client.delete(&format!("/vdisks/{}", escape(vdisk)));
            }
            return Err(error);
        }
    };
    if json {
        return print_json(&vm);
    }
    println!(
        "created VM {} ({} vCPUs, {}, boot {}); start it with: basalt vm start {}",
        vm.name,
        vm.vcpus,
        format_size(vm.memory),
        vm.boot,
        vm.name
    );
    Ok(())
}

/// A VM's node for tables and messages ("-" when it has none).
fn node_label(node: Option<u64>) -> String {
    node.map_or_else(|| "-".into(), |n| n.to_string())
}

fn show_vm(v: &Vm) {
    let mut t = table(&["Field", "Value"]);
    let node = v
        .node
        .map_or_else(|| "-".to_string(), |n| format!("node {n}"));
    let rows = [
        ("name", v.name.clone()),
        ("state", v.state.clone()),
        ("desired", v.desired.clone()),
        ("node", node),
        ("why", v.reason.clone()),
        ("vcpus", v.vcpus.to_string()),
        ("memory", format_size(v.memory)),
        ("disks", v.disks.join(", ")),
        ("boot", v.boot.clone()),
        ("cmdline", v.cmdline.clone().unwrap_or_else(|| "-".into())),
        ("nics", v.nics.to_string()),
        ("generation", v.generation.to_string()),
    ];
    for (k, value) in rows {
        t.add_row(vec![k.to_string(), value]);
    }
    if let Some(m) = &v.migration {
        t.add_row(vec![
            "migration".to_string(),
            format!(
                "node {} -> node {}: {} of {}",
                m.from,
                m.to,
                format_size(m.transferred),
                format_size(m.total)
            ),
        ]);
    }
    if let (Some(down), Some(total)) = (v.last_migration_downtime_ms, v.last_migration_total_ms) {
        t.add_row(vec![
            "last migration".to_string(),
            format!("{down} ms downtime, {total} ms in all"),
        ]);
    }
    println!("{t}");
}

/// Follows a migration with a progress bar until it ends.
fn follow_migration(client: &Client, name: &str, to: u64, json: bool) -> anyhow::Result<()> {
    let path = format!("/vms/{}", escape(name));
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .map_err(|e| anyhow!("progress bar: {e}"))?
        .progress_chars("=> "),
    );
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_message(format!("migrating {name} to node {to}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
    loop {
        let v: Vm = client.get(&path)?;
        match &v.migration {
            Some(m) => {
                bar.set_length(m.total);
                bar.set_position(m.transferred);
            }
            None => {
                bar.finish_and_clear();
                if v.node != Some(to) {
                    return Err(anyhow!("{}", v.reason));
                }
                if json {
                    return print_json(&v);
                }
                println!("{}", v.reason);
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(anyhow!(
                "the migration of {name} did not end within 15 minutes"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Runs `call` (a request the node answers only when it is done, such as
/// a stop that waits for the guest) behind a spinner that says what is
/// being waited for; no spinner with `--json` or when stderr is no terminal.
fn waiting<T>(json: bool, message: String, call: impl FnOnce() -> T) -> T {
    let spinner = indicatif::ProgressBar::new_spinner();
    if json {
        spinner.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    spinner.set_message(message);
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let result = call();
    spinner.finish_and_clear();
    result
}

fn vm(client: &Client, json: bool, command: VmCommand) -> anyhow::Result<()> {
    match command {
        VmCommand::Create(args) => create_vm(client, json, *args)?,
        VmCommand::Start { name } => {
            let v: Vm = waiting(json, format!("starting {name}"), || {
                client.post(
                    &format!("/vms/{}/start", escape(&name)),
                    &serde_json::json!({}),
                )
            })?;
            if json {
                return print_json(&v);
            }
            println!(
                "VM {} is {} on node {}",
                v.name,
                v.state,
                node_label(v.node)
            );
        }
        VmCommand::Stop {
            name,
            force,
            timeout,
        } => {
            let message = if force {
                format!("stopping {name}")
            } else {
                format!("stopping {name}: waiting up to {timeout} s for the guest to power off")
            };
            let v: Vm = waiting(json, message, || {
                client.post(
                    &format!("/vms/{}/stop", escape(&name)),
                    &StopVm {
                        force,
                        timeout: Some(timeout),
                    },
                )
            })?;
            if json {
                return print_json(&v);
            }
            println!("VM {} is {} ({})", v.name, v.state, v.reason);
        }
        VmCommand::Restart { name, force } => {
            let v: Vm = waiting(json, format!("restarting {name}"), || {
                client.post(
                    &format!("/vms/{}/restart", escape(&name)),
                    &StopVm {
                        force,
                        timeout: None,
                    },
                )
            })?;
            if json {
                return print_json(&v);
            }
            println!(
                "VM {} is {} on node {}",
                v.name,
                v.state,
                node_label(v.node)
            );
        }
        VmCommand::Delete { name } => {
            client.delete(&format!("/vms/{}", escape(&name)))?;
            if json {
                return print_json(&serde_json::json!({ "deleted": name }));
            }
            println!("deleted VM {name}");
        }
        VmCommand::Show { name } => {
            let v: Vm = client.get(&format!("/vms/{}", escape(&name)))?;
            if json {
                return print_json(&v);
            }
            show_vm(&v);
        }
        VmCommand::List => {
            let list: Vec<Vm> = client.get("/vms")?;
            if json {
                return print_json(&list);
            }
            let mut t = table(&["Name", "State", "Node", "vCPUs", "Memory", "Disks"]);
            for v in list {
                t.add_row(vec![
                    v.name,
                    v.state,
                    node_label(v.node),
                    v.vcpus.to_string(),
                    format_size(v.memory),
                    v.disks.join(", "),
                ]);
            }
            println!("{t}");
        }
        VmCommand::Console { name, follow } => {
            use std::io::Write;
            let mut offset = 0;
            let mut stdout = std::io::stdout();
            loop {
                let chunk: ConsoleChunk =
                    client.get(&format!("/vms/{}/console?offset={offset}", escape(&name)))?;
                if chunk.offset < offset {
                    // A new QEMU process began a new log.
                    writeln!(stdout, "\n--- console restarted on node {} ---", chunk.node)?;
                }
                stdout.write_all(chunk.data.as_bytes())?;
                stdout.flush()?;
                let more = chunk.next > chunk.offset;
                offset = chunk.next;
                if !follow && !more {
                    break;
                }
                if !more {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            }
        }
        VmCommand::Migrate { name, to } => {
            let _: Vm = client.post(
                &format!("/vms/{}/migrate", escape(&name)),
                &MigrateVm { to },
            )?;
            follow_migration(client, &name, to, json)?;
        }
    }
    Ok(())
}

/// `qemu-img info` of an image file: (format, virtual size).
fn image_info(file: &std::path::Path) -> anyhow::Result<(String, u64)> {
    let output = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(file)
        .output()
        .context("running qemu-img (install qemu-utils)")?;
    if !output.status.success() {
        return Err(anyhow!(
            "qemu-img cannot read {}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("parsing qemu-img info")?;
    let format = info["format"]
        .as_str()
        .ok_or_else(|| anyhow!("qemu-img info gave no format"))?
        .to_string();
    if format != "raw" && format != "qcow2" {
        return Err(anyhow!(
            "{} is a {format} image; raw and qcow2 are supported",
            file.display()
        ));
    }
    let size = info["virtual-size"]
        .as_u64()
        .ok_or_else(|| anyhow!("qemu-img info gave no virtual size"))?;
    Ok((format, size))
}

fn image(client: &Client, json: bool, command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Import { name, file, rf } => {
            let (format, virtual_size) = image_info(&file)?;
            let size = virtual_size.max(1).div_ceil(4096) * 4096;
            let v: Vdisk = client.post(
                "/vdisks",
                &CreateVdisk {
                    name: name.clone(),
                    size,
                    rf,
                    from: None,
                },
            )?;
            let copied = convert_with_progress(&file, &format, &v.nbd_uri, json);
            if let Err(error) = copied {
                let _ = client.delete(&format!("/vdisks/{}", escape(&name)));
                return Err(error);
            }
            if json {
                return print_json(&v);
            }
            println!(
                "imported {} ({format}, {}) as vdisk {}",
                file.display(),
                format_size(virtual_size),
                v.name
            );
        }
    }
    Ok(())
}

/// Copies an image into a vdisk over NBD with `qemu-img convert`, showing
/// its progress as a bar.
fn convert_with_progress(
    file: &std::path::Path,
    format: &str,
    uri: &str,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::Read;
    let mut child = std::process::Command::new("qemu-img")
        .args(["convert", "-p", "-n", "-f", format, "-O", "raw"])
        .arg(file)
        .arg(uri)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running qemu-img convert")?;
    let bar = indicatif::ProgressBar::new(10_000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("importing [{bar:40}] {percent}% ({elapsed})")
            .map_err(|e| anyhow!("progress bar: {e}"))?
            .progress_chars("=> "),
    );
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    if let Some(mut out) = child.stdout.take() {
        // qemu-img -p prints "    (12.34/100%)" lines separated by \r.
        let mut buf = [0u8; 256];
        let mut text = String::new();
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(percent) = text
                .rsplit('(')
                .find_map(|piece| piece.split('/').next()?.trim().parse::<f64>().ok())
            {
                bar.set_position((percent * 100.0) as u64);
            }
            if text.len() > 4096 {
                text.drain(..2048);
            }
        }
    }
    let output = child.wait_with_output().context("waiting for qemu-img")?;
    if !output.status.success() {
        bar.abandon();
        return Err(anyhow!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    bar.finish();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::api_base;

    #[test]
    fn a_bare_api_address_means_http_and_a_trailing_slash_goes() {
        assert_eq!(api_base("127.0.0.1:7480"), "http://127.0.0.1:7480");
        assert_eq!(api_base("http://10.0.0.2:7480/"), "http://10.0.0.2:7480");
        assert_eq!(api_base("https://basalt.example"), "https://basalt.example");
    }
}

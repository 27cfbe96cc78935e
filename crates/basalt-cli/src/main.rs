//! `basalt`: the command-line client of a Basalt node's REST API.
//!
//! Human tables by default, `--json` for scripts. Every error is one line on
//! stderr and a non-zero exit status.

use std::process::ExitCode;

use anyhow::{Context, anyhow};
use basalt_api::{
    ClusterStatus, CreateVdisk, Disk, ErrorBody, NodeStatus, ResizeVdisk, Vdisk, VhostExport,
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
    /// URL of the node's API.
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
        /// Size, e.g. 512M or 10G.
        #[arg(long, value_parser = size_arg)]
        size: u64,
        /// Replication factor: nodes holding a full copy, 1 to 3
        /// [default: 2 on clusters of two or more nodes, else 1].
        #[arg(long)]
        rf: Option<u32>,
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
            base: base.trim_end_matches('/').to_string(),
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
    }
    Ok(())
}

fn vdisk(client: &Client, json: bool, command: VdiskCommand) -> anyhow::Result<()> {
    match command {
        VdiskCommand::Create { name, size, rf } => {
            let v: Vdisk = client.post("/vdisks", &CreateVdisk { name, size, rf })?;
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

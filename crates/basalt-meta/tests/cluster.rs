//! The metadata group on real sockets: bootstrap, joins through any member,
//! voter promotion, proposals from followers, leader loss, restart from disk,
//! and joins that must be refused.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use basalt_meta::{Command, CommandResult, MetaConfig, MetaNode, NodeAnnouncement};
use basalt_net::{Identity, Transport, TransportConfig};
use openraft::ServerState;
use tokio::net::TcpListener;
use uuid::Uuid;

struct TestNode {
    meta: MetaNode,
    transport: Transport,
    addr: String,
    uuid: Uuid,
    dir: std::path::PathBuf,
    server: tokio::task::JoinHandle<()>,
}

fn fast() -> MetaConfig {
    MetaConfig {
        heartbeat: Duration::from_millis(100),
        election_timeout: (Duration::from_millis(400), Duration::from_millis(800)),
        ping_interval: Duration::from_millis(200),
        dead_after: Duration::from_secs(2),
        rebalance: true,
    }
}

async fn start(dir: &std::path::Path, addr: Option<&str>, uuid: Uuid) -> Result<TestNode> {
    let listener = TcpListener::bind(addr.unwrap_or("127.0.0.1:0")).await?;
    let addr = listener.local_addr()?.to_string();
    let transport = Transport::new(
        Identity {
            cluster_id: Uuid::nil(),
            node_id: 0,
        },
        TransportConfig::default(),
    );
    let server = transport.serve(listener);
    let meta = MetaNode::open(dir, transport.clone(), fast()).await?;
    Ok(TestNode {
        meta,
        transport,
        addr,
        uuid,
        dir: dir.to_path_buf(),
        server,
    })
}

impl TestNode {
    fn me(&self) -> NodeAnnouncement {
        NodeAnnouncement {
            uuid: self.uuid,
            listen: self.addr.clone(),
            api: String::new(),
            nbd: String::new(),
        }
    }

    async fn stop(self) -> Result<(std::path::PathBuf, String, Uuid)> {
        self.meta.shutdown().await;
        self.transport.shutdown();
        self.server.await?;
        Ok((self.dir, self.addr, self.uuid))
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("timed out waiting until {what}")
}

fn voters(node: &TestNode) -> usize {
    node.meta
        .raft()
        .map(|raft| {
            raft.metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .count()
        })
        .unwrap_or(0)
}

fn create(name: &str, rf: u8) -> Command {
    Command::CreateVdisk {
        name: name.into(),
        size: 1 << 30,
        rf,
        created: 0,
        preferred: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_group_that_survives_its_leader() -> Result<()> {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let a = start(dirs[0].path(), None, Uuid::new_v4()).await?;
    let membership = a.meta.bootstrap(a.me()).await?;
    assert_eq!(membership.node_id, 1);

    let b = start(dirs[1].path(), None, Uuid::new_v4()).await?;
    let joined = b.meta.join(&a.addr, b.me()).await?;
    assert_eq!(joined.cluster_id, membership.cluster_id);
    assert_eq!(joined.node_id, 2);
    // The third joins through a follower, not the leader.
    let c = start(dirs[2].path(), None, Uuid::new_v4()).await?;
    let joined = c.meta.join(&b.addr, c.me()).await?;
    assert_eq!(joined.node_id, 3);

    let nodes = [&a, &b, &c];
    eventually("three voters", || async { voters(&a) == 3 }).await?;
    eventually("every node sees three members", || async {
        nodes.iter().all(|n| n.meta.cluster().nodes.len() == 3)
    })
    .await?;

    // A follower proposes; everyone applies it.
    assert_eq!(
        c.meta.propose(create("vol", 3)).await?,
        CommandResult::Id(1)
    );
    assert!(matches!(
        b.meta.propose(create("vol", 1)).await?,
        CommandResult::Refused { reason, .. } if reason.contains("already exists")
    ));
    eventually("the vdisk is everywhere", || async {
        nodes
            .iter()
            .all(|n| n.meta.cluster().vdisk_by_name("vol").is_some())
    })
    .await?;

    // Kill the leader; the other two elect one and keep accepting changes.
    let (a_dir, a_addr, a_uuid) = a.stop().await?;
    eventually("a new leader", || async {
        [&b, &c].iter().any(|n| {
            n.meta
                .raft()
                .is_some_and(|r| r.metrics().borrow().state == ServerState::Leader)
        })
    })
    .await?;
    assert_eq!(
        b.meta
            .propose(Command::AcquireVdisk {
                name: "vol".into(),
                node: 2
            })
            .await?,
        CommandResult::Epoch(1)
    );

    // Silent past dead-after, the old leader is declared down by the new one.
    eventually("node 1 is declared down", || async {
        b.meta.cluster().nodes.get(&1).map(|n| n.state) == Some(basalt_meta::NodeState::Down)
    })
    .await?;
    assert!(!b.meta.reachable(1));

    // The old leader restarts from its directory and catches up.
    let a = start(&a_dir, Some(&a_addr), a_uuid).await?;
    assert_eq!(a.meta.membership().map(|m| m.node_id), Some(1));
    eventually("the restarted node catches up", || async {
        a.meta.cluster().vdisk_by_name("vol").and_then(|v| v.owner) == Some(2)
    })
    .await?;
    eventually("node 1 is up again", || async {
        b.meta.cluster().nodes.get(&1).map(|n| n.state) == Some(basalt_meta::NodeState::Up)
    })
    .await?;
    eventually("all three agree", || async {
        a.meta.cluster() == b.meta.cluster() && b.meta.cluster() == c.meta.cluster()
    })
    .await?;

    // Bad joins: a node already in a cluster; an address nobody listens on.
    let result = a.meta.join(&b.addr, a.me()).await;
    assert!(result.is_err());
    let d_dir = tempfile::tempdir()?;
    let d = start(d_dir.path(), None, Uuid::new_v4()).await?;
    let closed = TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?
        .to_string();
    let result = d.meta.join(&closed, d.me()).await;
    let error = result.err().context("joining a dead address must fail")?;
    assert!(error.to_string().contains("cannot reach"), "{error}");
    assert!(
        d.meta.membership().is_none(),
        "a failed join leaves the node unjoined"
    );

    for node in [a, b, c, d] {
        node.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_cannot_join_or_talk() -> Result<()> {
    let one = tempfile::tempdir()?;
    let two = tempfile::tempdir()?;
    let a = start(one.path(), None, Uuid::new_v4()).await?;
    a.meta.bootstrap(a.me()).await?;
    let b = start(two.path(), None, Uuid::new_v4()).await?;
    b.meta.bootstrap(b.me()).await?;
    let result = b.meta.join(&a.addr, b.me()).await;
    assert!(
        result.is_err(),
        "a bootstrapped node cannot join another cluster"
    );
    // Raft traffic between them is refused at the handshake.
    let result = b
        .transport
        .call(
            &a.addr,
            basalt_net::TrafficClass::Control,
            basalt_meta::SERVICE_META,
            bytes::Bytes::from_static(b"{}"),
            bytes::Bytes::new(),
        )
        .await;
    match result {
        Err(basalt_net::NetError::Refused { reason, .. }) => {
            assert!(reason.contains("wrong cluster"), "{reason}")
        }
        other => return Err(anyhow!("expected a refusal, got {other:?}")),
    }
    assert_eq!(a.meta.cluster().nodes.len(), 1);
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

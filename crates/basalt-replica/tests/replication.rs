//! Replication over real sockets between three in-process nodes, each with
//! its own store on a simulated disk. The coordinator here is a stand-in for
//! Raft (a fake is fine inside a unit test): it hands out epochs and records
//! stale replicas, and can be told to refuse, as Raft refuses a fenced owner.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use basalt_core::{BlockBackend, BlockError, BoxFuture, IoBuf, WriteFlags, WriteSource};
use basalt_disk::sim::SimDisk;
use basalt_net::{Identity, Transport, TransportConfig};
use basalt_replica::{
    Acquired, Coordinator, DirtyReport, LocalReplicas, Op, ReplicaGate, ReplicaService, ReplicaSet,
    ReplicaTarget, ReplicatedVdisk, Request, SERVICE_REPLICA,
};
use basalt_store::{OpenedDisk, Store, StoreConfig};
use basalt_vdisk::VdiskRegistry;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use uuid::Uuid;

const VDISK: u64 = 7;
const SIZE: u64 = 16 << 20;

struct Local(VdiskRegistry);

impl LocalReplicas for Local {
    fn replica(&self, vdisk: u64) -> Option<Arc<dyn BlockBackend>> {
        self.0.get_by_id(vdisk).map(|v| v as Arc<dyn BlockBackend>)
    }
}

struct TestNode {
    id: u64,
    addr: String,
    transport: Transport,
    registry: VdiskRegistry,
    gate: Arc<ReplicaGate>,
    _dir: tempfile::TempDir,
}

async fn node(id: u64, cluster: Uuid) -> Result<TestNode> {
    let dir = tempfile::tempdir()?;
    let disk = SimDisk::new(128 << 20);
    let store = Store::open_with_engines(
        StoreConfig::new(dir.path()),
        vec![OpenedDisk {
            path: "sim".into(),
            engine: disk.engine(),
        }],
    )
    .await?;
    store.create_vdisk_with_id(VDISK, "v", SIZE).await?;
    let registry = VdiskRegistry::new(store);
    let transport = Transport::new(
        Identity {
            cluster_id: cluster,
            node_id: id,
        },
        TransportConfig::default(),
    );
    let gate = Arc::new(ReplicaGate::new());
    // The copy was created by this "process": nothing unsettled predates it.
    gate.dirty().mark_known(VDISK);
    transport.register(
        SERVICE_REPLICA,
        Arc::new(ReplicaService::new(
            Arc::new(Local(registry.clone())),
            gate.clone(),
        )),
        false,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    transport.serve(listener);
    Ok(TestNode {
        id,
        addr,
        transport,
        registry,
        gate,
        _dir: dir,
    })
}

/// Plays Raft's part: epochs, in-sync set, stale records. Fencing is real:
/// it goes through the local gate and the replica service, as the control
/// plane's coordinator does.
struct FakeCoordinator {
    epoch: u64,
    local: (u64, Arc<dyn BlockBackend>),
    gate: Arc<ReplicaGate>,
    transport: Transport,
    remotes: Vec<ReplicaTarget>,
    stale: Mutex<BTreeSet<u64>>,
    refuse: Mutex<bool>,
}

impl Coordinator for FakeCoordinator {
    fn acquire(&self, _vdisk: u64) -> BoxFuture<'static, Result<Acquired, BlockError>> {
        let set = ReplicaSet {
            epoch: self.epoch,
            local: Some(self.local.clone()),
            local_in_sync: true,
            remotes: self.remotes.clone(),
        };
        let gate = self.gate.clone();
        let transport = self.transport.clone();
        Box::pin(async move {
            let mut reports = Vec::new();
            let local = gate
                .fence(VDISK, set.epoch)
                .await
                .map_err(|newer| BlockError::Io(format!("fenced by {newer}")))?;
            reports.push((set.local.as_ref().map_or(0, |(n, _)| *n), local));
            for target in &set.remotes {
                let reply = transport
                    .call(
                        &target.addr,
                        basalt_net::TrafficClass::Control,
                        SERVICE_REPLICA,
                        Request::new(Op::Fence, VDISK, set.epoch, 0, 0).encode(),
                        bytes::Bytes::new(),
                    )
                    .await
                    .map_err(|e| BlockError::Io(e.to_string()))?;
                reports.push((target.node, DirtyReport::decode(&reply.data)));
            }
            Ok(Acquired { set, reports })
        })
    }

    fn mark_stale(
        &self,
        _vdisk: u64,
        node: u64,
        _epoch: u64,
    ) -> BoxFuture<'static, Result<(), BlockError>> {
        let refused = *self.refuse.lock();
        if !refused {
            self.stale.lock().insert(node);
        }
        Box::pin(async move {
            if refused {
                Err(BlockError::Io("fenced in Raft".into()))
            } else {
                Ok(())
            }
        })
    }
}

fn pattern(seed: u8, len: usize) -> IoBuf {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    IoBuf::from_slice(&bytes)
}

async fn read_local(node: &TestNode, offset: u64, len: u32) -> Result<Vec<u8>> {
    let vdisk = node.registry.get_by_id(VDISK).context("replica")?;
    Ok(vdisk.read(offset, len).await?.as_slice().to_vec())
}

struct Cluster {
    nodes: Vec<TestNode>,
    coordinator: Arc<FakeCoordinator>,
    owner: ReplicatedVdisk,
}

async fn cluster(epoch: u64) -> Result<Cluster> {
    let id = Uuid::new_v4();
    let nodes = vec![node(1, id).await?, node(2, id).await?, node(3, id).await?];
    let (coordinator, owner) = owner_on(&nodes, 0, epoch)?;
    Ok(Cluster {
        nodes,
        coordinator,
        owner,
    })
}

/// An owner on `nodes[at]` under `epoch`, every replica in sync.
fn owner_on(
    nodes: &[TestNode],
    at: usize,
    epoch: u64,
) -> Result<(Arc<FakeCoordinator>, ReplicatedVdisk)> {
    let me = &nodes[at];
    let local = me.registry.get_by_id(VDISK).context("local")?;
    let coordinator = Arc::new(FakeCoordinator {
        epoch,
        local: (me.id, local as Arc<dyn BlockBackend>),
        gate: me.gate.clone(),
        transport: me.transport.clone(),
        remotes: nodes
            .iter()
            .filter(|n| n.id != me.id)
            .map(|n| ReplicaTarget {
                node: n.id,
                addr: n.addr.clone(),
                in_sync: true,
            })
            .collect(),
        stale: Mutex::new(BTreeSet::new()),
        refuse: Mutex::new(false),
    });
    let owner = ReplicatedVdisk::new(
        VDISK,
        "v".into(),
        SIZE,
        me.transport.clone(),
        coordinator.clone(),
        me.gate.clone(),
    );
    Ok((coordinator, owner))
}

/// What an owner that crashed part-way through a write leaves behind: the
/// write applied on `node` only, under `epoch`, never settled.
async fn unsettled_write(
    from: &TestNode,
    node: &TestNode,
    epoch: u64,
    offset: u64,
    data: IoBuf,
) -> Result<()> {
    let request = Request {
        seq: 10,
        settled: 2,
        ..Request::new(Op::Write, VDISK, epoch, offset, data.len() as u64)
    };
    from.transport
        .call(
            &node.addr,
            basalt_net::TrafficClass::Foreground,
            SERVICE_REPLICA,
            request.encode(),
            bytes::Bytes::copy_from_slice(data.as_slice()),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_gets_every_write_including_unaligned_ones() -> Result<()> {
    let c = cluster(1).await?;
    c.owner
        .write(0, pattern(1, 1 << 20), WriteFlags::default())
        .await?;
    c.owner
        .write(4096 * 7 + 100, pattern(2, 5000), WriteFlags { fua: true })
        .await?;
    c.owner
        .write_zeroes(65536 + 10, 9000, false, WriteFlags::default())
        .await?;
    c.owner.trim(512 << 10, 128 << 10).await?;
    c.owner.flush().await?;
    let expected = c.owner.read(0, 1 << 20).await?.as_slice().to_vec();
    assert_eq!(
        &expected[4096 * 7 + 100..4096 * 7 + 100 + 5000],
        pattern(2, 5000).as_slice()
    );
    assert!(
        expected[65536 + 10..65536 + 10 + 9000]
            .iter()
            .all(|b| *b == 0)
    );
    for node in &c.nodes {
        assert_eq!(
            read_local(node, 0, 1 << 20).await?,
            expected,
            "node {}",
            node.id
        );
    }
    assert!(c.coordinator.stale.lock().is_empty());
    // Bad input is refused before any replica sees it.
    assert!(matches!(
        c.owner
            .write(SIZE - 4096, pattern(3, 8192), WriteFlags::default())
            .await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(c.coordinator.stale.lock().is_empty());
    Ok(())
}

/// A write's bytes handed out in the pieces the backend asks for.
struct PatternSource {
    data: IoBuf,
    taken: usize,
    calls: usize,
}

impl PatternSource {
    fn new(seed: u8, len: usize) -> PatternSource {
        PatternSource {
            data: pattern(seed, len),
            taken: 0,
            calls: 0,
        }
    }
}

impl WriteSource for PatternSource {
    fn read_next(&mut self, dst: &mut [u8]) -> Result<(), BlockError> {
        let end = self.taken + dst.len();
        let bytes = self
            .data
            .as_slice()
            .get(self.taken..end)
            .ok_or_else(|| BlockError::Invalid("asked past the end".into()))?;
        dst.copy_from_slice(bytes);
        self.taken = end;
        self.calls += 1;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_a_source_reach_every_replica() -> Result<()> {
    let c = cluster(1).await?;
    for (seed, offset, len) in [(1u8, 1u64 << 20, 1usize << 20), (2, 4096 * 3 + 7, 9000)] {
        let mut source = PatternSource::new(seed, len);
        c.owner
            .write_from(offset, len as u32, &mut source, WriteFlags::default())
            .await?;
        assert_eq!(source.taken, len);
        for node in &c.nodes {
            assert_eq!(
                read_local(node, offset, len as u32).await?,
                pattern(seed, len).as_slice(),
                "node {}",
                node.id
            );
        }
    }
    assert!(c.coordinator.stale.lock().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_copy_takes_a_whole_extent_in_pieces_and_stays_fenced() -> Result<()> {
    let nodes = vec![node(1, Uuid::new_v4()).await?];
    let (_coordinator, owner) = owner_on(&nodes, 0, 1)?;
    let mut source = PatternSource::new(5, 1 << 20);
    owner
        .write_from(2 << 20, 1 << 20, &mut source, WriteFlags::default())
        .await?;
    assert!(
        source.calls > 1,
        "the only copy's store did not take the extent in pieces"
    );
    assert_eq!(
        owner.read(2 << 20, 1 << 20).await?.as_slice(),
        pattern(5, 1 << 20).as_slice()
    );
    // A newer owner elsewhere: this one writes nothing more, not even here.
    nodes[0].gate.epochs().raise(VDISK, 2);
    let mut late = PatternSource::new(6, 1 << 20);
    assert!(
        owner
            .write_from(2 << 20, 1 << 20, &mut late, WriteFlags::default())
            .await
            .is_err()
    );
    assert_eq!(late.taken, 0, "a fenced owner copied the write");
    assert_eq!(
        read_local(&nodes[0], 2 << 20, 1 << 20).await?,
        pattern(5, 1 << 20).as_slice()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replica_is_recorded_stale_before_the_write_completes_and_then_skipped() -> Result<()>
{
    let c = cluster(1).await?;
    c.owner
        .write(0, pattern(1, 8192), WriteFlags::default())
        .await?;
    c.nodes[2].transport.shutdown();
    c.owner
        .write(0, pattern(4, 8192), WriteFlags::default())
        .await?;
    assert_eq!(*c.coordinator.stale.lock(), BTreeSet::from([3]));
    assert_eq!(c.owner.replica_nodes(), vec![1, 2]);
    c.owner
        .write(8192, pattern(5, 4096), WriteFlags::default())
        .await?;
    for node in &c.nodes[..2] {
        assert_eq!(
            read_local(node, 0, 8192).await?,
            pattern(4, 8192).as_slice()
        );
    }
    // The stale replica kept the old data: it must be resynced before use.
    assert_eq!(
        read_local(&c.nodes[2], 0, 8192).await?,
        pattern(1, 8192).as_slice()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_cannot_record_a_stale_replica_fails_the_write() -> Result<()> {
    let c = cluster(1).await?;
    c.owner
        .write(0, pattern(1, 4096), WriteFlags::default())
        .await?;
    c.nodes[1].transport.shutdown();
    *c.coordinator.refuse.lock() = true;
    let result = c
        .owner
        .write(0, pattern(2, 4096), WriteFlags::default())
        .await;
    if result.is_ok() {
        bail!("a write completed without all replicas and without a stale record");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_owner_can_never_write_again() -> Result<()> {
    let c = cluster(1).await?;
    c.owner
        .write(0, pattern(1, 4096), WriteFlags::default())
        .await?;
    // A new owner took epoch 2 and fenced the remote replicas.
    for node in &c.nodes[1..] {
        node.gate.epochs().raise(VDISK, 2);
    }
    let result = c
        .owner
        .write(0, pattern(9, 4096), WriteFlags::default())
        .await;
    assert!(result.is_err(), "the fenced owner's write completed");
    assert!(c.owner.is_fenced());
    assert!(
        c.owner.read(0, 4096).await.is_err(),
        "a fenced owner serves nothing"
    );
    for node in &c.nodes[1..] {
        assert_eq!(
            read_local(node, 0, 4096).await?,
            pattern(1, 4096).as_slice()
        );
    }
    assert!(
        c.coordinator.stale.lock().is_empty(),
        "fencing is not a replica failure"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_replica_requests_are_refused() -> Result<()> {
    let c = cluster(1).await?;
    let result = c.nodes[0]
        .transport
        .call(
            &c.nodes[1].addr,
            basalt_net::TrafficClass::Foreground,
            SERVICE_REPLICA,
            bytes::Bytes::from_static(b"short"),
            bytes::Bytes::new(),
        )
        .await;
    assert!(
        matches!(result, Err(basalt_net::NetError::Remote(e)) if e.code == basalt_replica::CODE_INVALID)
    );
    let request = Request::new(Op::Read, 99, 1, 0, 4096);
    let result = c.nodes[0]
        .transport
        .call(
            &c.nodes[1].addr,
            basalt_net::TrafficClass::Foreground,
            SERVICE_REPLICA,
            request.encode(),
            bytes::Bytes::new(),
        )
        .await;
    assert!(
        matches!(result, Err(basalt_net::NetError::Remote(e)) if e.code == basalt_replica::CODE_NO_REPLICA)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_repairs_what_an_unsettled_write_left_diverging() -> Result<()> {
    let c = cluster(1).await?;
    c.owner
        .write(0, pattern(1, 3 << 20), WriteFlags::default())
        .await?;
    // The flush carries the settled mark past that write.
    c.owner.flush().await?;
    // The owner dies part-way through two writes: one reached node 2 only,
    // the other node 1 (its own copy) and node 3.
    unsettled_write(&c.nodes[0], &c.nodes[1], 1, 4096, pattern(7, 8192)).await?;
    unsettled_write(&c.nodes[1], &c.nodes[2], 1, 2 << 20, pattern(8, 4096)).await?;
    unsettled_write(&c.nodes[1], &c.nodes[0], 1, 2 << 20, pattern(8, 4096)).await?;
    let report = c.nodes[1].gate.dirty().report(VDISK);
    assert_eq!(report.regions, vec![0], "node 2 noted the unsettled region");
    drop(c.owner);
    // Node 3 takes over under epoch 2: before it serves anything, the
    // in-sync replicas agree again, on its own copy's data.
    let (_coordinator, owner) = owner_on(&c.nodes, 2, 2)?;
    let expected = owner.read(0, 3 << 20).await?.as_slice().to_vec();
    assert_eq!(
        &expected[4096..4096 + 8192],
        &pattern(1, 3 << 20).as_slice()[4096..4096 + 8192]
    );
    assert_eq!(
        &expected[2 << 20..(2 << 20) + 4096],
        pattern(8, 4096).as_slice()
    );
    for node in &c.nodes {
        assert_eq!(
            read_local(node, 0, 3 << 20).await?,
            expected,
            "node {} disagrees after the takeover",
            node.id
        );
        assert_eq!(
            node.gate.dirty().report(VDISK),
            DirtyReport {
                complete: true,
                regions: vec![]
            },
            "node {} still has notes after the settle",
            node.id
        );
    }
    // Settled writes leave no notes behind.
    owner
        .write(8 << 20, pattern(3, 1 << 20), WriteFlags::default())
        .await?;
    owner.flush().await?;
    for node in &c.nodes {
        assert!(
            node.gate.dirty().report(VDISK).regions.is_empty(),
            "node {}",
            node.id
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_restarted_gets_its_whole_copy_compared() -> Result<()> {
    let c = cluster(1).await?;
    c.owner
        .write(0, pattern(1, 1 << 20), WriteFlags::default())
        .await?;
    drop(c.owner);
    // Node 2 restarted: whatever it applied before is unknown to it. Its
    // copy differs far from any note.
    let far = SIZE - (1 << 20);
    c.nodes[1]
        .registry
        .get_by_id(VDISK)
        .context("replica")?
        .write(far, pattern(5, 65536), WriteFlags::default())
        .await?;
    c.nodes[1].gate.dirty().forget(VDISK);
    assert!(!c.nodes[1].gate.dirty().report(VDISK).complete);
    let (_coordinator, owner) = owner_on(&c.nodes, 0, 2)?;
    let expected = owner.read(far, 65536).await?.as_slice().to_vec();
    assert!(expected.iter().all(|b| *b == 0));
    for node in &c.nodes {
        assert_eq!(
            read_local(node, far, 65536).await?,
            expected,
            "node {}",
            node.id
        );
        assert!(node.gate.dirty().report(VDISK).complete);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_owner_cannot_write_its_own_copy_either() -> Result<()> {
    let c = cluster(1).await?;
    c.owner
        .write(0, pattern(1, 4096), WriteFlags::default())
        .await?;
    // A new owner elsewhere fenced this node's copy too.
    let (_coordinator, owner) = owner_on(&c.nodes, 1, 2)?;
    owner
        .write(0, pattern(2, 4096), WriteFlags::default())
        .await?;
    assert!(
        c.owner
            .write(0, pattern(9, 4096), WriteFlags::default())
            .await
            .is_err()
    );
    assert!(c.owner.read(0, 4096).await.is_err());
    for node in &c.nodes {
        assert_eq!(
            read_local(node, 0, 4096).await?,
            pattern(2, 4096).as_slice(),
            "node {}",
            node.id
        );
    }
    Ok(())
}

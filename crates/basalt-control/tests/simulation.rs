//! A deterministic, seeded simulation of the replication and epoch rules.
//!
//! Three nodes hold replicas of one vdisk. Clients on any node take it over
//! and write; messages between nodes are delayed, reordered and lost; nodes
//! crash and restart (losing what was in flight and what they kept in
//! memory) and the network partitions and heals. The cluster metadata is the
//! real [`ClusterState`] (its `AcquireVdisk` and `MarkStale` validation is
//! what is under test), applied only when the proposer reaches a majority,
//! as Raft would; each replica fences with the real [`EpochTable`] and
//! notes unsettled writes in the real [`DirtyTable`]. The owner follows the
//! rules of `ReplicatedVdisk`: a write completes when every in-sync replica
//! has it, a replica that failed it must first be recorded stale, every
//! write carries its number and the owner's settled mark, and a new owner
//! compares and repairs the regions the fenced replicas report unsettled
//! (the whole vdisk when one restarted) before it writes.
//!
//! After every schedule the network heals and, for every block, no in-sync
//! replica may hold a value older than the newest acknowledged write to
//! that block — acknowledged data is never lost — and all in-sync replicas
//! hold the same value, whatever the schedule: a write that failed part-way
//! (applied on some replicas, its failure unrecordable because the owner
//! crashed or lost its quorum) must not leave them disagreeing once a new
//! owner has taken over. The final takeover is part of the schedule.
//!
//! Simplification: a takeover (fence, reports, comparison and repair) is
//! one atomic step here; in the real code the repairs are ordinary numbered
//! writes that a crash may interrupt, noted like any other.
//!
//! `BASALT_SIM_SEEDS=N` runs N seeds (CI runs a fixed 300), `BASALT_SIM_SEED`
//! replays one.

use std::collections::{BTreeMap, BTreeSet};

use basalt_meta::{ClusterState, Command, CommandResult, NodeRecord, NodeState, ReplicaState};
use basalt_replica::{DIRTY_REGION, DirtyTable, EpochTable};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const NODES: u64 = 3;
const BLOCKS: usize = 6;
const VDISK: u64 = 1;

#[derive(Debug, Clone)]
enum Event {
    /// A client on `node` takes the vdisk over.
    Acquire {
        node: u64,
    },
    /// The owner on `node` issues a write.
    Write {
        node: u64,
        block: usize,
    },
    /// A write reaches a replica.
    Deliver {
        write: u64,
        replica: u64,
    },
    /// The replica's answer reaches the owner.
    Answer {
        write: u64,
        replica: u64,
        ok: bool,
        fenced: bool,
    },
    Crash {
        node: u64,
    },
    Restart {
        node: u64,
    },
    Partition {
        side: BTreeSet<u64>,
    },
    Heal,
}

struct Owner {
    epoch: u64,
    /// Replicas written to (all placed ones) and whether in sync when taken.
    replicas: Vec<(u64, bool)>,
    fenced: bool,
    /// Numbers of writes issued so far, and those not settled.
    issued: u64,
    unsettled: BTreeSet<u64>,
}

impl Owner {
    fn mark(&self) -> u64 {
        self.unsettled.first().copied().unwrap_or(self.issued + 1)
    }
}

struct Pending {
    owner: u64,
    epoch: u64,
    block: usize,
    value: u64,
    seq: u64,
    mark: u64,
    waiting: BTreeSet<u64>,
    failed: Vec<u64>,
    fenced: bool,
    /// Replicas that were in sync when the write was issued.
    in_sync: BTreeSet<u64>,
}

struct Sim {
    rng: StdRng,
    now: u64,
    queue: BTreeMap<(u64, u64), Event>,
    seq: u64,
    state: ClusterState,
    up: BTreeSet<u64>,
    /// Nodes on the minority side of a partition (empty: no partition).
    cut: BTreeSet<u64>,
    copies: BTreeMap<u64, Vec<u64>>,
    epochs: BTreeMap<u64, EpochTable>,
    dirty: BTreeMap<u64, DirtyTable>,
    owners: BTreeMap<u64, Owner>,
    pending: BTreeMap<u64, Pending>,
    next_value: u64,
    /// Newest acknowledged value per block.
    acked: Vec<u64>,
    /// Blocks a takeover repaired.
    repaired: usize,
    log: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut state = ClusterState::default();
        state.apply(&Command::Bootstrap {
            cluster_id: Uuid::from_u128(u128::from(seed) + 1),
        });
        for id in 1..=NODES {
            state.apply(&Command::AddNode {
                node: NodeRecord {
                    id,
                    uuid: Uuid::from_u128(u128::from(id)),
                    listen: format!("n{id}"),
                    api: String::new(),
                    nbd: String::new(),
                    joined: 0,
                    state: NodeState::Up,
                },
            });
        }
        let created = state.apply(&Command::CreateVdisk {
            name: "v".into(),
            size: 1 << 20,
            rf: 3,
            created: 0,
            preferred: Some(1),
        });
        assert_eq!(created, CommandResult::Id(VDISK));
        Sim {
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            queue: BTreeMap::new(),
            seq: 0,
            state,
            up: (1..=NODES).collect(),
            cut: BTreeSet::new(),
            copies: (1..=NODES).map(|n| (n, vec![0; BLOCKS])).collect(),
            epochs: (1..=NODES).map(|n| (n, EpochTable::new())).collect(),
            dirty: (1..=NODES)
                .map(|n| {
                    let table = DirtyTable::new();
                    table.mark_known(VDISK);
                    (n, table)
                })
                .collect(),
            owners: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_value: 1,
            acked: vec![0; BLOCKS],
            repaired: 0,
            log: Vec::new(),
        }
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), event);
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        self.up.contains(&a)
            && self.up.contains(&b)
            && self.cut.contains(&a) == self.cut.contains(&b)
    }

    /// Raft: a proposal from `node` is applied if it reaches a majority.
    fn propose(&mut self, node: u64, command: Command) -> Option<CommandResult> {
        let reachable = (1..=NODES).filter(|n| self.connected(node, *n)).count() as u64;
        if reachable * 2 <= NODES {
            return None;
        }
        Some(self.state.apply(&command))
    }

    fn acquire(&mut self, node: u64) {
        if !self.up.contains(&node) {
            return;
        }
        let Some(CommandResult::Epoch(epoch)) = self.propose(
            node,
            Command::AcquireVdisk {
                name: "v".into(),
                node,
            },
        ) else {
            return;
        };
        let record = self.state.vdisks[&VDISK].clone();
        let mut replicas = Vec::new();
        let mut reports = BTreeMap::new();
        for replica in &record.replicas {
            let in_sync = replica.state == ReplicaState::InSync;
            if self.connected(node, replica.node) {
                // Fence, and collect what may be unsettled there.
                if self.epochs[&replica.node].admit(VDISK, epoch).is_err() {
                    return;
                }
                reports.insert(replica.node, self.dirty[&replica.node].report(VDISK));
                replicas.push((replica.node, in_sync));
            } else {
                let marked = self.propose(
                    node,
                    Command::MarkStale {
                        vdisk: VDISK,
                        node: replica.node,
                        epoch,
                    },
                );
                if !matches!(marked, Some(CommandResult::Done)) {
                    self.log
                        .push(format!("t{} node {node} acquire failed", self.now));
                    return;
                }
            }
        }
        if !replicas.iter().any(|(_, in_sync)| *in_sync) {
            return;
        }
        // Reconcile the in-sync replicas (the owner's own copy first) where
        // a report says a write may not have settled.
        let mut in_sync: Vec<u64> = replicas
            .iter()
            .filter(|(_, s)| *s)
            .map(|(n, _)| *n)
            .collect();
        in_sync.sort_by_key(|n| *n != node);
        let whole = in_sync.iter().any(|n| !reports[n].complete);
        let blocks: BTreeSet<usize> = if whole {
            (0..BLOCKS).collect()
        } else {
            in_sync
                .iter()
                .flat_map(|n| reports[n].regions.iter().map(|r| *r as usize))
                .filter(|b| *b < BLOCKS)
                .collect()
        };
        let source = in_sync[0];
        for block in blocks {
            let value = self.copies[&source][block];
            for other in &in_sync[1..] {
                if let Some(copy) = self.copies.get_mut(other)
                    && copy[block] != value
                {
                    copy[block] = value;
                    self.repaired += 1;
                }
            }
        }
        for (replica, _) in &replicas {
            self.dirty[replica].settle(VDISK, epoch);
        }
        self.log.push(format!(
            "t{} node {node} owns at epoch {epoch} (compared {})",
            self.now,
            if whole {
                "everything"
            } else {
                "the reported regions"
            }
        ));
        self.owners.insert(
            node,
            Owner {
                epoch,
                replicas,
                fenced: false,
                issued: 0,
                unsettled: BTreeSet::new(),
            },
        );
    }

    fn write(&mut self, node: u64, block: usize) {
        let Some(owner) = self.owners.get(&node) else {
            return;
        };
        if owner.fenced || !self.up.contains(&node) {
            return;
        }
        // Like QEMU, a client never has two overlapping writes in flight
        // (their order would be undefined).
        if self
            .pending
            .values()
            .any(|p| p.owner == node && p.block == block)
        {
            return;
        }
        let value = self.next_value;
        self.next_value += 1;
        let targets: Vec<(u64, bool)> = owner.replicas.clone();
        let epoch = owner.epoch;
        let write = value;
        let Some(owner) = self.owners.get_mut(&node) else {
            return;
        };
        owner.issued += 1;
        let seq = owner.issued;
        owner.unsettled.insert(seq);
        let mark = owner.mark();
        self.pending.insert(
            write,
            Pending {
                owner: node,
                epoch,
                block,
                value,
                seq,
                mark,
                waiting: targets.iter().map(|(n, _)| *n).collect(),
                failed: Vec::new(),
                fenced: false,
                in_sync: targets
                    .iter()
                    .filter(|(_, s)| *s)
                    .map(|(n, _)| *n)
                    .collect(),
            },
        );
        for (replica, _) in targets {
            let delay = self.rng.gen_range(1..20);
            self.at(delay, Event::Deliver { write, replica });
        }
    }

    fn deliver(&mut self, write: u64, replica: u64) {
        let Some(pending) = self.pending.get(&write) else {
            return;
        };
        let (owner, epoch, block, value, seq, mark) = (
            pending.owner,
            pending.epoch,
            pending.block,
            pending.value,
            pending.seq,
            pending.mark,
        );
        let delay = self.rng.gen_range(1..20);
        if !self.connected(owner, replica) {
            self.at(
                delay,
                Event::Answer {
                    write,
                    replica,
                    ok: false,
                    fenced: false,
                },
            );
            return;
        }
        match self.epochs[&replica].admit(VDISK, epoch) {
            Ok(()) => {
                let table = &self.dirty[&replica];
                table.record(VDISK, epoch, seq, block as u64 * DIRTY_REGION, 1);
                table.sweep(VDISK, epoch, mark);
                if let Some(copy) = self.copies.get_mut(&replica) {
                    copy[block] = value;
                }
                self.at(
                    delay,
                    Event::Answer {
                        write,
                        replica,
                        ok: true,
                        fenced: false,
                    },
                );
            }
            Err(_) => self.at(
                delay,
                Event::Answer {
                    write,
                    replica,
                    ok: false,
                    fenced: true,
                },
            ),
        }
    }

    fn answer(&mut self, write: u64, replica: u64, ok: bool, fenced: bool) {
        let Some(pending) = self.pending.get_mut(&write) else {
            return;
        };
        // A lost answer (owner down or cut off) is a failure too.
        let owner = pending.owner;
        let reached = ok
            && self.up.contains(&owner)
            && (self.cut.contains(&owner) == self.cut.contains(&replica));
        pending.waiting.remove(&replica);
        if fenced {
            pending.fenced = true;
        } else if !reached {
            pending.failed.push(replica);
        }
        if !pending.waiting.is_empty() {
            return;
        }
        let Some(pending) = self.pending.remove(&write) else {
            return;
        };
        if !self.up.contains(&pending.owner) {
            return;
        }
        if pending.fenced {
            if let Some(o) = self.owners.get_mut(&pending.owner) {
                o.fenced = true;
            }
            return;
        }
        let in_sync_failed = pending
            .failed
            .iter()
            .filter(|n| pending.in_sync.contains(n))
            .count();
        if in_sync_failed == pending.in_sync.len() {
            // Failed to the client; settled only if no replica applied it.
            let targets = self
                .owners
                .get(&pending.owner)
                .map_or(0, |o| o.replicas.len());
            if pending.failed.len() == targets {
                self.settle(pending.owner, pending.epoch, pending.seq);
            }
            return;
        }
        for failed in &pending.failed {
            let marked = self.propose(
                pending.owner,
                Command::MarkStale {
                    vdisk: VDISK,
                    node: *failed,
                    epoch: pending.epoch,
                },
            );
            if !matches!(marked, Some(CommandResult::Done)) {
                return;
            }
            if let Some(o) = self.owners.get_mut(&pending.owner) {
                o.replicas.retain(|(n, _)| n != failed);
            }
        }
        self.settle(pending.owner, pending.epoch, pending.seq);
        // Acknowledged to the client.
        self.log.push(format!(
            "t{} ack value {} block {}",
            self.now, pending.value, pending.block
        ));
        self.acked[pending.block] = self.acked[pending.block].max(pending.value);
    }

    fn settle(&mut self, owner: u64, epoch: u64, seq: u64) {
        if let Some(o) = self.owners.get_mut(&owner)
            && o.epoch == epoch
        {
            o.unsettled.remove(&seq);
        }
    }

    fn crash(&mut self, node: u64) {
        self.up.remove(&node);
        // The owner process and its in-flight writes die with the node.
        self.owners.remove(&node);
        self.pending.retain(|_, p| p.owner != node);
        self.log.push(format!("t{} crash {node}", self.now));
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            let delay = self.rng.gen_range(1..15);
            let event = match self.rng.gen_range(0..100) {
                0..=9 => Event::Acquire {
                    node: self.rng.gen_range(1..=NODES),
                },
                10..=69 => Event::Write {
                    node: self.rng.gen_range(1..=NODES),
                    block: self.rng.gen_range(0..BLOCKS),
                },
                70..=77 => Event::Crash {
                    node: self.rng.gen_range(1..=NODES),
                },
                78..=87 => Event::Restart {
                    node: self.rng.gen_range(1..=NODES),
                },
                88..=93 => Event::Partition {
                    side: [self.rng.gen_range(1..=NODES)].into_iter().collect(),
                },
                _ => Event::Heal,
            };
            self.at(delay, event);
            self.step_until(self.now + delay);
        }
        self.cut.clear();
        for node in 1..=NODES {
            self.up.insert(node);
        }
        self.step_until(u64::MAX);
        // A client takes the vdisk over once more: its reads must agree.
        for node in 1..=NODES {
            self.acquire(node);
            if self.owners.contains_key(&node) {
                break;
            }
        }
    }

    fn step_until(&mut self, until: u64) {
        while let Some((&(time, seq), _)) = self.queue.iter().next() {
            if time > until {
                break;
            }
            let Some(event) = self.queue.remove(&(time, seq)) else {
                break;
            };
            self.now = time;
            match event {
                Event::Acquire { node } => self.acquire(node),
                Event::Write { node, block } => self.write(node, block),
                Event::Deliver { write, replica } => self.deliver(write, replica),
                Event::Answer {
                    write,
                    replica,
                    ok,
                    fenced,
                } => self.answer(write, replica, ok, fenced),
                Event::Crash { node } => self.crash(node),
                Event::Restart { node } => {
                    if self.up.insert(node) {
                        // The epoch table lives in memory: a restarted node
                        // starts with none (the real node raises it from its
                        // Raft state as it catches up; here, not at all).
                        self.epochs.insert(node, EpochTable::new());
                        // So do the dirty notes: this vdisk is unknown now.
                        self.dirty.insert(node, DirtyTable::new());
                    }
                }
                Event::Partition { side } => self.cut = side,
                Event::Heal => self.cut.clear(),
            }
        }
    }

    /// Checks that acknowledged writes are all there and that the in-sync
    /// replicas agree.
    fn check(&self) -> Result<(), String> {
        let record = &self.state.vdisks[&VDISK];
        let in_sync: Vec<u64> = record.in_sync().collect();
        if in_sync.is_empty() {
            return Err("no in-sync replica left".into());
        }
        if !self.owners.values().any(|o| !o.fenced) {
            return Err("no node could take the vdisk over after healing".into());
        }
        for (block, acked) in self.acked.iter().enumerate() {
            for node in &in_sync {
                let held = self.copies[node][block];
                if held < *acked {
                    return Err(format!(
                        "block {block}: acknowledged value {acked} lost, in-sync node {node} holds {held}"
                    ));
                }
            }
        }
        let reference = &self.copies[&in_sync[0]];
        let diverging = (0..BLOCKS)
            .filter(|block| {
                in_sync
                    .iter()
                    .any(|n| self.copies[n][*block] != reference[*block])
            })
            .count();
        if diverging > 0 {
            return Err(format!(
                "in-sync replicas disagree on {diverging} blocks after a takeover: {:?}",
                in_sync
                    .iter()
                    .map(|n| (n, &self.copies[n]))
                    .collect::<Vec<_>>()
            ));
        }
        Ok(())
    }
}

/// Runs one schedule: (blocks with an acknowledged write, blocks repaired).
fn run_seed(seed: u64) -> Result<(usize, usize), String> {
    let mut sim = Sim::new(seed);
    sim.run(400);
    let acked = sim.acked.iter().filter(|v| **v > 0).count();
    sim.check().map(|()| (acked, sim.repaired)).map_err(|why| {
        let tail: Vec<&String> = sim.log.iter().rev().take(25).collect();
        format!("seed {seed}: {why}\nlast events (newest first): {tail:#?}")
    })
}

#[test]
fn replication_and_epoch_rules_hold_under_random_schedules() {
    if let Some(seed) = std::env::var("BASALT_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        if let Err(why) = run_seed(seed) {
            panic!("{why}");
        }
        return;
    }
    let seeds: u64 = std::env::var("BASALT_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut acknowledged = 0;
    let mut repaired = 0;
    for seed in 0..seeds {
        match run_seed(seed) {
            Ok((acked, fixed)) => {
                acknowledged += acked;
                repaired += fixed;
            }
            Err(why) => panic!("{why}"),
        }
    }
    eprintln!(
        "{seeds} schedules: {acknowledged} blocks with acknowledged writes, all kept; \
         takeovers repaired {repaired} blocks left diverging by unsettled writes"
    );
    // The schedules must actually acknowledge writes, or the check is empty.
    assert!(
        acknowledged > seeds as usize,
        "only {acknowledged} blocks acknowledged over {seeds} seeds"
    );
}

//! Connections, request/reply matching and the services a node offers.
//!
//! A node keeps one outbound connection per peer address for its own
//! requests and accepts inbound connections for the requests of others; a
//! pair of nodes therefore talks over two TCP connections, each carrying
//! requests one way and replies the other. That keeps each side's send
//! scheduler in charge of everything it sends: requests on the outbound
//! connection, replies on the inbound one, both ordered by class.
//!
//! Requests are dispatched by *service* number to a [`Handler`] the layer
//! above registers (Raft, cluster control, replication...). Handlers run
//! concurrently, at most [`MAX_IN_FLIGHT_PER_CONNECTION`] per connection, so
//! one slow request never holds up the others and a flood from one peer
//! cannot exhaust the node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, oneshot};
use uuid::Uuid;

use crate::NetError;
use crate::frame::{Frame, FrameKind, TrafficClass, read_frame};
use crate::handshake::{
    Hello, PROTOCOL_VERSION, Welcome, WelcomeStatus, negotiate, read_hello, send_hello,
};
use crate::sched::{ClassQueues, ClassWeights};

/// Read buffer of a connection (large data parts bypass it).
const READ_BUFFER: usize = 256 << 10;

/// Most requests of one inbound connection handled at the same time.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 512;

/// Who this node is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The cluster; nil until the node has bootstrapped or joined one.
    pub cluster_id: Uuid,
    /// The node's id in the cluster; 0 until assigned.
    pub node_id: u64,
}

/// Tunables of a [`Transport`].
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Foreground/background shares of each connection.
    pub weights: ClassWeights,
    /// How long to wait for a TCP connection and handshake.
    pub connect_timeout: Duration,
    /// Oldest protocol version accepted (tests lower/raise these).
    pub min_version: u16,
    /// Newest protocol version spoken.
    pub max_version: u16,
}

impl Default for TransportConfig {
    fn default() -> TransportConfig {
        TransportConfig {
            weights: ClassWeights::default(),
            connect_timeout: Duration::from_secs(3),
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        }
    }
}

/// The sender of a request, as established by the handshake.
#[derive(Debug, Clone, Copy)]
pub struct PeerInfo {
    /// The peer's TCP address (its outbound socket, not its listen address).
    pub addr: SocketAddr,
    /// The node id it presented (0 while joining).
    pub node_id: u64,
    /// True when it belongs to no cluster yet.
    pub joining: bool,
}

/// A request delivered to a [`Handler`].
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Who sent it.
    pub peer: PeerInfo,
    /// Its traffic class (the reply travels in the same class).
    pub class: TrafficClass,
    /// The service it was addressed to.
    pub service: u16,
    /// The message.
    pub body: Bytes,
    /// Raw bulk bytes.
    pub data: Bytes,
}

/// A successful answer.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// The message.
    pub body: Bytes,
    /// Raw bulk bytes.
    pub data: Bytes,
}

impl Reply {
    /// A reply with a body and no data.
    pub fn body(body: impl Into<Bytes>) -> Reply {
        Reply {
            body: body.into(),
            data: Bytes::new(),
        }
    }
}

/// A failed request as the requester sees it: a code the layer above
/// defines and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RemoteError {
    /// Meaning defined by the service.
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

impl RemoteError {
    /// Code of errors raised by the transport itself (unknown service...).
    pub const TRANSPORT: u16 = 0xffff;

    /// A new error.
    pub fn new(code: u16, message: impl Into<String>) -> RemoteError {
        RemoteError {
            code,
            message: message.into(),
        }
    }

    fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(2 + self.message.len());
        out.put_u16_le(self.code);
        out.put_slice(self.message.as_bytes());
        out.freeze()
    }

    fn decode(mut body: Bytes) -> RemoteError {
        if body.len() < 2 {
            return RemoteError::new(Self::TRANSPORT, "malformed error reply");
        }
        let code = body.get_u16_le();
        RemoteError::new(code, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Serves the requests of one service.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request. Runs concurrently with others.
    fn handle(&self, request: Incoming) -> BoxFuture<'static, Result<Reply, RemoteError>>;
}

struct Service {
    handler: Arc<dyn Handler>,
    open_to_joining: bool,
}

/// Bytes moved, by class (index = `TrafficClass as usize`).
#[derive(Debug, Default)]
pub struct TrafficCounters {
    sent: [AtomicU64; 3],
    received: [AtomicU64; 3],
}

impl TrafficCounters {
    /// Bytes sent in a class (frames and headers).
    pub fn sent(&self, class: TrafficClass) -> u64 {
        self.sent[class as usize].load(Ordering::Relaxed)
    }

    /// Bytes received in a class.
    pub fn received(&self, class: TrafficClass) -> u64 {
        self.received[class as usize].load(Ordering::Relaxed)
    }
}

/// The node's endpoint: serves inbound connections, sends requests to peers.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    identity: RwLock<Identity>,
    config: TransportConfig,
    services: RwLock<HashMap<u16, Service>>,
    links: Mutex<HashMap<String, Arc<LinkSlot>>>,
    next_request: AtomicU64,
    counters: TrafficCounters,
    /// Set once by [`Transport::shutdown`]; every task of the transport watches it.
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Nodes this node cannot talk to (fault injection for partition tests).
    partitioned: RwLock<std::collections::HashSet<u64>>,
}

/// The outbound connection to one address, if open; its lock serialises
/// connecting so concurrent callers share one connection.
type LinkSlot = tokio::sync::Mutex<Option<Arc<Link>>>;

/// One connection's send side and outstanding requests.
struct Link {
    queues: Mutex<ClassQueues>,
    wake: Notify,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Frame, NetError>>>>,
    closed: AtomicBool,
    peer_node: u64,
}

impl Link {
    fn new(weights: ClassWeights, peer_node: u64) -> Arc<Link> {
        Arc::new(Link {
            queues: Mutex::new(ClassQueues::new(weights)),
            wake: Notify::new(),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            peer_node,
        })
    }

    fn send(&self, frame: Frame) -> Result<(), NetError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(NetError::Disconnected);
        }
        self.queues.lock().push(frame);
        self.wake.notify_one();
        Ok(())
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.queues.lock().drain_all();
        let pending: Vec<_> = self.pending.lock().drain().collect();
        for (_, waiter) in pending {
            let _ = waiter.send(Err(NetError::Disconnected));
        }
        self.wake.notify_one();
    }
}

/// Removes a pending request when its caller stops waiting.
struct PendingGuard {
    link: Arc<Link>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.link.pending.lock().remove(&self.id);
    }
}

impl Transport {
    /// A transport with the given identity (nil cluster while joining).
    pub fn new(identity: Identity, config: TransportConfig) -> Transport {
        Transport {
            inner: Arc::new(Inner {
                identity: RwLock::new(identity),
                config,
                services: RwLock::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
                next_request: AtomicU64::new(1),
                counters: TrafficCounters::default(),
                shutdown: tokio::sync::watch::Sender::new(false),
                partitioned: RwLock::new(std::collections::HashSet::new()),
            }),
        }
    }

    /// This node's identity.
    pub fn identity(&self) -> Identity {
        *self.inner.identity.read()
    }

    /// Changes the identity (after joining a cluster). Existing outbound
    /// connections were opened under the old identity and are dropped.
    pub fn set_identity(&self, identity: Identity) {
        *self.inner.identity.write() = identity;
        self.close_links(|_| true, true);
    }

    /// Stops serving: the listener closes, inbound connections are cut and
    /// outbound ones closed (their pending calls fail). Used when the daemon
    /// stops, and by tests to make a node vanish.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        self.close_links(|_| true, true);
    }

    /// Fault injection: from now on this node neither sends to nor accepts
    /// anything from `nodes` (an empty list heals). Connections to and from
    /// them are cut. Tests use it to partition a cluster.
    pub fn set_partition(&self, nodes: impl IntoIterator<Item = u64>) {
        let nodes: std::collections::HashSet<u64> = nodes.into_iter().collect();
        tracing::warn!(?nodes, "fault injection: partitioned from these nodes");
        *self.inner.partitioned.write() = nodes.clone();
        self.close_links(|link| nodes.contains(&link.peer_node), false);
    }

    fn is_partitioned_from(&self, node: u64) -> bool {
        self.inner.partitioned.read().contains(&node)
    }

    fn is_shut_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Bytes moved by class.
    pub fn counters(&self) -> &TrafficCounters {
        &self.inner.counters
    }

    /// Registers the handler of a service. `open_to_joining` lets nodes that
    /// belong to no cluster yet call it (the join service); every other
    /// service answers them with an error.
    pub fn register(&self, service: u16, handler: Arc<dyn Handler>, open_to_joining: bool) {
        self.inner.services.write().insert(
            service,
            Service {
                handler,
                open_to_joining,
            },
        );
    }

    /// Accepts connections on `listener` until [`Transport::shutdown`].
    pub fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let transport = self.clone();
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                };
                match accepted {
                    Ok((stream, addr)) => {
                        let transport = transport.clone();
                        tokio::spawn(async move {
                            if let Err(error) = transport.serve_connection(stream, addr).await {
                                tracing::warn!(peer = %addr, %error, "peer connection closed");
                            }
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accepting a peer connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }

    async fn serve_connection(
        &self,
        mut stream: TcpStream,
        addr: SocketAddr,
    ) -> Result<(), NetError> {
        let _ = stream.set_nodelay(true);
        let hello =
            tokio::time::timeout(self.inner.config.connect_timeout, read_hello(&mut stream))
                .await
                .map_err(|_| NetError::Malformed("no hello within the connect timeout".into()))??;
        let identity = self.identity();
        let config = &self.inner.config;
        let refusal = |status, reason: String| Welcome {
            status,
            version: 0,
            cluster_id: identity.cluster_id,
            node_id: identity.node_id,
            reason,
        };
        let decision = match negotiate(&hello, config.min_version, config.max_version) {
            None => Err(refusal(
                WelcomeStatus::UnsupportedVersion,
                format!(
                    "no common protocol version: the peer speaks {}..={}, this node {}..={}",
                    hello.min_version, hello.max_version, config.min_version, config.max_version
                ),
            )),
            Some(_) if identity.cluster_id.is_nil() => Err(refusal(
                WelcomeStatus::Refused,
                "this node is not a member of any cluster yet".into(),
            )),
            Some(_) if !hello.is_joining() && hello.cluster_id != identity.cluster_id => {
                Err(refusal(
                    WelcomeStatus::WrongCluster,
                    format!(
                        "wrong cluster: this node belongs to cluster {}, the peer (node {}) to cluster {}",
                        identity.cluster_id, hello.node_id, hello.cluster_id
                    ),
                ))
            }
            Some(version) => Ok(version),
        };
        let version = match decision {
            Ok(version) => version,
            Err(welcome) => {
                tracing::warn!(peer = %addr, reason = %welcome.reason, "refused a peer");
                stream.write_all(&welcome.encode()).await?;
                let _ = stream.shutdown().await;
                return Ok(());
            }
        };
        let welcome = Welcome {
            status: WelcomeStatus::Accepted,
            version,
            cluster_id: identity.cluster_id,
            node_id: identity.node_id,
            reason: String::new(),
        };
        stream.write_all(&welcome.encode()).await?;
        let peer = PeerInfo {
            addr,
            node_id: hello.node_id,
            joining: hello.is_joining(),
        };
        tracing::debug!(peer = %addr, node = hello.node_id, joining = peer.joining, "peer connected");
        let (reader, writer) = stream.into_split();
        let link = Link::new(config.weights, hello.node_id);
        let writer_task = tokio::spawn(write_loop(self.clone(), link.clone(), writer));
        let result = self.serve_requests(peer, &link, reader).await;
        link.close();
        let _ = writer_task.await;
        result
    }

    async fn serve_requests(
        &self,
        peer: PeerInfo,
        link: &Arc<Link>,
        reader: OwnedReadHalf,
    ) -> Result<(), NetError> {
        // Buffered: under load one read brings in many frames, instead of
        // three system calls per frame (header, body, data).
        let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let frame = tokio::select! {
                frame = read_frame(&mut reader) => frame?,
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            };
            let Some(frame) = frame else {
                return Ok(());
            };
            if self.is_partitioned_from(peer.node_id) {
                return Err(NetError::Unreachable {
                    addr: peer.addr.to_string(),
                    reason: "partitioned (fault injection)".into(),
                });
            }
            self.inner.counters.received[frame.class as usize]
                .fetch_add(frame.wire_len() as u64, Ordering::Relaxed);
            if frame.kind != FrameKind::Request {
                return Err(NetError::Malformed(
                    "a reply arrived on a connection that carries requests".into(),
                ));
            }
            let service = {
                let services = self.inner.services.read();
                match services.get(&frame.service) {
                    Some(service) if service.open_to_joining || !peer.joining => {
                        Ok(service.handler.clone())
                    }
                    Some(_) => Err(RemoteError::new(
                        RemoteError::TRANSPORT,
                        format!(
                            "service {} is for cluster members; join the cluster first",
                            frame.service
                        ),
                    )),
                    None => Err(RemoteError::new(
                        RemoteError::TRANSPORT,
                        format!("unknown service {}", frame.service),
                    )),
                }
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return Ok(());
            };
            let link = link.clone();
            let incoming = Incoming {
                peer,
                class: frame.class,
                service: frame.service,
                body: frame.body,
                data: frame.data,
            };
            tokio::spawn(async move {
                let result = match service {
                    Ok(handler) => handler.handle(incoming).await,
                    Err(error) => Err(error),
                };
                let (kind, body, data) = match result {
                    Ok(reply) => (FrameKind::Reply, reply.body, reply.data),
                    Err(error) => (FrameKind::Error, error.encode(), Bytes::new()),
                };
                let _ = link.send(Frame {
                    class: frame.class,
                    kind,
                    service: frame.service,
                    request_id: frame.request_id,
                    body,
                    data,
                });
                drop(permit);
            });
        }
    }

    /// Sends a request to the node listening at `addr` and waits for its reply.
    pub async fn call(
        &self,
        addr: &str,
        class: TrafficClass,
        service: u16,
        body: Bytes,
        data: Bytes,
    ) -> Result<Reply, NetError> {
        let link = self.link(addr).await?;
        if self.is_partitioned_from(link.peer_node) {
            link.close();
            return Err(NetError::Unreachable {
                addr: addr.to_string(),
                reason: "partitioned (fault injection)".into(),
            });
        }
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        link.pending.lock().insert(id, sender);
        let _guard = PendingGuard {
            link: link.clone(),
            id,
        };
        link.send(Frame {
            class,
            kind: FrameKind::Request,
            service,
            request_id: id,
            body,
            data,
        })?;
        let frame = receiver.await.map_err(|_| NetError::Disconnected)??;
        match frame.kind {
            FrameKind::Reply => Ok(Reply {
                body: frame.body,
                data: frame.data,
            }),
            _ => Err(NetError::Remote(RemoteError::decode(frame.body))),
        }
    }

    /// [`Transport::call`] that gives up after `timeout`.
    pub async fn call_timeout(
        &self,
        addr: &str,
        class: TrafficClass,
        service: u16,
        body: Bytes,
        data: Bytes,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        tokio::time::timeout(timeout, self.call(addr, class, service, body, data))
            .await
            .map_err(|_| NetError::Timeout)?
    }

    /// The node id of the peer at `addr`, connecting if needed.
    pub async fn peer_node_id(&self, addr: &str) -> Result<u64, NetError> {
        Ok(self.link(addr).await?.peer_node)
    }

    /// Closes the connection to `addr` (the next call reconnects).
    pub fn disconnect(&self, addr: &str) {
        let slot = self.inner.links.lock().remove(addr);
        if let Some(slot) = slot {
            close_slot(&slot, |_| true);
        }
    }

    /// Closes the outbound connections whose link matches; with `forget`,
    /// also drops every connection slot (the next call starts afresh).
    fn close_links(&self, matches: impl Fn(&Link) -> bool, forget: bool) {
        let slots: Vec<_> = if forget {
            self.inner
                .links
                .lock()
                .drain()
                .map(|(_, slot)| slot)
                .collect()
        } else {
            self.inner.links.lock().values().cloned().collect()
        };
        for slot in slots {
            close_slot(&slot, &matches);
        }
    }

    async fn link(&self, addr: &str) -> Result<Arc<Link>, NetError> {
        if self.is_shut_down() {
            return Err(NetError::Disconnected);
        }
        // Fast path, taken by nearly every call: an open link, found without
        // allocating or waiting.
        let existing = self.inner.links.lock().get(addr).cloned();
        if let Some(slot) = &existing
            && let Ok(guard) = slot.try_lock()
            && let Some(link) = guard.as_ref()
            && !link.closed.load(Ordering::Acquire)
        {
            return Ok(link.clone());
        }
        let slot = match existing {
            Some(slot) => slot,
            None => self
                .inner
                .links
                .lock()
                .entry(addr.to_string())
                .or_default()
                .clone(),
        };
        let mut guard = slot.lock().await;
        if let Some(link) = guard.as_ref()
            && !link.closed.load(Ordering::Acquire)
        {
            return Ok(link.clone());
        }
        let link = tokio::time::timeout(self.inner.config.connect_timeout, self.connect(addr))
            .await
            .map_err(|_| NetError::Unreachable {
                addr: addr.to_string(),
                reason: "connect timed out".into(),
            })??;
        *guard = Some(link.clone());
        Ok(link)
    }

    async fn connect(&self, addr: &str) -> Result<Arc<Link>, NetError> {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|error| NetError::Unreachable {
                addr: addr.to_string(),
                reason: error.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        let identity = self.identity();
        let config = &self.inner.config;
        let hello = Hello {
            min_version: config.min_version,
            max_version: config.max_version,
            cluster_id: identity.cluster_id,
            node_id: identity.node_id,
        };
        let welcome = send_hello(&mut stream, &hello).await?;
        let (reader, writer) = stream.into_split();
        let link = Link::new(config.weights, welcome.node_id);
        tokio::spawn(write_loop(self.clone(), link.clone(), writer));
        tokio::spawn(read_replies(
            self.clone(),
            link.clone(),
            reader,
            addr.to_string(),
        ));
        Ok(link)
    }
}

/// Closes the link in `slot` if it matches. A slot being connected right
/// now (locked) is left alone.
fn close_slot(slot: &LinkSlot, matches: impl Fn(&Link) -> bool) {
    if let Ok(guard) = slot.try_lock()
        && let Some(link) = guard.as_ref()
        && matches(link)
    {
        link.close();
    }
}

/// Sends queued frames in scheduler order; flushes when the queue runs dry.
async fn write_loop(transport: Transport, link: Arc<Link>, writer: OwnedWriteHalf) {
    let mut writer = BufWriter::with_capacity(256 << 10, writer);
    loop {
        let next = link.queues.lock().pop();
        let result = match next {
            Some(frame) => write_frame(&mut writer, &frame).await.map(|()| {
                transport.inner.counters.sent[frame.class as usize]
                    .fetch_add(frame.wire_len() as u64, Ordering::Relaxed);
            }),
            None => {
                if let Err(error) = writer.flush().await {
                    Err(NetError::Io(error))
                } else if link.closed.load(Ordering::Acquire) {
                    break;
                } else {
                    link.wake.notified().await;
                    Ok(())
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "peer connection write failed");
            link.close();
            break;
        }
    }
    let _ = writer.shutdown().await;
}

async fn write_frame(
    writer: &mut BufWriter<OwnedWriteHalf>,
    frame: &Frame,
) -> Result<(), NetError> {
    let header = frame.encode_header()?;
    writer.write_all(&header).await?;
    writer.write_all(&frame.body).await?;
    writer.write_all(&frame.data).await?;
    Ok(())
}

/// Matches replies on an outbound connection to their requests.
async fn read_replies(transport: Transport, link: Arc<Link>, reader: OwnedReadHalf, addr: String) {
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let mut shutdown = transport.inner.shutdown.subscribe();
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader) => frame,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        match frame {
            Ok(Some(frame)) => {
                transport.inner.counters.received[frame.class as usize]
                    .fetch_add(frame.wire_len() as u64, Ordering::Relaxed);
                if frame.kind == FrameKind::Request {
                    tracing::warn!(peer = %addr, "peer sent a request on a reply connection");
                    break;
                }
                let waiter = link.pending.lock().remove(&frame.request_id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(frame));
                }
            }
            Ok(None) => break,
            Err(error) => {
                tracing::warn!(peer = %addr, %error, "peer connection failed");
                break;
            }
        }
    }
    link.close();
}

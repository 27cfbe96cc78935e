//! Accepting clients: one task per connection, a shared export registry, and
//! a graceful shutdown that lets outstanding requests finish.

use std::sync::Arc;
use std::time::Duration;

use basalt_core::{ExportRegistry, MAX_REQUEST_BYTES};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::conn::{self, End, wait_shutdown};
use crate::error::NbdError;

/// Tunables of an [`NbdServer`].
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Time a client has from connecting to entering transmission.
    pub handshake_timeout: Duration,
    /// Payload bytes (reads and writes, plus 1 KiB per request) one
    /// connection may have in flight; past this the server stops reading that
    /// client's requests until replies have been written. Values below room
    /// for two maximum-size requests (about 64 MiB) are raised to that.
    pub max_inflight_bytes: u32,
    /// After shutdown, how long [`NbdServer::serve`] waits for connections to
    /// finish their outstanding requests before dropping them.
    pub shutdown_grace: Duration,
}

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        NbdConfig {
            handshake_timeout: Duration::from_secs(30),
            max_inflight_bytes: 2 * MAX_REQUEST_BYTES,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// An NBD server exporting the backends of an [`ExportRegistry`].
///
/// Serving is cheap to start and can run on several listeners at once (TCP
/// and a unix socket, say): clone the server or call the serve methods from
/// several tasks.
#[derive(Clone)]
pub struct NbdServer {
    registry: Arc<dyn ExportRegistry>,
    config: NbdConfig,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl NbdServer {
    /// A server with the default [`NbdConfig`].
    pub fn new(registry: Arc<dyn ExportRegistry>) -> NbdServer {
        NbdServer::with_config(registry, NbdConfig::default())
    }

    /// A server with explicit tunables.
    pub fn with_config(registry: Arc<dyn ExportRegistry>, config: NbdConfig) -> NbdServer {
        NbdServer { registry, config }
    }

    /// Serves clients connecting to `listener` until `shutdown` becomes true
    /// (or its sender is dropped). Then it stops accepting, lets every
    /// connection finish the requests it already read (up to
    /// [`NbdConfig::shutdown_grace`]), and returns.
    ///
    /// A failing client only ends its own connection.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), NbdError> {
        self.serve_listener(Listener::Tcp(listener), shutdown).await
    }

    /// Like [`NbdServer::serve`], on a unix socket (`nbd+unix:///NAME?socket=PATH`).
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), NbdError> {
        self.serve_listener(Listener::Unix(listener), shutdown)
            .await
    }

    /// Serves one already-connected client over any byte stream (used by
    /// tests and by transports other than sockets). Returns when the client
    /// disconnects; the error says why a connection ended abnormally.
    pub async fn serve_stream<S>(
        &self,
        stream: S,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        conn::serve(
            reader,
            writer,
            self.registry.clone(),
            &self.config,
            shutdown,
        )
        .await
        .map(|_| ())
    }

    async fn serve_listener(
        &self,
        listener: Listener,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), NbdError> {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = wait_shutdown(&mut shutdown) => break,
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        tracing::error!("NBD connection task panicked: {e}");
                    }
                }
                accepted = accept(&listener) => match accepted {
                    Ok((reader, writer, peer)) => {
                        self.spawn_connection(&mut connections, reader, writer, peer, &shutdown);
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!("accepting an NBD client failed: {e}");
                        tokio::select! {
                            _ = wait_shutdown(&mut shutdown) => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                }
            }
        }
        drop(listener);
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(self.config.shutdown_grace, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = connections.len(),
                "NBD connections did not finish in time; dropping them"
            );
            connections.shutdown().await;
        }
        Ok(())
    }

    fn spawn_connection(
        &self,
        connections: &mut JoinSet<()>,
        reader: Box<dyn AsyncRead + Unpin + Send>,
        writer: Box<dyn AsyncWrite + Unpin + Send>,
        peer: String,
        shutdown: &watch::Receiver<bool>,
    ) {
        let registry = self.registry.clone();
        let config = self.config.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("nbd", %peer);
        connections.spawn(
            async move {
                tracing::debug!("client connected");
                match conn::serve(reader, writer, registry, &config, shutdown).await {
                    Ok(End::Disconnect | End::Eof | End::Negotiation) => {
                        tracing::debug!("client disconnected")
                    }
                    Ok(End::Shutdown) => tracing::debug!("connection closed for shutdown"),
                    Err(e) => tracing::info!(error = %e, cause = ?std::error::Error::source(&e),
                        "client connection ended"),
                }
            }
            .instrument(span),
        );
    }
}

type Halves = (
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn AsyncWrite + Unpin + Send>,
    String,
);

async fn accept(listener: &Listener) -> std::io::Result<Halves> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, peer) = listener.accept().await?;
            // Replies are batched by the connection; never let Nagle hold one back.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, "could not set TCP_NODELAY: {e}");
            }
            let (reader, writer) = stream.into_split();
            Ok((Box::new(reader), Box::new(writer), peer.to_string()))
        }
        Listener::Unix(listener) => {
            let (stream, _) = listener.accept().await?;
            let (reader, writer) = stream.into_split();
            Ok((Box::new(reader), Box::new(writer), "unix".to_string()))
        }
    }
}

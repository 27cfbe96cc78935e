//! Basalt's NBD server: exports vdisks to any NBD client (QEMU, qemu-img,
//! nbdcopy, nbdinfo, fio, the kernel's nbd-client).
//!
//! The server speaks the fixed-newstyle protocol as the NBD specification
//! describes it, with structured replies, `base:allocation` block status,
//! FUA, flush, trim, write-zeroes (including fast zero) and multi-connection
//! consistency. `docs/nbd.md` lists exactly what is supported.
//!
//! Layout, and why:
//!
//! * [`proto`] — the wire format with no I/O: constants, parsers, the
//!   decision what to do with a request, reply encoders. Everything a client
//!   controls is parsed here, so it is what the fuzz target exercises.
//! * [`negotiate`] — option haggling as a synchronous state machine over an
//!   [`basalt_core::ExportRegistry`]; also fuzzable and testable without sockets.
//! * `conn` / `reply` — one task per connection reads requests back to back,
//!   runs them all concurrently against the [`basalt_core::BlockBackend`],
//!   and puts every finished reply into one vectored write.
//!   Write payloads land directly in aligned [`basalt_core::IoBuf`]s and read
//!   payloads go from the backend's buffer to the socket without copies.
//! * [`server`] — accepting on TCP or unix sockets, graceful shutdown.
//! * [`testing`] — an in-memory backend and registry for tests and examples.
//!
//! ```no_run
//! # async fn run(registry: std::sync::Arc<dyn basalt_core::ExportRegistry>) -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! let (stop, shutdown) = tokio::sync::watch::channel(false);
//! let server = basalt_nbd::NbdServer::new(registry);
//! let task = tokio::spawn(async move { server.serve(listener, shutdown).await });
//! // ... later:
//! stop.send(true)?;
//! task.await??;
//! # Ok(()) }
//! ```

mod conn;
mod error;
pub mod negotiate;
pub mod proto;
mod reply;
pub mod server;
pub mod testing;

pub use error::NbdError;
pub use proto::ProtoError;
pub use server::{NbdConfig, NbdServer};

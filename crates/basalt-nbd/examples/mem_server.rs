//! Serves an in-memory export over NBD, for trying clients and benchmarking
//! the protocol layer on its own.
//!
//! ```text
//! cargo run --release -p basalt-nbd --example mem_server -- 127.0.0.1:10809 1G
//! qemu-img info nbd://127.0.0.1:10809/mem
//! ```
//!
//! Arguments: listen address (`HOST:PORT` or a unix socket path starting with
//! `/`), export size (`512M`, `1G`, ...), and optionally the number of runtime
//! worker threads. Stops on Ctrl-C.

use std::sync::Arc;

use basalt_core::size::parse_size;
use basalt_nbd::NbdServer;
use basalt_nbd::testing::{MemBackend, MemRegistry};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let size = parse_size(&args.next().unwrap_or_else(|| "1G".into()))?;
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let registry = Arc::new(MemRegistry::new());
        registry.insert("mem", "in-memory export", MemBackend::new(size));
        let server = NbdServer::new(registry);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = stop.send(true);
        });
        if addr.starts_with('/') {
            let _ = std::fs::remove_file(&addr);
            let listener = tokio::net::UnixListener::bind(&addr)?;
            eprintln!("serving export \"mem\" of {size} bytes on nbd+unix:///mem?socket={addr}");
            server.serve_unix(listener, shutdown).await?;
        } else {
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            eprintln!("serving export \"mem\" of {size} bytes on nbd://{addr}/mem");
            server.serve(listener, shutdown).await?;
        }
        Ok(())
    })
}

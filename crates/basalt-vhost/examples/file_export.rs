//! Exports a raw file, or a null disk, through Basalt's vhost-user-blk
//! device, without the store: a diagnostic for `bench/front_pair.py`, which
//! puts it beside qemu-storage-daemon's export of the same kind in one guest,
//! so that the device's share of a guest's figures shows apart from the
//! store's.
//!
//! ```text
//! cargo run --release -p basalt-vhost --example file_export -- \
//!     (--file PATH | --null BYTES) --socket PATH [--max-segments N]
//! ```
//!
//! A file is opened with `O_DIRECT` and served by blocking `pread`/`pwrite`
//! on tokio's blocking pool; FLUSH is `fdatasync`. The null disk answers at
//! once (reads are zeros, writes are dropped). Runs until killed.
#![allow(clippy::print_stderr)]

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use basalt_core::{AllocationExtent, BlockBackend, BlockError, BoxFuture, IoBuf, WriteFlags};
use basalt_vhost::{VhostBlkExport, VhostBlkOptions};

/// A raw file, or nothing.
struct Disk {
    file: Option<Arc<std::fs::File>>,
    size: u64,
}

fn io_error(error: impl std::fmt::Display) -> BlockError {
    BlockError::Io(error.to_string())
}

impl Disk {
    /// Runs `work` on the file on the blocking pool; `null` without a file.
    fn on_file<T: Send + 'static>(
        &self,
        null: impl FnOnce() -> T + Send + 'static,
        work: impl FnOnce(&std::fs::File) -> std::io::Result<T> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, BlockError>> {
        let file = self.file.clone();
        Box::pin(async move {
            match file {
                None => Ok(null()),
                Some(file) => tokio::task::spawn_blocking(move || work(&file))
                    .await
                    .map_err(io_error)?
                    .map_err(io_error),
            }
        })
    }
}

impl BlockBackend for Disk {
    fn size(&self) -> u64 {
        self.size
    }
    fn id(&self) -> String {
        "file-export".into()
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<IoBuf, BlockError>> {
        self.on_file(
            move || IoBuf::zeroed(len as usize),
            move |file| {
                let mut buf = IoBuf::for_overwrite(len as usize);
                file.read_exact_at(buf.as_mut_slice(), offset)?;
                Ok(buf)
            },
        )
    }
    fn write(
        &self,
        offset: u64,
        data: IoBuf,
        _flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        self.on_file(
            || (),
            move |file| file.write_all_at(data.as_slice(), offset),
        )
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        self.on_file(|| (), |file| file.sync_data())
    }
    fn trim(&self, _offset: u64, _len: u64) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _allocate: bool,
        _flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async {
            Err(BlockError::Invalid(
                "write-zeroes is not served by this diagnostic export".into(),
            ))
        })
    }
    fn block_status(
        &self,
        _offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<AllocationExtent>, BlockError>> {
        Box::pin(async move {
            Ok(vec![AllocationExtent {
                length: len,
                hole: false,
                zero: false,
            }])
        })
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut file, mut null, mut socket) = (None, None, None);
    let mut options = VhostBlkOptions {
        num_queues: 1,
        ..VhostBlkOptions::default()
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--file" => file = Some(value()?),
            "--null" => null = Some(value()?.parse::<u64>().context("--null BYTES")?),
            "--socket" => socket = Some(value()?),
            "--max-segments" => {
                options.max_segments = value()?.parse().context("--max-segments N")?;
            }
            other => bail!("unknown argument {other}"),
        }
    }
    let socket = socket.ok_or_else(|| anyhow!("--socket PATH is required"))?;
    let disk = match (file, null) {
        (Some(path), None) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .with_context(|| format!("opening {path}"))?;
            let size = file.metadata()?.len();
            Disk {
                file: Some(Arc::new(file)),
                size,
            }
        }
        (None, Some(size)) => Disk { file: None, size },
        _ => bail!("give either --file PATH or --null BYTES"),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let _export =
        VhostBlkExport::start(&socket, Arc::new(disk), runtime.handle().clone(), options)?;
    eprintln!("serving on {socket}");
    loop {
        std::thread::park();
    }
}

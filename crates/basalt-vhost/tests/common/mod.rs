//! Test helpers: an in-memory block backend that records what it was asked,
//! and a test frontend (`driver`).
#![allow(dead_code)]

pub mod driver;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use basalt_core::{
    AllocationExtent, BlockBackend, BlockError, BoxFuture, IoBuf, WriteFlags, check_range,
};
use parking_lot::Mutex;

/// A vdisk in a `Vec<u8>`.
pub struct MemBackend {
    pub data: Mutex<Vec<u8>>,
    pub id: String,
    /// Every backend call sleeps this long first (on the tokio timer).
    pub delay: Mutex<Duration>,
    /// Reads starting at this offset sleep this long instead.
    pub slow_read: Mutex<Option<(u64, Duration)>>,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub fua_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: Mutex<Vec<(u64, u64)>>,
    pub zeroes: Mutex<Vec<(u64, u64, bool)>>,
    inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    /// Reads and writes touching this byte fail with an I/O error.
    pub poison: Mutex<Option<u64>>,
    /// Reads starting at this offset panic.
    pub panic_at: Mutex<Option<u64>>,
}

impl MemBackend {
    pub fn new(size: usize, id: &str) -> Arc<MemBackend> {
        Arc::new(MemBackend {
            data: Mutex::new(vec![0u8; size]),
            id: id.to_string(),
            delay: Mutex::new(Duration::ZERO),
            slow_read: Mutex::new(None),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            trims: Mutex::new(Vec::new()),
            zeroes: Mutex::new(Vec::new()),
            inflight: AtomicUsize::new(0),
            max_inflight: AtomicUsize::new(0),
            poison: Mutex::new(None),
            panic_at: Mutex::new(None),
        })
    }

    pub fn read_bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.lock()[offset..offset + len].to_vec()
    }

    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        self.data.lock()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Backend calls currently running.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    async fn enter(&self) -> InflightGuard<'_> {
        self.enter_for(None).await
    }

    async fn enter_for(&self, read_at: Option<u64>) -> InflightGuard<'_> {
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_inflight.fetch_max(now, Ordering::SeqCst);
        let delay = match (*self.slow_read.lock(), read_at) {
            (Some((slow, delay)), Some(offset)) if slow == offset => delay,
            _ => *self.delay.lock(),
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        InflightGuard(&self.inflight)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.size())?;
        if let Some(bad) = *self.poison.lock()
            && bad >= offset
            && bad < offset + len
        {
            return Err(BlockError::Io("poisoned byte".to_string()));
        }
        Ok(())
    }
}

struct InflightGuard<'a>(&'a AtomicUsize);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.data.lock().len() as u64
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<IoBuf, BlockError>> {
        Box::pin(async move {
            let _guard = self.enter_for(Some(offset)).await;
            if *self.panic_at.lock() == Some(offset) {
                panic!("test backend panics at {offset}");
            }
            self.check(offset, u64::from(len))?;
            self.reads.fetch_add(1, Ordering::SeqCst);
            let data = self.data.lock();
            Ok(IoBuf::from_slice(
                &data[offset as usize..offset as usize + len as usize],
            ))
        })
    }

    fn write(
        &self,
        offset: u64,
        data: IoBuf,
        flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            let _guard = self.enter().await;
            self.check(offset, data.len() as u64)?;
            self.writes.fetch_add(1, Ordering::SeqCst);
            if flags.fua {
                self.fua_writes.fetch_add(1, Ordering::SeqCst);
            }
            self.data.lock()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(data.as_slice());
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            let _guard = self.enter().await;
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            let _guard = self.enter().await;
            self.check(offset, len)?;
            self.trims.lock().push((offset, len));
            self.data.lock()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        _flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            let _guard = self.enter().await;
            self.check(offset, len)?;
            self.zeroes.lock().push((offset, len, allocate));
            self.data.lock()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
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

/// A multi-threaded tokio runtime for the export's backend calls.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

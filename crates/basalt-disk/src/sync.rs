//! pread/pwrite engine: the fallback where `O_DIRECT` is refused.
//!
//! Each operation runs on tokio's blocking pool. Data goes through the page
//! cache, so `sync` (fdatasync) is what makes it durable — exactly the same
//! contract as the io_uring engine.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use basalt_core::{BoxFuture, IoBuf};

use crate::{DiskEngine, DiskError, EngineKind, ReadResult, Segment, check_aligned, segment_parts};

/// Blocking-pool engine over a buffered file descriptor.
pub struct SyncEngine {
    file: Arc<File>,
    size: u64,
}

impl SyncEngine {
    /// Wraps `file` (opened read-write) of `size` usable bytes.
    pub fn new(file: File, size: u64) -> SyncEngine {
        SyncEngine {
            file: Arc::new(file),
            size,
        }
    }

    fn check(&self, offset: u64, parts: &[(usize, usize, usize)]) -> Result<(), DiskError> {
        check_aligned(offset, parts.iter().copied())?;
        let total: u64 = parts.iter().map(|&(_, l, _)| l as u64).sum();
        match offset.checked_add(total) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                len: total,
                size: self.size,
            }),
        }
    }
}

fn join_error(error: tokio::task::JoinError) -> DiskError {
    DiskError::Io {
        offset: 0,
        source: std::io::Error::other(error.to_string()),
    }
}

impl DiskEngine for SyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<'static, ReadResult> {
        if let Err(e) = self.check(offset, &[(0, buf.len(), buf.len())]) {
            return Box::pin(async move { (buf, Err(e)) });
        }
        let file = self.file.clone();
        Box::pin(async move {
            let len = buf.len();
            let joined = tokio::task::spawn_blocking(move || {
                let result = file
                    .read_exact_at(buf.as_mut_slice(), offset)
                    .map_err(|e| DiskError::from_io(offset, e));
                (buf, result)
            })
            .await;
            joined.unwrap_or_else(|e| (IoBuf::zeroed(len), Err(join_error(e))))
        })
    }

    fn write_at(
        &self,
        offset: u64,
        segments: Vec<Segment>,
    ) -> BoxFuture<'static, Result<(), DiskError>> {
        if let Err(e) = self.check(offset, &segment_parts(&segments)) {
            return Box::pin(async move { Err(e) });
        }
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut at = offset;
                for segment in &segments {
                    file.write_all_at(segment.as_slice(), at)
                        .map_err(|e| DiskError::from_io(at, e))?;
                    at += segment.len as u64;
                }
                Ok(())
            })
            .await
            .unwrap_or_else(|e| Err(join_error(e)))
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<(), DiskError>> {
        Box::pin(crate::open::fallocate(self.file.clone(), offset, len))
    }

    fn sync(&self) -> BoxFuture<'static, Result<(), DiskError>> {
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                file.sync_data().map_err(|e| DiskError::from_io(0, e))
            })
            .await
            .unwrap_or_else(|e| Err(join_error(e)))
        })
    }
}

//! Opening and claiming disks: files (created sparse when missing) or block devices.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sync::SyncEngine;
use crate::uring::UringEngine;
use crate::{DiskEngine, DiskError};

/// Smallest disk Basalt accepts.
pub const MIN_DISK_BYTES: u64 = 64 << 20;

/// How to pick the engine of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring with O_DIRECT when the filesystem allows it, pread/pwrite otherwise.
    #[default]
    Auto,
    /// Always io_uring with O_DIRECT (fails where O_DIRECT is refused).
    Uring,
    /// Always pread/pwrite through the page cache.
    Sync,
}

/// An opened, exclusively claimed disk.
pub struct DiskFile {
    /// Where the disk lives.
    pub path: PathBuf,
    /// Usable size in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// True for a block device, false for a regular file.
    pub block_device: bool,
    /// True when the file was created by this call.
    pub created: bool,
    /// The engine serving it.
    pub engine: Arc<dyn DiskEngine>,
}

/// Opens `path` for exclusive use by this process.
///
/// A missing path is created as a sparse file of `create_size` bytes when a size is
/// given. Block devices are opened with `O_EXCL` (the kernel refuses devices that are
/// mounted or claimed); files are locked with `flock`, so two daemons can never
/// share a disk.
pub fn open_disk(
    path: &Path,
    create_size: Option<u64>,
    choice: EngineChoice,
) -> Result<DiskFile, DiskError> {
    let open_err = |source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut created = false;
    if !path.exists() {
        let Some(size) = create_size else {
            return Err(open_err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file (give a size to create a file disk)",
            )));
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(open_err)?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(open_err)?;
        file.set_len(size).map_err(open_err)?;
        file.sync_all().map_err(open_err)?;
        created = true;
    }
    let meta = std::fs::metadata(path).map_err(open_err)?;
    let block_device = meta.file_type().is_block_device();
    if !block_device && !meta.is_file() {
        return Err(open_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        )));
    }

    let open_with = |flags: i32| -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    let open = |direct: bool| -> std::io::Result<File> {
        let mut flags = 0;
        if direct {
            flags |= libc::O_DIRECT;
        }
        if block_device {
            flags |= libc::O_EXCL;
        }
        open_with(flags)
    };
    // A descriptor for the engine's cached writes: neither direct nor
    // exclusive (the claim and the lock stay with the other two).
    let open_cached = || match open_with(0) {
        Ok(file) => Some(file),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error,
                "no buffered descriptor for cached writes; they are written direct");
            None
        }
    };

    let buffered = open(false).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            DiskError::InUse(path.to_path_buf())
        } else {
            open_err(e)
        }
    })?;
    if !block_device {
        // SAFETY: flock on a valid, owned file descriptor has no memory effects.
        let rc = unsafe { libc::flock(buffered.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(DiskError::InUse(path.to_path_buf()));
        }
    }
    let raw_size = if block_device {
        block_device_size(&buffered).map_err(open_err)?
    } else {
        meta.len()
    };
    let size = raw_size & !4095;
    if size < MIN_DISK_BYTES {
        return Err(DiskError::BadSize {
            path: path.to_path_buf(),
            size: raw_size,
            reason: "smaller than the 64 MiB minimum",
        });
    }

    let engine: Arc<dyn DiskEngine> = match choice {
        EngineChoice::Sync => Arc::new(SyncEngine::new(buffered, size)),
        EngineChoice::Uring => {
            let direct = open(true).map_err(open_err)?;
            Arc::new(UringEngine::new(
                direct,
                size,
                Some(buffered),
                open_cached(),
            )?)
        }
        EngineChoice::Auto => match open(true) {
            Ok(direct) if direct_io_works(&direct) => Arc::new(UringEngine::new(
                direct,
                size,
                Some(buffered),
                open_cached(),
            )?),
            _ => {
                tracing::info!(path = %path.display(), "O_DIRECT refused; using pread/pwrite");
                Arc::new(SyncEngine::new(buffered, size))
            }
        },
    };
    Ok(DiskFile {
        path: path.to_path_buf(),
        size,
        block_device,
        created,
        engine,
    })
}

/// Probes an O_DIRECT descriptor with one aligned read: some filesystems accept
/// the open flag and refuse the I/O.
fn direct_io_works(file: &File) -> bool {
    let mut buf = basalt_core::IoBuf::zeroed(4096);
    // SAFETY: the buffer is valid for 4096 writable bytes for the duration of the call.
    let rc = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), 4096, 0) };
    rc == 4096
}

/// Reserves space in a file with `fallocate` (mode 0 keeps existing data).
/// Block devices need no reservation.
pub(crate) async fn fallocate(file: Arc<File>, offset: u64, len: u64) -> Result<(), DiskError> {
    tokio::task::spawn_blocking(move || {
        let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        if !is_file {
            return Ok(());
        }
        let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(DiskError::OutOfRange {
                offset,
                len,
                size: u64::MAX,
            });
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is valid for the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, at, n) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            // Filesystems without fallocate (some FUSE mounts) cannot promise space; carry on.
            if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return Ok(());
            }
            return Err(DiskError::from_io(offset, error));
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| {
        Err(DiskError::Io {
            offset,
            source: std::io::Error::other(e.to_string()),
        })
    })
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_sparse_file_and_locks_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk0");
        let disk = open_disk(&path, Some(128 << 20), EngineChoice::Sync).expect("open");
        assert!(disk.created);
        assert_eq!(disk.size, 128 << 20);
        let blocks =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).expect("meta"));
        assert!(blocks < 1024, "file should be sparse, has {blocks} blocks");
        let second = open_disk(&path, None, EngineChoice::Sync);
        assert!(matches!(second, Err(DiskError::InUse(_))));
        drop(disk);
        assert!(open_disk(&path, None, EngineChoice::Sync).is_ok());
    }

    #[test]
    fn refuses_missing_without_size_and_tiny_disks() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            open_disk(&dir.path().join("nope"), None, EngineChoice::Auto),
            Err(DiskError::Open { .. })
        ));
        assert!(matches!(
            open_disk(&dir.path().join("tiny"), Some(1 << 20), EngineChoice::Auto),
            Err(DiskError::BadSize { .. })
        ));
    }
}

//! The guest's write-cache choice, kept per export rather than per connection.
//!
//! A virtio-blk driver that negotiated `VIRTIO_BLK_F_CONFIG_WCE` may switch
//! the device between write-back (a write is durable once a later FLUSH is
//! answered) and write-through (a write is durable when it is answered)
//! through the `writeback` config field.
//!
//! QEMU reads the config space from the backend once, when it realizes the
//! device, and from then on shows the guest its own copy. It changes that
//! copy only when the guest writes the field, and forwards the write as
//! `VHOST_USER_SET_CONFIG`. So the choice belongs to the QEMU process, not to
//! one vhost-user connection: it holds across a reboot of the guest inside
//! the same QEMU (the firmware's feature negotiation does not undo it) and
//! across a reconnection of the socket (a restarted basaltd). A live
//! migration's destination QEMU reads its config from the destination's
//! backend, which must therefore show the choice before that QEMU starts.
//!
//! A backend that forgot the choice would answer a write-through guest's
//! writes before they are durable, and that guest never sends a FLUSH: a
//! power cut would lose acknowledged writes. Hence [`WriteCache`], one per
//! export and shared by its connections, which starts from what the control
//! plane recorded and hands every change to a [`WriteCacheKeeper`] that
//! records it durably before the frontend hears the answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// Records a guest's write-cache choice durably (the control plane's side:
/// a file next to the QEMU process, the cluster metadata).
pub trait WriteCacheKeeper: Send + Sync {
    /// Records that the guest chose write-through (`true`) or write-back.
    /// Called before the choice takes effect and before the frontend is
    /// answered; an error refuses the change and is reported to the frontend.
    fn record(&self, write_through: bool) -> Result<(), String>;
}

/// The write-cache mode one export shows and honours, shared by the
/// connections it serves one after the other.
pub struct WriteCache {
    write_through: AtomicBool,
    /// Who records changes. Held for the whole of a change, so that the
    /// keeper's record and the mode in force cannot be reordered by two
    /// changes racing, nor by a reset.
    keeper: Mutex<Option<Arc<dyn WriteCacheKeeper>>>,
}

impl std::fmt::Debug for WriteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteCache")
            .field("write_through", &self.write_through())
            // Not `lock`: a change may hold it while its keeper records.
            .field("kept", &self.keeper.try_lock().map(|k| k.is_some()))
            .finish()
    }
}

impl Default for WriteCache {
    /// Write-back, with nobody recording changes (they last as long as the
    /// export).
    fn default() -> WriteCache {
        WriteCache::new(false, None)
    }
}

impl WriteCache {
    /// A cache mode starting at write-through (`true`) or write-back, whose
    /// changes `keeper` records.
    pub fn new(write_through: bool, keeper: Option<Arc<dyn WriteCacheKeeper>>) -> WriteCache {
        WriteCache {
            write_through: AtomicBool::new(write_through),
            keeper: Mutex::new(keeper),
        }
    }

    /// Whether the guest chose write-through.
    pub fn write_through(&self) -> bool {
        self.write_through.load(Ordering::Acquire)
    }

    /// Starts over for a new frontend process (a fresh QEMU, or the
    /// destination of a migration): its mode and who records its changes.
    pub fn reset(&self, write_through: bool, keeper: Option<Arc<dyn WriteCacheKeeper>>) {
        let mut kept = self.keeper.lock();
        *kept = keeper;
        self.write_through.store(write_through, Ordering::Release);
    }

    /// The guest's driver chose a mode. `before_write_through` runs first
    /// when the change is from write-back to write-through (the device
    /// flushes, so that what was answered before is durable too); then the
    /// keeper records the choice; only then does it take effect. Either
    /// failing leaves the mode as it was.
    pub(crate) fn choose(
        &self,
        write_through: bool,
        before_write_through: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        let keeper = self.keeper.lock();
        if self.write_through() == write_through {
            return Ok(());
        }
        if write_through {
            before_write_through()?;
        }
        if let Some(keeper) = keeper.as_ref() {
            keeper.record(write_through)?;
        }
        self.write_through.store(write_through, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Recorder {
        records: Mutex<Vec<bool>>,
        refuse: AtomicBool,
    }

    impl WriteCacheKeeper for Recorder {
        fn record(&self, write_through: bool) -> Result<(), String> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err("metadata unreachable".into());
            }
            self.records.lock().push(write_through);
            Ok(())
        }
    }

    #[test]
    fn a_change_is_recorded_before_it_takes_effect_and_a_refusal_changes_nothing() {
        let recorder = Arc::new(Recorder::default());
        let cache = WriteCache::new(false, Some(recorder.clone()));
        let flushes = AtomicUsize::new(0);
        let flush = || {
            flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        cache.choose(true, flush).unwrap();
        assert!(cache.write_through());
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
        // The same choice again records nothing and flushes nothing.
        cache.choose(true, || Err("not called".into())).unwrap();
        assert_eq!(*recorder.records.lock(), vec![true]);

        recorder.refuse.store(true, Ordering::SeqCst);
        assert!(cache.choose(false, || Ok(())).is_err());
        assert!(cache.write_through(), "a refused change took effect");
        recorder.refuse.store(false, Ordering::SeqCst);
        // Back to write-back needs no flush.
        cache.choose(false, || Err("no flush".into())).unwrap();
        assert!(!cache.write_through());
        assert_eq!(*recorder.records.lock(), vec![true, false]);

        // A failed flush refuses the switch to write-through, unrecorded.
        assert_eq!(
            cache.choose(true, || Err("disk gone".into())),
            Err("disk gone".to_string())
        );
        assert!(!cache.write_through());
        assert_eq!(recorder.records.lock().len(), 2);
    }

    #[test]
    fn reset_starts_over_with_a_new_keeper() {
        let old = Arc::new(Recorder::default());
        let cache = WriteCache::new(false, Some(old.clone()));
        let new = Arc::new(Recorder::default());
        cache.reset(true, Some(new.clone()));
        assert!(cache.write_through());
        cache.choose(false, || Ok(())).unwrap();
        assert!(old.records.lock().is_empty());
        assert_eq!(*new.records.lock(), vec![false]);
    }
}

//! Whether KVM is worth using here.
//!
//! `/dev/kvm` can exist, and QEMU can start under it, while a guest barely
//! moves: on the nested virtual machines Basalt's tests run on, QEMU's
//! firmware prints its banner under KVM after seconds, and a Linux kernel
//! never gets through its decompressor (each exit to the host costs
//! milliseconds). A probe that waits for the firmware's first words says
//! "KVM works" there, and every VM then hangs at boot.
//!
//! So the probe runs real work and times it: a tiny image
//! (`kvm_probe.S`, loaded with `-kernel` as a multiboot image) fills and
//! checks 64 MiB of RAM, touching every page as a booting kernel does,
//! enters long mode and prints a marker on QEMU's debug console. It runs
//! under TCG first, then under KVM with TCG's time as its limit: KVM is used
//! only when it finishes the same work sooner than TCG does. A working KVM
//! takes a fraction of TCG's time, since the work is plain guest code.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The assembled `kvm_probe.S` (`as --32`, `ld -m elf_i386 -Ttext=0x100000
/// --oformat binary`); a test checks the two agree where binutils exist.
const PROBE_IMAGE: [u8; 238] = [
    0x02, 0xb0, 0xad, 0x1b, 0x00, 0x00, 0x01, 0x00, 0xfe, 0x4f, 0x51, 0xe4, 0x00, 0x00, 0x10, 0x00,
    0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00, 0x10, 0x00,
    0xbf, 0x00, 0x00, 0x40, 0x00, 0xb9, 0x00, 0x00, 0x00, 0x01, 0xb8, 0xa5, 0xa5, 0x5a, 0x5a, 0xfc,
    0xf3, 0xab, 0xbf, 0x00, 0x00, 0x40, 0x00, 0xb9, 0x00, 0x00, 0x00, 0x01, 0xf3, 0xaf, 0x75, 0x64,
    0xbf, 0x00, 0x10, 0x20, 0x00, 0x31, 0xc0, 0xb9, 0x00, 0x0c, 0x00, 0x00, 0xf3, 0xab, 0xc7, 0x05,
    0x00, 0x10, 0x20, 0x00, 0x03, 0x20, 0x20, 0x00, 0xc7, 0x05, 0x00, 0x20, 0x20, 0x00, 0x03, 0x30,
    0x20, 0x00, 0xc7, 0x05, 0x00, 0x30, 0x20, 0x00, 0x83, 0x00, 0x00, 0x00, 0x0f, 0x20, 0xe0, 0x83,
    0xc8, 0x20, 0x0f, 0x22, 0xe0, 0xb8, 0x00, 0x10, 0x20, 0x00, 0x0f, 0x22, 0xd8, 0xb9, 0x80, 0x00,
    0x00, 0xc0, 0x0f, 0x32, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0, 0x0d, 0x01,
    0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0, 0x0f, 0x01, 0x15, 0xe8, 0x00, 0x10, 0x00, 0xea, 0xa7, 0x00,
    0x10, 0x00, 0x08, 0x00, 0xf4, 0xeb, 0xfd, 0x48, 0x8d, 0x35, 0x0f, 0x00, 0x00, 0x00, 0x66, 0xba,
    0x02, 0x04, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xf4, 0xeb, 0xfd, 0x42, 0x41, 0x53,
    0x41, 0x4c, 0x54, 0x2d, 0x4b, 0x56, 0x4d, 0x2d, 0x50, 0x52, 0x4f, 0x42, 0x45, 0x2d, 0x4f, 0x4b,
    0x0a, 0x00, 0x8d, 0xb6, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x9a, 0x20, 0x00, 0x0f, 0x00, 0xd8, 0x00, 0x10, 0x00,
];

/// What the probe prints on the debug console when it is done.
const PROBE_MARKER: &[u8] = b"BASALT-KVM-PROBE-OK";

/// Guest RAM of a probe run: the image fills 4 MiB to 68 MiB.
const PROBE_MEMORY_MIB: u32 = 128;

/// Outcome of [`probe_kvm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    /// Run guests under KVM.
    pub use_kvm: bool,
    /// Why, in words, with the times measured.
    pub reason: String,
}

/// Whether QEMU runs guests under KVM here, and faster than under TCG; no
/// run takes longer than `timeout`.
pub async fn probe_kvm(binary: &Path, timeout: Duration) -> KvmProbe {
    let no = |reason: String| KvmProbe {
        use_kvm: false,
        reason,
    };
    if !Path::new("/dev/kvm").exists() {
        return no("there is no /dev/kvm".into());
    }
    let dir = match ProbeDir::new() {
        Ok(dir) => dir,
        Err(error) => return no(format!("cannot write the probe image: {error}")),
    };
    let tcg = run_probe(binary, &dir.path, "tcg", timeout).await;
    // KVM must beat TCG (whose time is within `timeout`).
    let limit = tcg.unwrap_or(timeout);
    match (run_probe(binary, &dir.path, "kvm", limit).await, tcg) {
        (Some(kvm), Some(tcg)) => KvmProbe {
            use_kvm: true,
            reason: format!(
                "KVM ran the probe in {} ms, TCG in {} ms",
                kvm.as_millis(),
                tcg.as_millis()
            ),
        },
        (Some(kvm), None) => KvmProbe {
            use_kvm: true,
            reason: format!(
                "KVM ran the probe in {} ms; TCG did not within {} s",
                kvm.as_millis(),
                timeout.as_secs()
            ),
        },
        (None, Some(tcg)) => no(format!(
            "KVM did not finish the probe in the {} ms TCG took",
            tcg.as_millis()
        )),
        (None, None) => no(format!(
            "neither KVM nor TCG finished the probe within {} s",
            timeout.as_secs()
        )),
    }
}

/// Runs the probe image under `accel`; how long it took to print its
/// marker, or `None` if it did not within `limit` (or QEMU failed).
async fn run_probe(binary: &Path, dir: &Path, accel: &str, limit: Duration) -> Option<Duration> {
    let log = dir.join(format!("debugcon-{accel}.log"));
    let image = dir.join("probe.img");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .args(["-accel", accel, "-m"])
        .arg(PROBE_MEMORY_MIB.to_string())
        .args(["-nodefaults", "-display", "none", "-serial", "none"])
        .args(["-monitor", "none", "-no-reboot", "-kernel"])
        .arg(&image)
        .arg("-chardev")
        .arg(format!("file,id=dbg,path={}", log.display()))
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let mut finished = None;
    while started.elapsed() < limit {
        let done = std::fs::read(&log)
            .is_ok_and(|text| text.windows(PROBE_MARKER.len()).any(|w| w == PROBE_MARKER));
        if done {
            finished = Some(started.elapsed());
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = child.kill().await;
    finished
}

/// A scratch directory holding the probe image; removed when dropped.
struct ProbeDir {
    path: PathBuf,
}

impl ProbeDir {
    fn new() -> std::io::Result<ProbeDir> {
        let path = std::env::temp_dir().join(format!(
            "basalt-kvm-probe-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&path)?;
        let dir = ProbeDir { path };
        std::fs::write(dir.path.join("probe.img"), PROBE_IMAGE)?;
        Ok(dir)
    }
}

impl Drop for ProbeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(tool: &str) -> bool {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[tokio::test]
    async fn a_missing_qemu_means_no_kvm_at_once() {
        let started = Instant::now();
        let probe = probe_kvm(
            Path::new("/nonexistent/qemu-system-x86_64"),
            Duration::from_secs(5),
        )
        .await;
        assert!(!probe.use_kvm, "{probe:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// The image in the source is what `kvm_probe.S` assembles to.
    #[test]
    fn the_probe_image_is_its_assembled_source() {
        if !found("as") || !found("ld") {
            eprintln!("binutils (as, ld) not found: not reassembling kvm_probe.S");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kvm_probe.S");
        let object = dir.path().join("probe.o");
        let image = dir.path().join("probe.img");
        let assembled = std::process::Command::new("as")
            .arg("--32")
            .arg("-o")
            .arg(&object)
            .arg(&source)
            .status()
            .expect("as");
        assert!(assembled.success());
        let linked = std::process::Command::new("ld")
            .args([
                "-m",
                "elf_i386",
                "-Ttext=0x100000",
                "--oformat",
                "binary",
                "-o",
            ])
            .arg(&image)
            .arg(&object)
            .status()
            .expect("ld");
        assert!(linked.success());
        assert_eq!(std::fs::read(&image).expect("image"), PROBE_IMAGE);
    }

    /// Under TCG the image does its work and prints its marker.
    #[tokio::test]
    async fn the_probe_image_finishes_under_tcg() {
        let qemu = Path::new("qemu-system-x86_64");
        if !found("qemu-system-x86_64") {
            eprintln!("qemu-system-x86_64 not found: not running the probe image");
            return;
        }
        let dir = ProbeDir::new().expect("probe dir");
        let took = run_probe(qemu, &dir.path, "tcg", Duration::from_secs(30)).await;
        assert!(
            took.is_some(),
            "the probe image printed no marker under TCG"
        );
    }
}

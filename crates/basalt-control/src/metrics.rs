//! Prometheus metrics, read from the store's counters at scrape time.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::node::Node;

#[derive(Debug)]
struct NodeCollector {
    counters: Vec<(&'static str, &'static str, u64)>,
    gauges: Vec<(&'static str, &'static str, i64)>,
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for &(name, help, value) in &self.counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        for &(name, help, value) in &self.gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// The metrics of `node` in the OpenMetrics text format.
pub fn render(node: &Arc<Node>) -> Result<String, std::fmt::Error> {
    let s = node.store().stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let status = node.status();
    let disks = node.disks();
    let exports = node.vhost_stats();
    let collector = NodeCollector {
        counters: vec![
            (
                "basalt_reads",
                "Read requests served by the store",
                load(&s.reads),
            ),
            ("basalt_read_bytes", "Bytes read", load(&s.read_bytes)),
            (
                "basalt_writes",
                "Write requests served by the store",
                load(&s.writes),
            ),
            ("basalt_write_bytes", "Bytes written", load(&s.write_bytes)),
            (
                "basalt_cow_writes",
                "Whole-extent writes done copy-on-write",
                load(&s.cow_writes),
            ),
            ("basalt_flushes", "Flushes served", load(&s.flushes)),
            (
                "basalt_checksum_errors",
                "Blocks that failed their checksum",
                load(&s.checksum_errors),
            ),
            (
                "basalt_log_batches",
                "Oplog batches written",
                load(&s.log_batches),
            ),
            ("basalt_drains", "Drain cycles completed", load(&s.drains)),
            (
                "basalt_drained_blocks",
                "Blocks written home by the drainer",
                load(&s.drained_blocks),
            ),
            (
                "basalt_vhost_requests",
                "Requests answered by the current vhost-user exports",
                exports.iter().map(|(_, e)| e.requests).sum(),
            ),
            (
                "basalt_vhost_request_microseconds",
                "Time those requests spent in basaltd, summed: from being taken off the ring to their answer (over basalt_vhost_requests, the mean)",
                exports.iter().map(|(_, e)| e.request_nanos / 1000).sum(),
            ),
            (
                "basalt_vhost_write_through_writes",
                "Writes to the current vhost-user exports made durable before their answer (the guest chose write-through)",
                exports.iter().map(|(_, e)| e.write_through_writes).sum(),
            ),
        ],
        gauges: vec![
            (
                "basalt_capacity_bytes",
                "Bytes of vdisk data the disks can hold",
                status.capacity as i64,
            ),
            (
                "basalt_allocated_bytes",
                "Bytes allocated to vdisks",
                status.allocated as i64,
            ),
            ("basalt_vdisks", "Number of vdisks", status.vdisks as i64),
            (
                "basalt_disks_failed",
                "Disks failed or missing",
                disks.iter().filter(|d| d.state != "online").count() as i64,
            ),
            (
                "basalt_oplog_used_bytes",
                "Oplog bytes in use, all disks",
                disks.iter().map(|d| d.log_used as i64).sum(),
            ),
            (
                "basalt_vhost_exports",
                "Vdisks exported over vhost-user",
                exports.len() as i64,
            ),
            (
                "basalt_vhost_write_through_exports",
                "Vhost-user exports whose guest chose write-through",
                exports.iter().filter(|(_, e)| e.write_through).count() as i64,
            ),
        ],
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

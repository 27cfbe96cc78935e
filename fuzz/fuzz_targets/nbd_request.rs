//! Feeds arbitrary bytes to everything in the NBD server that parses client
//! input: request headers and their classification, option payloads, and a
//! whole option negotiation. Beyond "never panics", it checks the promises
//! the connection code relies on (a request handed to the backend is inside
//! the export and within the payload limit; a refused write drains exactly
//! its payload; option replies are well-formed).

#![no_main]

use std::sync::{Arc, OnceLock};

use basalt_nbd::negotiate::{Negotiator, Outcome};
use basalt_nbd::proto::*;
use basalt_nbd::testing::{MemBackend, MemRegistry};
use libfuzzer_sys::fuzz_target;

const MAX_REQUEST: u32 = 32 << 20;

fn registry() -> Arc<MemRegistry> {
    static REGISTRY: OnceLock<Arc<MemRegistry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let r = MemRegistry::new();
            r.insert("disk", "fuzz disk", MemBackend::new(1 << 20));
            r.insert("", "default", MemBackend::new(4096));
            Arc::new(r)
        })
        .clone()
}

fn check_request(bytes: &[u8; REQUEST_HEADER_LEN]) {
    let Ok(header) = RequestHeader::parse(bytes) else {
        return;
    };
    assert_eq!(&header.encode(), bytes);
    for session in [
        Session { size: 1 << 20, structured: true, block_status: true },
        Session { size: 1 << 20, structured: false, block_status: false },
        Session { size: u64::MAX, structured: true, block_status: false },
        Session { size: 0, structured: true, block_status: true },
    ] {
        match classify_request(&header, &session) {
            Disposition::Execute(op) => {
                let (offset, length) = match op {
                    Op::Read { offset, length, .. } | Op::Write { offset, length, .. } => {
                        assert!(length <= MAX_REQUEST && length > 0);
                        (offset, length)
                    }
                    Op::Trim { offset, length, .. }
                    | Op::WriteZeroes { offset, length, .. }
                    | Op::BlockStatus { offset, length, .. } => {
                        assert!(length > 0);
                        (offset, length)
                    }
                    Op::Flush => (0, 0),
                };
                let end = offset.checked_add(u64::from(length)).expect("no overflow");
                assert!(end <= session.size, "{op:?} escapes a {} byte export", session.size);
                if let Op::BlockStatus { .. } = op {
                    assert!(session.structured && session.block_status);
                }
            }
            Disposition::Reject { errno, drain, .. } => {
                assert!(errno != 0);
                if header.command == NBD_CMD_WRITE {
                    assert_eq!(drain, header.length);
                    assert!(drain <= MAX_REQUEST);
                } else {
                    assert_eq!(drain, 0);
                }
            }
            Disposition::Close(_) => {
                assert!(header.command == NBD_CMD_WRITE && header.length > MAX_REQUEST)
            }
            Disposition::Succeed | Disposition::Disconnect => {}
        }
    }
}

/// Checks that `out` is a sequence of complete option replies (or an
/// `NBD_OPT_EXPORT_NAME` reply) and returns how many there were.
fn check_option_replies(mut out: &[u8], option: u32) -> usize {
    if option == NBD_OPT_EXPORT_NAME {
        assert!(out.is_empty() || out.len() == 10 || out.len() == 134);
        return 0;
    }
    let mut count = 0;
    while !out.is_empty() {
        assert!(out.len() >= 20);
        assert_eq!(&out[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &option.to_be_bytes());
        let len = u32::from_be_bytes([out[16], out[17], out[18], out[19]]) as usize;
        assert!(out.len() >= 20 + len);
        out = &out[20 + len..];
        count += 1;
    }
    count
}

fn negotiate(data: &[u8]) {
    let Some((flags, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(mut negotiator) = Negotiator::new(registry(), u32::from_be_bytes(*flags)) else {
        return;
    };
    let mut out = Vec::new();
    // Options in a compact encoding: u8 option code, u16 length, payload.
    while let Some((head, tail)) = rest.split_first_chunk::<3>() {
        let option = u32::from(head[0] % 16);
        let len = usize::from(u16::from_be_bytes([head[1], head[2]])).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        out.clear();
        let shutting_down = head[1] == 0xff;
        let outcome = negotiator.handle_option(option, payload, shutting_down, &mut out);
        let replies = check_option_replies(&out, option);
        match outcome {
            Outcome::Continue => assert!(replies > 0),
            Outcome::Close => break,
            Outcome::Transmit(export) => {
                assert!(export.flags & NBD_FLAG_HAS_FLAGS != 0);
                assert!(export.meta_context.is_none() || export.structured);
                break;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Request headers, as sent and with a valid magic forced in.
    for window in data.chunks(REQUEST_HEADER_LEN) {
        if let Ok(bytes) = <[u8; REQUEST_HEADER_LEN]>::try_from(window) {
            check_request(&bytes);
            let mut forced = bytes;
            forced[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
            check_request(&forced);
        }
    }
    if let Some(bytes) = data.first_chunk::<OPTION_HEADER_LEN>() {
        if let Ok(header) = OptionHeader::parse(bytes) {
            assert_eq!(&header.encode(), bytes);
        }
    }
    // Option payload parsers on the raw bytes.
    let _ = parse_string(data);
    if let Ok(info) = InfoRequest::parse(data) {
        assert!(info.name.len() <= MAX_STRING_LEN);
        let _ = info.requests().count();
    }
    if let Ok(meta) = MetaContextRequest::parse(data) {
        for query in &meta.queries {
            let _ = interpret_query(query, true);
            let _ = interpret_query(query, false);
        }
    }
    negotiate(data);
});

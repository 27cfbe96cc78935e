//! Option haggling: the fixed-newstyle handshake as a synchronous state machine.
//!
//! The connection code reads one option from the socket, hands it to
//! [`Negotiator::handle_option`], writes whatever bytes it produced, and acts
//! on the returned [`Outcome`]. Nothing here touches a socket, so the whole
//! negotiation can be unit-tested and fuzzed with a fake registry.
//!
//! ```text
//!   greeting ─▶ client flags ─▶ ┌─────────── options ───────────┐
//!                               │ LIST, INFO, STRUCTURED_REPLY,  │
//!                               │ {LIST,SET}_META_CONTEXT,       │──▶ Continue
//!                               │ STARTTLS (refused), unknown    │
//!                               └────────────────────────────────┘
//!                     GO (known export) / EXPORT_NAME ──▶ Transmit
//!                     ABORT / EXPORT_NAME (unknown) ──────▶ Close
//! ```

use std::fmt;
use std::sync::Arc;

use basalt_core::{BlockBackend, ExportRegistry};

use crate::proto::{self, ClientFlags, ProtoError};

/// The export a client chose, with everything the transmission phase needs.
pub struct Export {
    /// Name the client asked for.
    pub name: String,
    /// The backend serving it.
    pub backend: Arc<dyn BlockBackend>,
    /// Size sent to the client.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Id of the `base:allocation` context, when the client selected it for this export.
    pub meta_context: Option<u32>,
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("flags", &format_args!("{:#06x}", self.flags))
            .field("structured", &self.structured)
            .field("meta_context", &self.meta_context)
            .finish_non_exhaustive()
    }
}

/// What the connection does after an option was handled.
#[derive(Debug)]
pub enum Outcome {
    /// Write the produced bytes and read the next option.
    Continue,
    /// Write the produced bytes, then close the connection.
    Close,
    /// Write the produced bytes, then enter the transmission phase.
    Transmit(Export),
}

/// State of one client's option haggling.
pub struct Negotiator {
    registry: Arc<dyn ExportRegistry>,
    flags: ClientFlags,
    structured: bool,
    /// Export name for which the last `NBD_OPT_SET_META_CONTEXT` selected `base:allocation`.
    meta_export: Option<String>,
}

impl fmt::Debug for Negotiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Negotiator")
            .field("flags", &self.flags)
            .field("structured", &self.structured)
            .field("meta_export", &self.meta_export)
            .finish_non_exhaustive()
    }
}

/// Transmission flags for an export: everything Basalt supports.
///
/// `CAN_MULTI_CONN` holds because a flush reaches the shared backend, which
/// makes every completed write durable whichever connection sent it.
/// `SEND_DF` is only allowed once structured replies are on.
pub fn transmission_flags(structured: bool) -> u16 {
    let mut flags = proto::NBD_FLAG_HAS_FLAGS
        | proto::NBD_FLAG_SEND_FLUSH
        | proto::NBD_FLAG_SEND_FUA
        | proto::NBD_FLAG_SEND_TRIM
        | proto::NBD_FLAG_SEND_WRITE_ZEROES
        | proto::NBD_FLAG_CAN_MULTI_CONN
        | proto::NBD_FLAG_SEND_CACHE
        | proto::NBD_FLAG_SEND_FAST_ZERO;
    if structured {
        flags |= proto::NBD_FLAG_SEND_DF;
    }
    flags
}

impl Negotiator {
    /// Starts negotiation after the client sent its flags. Unknown client
    /// flags are an error: the specification says to drop the connection.
    ///
    /// Clients that do not set `NBD_FLAG_C_FIXED_NEWSTYLE` are still served
    /// (the specification allows it): such clients only ever send
    /// `NBD_OPT_EXPORT_NAME`, which needs no option replies.
    pub fn new(
        registry: Arc<dyn ExportRegistry>,
        client_flags: u32,
    ) -> Result<Negotiator, ProtoError> {
        Ok(Negotiator {
            registry,
            flags: ClientFlags::parse(client_flags)?,
            structured: false,
            meta_export: None,
        })
    }

    /// Handles one option with its whole payload, appending the reply bytes
    /// to `out`. With `shutting_down`, every option but `NBD_OPT_ABORT` is
    /// refused with `NBD_REP_ERR_SHUTDOWN`.
    pub fn handle_option(
        &mut self,
        option: u32,
        payload: &[u8],
        shutting_down: bool,
        out: &mut Vec<u8>,
    ) -> Outcome {
        use proto::*;
        if shutting_down && option != NBD_OPT_ABORT {
            if option == NBD_OPT_EXPORT_NAME {
                return Outcome::Close;
            }
            option_reply(
                out,
                option,
                NBD_REP_ERR_SHUTDOWN,
                b"server is shutting down",
            );
            return Outcome::Continue;
        }
        match option {
            NBD_OPT_EXPORT_NAME => self.export_name(payload, out),
            NBD_OPT_ABORT => {
                option_reply(out, option, NBD_REP_ACK, &[]);
                Outcome::Close
            }
            NBD_OPT_LIST => {
                if payload.is_empty() {
                    for (name, description) in self.registry.list() {
                        rep_server(out, &name, &description);
                    }
                    option_reply(out, option, NBD_REP_ACK, &[]);
                } else {
                    option_reply(
                        out,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    );
                }
                Outcome::Continue
            }
            NBD_OPT_STARTTLS => {
                if payload.is_empty() {
                    option_reply(
                        out,
                        option,
                        NBD_REP_ERR_POLICY,
                        b"TLS is not offered by this server",
                    );
                } else {
                    option_reply(
                        out,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"NBD_OPT_STARTTLS takes no data",
                    );
                }
                Outcome::Continue
            }
            NBD_OPT_INFO | NBD_OPT_GO => self.info_or_go(option, payload, out),
            NBD_OPT_STRUCTURED_REPLY => {
                if payload.is_empty() {
                    self.structured = true;
                    option_reply(out, option, NBD_REP_ACK, &[]);
                } else {
                    option_reply(
                        out,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                Outcome::Continue
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                self.meta_context(option, payload, out);
                Outcome::Continue
            }
            _ => {
                option_reply(out, option, NBD_REP_ERR_UNSUP, b"option not supported");
                Outcome::Continue
            }
        }
    }

    fn export(&self, name: &str) -> Option<Export> {
        let backend = self.registry.lookup(name)?;
        let meta_context = (self.structured && self.meta_export.as_deref() == Some(name))
            .then_some(proto::BASE_ALLOCATION_ID);
        Some(Export {
            name: name.to_string(),
            size: backend.size(),
            backend,
            flags: transmission_flags(self.structured),
            structured: self.structured,
            meta_context,
        })
    }

    fn export_name(&self, payload: &[u8], out: &mut Vec<u8>) -> Outcome {
        // This option cannot report errors: an unusable name ends the session.
        let Ok(name) = proto::parse_string(payload) else {
            return Outcome::Close;
        };
        match self.export(name) {
            Some(export) => {
                proto::export_name_reply(out, export.size, export.flags, self.flags.no_zeroes);
                Outcome::Transmit(export)
            }
            None => Outcome::Close,
        }
    }

    fn info_or_go(&self, option: u32, payload: &[u8], out: &mut Vec<u8>) -> Outcome {
        use proto::*;
        let request = match InfoRequest::parse(payload) {
            Ok(request) => request,
            Err(e) => {
                option_reply(out, option, NBD_REP_ERR_INVALID, e.to_string().as_bytes());
                return Outcome::Continue;
            }
        };
        let Some(export) = self.export(request.name) else {
            let message = format!("export {:?} is not known", request.name);
            option_reply(out, option, NBD_REP_ERR_UNKNOWN, message.as_bytes());
            return Outcome::Continue;
        };
        info_export(out, option, export.size, export.flags);
        // Block sizes are sent unasked (the specification allows extra
        // information): they are the defaults, so clients lose nothing.
        info_block_size(
            out,
            option,
            BLOCK_SIZE_MIN,
            BLOCK_SIZE_PREFERRED,
            BLOCK_SIZE_MAX,
        );
        let mut sent_name = false;
        let mut sent_description = false;
        for kind in request.requests() {
            match kind {
                NBD_INFO_NAME if !sent_name => {
                    info_string(out, option, NBD_INFO_NAME, &export.name);
                    sent_name = true;
                }
                NBD_INFO_DESCRIPTION if !sent_description => {
                    sent_description = true;
                    let description = self
                        .registry
                        .list()
                        .into_iter()
                        .find(|(name, _)| *name == export.name)
                        .map(|(_, description)| description)
                        .unwrap_or_default();
                    if !description.is_empty() {
                        info_string(out, option, NBD_INFO_DESCRIPTION, &description);
                    }
                }
                // Export and block size were sent already; unknown types are ignored.
                _ => {}
            }
        }
        option_reply(out, option, NBD_REP_ACK, &[]);
        if option == NBD_OPT_GO {
            Outcome::Transmit(export)
        } else {
            Outcome::Continue
        }
    }

    fn meta_context(&mut self, option: u32, payload: &[u8], out: &mut Vec<u8>) {
        use proto::*;
        let listing = option == NBD_OPT_LIST_META_CONTEXT;
        if !listing {
            // Setting replaces the previous selection, even when it fails.
            self.meta_export = None;
        }
        if !self.structured {
            option_reply(
                out,
                option,
                NBD_REP_ERR_INVALID,
                b"negotiate NBD_OPT_STRUCTURED_REPLY first",
            );
            return;
        }
        let request = match MetaContextRequest::parse(payload) {
            Ok(request) => request,
            Err(e) => {
                option_reply(out, option, NBD_REP_ERR_INVALID, e.to_string().as_bytes());
                return;
            }
        };
        if self.registry.lookup(request.name).is_none() {
            let message = format!("export {:?} is not known", request.name);
            option_reply(out, option, NBD_REP_ERR_UNKNOWN, message.as_bytes());
            return;
        }
        let mut selected = listing && request.queries.is_empty();
        for query in &request.queries {
            match interpret_query(query, listing) {
                Ok(MetaQuery::BaseAllocation) => selected = true,
                Ok(MetaQuery::Nothing) => {}
                Err(e) => {
                    option_reply(out, option, NBD_REP_ERR_INVALID, e.to_string().as_bytes());
                    return;
                }
            }
        }
        if selected {
            let id = if listing { 0 } else { BASE_ALLOCATION_ID };
            rep_meta_context(out, option, id, BASE_ALLOCATION);
            if !listing {
                self.meta_export = Some(request.name.to_string());
            }
        }
        option_reply(out, option, NBD_REP_ACK, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;
    use crate::testing::{MemBackend, MemRegistry};

    fn registry() -> Arc<dyn ExportRegistry> {
        let reg = MemRegistry::new();
        reg.insert("disk", "the test disk", MemBackend::new(1 << 20));
        reg.insert("", "", MemBackend::new(4096));
        Arc::new(reg)
    }

    /// Splits a run of option replies into (option, type, payload).
    fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(&bytes[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
            let option = u32::from_be_bytes(bytes[8..12].try_into().expect("4"));
            let kind = u32::from_be_bytes(bytes[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(bytes[16..20].try_into().expect("4")) as usize;
            out.push((option, kind, bytes[20..20 + len].to_vec()));
            bytes = &bytes[20 + len..];
        }
        out
    }

    fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        p
    }

    fn run(n: &mut Negotiator, option: u32, payload: &[u8]) -> (Outcome, Vec<(u32, u32, Vec<u8>)>) {
        let mut out = Vec::new();
        let outcome = n.handle_option(option, payload, false, &mut out);
        (outcome, replies(&out))
    }

    #[test]
    fn unknown_client_flags_are_refused() {
        assert!(Negotiator::new(registry(), 4).is_err());
        assert!(Negotiator::new(registry(), 3).is_ok());
        assert!(Negotiator::new(registry(), 0).is_ok());
    }

    #[test]
    fn go_sends_export_info_block_sizes_and_ack() {
        let mut n = Negotiator::new(registry(), 3).expect("flags");
        let (outcome, r) = run(
            &mut n,
            NBD_OPT_GO,
            &info_payload("disk", &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, 999]),
        );
        let Outcome::Transmit(export) = outcome else {
            panic!("expected transmission, got {outcome:?}");
        };
        assert_eq!(export.size, 1 << 20);
        assert!(!export.structured);
        assert_eq!(export.flags & NBD_FLAG_SEND_DF, 0);
        assert_eq!(r.len(), 5, "{r:?}");
        assert_eq!(r[0].1, NBD_REP_INFO);
        assert_eq!(&r[0].2[..2], &NBD_INFO_EXPORT.to_be_bytes());
        assert_eq!(&r[0].2[2..10], &(1u64 << 20).to_be_bytes());
        assert_eq!(&r[1].2[..2], &NBD_INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(&r[1].2[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
        assert_eq!(r[2].2, b"\0\x01disk");
        assert_eq!(r[3].2, b"\0\x02the test disk");
        assert_eq!((r[4].1, r[4].2.len()), (NBD_REP_ACK, 0));
    }

    #[test]
    fn info_does_not_enter_transmission_and_unknown_exports_error() {
        let mut n = Negotiator::new(registry(), 1).expect("flags");
        let (outcome, r) = run(&mut n, NBD_OPT_INFO, &info_payload("disk", &[]));
        assert!(matches!(outcome, Outcome::Continue));
        assert_eq!(r.last().map(|r| r.1), Some(NBD_REP_ACK));
        let (outcome, r) = run(&mut n, NBD_OPT_GO, &info_payload("nope", &[]));
        assert!(matches!(outcome, Outcome::Continue));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, NBD_REP_ERR_UNKNOWN);
        let (outcome, r) = run(&mut n, NBD_OPT_GO, &[0, 0, 0, 9, b'x']);
        assert!(matches!(outcome, Outcome::Continue));
        assert_eq!(r[0].1, NBD_REP_ERR_INVALID);
        // The default (empty) name is just another registry lookup.
        let (outcome, _) = run(&mut n, NBD_OPT_GO, &info_payload("", &[]));
        assert!(matches!(outcome, Outcome::Transmit(e) if e.size == 4096));
    }

    #[test]
    fn export_name_replies_or_closes() {
        let mut n = Negotiator::new(registry(), 3).expect("flags");
        let mut out = Vec::new();
        let outcome = n.handle_option(NBD_OPT_EXPORT_NAME, b"disk", false, &mut out);
        assert!(matches!(outcome, Outcome::Transmit(_)));
        assert_eq!(out.len(), 10, "NO_ZEROES was negotiated");
        let mut n = Negotiator::new(registry(), 1).expect("flags");
        out.clear();
        assert!(matches!(
            n.handle_option(NBD_OPT_EXPORT_NAME, b"disk", false, &mut out),
            Outcome::Transmit(_)
        ));
        assert_eq!(out.len(), 134);
        out.clear();
        assert!(matches!(
            n.handle_option(NBD_OPT_EXPORT_NAME, b"missing", false, &mut out),
            Outcome::Close
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn list_abort_starttls_unknown() {
        let mut n = Negotiator::new(registry(), 1).expect("flags");
        let (_, r) = run(&mut n, NBD_OPT_LIST, &[]);
        assert_eq!(r.len(), 3);
        assert!(r.iter().take(2).all(|r| r.1 == NBD_REP_SERVER));
        assert!(r.iter().any(|r| r.2 == b"\0\0\0\x04diskthe test disk"));
        let (_, r) = run(&mut n, NBD_OPT_LIST, &[1]);
        assert_eq!(r[0].1, NBD_REP_ERR_INVALID);
        let (_, r) = run(&mut n, NBD_OPT_STARTTLS, &[]);
        assert_eq!(r[0].1, NBD_REP_ERR_POLICY);
        let (_, r) = run(&mut n, 0x4242, &[1, 2, 3]);
        assert_eq!((r[0].0, r[0].1), (0x4242, NBD_REP_ERR_UNSUP));
        let (_, r) = run(&mut n, NBD_OPT_EXTENDED_HEADERS, &[]);
        assert_eq!(r[0].1, NBD_REP_ERR_UNSUP);
        let (_, r) = run(&mut n, NBD_OPT_STRUCTURED_REPLY, &[0]);
        assert_eq!(r[0].1, NBD_REP_ERR_INVALID);
        let (outcome, r) = run(&mut n, NBD_OPT_ABORT, &[]);
        assert!(matches!(outcome, Outcome::Close));
        assert_eq!(r[0].1, NBD_REP_ACK);
    }

    #[test]
    fn shutdown_refuses_options_but_acks_abort() {
        let mut n = Negotiator::new(registry(), 1).expect("flags");
        let mut out = Vec::new();
        let outcome = n.handle_option(NBD_OPT_GO, &info_payload("disk", &[]), true, &mut out);
        assert!(matches!(outcome, Outcome::Continue));
        assert_eq!(replies(&out)[0].1, NBD_REP_ERR_SHUTDOWN);
        out.clear();
        assert!(matches!(
            n.handle_option(NBD_OPT_ABORT, &[], true, &mut out),
            Outcome::Close
        ));
        assert_eq!(replies(&out)[0].1, NBD_REP_ACK);
    }

    #[test]
    fn meta_contexts_need_structured_replies_and_follow_the_export() {
        let mut n = Negotiator::new(registry(), 1).expect("flags");
        let set = meta_payload("disk", &["base:allocation"]);
        let (_, r) = run(&mut n, NBD_OPT_SET_META_CONTEXT, &set);
        assert_eq!(r[0].1, NBD_REP_ERR_INVALID);

        let (_, r) = run(&mut n, NBD_OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].1, NBD_REP_ACK);

        // Listing: no query and the base: wildcard both list base:allocation.
        for queries in [&[][..], &["base:"][..]] {
            let (_, r) = run(
                &mut n,
                NBD_OPT_LIST_META_CONTEXT,
                &meta_payload("disk", queries),
            );
            assert_eq!(r.len(), 2, "{queries:?}");
            assert_eq!(r[0].1, NBD_REP_META_CONTEXT);
            assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
            assert_eq!(r[1].1, NBD_REP_ACK);
        }
        // Unknown namespaces are ignored; missing colon is invalid; unknown export errors.
        let (_, r) = run(
            &mut n,
            NBD_OPT_LIST_META_CONTEXT,
            &meta_payload("disk", &["qemu:dirty-bitmap:x"]),
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, NBD_REP_ACK);
        let (_, r) = run(
            &mut n,
            NBD_OPT_LIST_META_CONTEXT,
            &meta_payload("disk", &["nocolon"]),
        );
        assert_eq!(r[0].1, NBD_REP_ERR_INVALID);
        let (_, r) = run(
            &mut n,
            NBD_OPT_SET_META_CONTEXT,
            &meta_payload("nope", &["base:allocation"]),
        );
        assert_eq!(r[0].1, NBD_REP_ERR_UNKNOWN);

        // "base:" selects nothing when setting.
        let (_, r) = run(
            &mut n,
            NBD_OPT_SET_META_CONTEXT,
            &meta_payload("disk", &["base:"]),
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, NBD_REP_ACK);

        let (_, r) = run(&mut n, NBD_OPT_SET_META_CONTEXT, &set);
        assert_eq!(r.len(), 2);
        assert_eq!(&r[0].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());

        // Going to another export drops the context.
        let (outcome, _) = run(&mut n, NBD_OPT_GO, &info_payload("", &[]));
        assert!(
            matches!(outcome, Outcome::Transmit(e) if e.meta_context.is_none() && e.structured)
        );
        let (outcome, _) = run(&mut n, NBD_OPT_GO, &info_payload("disk", &[]));
        let Outcome::Transmit(e) = outcome else {
            panic!("expected transmission");
        };
        assert_eq!(e.meta_context, Some(BASE_ALLOCATION_ID));
        assert_ne!(e.flags & NBD_FLAG_SEND_DF, 0);

        // A failed set clears the selection.
        let _ = run(&mut n, NBD_OPT_SET_META_CONTEXT, &[1, 2]);
        let (outcome, _) = run(&mut n, NBD_OPT_GO, &info_payload("disk", &[]));
        assert!(matches!(outcome, Outcome::Transmit(e) if e.meta_context.is_none()));
    }
}

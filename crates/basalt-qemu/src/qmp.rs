//! A QMP client: line-delimited JSON over a unix socket.
//!
//! On connect QEMU sends a greeting (`{"QMP": {...}}`); the client must send
//! `qmp_capabilities` before anything else. Each command gets exactly one
//! answer, `{"return": ...}` or `{"error": {"class", "desc"}}`; events
//! (`{"event": ...}`) may arrive at any time in between and are kept for
//! [`Qmp::take_events`]. One command at a time per connection.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::QemuError;

/// How long a command may take before the connection is given up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// A negotiated QMP connection.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: Vec<Value>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("pending_events", &self.events.len())
            .finish()
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket, retrying until `timeout` (QEMU
    /// creates the socket shortly after it starts), and negotiates.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QemuError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(source) if tokio::time::Instant::now() >= deadline => {
                    return Err(QemuError::io(
                        format!("QMP socket {}", path.display()),
                        source,
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
            events: Vec::new(),
        };
        // QEMU can write an event to a new connection before its greeting:
        // an event emitted from another thread (the migration thread's
        // MIGRATION events on a destination, seen here) races the monitor's
        // handling of the connection's opening, which QEMU did not lock
        // against it (a "qmp: Fix thread race" patch went to qemu-devel in
        // December 2025). Such events are kept like any other; anything else
        // must be the greeting.
        loop {
            let message = qmp.read_message("the QMP greeting").await?;
            if message.get("QMP").is_some() {
                break;
            }
            if message.get("event").is_none() {
                return Err(QemuError::Protocol(format!(
                    "expected the QMP greeting, got {message}"
                )));
            }
            qmp.events.push(message);
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self, what: &str) -> Result<Value, QemuError> {
        let mut line = String::new();
        let read = tokio::time::timeout(COMMAND_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QemuError::Timeout(what.to_string()))?
            .map_err(|e| QemuError::io("reading QMP", e))?;
        if read == 0 {
            return Err(QemuError::Closed);
        }
        serde_json::from_str(&line)
            .map_err(|e| QemuError::Protocol(format!("{e} in {:?}", line.trim_end())))
    }

    /// Runs `command` with `arguments`; returns QEMU's `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QemuError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    QemuError::Closed
                }
                _ => QemuError::io("writing QMP", e),
            })?;
        loop {
            let mut message = self.read_message(command).await?;
            if message.get("event").is_some() {
                self.events.push(message);
                continue;
            }
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = message.get("error") {
                let text = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QemuError::Command {
                    command: command.to_string(),
                    class: text("class"),
                    description: text("desc"),
                });
            }
            return Err(QemuError::Protocol(format!(
                "unexpected QMP message {message}"
            )));
        }
    }

    /// QEMU's run state (`running`, `paused`, `shutdown`, `inmigrate`,
    /// `postmigrate`, ...).
    pub async fn status(&mut self) -> Result<String, QemuError> {
        let status = self.execute("query-status", None).await?;
        status
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QemuError::Protocol(format!("query-status answered {status}")))
    }

    /// The events received so far (oldest first), emptying the list.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake QEMU that answers the handshake and one scripted exchange.
    async fn fake_qemu(listener: UnixListener, answers: Vec<&'static str>) -> Vec<String> {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        // An event before the greeting, as QEMU sends when an event from
        // another thread races the connection's opening (see `connect`).
        write
            .write_all(b"{\"event\": \"MIGRATION\", \"data\": {\"status\": \"setup\"}}\n")
            .await
            .unwrap();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        for answer in answers {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            seen.push(line.trim_end().to_string());
            write.write_all(answer.as_bytes()).await.unwrap();
        }
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest).await;
        seen
    }

    #[tokio::test]
    async fn negotiates_keeps_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(
            listener,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true}}\n{\"return\": {\"status\": \"shutdown\", \"running\": false}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such thing\"}}\n",
            ],
        ));
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.status().await.unwrap(), "shutdown");
        let events = qmp.take_events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["event"], "MIGRATION");
        assert_eq!(events[1]["event"], "SHUTDOWN");
        assert!(qmp.take_events().is_empty());
        let error = qmp
            .execute("device_del", Some(json!({"id": "x"})))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, QemuError::Command { class, description, .. }
                if class == "GenericError" && description == "no such thing"),
            "{error}"
        );
        drop(qmp);
        let seen = server.await.unwrap();
        assert_eq!(seen[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(seen[1], r#"{"execute":"query-status"}"#);
        assert_eq!(
            seen[2],
            r#"{"arguments":{"id":"x"},"execute":"device_del"}"#
        );
    }

    #[tokio::test]
    async fn a_peer_that_is_not_qemu_is_refused_and_a_closed_one_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"{\"hello\": 1}\n").await.unwrap();
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"not json\n").await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            drop(stream);
        });
        let first = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(first, QemuError::Protocol(_)), "{first}");
        let second = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(second, QemuError::Protocol(_)), "{second}");
        let third = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(third, QemuError::Closed), "{third}");
        server.await.unwrap();
    }
}

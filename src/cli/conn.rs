//! What every client command shares: the `--server` and `--json` flags
//! ([`Conn`]), the open connection plus output sink ([`Session`]), and the
//! one-line error messages for failed RPCs and unreachable brokers.

use std::error::Error as StdError;
use std::fmt::Display;

use clap::Args;
use tonic::{Code, Status};

use super::output::Output;
use crate::client::Client;

/// Default broker URL of client commands.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Flags of every client command.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    /// URL of the broker.
    #[arg(
        long,
        global = true,
        env = "COURIER_SERVER",
        hide_env_values = true,
        default_value = DEFAULT_SERVER,
        value_name = "URL",
        value_parser = server_url
    )]
    pub server: String,

    /// Print one JSON object per line instead of human-readable text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Longest wait for the broker's answer to each call; a pull's --wait comes on top
    #[arg(
        long,
        global = true,
        env = "COURIER_TIMEOUT",
        default_value = "30s",
        value_name = "DURATION",
        value_parser = timeout_ms
    )]
    pub timeout: u64,
}

fn timeout_ms(s: &str) -> Result<u64, String> {
    match super::parse::duration_ms(s)? {
        0 => Err(format!("{s:?} must be longer than 0")),
        ms => Ok(ms),
    }
}

impl Conn {
    /// Connects to the broker and opens stdout.
    pub async fn open(&self) -> anyhow::Result<Session> {
        self.open_waiting(0).await
    }

    /// Like [`Conn::open`], for calls that may wait `wait_ms` on the broker
    /// (a long-polling pull) before the timeout counts.
    pub async fn open_waiting(&self, wait_ms: u64) -> anyhow::Result<Session> {
        let timeout = std::time::Duration::from_millis(self.timeout.saturating_add(wait_ms));
        let client = Client::connect_with_timeout(&self.server, Some(timeout))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach courier at {}: {}",
                    self.server,
                    error_chain(&e)
                )
            })?;
        Ok(Session {
            client,
            out: Output::new(self.json),
            server: self.server.clone(),
            timeout,
        })
    }
}

/// Checks a broker URL: `http://HOST:PORT`. Without a scheme, `http://` is
/// assumed (`127.0.0.1:50051`). Empty means the default, so an empty
/// `COURIER_SERVER` counts as unset, as empty `serve` variables do.
pub fn server_url(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Ok(DEFAULT_SERVER.to_string());
    }
    let url = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|e| format!("{s:?} is not a URL ({e}); expected for example {DEFAULT_SERVER}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{s:?}: only http:// URLs are supported"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "{s:?} names no host; expected for example {DEFAULT_SERVER}"
        ));
    }
    Ok(url)
}

/// A connected client command.
pub struct Session {
    pub client: Client,
    pub out: Output,
    server: String,
    timeout: std::time::Duration,
}

impl Session {
    /// The error for a failed RPC: `{what}: {CODE}: {message}`, where `what`
    /// names the operation and its object (`sub create "orders-x"`). A
    /// transport failure reports the broker as unreachable instead.
    pub fn fail(&self, what: impl Display, status: Status) -> anyhow::Error {
        if is_client_timeout(&status) {
            return anyhow::anyhow!(
                "{what}: no answer from courier at {} within {} (--timeout)",
                self.server,
                humantime::format_duration(self.timeout)
            );
        }
        anyhow::anyhow!(rpc_error_line(&self.server, &what.to_string(), &status))
    }
}

/// Whether `status` is the client's own request timeout, not the broker's.
fn is_client_timeout(status: &Status) -> bool {
    let mut next = status.source();
    while let Some(e) = next {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// The text of [`Session::fail`].
pub fn rpc_error_line(server: &str, what: &str, status: &Status) -> String {
    // Statuses made by the client's transport (not sent by the broker) carry
    // the underlying error as their source.
    if let (Code::Unavailable, Some(source)) = (status.code(), status.source()) {
        let cause = error_chain(source);
        let message = status.message().trim();
        return if message.is_empty() || cause.contains(message) {
            format!("cannot reach courier at {server}: {cause}")
        } else {
            format!("cannot reach courier at {server}: {message}: {cause}")
        };
    }
    // Other statuses with a source were made by the client's transport too:
    // what the server said was not gRPC, or the connection broke.
    if let Some(source) = status.source() {
        let cause = error_chain(source);
        let not_grpc = [
            "h2 protocol error",
            "http2 error",
            "invalid HTTP",
            "frame with invalid size",
        ];
        if not_grpc
            .iter()
            .any(|s| cause.contains(s) || status.message().contains(s))
        {
            return format!("{what}: the server at {server} does not speak gRPC (HTTP/2): {cause}");
        }
        return format!("{what}: connection to courier at {server} lost: {cause}");
    }
    let message = status.message().trim();
    if message.is_empty() {
        format!("{what}: {}", code_name(status.code()))
    } else {
        format!("{what}: {}: {message}", code_name(status.code()))
    }
}

/// An error and its sources joined with `: `, skipping repeats.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// The canonical gRPC name of a status code (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_errors_name_operation_code_and_message() {
        let status = Status::not_found("topic \"orders\" not found");
        assert_eq!(
            rpc_error_line(DEFAULT_SERVER, "sub create \"orders-x\"", &status),
            "sub create \"orders-x\": NOT_FOUND: topic \"orders\" not found"
        );
        let status = Status::new(Code::Internal, "");
        assert_eq!(
            rpc_error_line(DEFAULT_SERVER, "stats", &status),
            "stats: INTERNAL"
        );
    }

    #[test]
    fn server_urls() {
        assert_eq!(server_url("http://h:1").as_deref(), Ok("http://h:1"));
        assert_eq!(
            server_url("127.0.0.1:50051").as_deref(),
            Ok("http://127.0.0.1:50051")
        );
        assert!(server_url("https://h:1").is_err());
        assert!(server_url("not a url").is_err());
        assert!(server_url("http://").is_err());
        assert_eq!(server_url("").as_deref(), Ok(DEFAULT_SERVER));
    }

    #[test]
    fn a_server_that_is_not_grpc_and_a_lost_connection_are_named() {
        let frame = std::io::Error::other("connection error detected: frame with invalid size");
        let mut status = Status::unknown("h2 protocol error: http2 error");
        status.set_source(std::sync::Arc::new(frame));
        assert_eq!(
            rpc_error_line(DEFAULT_SERVER, "topic list", &status),
            "topic list: the server at http://127.0.0.1:50051 does not speak gRPC (HTTP/2): \
             connection error detected: frame with invalid size"
        );
        let reset = std::io::Error::other("connection reset");
        let mut status = Status::unknown("transport error");
        status.set_source(std::sync::Arc::new(reset));
        assert_eq!(
            rpc_error_line(DEFAULT_SERVER, "pull \"s\"", &status),
            "pull \"s\": connection to courier at http://127.0.0.1:50051 lost: connection reset"
        );
    }

    #[test]
    fn transport_failures_say_the_broker_is_unreachable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let mut status = Status::unavailable("tcp connect error");
        status.set_source(std::sync::Arc::new(io));
        let line = rpc_error_line(DEFAULT_SERVER, "stats", &status);
        assert!(
            line.starts_with("cannot reach courier at http://127.0.0.1:50051: "),
            "{line}"
        );
    }
}

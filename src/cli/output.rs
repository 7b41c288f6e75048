//! How client commands print: the [`Output`] sink (human text or one JSON
//! object per line on stdout), aligned tables and `key: value` blocks, and
//! the renderings shared by several commands (timestamps, durations,
//! payloads, attributes, enum names, deliveries).
//!
//! Conventions: JSON objects use the proto field names (snake_case),
//! timestamps are RFC 3339 strings (null when unset), durations stay in
//! milliseconds (`*_ms`), payloads are base64 in `data`, enums are short
//! kebab-case names (`rejected`, `in-flight`). Human output prints payloads
//! as UTF-8 when valid, else as base64 under a `data (base64)` key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, BufWriter, Stdout, Write};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use prost_types::Timestamp;
use serde_json::{Value, json};

use crate::api::pb::v1::{
    AckStatus, DeadLetterReason, Message, MessageState, ReceivedMessage, StartPosition,
};

/// Writing to stdout failed. Kept apart from other I/O errors so a closed
/// pipe (`courier topic list | head -1`) ends the command quietly.
#[derive(Debug)]
pub struct WriteError(pub io::Error);

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "writing output: {}", self.0)
    }
}

impl std::error::Error for WriteError {}

/// Where a client command's results go.
pub struct Output {
    json: bool,
    w: BufWriter<Stdout>,
    /// See [`Output::finish_work_if_closed`].
    finish_work: bool,
    /// The reader went away; output since is dropped.
    closed: bool,
}

impl Output {
    /// Stdout, as JSON lines if `json`.
    pub fn new(json: bool) -> Output {
        Output {
            json,
            w: BufWriter::new(io::stdout()),
            finish_work: false,
            closed: false,
        }
    }

    /// For commands whose work must not stop half-way because nobody reads
    /// their output (`publish --lines | head -1`): once stdout is closed,
    /// output is dropped and writes succeed, so the command does all its
    /// work and exits as it would have. Other commands stop at a closed
    /// stdout (a `pull --ack` must not ack what it cannot show).
    pub fn finish_work_if_closed(&mut self) {
        self.finish_work = true;
    }

    fn wrote(&mut self, result: io::Result<()>) -> Result<(), WriteError> {
        match result {
            Err(e) if self.finish_work && e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other.map_err(WriteError),
        }
    }

    /// Whether results are printed as JSON lines.
    pub fn json(&self) -> bool {
        self.json
    }

    /// One line of text.
    pub fn line(&mut self, text: impl fmt::Display) -> Result<(), WriteError> {
        if self.closed {
            return Ok(());
        }
        let result = writeln!(self.w, "{text}");
        self.wrote(result)
    }

    /// One JSON object on its own line.
    pub fn json_line(&mut self, value: &Value) -> Result<(), WriteError> {
        if self.closed {
            return Ok(());
        }
        let result = writeln!(self.w, "{value}");
        self.wrote(result)
    }

    /// An aligned table: a header row, then `rows`, columns separated by two
    /// spaces, the last column unpadded.
    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) -> Result<(), WriteError> {
        let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        for row in std::iter::once(&header).chain(rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad + 2));
                }
            }
            self.line(line)?;
        }
        Ok(())
    }

    /// `key: value` lines with the values aligned.
    pub fn fields(&mut self, fields: &[(&str, String)]) -> Result<(), WriteError> {
        let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (key, value) in fields {
            let pad = width - key.len();
            if value.is_empty() {
                self.line(format_args!("{key}:"))?;
            } else {
                self.line(format_args!("{key}:{:pad$} {value}", "", pad = pad))?;
            }
        }
        Ok(())
    }

    /// Pushes buffered output to stdout.
    pub fn flush(&mut self) -> Result<(), WriteError> {
        if self.closed {
            return Ok(());
        }
        let result = self.w.flush();
        self.wrote(result)
    }
}

/// A timestamp as RFC 3339, or `None` when unset.
pub fn time(t: &Option<Timestamp>) -> Option<String> {
    t.as_ref().map(|t| t.to_string())
}

/// A timestamp for humans: RFC 3339, or `-` when unset.
pub fn time_human(t: &Option<Timestamp>) -> String {
    time(t).unwrap_or_else(|| "-".to_string())
}

/// A timestamp for JSON: an RFC 3339 string, or null when unset.
pub fn time_json(t: &Option<Timestamp>) -> Value {
    time(t).map_or(Value::Null, Value::String)
}

/// Milliseconds for humans: `30s`, `1m 30s`, `100ms`.
pub fn ms_human(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// A byte count for humans: `1048576 (1.0 MiB)`; small counts plain.
pub fn bytes_human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return n.to_string();
    }
    let mut value = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    format!("{n} ({value:.1} {unit})")
}

/// Base64 (standard alphabet, padded).
pub fn base64(data: &[u8]) -> String {
    BASE64.encode(data)
}

/// The key and text under which a payload is shown to humans: UTF-8 as is,
/// anything else as base64 with a note in the key.
pub fn payload_human(data: &[u8]) -> (&'static str, String) {
    match std::str::from_utf8(data) {
        Ok(text) => ("data", text.to_string()),
        Err(_) => ("data (base64)", base64(data)),
    }
}

/// `1 dead letter`, `2 dead letters`: a count with its noun, plural
/// formed with `s`.
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Attributes sorted by key.
pub fn attributes_sorted(attrs: &HashMap<String, String>) -> BTreeMap<&str, &str> {
    attrs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Attributes for humans: `k1=v1, k2=v2` sorted by key, `-` when none.
pub fn attributes_human(attrs: &HashMap<String, String>) -> String {
    if attrs.is_empty() {
        return "-".to_string();
    }
    attributes_sorted(attrs)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Short name of a dead-letter reason, as the `--reason` flag spells it.
pub fn reason_name(reason: i32) -> String {
    match DeadLetterReason::try_from(reason) {
        Ok(DeadLetterReason::AttemptsExhausted) => "attempts-exhausted".into(),
        Ok(DeadLetterReason::Rejected) => "rejected".into(),
        Ok(DeadLetterReason::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown({reason})"),
    }
}

/// Short name of an ack status.
pub fn ack_status_name(status: i32) -> String {
    match AckStatus::try_from(status) {
        Ok(AckStatus::Ok) => "ok".into(),
        Ok(AckStatus::Unknown) => "unknown".into(),
        Ok(AckStatus::Stale) => "stale".into(),
        Ok(AckStatus::AlreadySettled) => "already settled (acknowledged or dead-lettered)".into(),
        Ok(AckStatus::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown({status})"),
    }
}

/// Short name of a message's state in a subscription.
pub fn state_name(state: i32) -> String {
    match MessageState::try_from(state) {
        Ok(MessageState::Pending) => "pending".into(),
        Ok(MessageState::InFlight) => "in-flight".into(),
        Ok(MessageState::Acked) => "acked".into(),
        Ok(MessageState::DeadLettered) => "dead-lettered".into(),
        Ok(MessageState::NotSubscribed) => "not-subscribed".into(),
        Ok(MessageState::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown({state})"),
    }
}

/// Short name of a start position (unspecified reads as latest).
pub fn start_position_name(position: i32) -> String {
    match StartPosition::try_from(position) {
        Ok(StartPosition::Earliest) => "earliest".into(),
        Ok(StartPosition::Latest | StartPosition::Unspecified) => "latest".into(),
        Err(_) => format!("unknown({position})"),
    }
}

/// The JSON fields of a message: `message_id`, `publish_time`,
/// `ordering_key` (null when empty), `attributes`, `data` (base64).
pub fn message_json(m: &Message) -> serde_json::Map<String, Value> {
    let mut obj = serde_json::Map::new();
    obj.insert("message_id".into(), json!(m.message_id));
    obj.insert("publish_time".into(), time_json(&m.publish_time));
    obj.insert(
        "ordering_key".into(),
        if m.ordering_key.is_empty() {
            Value::Null
        } else {
            json!(m.ordering_key)
        },
    );
    obj.insert("attributes".into(), json!(attributes_sorted(&m.attributes)));
    obj.insert("data".into(), json!(base64(&m.data)));
    obj
}

/// The human fields of a message, payload last.
pub fn message_fields(m: &Message) -> Vec<(&'static str, String)> {
    let mut fields = vec![("publish_time", time_human(&m.publish_time))];
    if !m.ordering_key.is_empty() {
        fields.push(("ordering_key", m.ordering_key.clone()));
    }
    fields.push(("attributes", attributes_human(&m.attributes)));
    let (key, text) = payload_human(&m.data);
    fields.push((key, text));
    fields
}

/// A delivery as one JSON object: the message's fields plus `ack_id` and
/// `delivery_attempt`.
pub fn delivery_json(d: &ReceivedMessage) -> Value {
    let mut obj = d.message.as_ref().map(message_json).unwrap_or_default();
    obj.insert("ack_id".into(), json!(d.ack_id));
    obj.insert("delivery_attempt".into(), json!(d.delivery_attempt));
    Value::Object(obj)
}

/// A delivery as human `key: value` fields.
pub fn delivery_fields(d: &ReceivedMessage) -> Vec<(&'static str, String)> {
    let message = d.message.clone().unwrap_or_default();
    let mut fields = vec![
        ("message_id", message.message_id.clone()),
        ("ack_id", d.ack_id.clone()),
        ("delivery_attempt", d.delivery_attempt.to_string()),
    ];
    fields.extend(message_fields(&message));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_fall_back_to_base64() {
        assert_eq!(payload_human(b"hello"), ("data", "hello".to_string()));
        assert_eq!(
            payload_human(&[0xff, 0x00]),
            ("data (base64)", "/wA=".to_string())
        );
    }

    #[test]
    fn human_sizes_and_durations() {
        assert_eq!(bytes_human(10), "10");
        assert_eq!(bytes_human(1 << 20), "1048576 (1.0 MiB)");
        assert_eq!(ms_human(90_000), "1m 30s");
        assert_eq!(ms_human(100), "100ms");
    }

    #[test]
    fn deliveries_in_json_carry_the_documented_fields() {
        let d = ReceivedMessage {
            ack_id: "a1".into(),
            delivery_attempt: 2,
            message: Some(Message {
                message_id: "7".into(),
                data: bytes::Bytes::from_static(b"hi"),
                attributes: [("k".to_string(), "v".to_string())].into(),
                ordering_key: String::new(),
                publish_time: Some(Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
            }),
        };
        let v = delivery_json(&d);
        assert_eq!(v["message_id"], "7");
        assert_eq!(v["ack_id"], "a1");
        assert_eq!(v["delivery_attempt"], 2);
        assert_eq!(v["attributes"]["k"], "v");
        assert_eq!(v["data"], "aGk=");
        assert_eq!(v["publish_time"], "1970-01-01T00:00:00Z");
        assert_eq!(v["ordering_key"], Value::Null);
    }
}

//! `courier pull`, `ack`, `nack` and `modack`: the unary Subscriber calls.
//! Settling commands print one result per ack id and fail (exit 1) when
//! any ack id was not applied (unknown or stale).

use clap::Args;
use serde_json::json;

use super::conn::{Conn, Session};
use super::output::{ack_status_name, delivery_fields, delivery_json};
use super::parse;
use crate::api::pb::v1::{AckResult, AckStatus, ModifyAckDeadlineRequest, ReceivedMessage};
use crate::broker::config::{ACK_IDS_PER_REQUEST_MAX, PULL_MESSAGES_MAX};

/// `courier pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Subscription to pull from.
    pub subscription: String,
    /// Most messages to lease, 1 to 1000.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=PULL_MESSAGES_MAX as i64))]
    pub max: u32,
    /// How long to wait for the first message, at most 1m.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse::wait_ms)]
    pub wait: u64,
    /// Acknowledge the messages once printed.
    #[arg(long)]
    pub ack: bool,
}

/// `courier ack`.
#[derive(Args, Debug)]
pub struct AckArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Subscription that delivered the messages.
    pub subscription: String,
    /// Ack ids of the deliveries.
    #[arg(required = true, value_name = "ACK_ID")]
    pub ack_ids: Vec<String>,
}

/// `courier nack`.
#[derive(Args, Debug)]
pub struct NackArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Subscription that delivered the messages.
    pub subscription: String,
    /// Ack ids of the deliveries.
    #[arg(required = true, value_name = "ACK_ID")]
    pub ack_ids: Vec<String>,
    /// Send the messages straight to the dead-letter queue instead of
    /// redelivering them.
    #[arg(long)]
    pub reject: bool,
    /// Why, at most 1024 bytes: with --reject, the dead letters' reason
    /// text; otherwise kept as each message's last nack reason (shown by
    /// `courier status` and in its dead letter if its attempts run out).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

/// `courier modack`.
#[derive(Args, Debug)]
pub struct ModackArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Subscription that delivered the messages.
    pub subscription: String,
    /// New lease deadline from now, 100ms to 10m; 0 nacks.
    #[arg(long, value_name = "DURATION", value_parser = parse::duration_ms)]
    pub deadline: u64,
    /// Ack ids of the deliveries.
    #[arg(required = true, value_name = "ACK_ID")]
    pub ack_ids: Vec<String>,
}

impl PullArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut s = self.conn.open_waiting(self.wait).await?;
        let sub = &self.subscription;
        let received = s
            .client
            .pull(sub, self.max, self.wait)
            .await
            .map_err(|e| s.fail(format_args!("pull {sub:?}"), e))?;
        print_deliveries(&mut s, &received)?;
        s.out.flush()?;
        if self.ack && !received.is_empty() {
            let ids: Vec<String> = received.iter().map(|r| r.ack_id.clone()).collect();
            let results = s
                .client
                .ack(sub, ids)
                .await
                .map_err(|e| s.fail(format_args!("pull {sub:?}: ack"), e))?;
            check_results(&format!("pull {sub:?}: ack"), "acknowledged", &results)?;
        }
        Ok(())
    }
}

fn print_deliveries(s: &mut Session, received: &[ReceivedMessage]) -> anyhow::Result<()> {
    if s.out.json() {
        for d in received {
            s.out.json_line(&delivery_json(d))?;
        }
        return Ok(());
    }
    if received.is_empty() {
        s.out.line("(no messages)")?;
    }
    for (i, d) in received.iter().enumerate() {
        if i > 0 {
            s.out.line("")?;
        }
        s.out.fields(&delivery_fields(d))?;
    }
    Ok(())
}

impl AckArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut s = self.conn.open().await?;
        let what = format!("ack {:?}", self.subscription);
        let mut results = Vec::new();
        for chunk in self.ack_ids.chunks(ACK_IDS_PER_REQUEST_MAX) {
            let r = s
                .client
                .ack(&self.subscription, chunk.to_vec())
                .await
                .map_err(|e| s.fail(&what, e))?;
            results.extend(r);
        }
        print_results(&mut s, &results)?;
        check_results(&what, "acknowledged", &results)
    }
}

impl NackArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut s = self.conn.open().await?;
        let what = format!("nack {:?}", self.subscription);
        let reason = self.reason.as_deref().unwrap_or_default();
        let mut results = Vec::new();
        for chunk in self.ack_ids.chunks(ACK_IDS_PER_REQUEST_MAX) {
            let r = s
                .client
                .nack(&self.subscription, chunk.to_vec(), self.reject, reason)
                .await
                .map_err(|e| s.fail(&what, e))?;
            results.extend(r);
        }
        print_results(&mut s, &results)?;
        check_results(&what, "nacked", &results)
    }
}

impl ModackArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut s = self.conn.open().await?;
        let what = format!("modack {:?}", self.subscription);
        let mut results = Vec::new();
        for chunk in self.ack_ids.chunks(ACK_IDS_PER_REQUEST_MAX) {
            let request = ModifyAckDeadlineRequest {
                subscription: self.subscription.clone(),
                ack_ids: chunk.to_vec(),
                ack_deadline_ms: self.deadline,
            };
            let r = s
                .client
                .subscriber()
                .modify_ack_deadline(request)
                .await
                .map_err(|e| s.fail(&what, e))?
                .into_inner()
                .results;
            results.extend(r);
        }
        print_results(&mut s, &results)?;
        check_results(&what, "modified", &results)
    }
}

/// Prints one line per ack id: `ACK_ID  STATUS`, or JSON
/// `{"ack_id", "status"}`.
fn print_results(s: &mut Session, results: &[AckResult]) -> anyhow::Result<()> {
    if s.out.json() {
        for r in results {
            s.out
                .json_line(&json!({"ack_id": r.ack_id, "status": ack_status_name(r.status)}))?;
        }
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|r| vec![r.ack_id.clone(), ack_status_name(r.status)])
            .collect();
        s.out.table(&["ACK_ID", "STATUS"], &rows)?;
    }
    s.out.flush()?;
    Ok(())
}

/// Fails unless every result is OK.
fn check_results(what: &str, done: &str, results: &[AckResult]) -> anyhow::Result<()> {
    let failed: Vec<&AckResult> = results
        .iter()
        .filter(|r| r.status != AckStatus::Ok as i32)
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    let first = failed[0];
    Err(anyhow::anyhow!(
        "{what}: {} of {} ack ids were not {done} (first: {:?} is {})",
        failed.len(),
        results.len(),
        first.ack_id,
        ack_status_name(first.status)
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(argv: &[&str]) -> Result<Command, clap::Error> {
        Ok(Cli::try_parse_from(std::iter::once(&"courier").chain(argv))?.command)
    }

    #[test]
    fn pull_defaults_and_flags() {
        let Ok(Command::Pull(p)) = parse(&["pull", "s"]) else {
            panic!()
        };
        assert_eq!((p.max, p.wait, p.ack), (1, 0, false));
        let Ok(Command::Pull(p)) = parse(&["pull", "s", "--max", "10", "--wait", "5s", "--ack"])
        else {
            panic!()
        };
        assert_eq!((p.max, p.wait, p.ack), (10, 5000, true));
    }

    #[test]
    fn settling_commands_parse() {
        let Ok(Command::Ack(a)) = parse(&["ack", "s", "a1", "a2"]) else {
            panic!()
        };
        assert_eq!(a.ack_ids, ["a1", "a2"]);
        let Ok(Command::Nack(n)) = parse(&["nack", "s", "a1", "--reject", "--reason", "bad"])
        else {
            panic!()
        };
        assert!(n.reject);
        assert_eq!(n.reason.as_deref(), Some("bad"));
        let Ok(Command::Nack(n)) = parse(&["nack", "s", "a1", "--reason", "timeout"]) else {
            panic!()
        };
        assert!(!n.reject);
        assert_eq!(n.reason.as_deref(), Some("timeout"));
        let Ok(Command::Modack(m)) = parse(&["modack", "s", "--deadline", "1m", "a1"]) else {
            panic!()
        };
        assert_eq!(m.deadline, 60_000);
        for argv in [&["ack", "s"][..], &["nack", "s"], &["modack", "s", "a1"]] {
            assert_eq!(parse(argv).unwrap_err().exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn unsettled_ack_ids_fail_the_command() {
        let ok = AckResult {
            ack_id: "a".into(),
            status: AckStatus::Ok as i32,
        };
        let stale = AckResult {
            ack_id: "b".into(),
            status: AckStatus::Stale as i32,
        };
        assert!(check_results("ack \"s\"", "acknowledged", std::slice::from_ref(&ok)).is_ok());
        let err = check_results("ack \"s\"", "acknowledged", &[ok, stale]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ack \"s\": 1 of 2 ack ids were not acknowledged (first: \"b\" is stale)"
        );
    }
}

//! `courier topic ...`: create, get, list, delete and stats of topics,
//! through the Admin service.

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::conn::Conn;
use super::output::{Output, WriteError, bytes_human, ms_human, time_human, time_json};
use super::parse;
use crate::api::pb::v1::{
    CreateTopicRequest, DeleteTopicRequest, GetTopicRequest, GetTopicStatsRequest,
    ListTopicsRequest, RetentionMode, RetentionPolicy, Topic, TopicStats,
};

/// `courier topic`.
#[derive(Args, Debug)]
pub struct TopicArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: TopicCommand,
}

/// What a topic does at its retention limits (`--retention-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Remove the oldest messages, processed or not (each subscription
    /// counts what it lost).
    DropOldest,
    /// Never remove unprocessed messages: refuse publishes while the
    /// unsettled backlog is at --retention-max-bytes.
    RejectPublish,
}

impl From<Mode> for RetentionMode {
    fn from(m: Mode) -> RetentionMode {
        match m {
            Mode::DropOldest => RetentionMode::DropOldest,
            Mode::RejectPublish => RetentionMode::RejectPublish,
        }
    }
}

/// The topic subcommands.
#[derive(Subcommand, Debug, PartialEq)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Name of the topic.
        name: String,
        /// Remove messages published longer ago than this (e.g. 7d, 12h).
        #[arg(long, value_name = "DURATION", value_parser = parse::duration_ms)]
        retention_max_age: Option<u64>,
        /// Keep the topic's log at most this large on disk (e.g. 1GiB); with
        /// `--retention-mode reject-publish`, the most it keeps unprocessed.
        #[arg(long, value_name = "BYTES", value_parser = parse::bytes)]
        retention_max_bytes: Option<u64>,
        /// What reaching a limit does (default drop-oldest).
        #[arg(long, value_enum, value_name = "MODE")]
        retention_mode: Option<Mode>,
    },
    /// Show a topic.
    Get {
        /// Name of the topic.
        name: String,
    },
    /// List every topic, sorted by name.
    List,
    /// Delete a topic with its messages (and, with --force, its subscriptions).
    Delete {
        /// Name of the topic.
        name: String,
        /// Also delete its subscriptions, with their unread messages and dead letters.
        #[arg(long)]
        force: bool,
    },
    /// Show a topic's log statistics.
    Stats {
        /// Name of the topic.
        name: String,
    },
}

impl TopicArgs {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut s = self.conn.open().await?;
        let mut admin = s.client.admin();
        match self.command {
            TopicCommand::Create {
                name,
                retention_max_age,
                retention_max_bytes,
                retention_mode,
            } => {
                let retention = (retention_max_age.is_some()
                    || retention_max_bytes.is_some()
                    || retention_mode.is_some())
                .then_some(RetentionPolicy {
                    max_age_ms: retention_max_age,
                    max_bytes: retention_max_bytes,
                    mode: retention_mode.map_or(RetentionMode::Unspecified, RetentionMode::from)
                        as i32,
                });
                let request = CreateTopicRequest {
                    name: name.clone(),
                    retention,
                };
                let topic = admin
                    .create_topic(request)
                    .await
                    .map_err(|e| s.fail(format_args!("topic create {name:?}"), e))?
                    .into_inner();
                print_topic(&mut s.out, &topic)?;
            }
            TopicCommand::Get { name } => {
                let topic = admin
                    .get_topic(GetTopicRequest { name: name.clone() })
                    .await
                    .map_err(|e| s.fail(format_args!("topic get {name:?}"), e))?
                    .into_inner();
                print_topic(&mut s.out, &topic)?;
            }
            TopicCommand::List => {
                let topics = admin
                    .list_topics(ListTopicsRequest {})
                    .await
                    .map_err(|e| s.fail("topic list", e))?
                    .into_inner()
                    .topics;
                if s.out.json() {
                    for topic in &topics {
                        s.out.json_line(&topic_json(topic))?;
                    }
                } else if topics.is_empty() {
                    s.out.line("(no topics)")?;
                } else {
                    let rows: Vec<Vec<String>> = topics
                        .iter()
                        .map(|t| {
                            vec![
                                t.name.clone(),
                                retention_human(&t.retention),
                                time_human(&t.create_time),
                            ]
                        })
                        .collect();
                    s.out.table(&["NAME", "RETENTION", "CREATED"], &rows)?;
                }
            }
            TopicCommand::Delete { name, force } => {
                let deleted = admin
                    .delete_topic(DeleteTopicRequest {
                        name: name.clone(),
                        force,
                    })
                    .await
                    .map_err(|e| s.fail(format_args!("topic delete {name:?}"), e))?
                    .into_inner()
                    .deleted_subscriptions;
                if s.out.json() {
                    s.out.json_line(&json!({
                        "topic": name,
                        "deleted": true,
                        "deleted_subscriptions": deleted,
                    }))?;
                } else if deleted.is_empty() {
                    s.out.line(format_args!("deleted topic {name:?}"))?;
                } else {
                    let subs: Vec<String> = deleted.iter().map(|d| format!("{d:?}")).collect();
                    s.out.line(format_args!(
                        "deleted topic {name:?} and its subscriptions {}",
                        subs.join(", ")
                    ))?;
                }
            }
            TopicCommand::Stats { name } => {
                let stats = admin
                    .get_topic_stats(GetTopicStatsRequest { name: name.clone() })
                    .await
                    .map_err(|e| s.fail(format_args!("topic stats {name:?}"), e))?
                    .into_inner();
                print_stats(&mut s.out, &stats)?;
            }
        }
        s.out.flush()?;
        Ok(())
    }
}

/// A topic as JSON.
pub fn topic_json(t: &Topic) -> Value {
    json!({
        "name": t.name,
        "retention": t.retention.as_ref().map(|r| json!({
            "max_age_ms": r.max_age_ms,
            "max_bytes": r.max_bytes,
            "mode": mode_name(r.mode),
        })),
        "create_time": time_json(&t.create_time),
    })
}

/// A retention mode as `--retention-mode` spells it.
fn mode_name(mode: i32) -> &'static str {
    match RetentionMode::try_from(mode) {
        Ok(RetentionMode::RejectPublish) => "reject-publish",
        Ok(RetentionMode::Unspecified | RetentionMode::DropOldest) => "drop-oldest",
        Err(_) => "unknown",
    }
}

/// Retention limits for humans.
fn retention_human(r: &Option<RetentionPolicy>) -> String {
    let Some(r) = r else { return "none".into() };
    let mut parts = Vec::new();
    if let Some(ms) = r.max_age_ms {
        parts.push(format!("max age {}", ms_human(ms)));
    }
    if let Some(b) = r.max_bytes {
        parts.push(format!("max bytes {}", bytes_human(b)));
    }
    if RetentionMode::try_from(r.mode) == Ok(RetentionMode::RejectPublish) {
        parts.push("reject-publish".into());
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn print_topic(out: &mut Output, t: &Topic) -> Result<(), WriteError> {
    if out.json() {
        return out.json_line(&topic_json(t));
    }
    out.fields(&[
        ("name", t.name.clone()),
        ("retention", retention_human(&t.retention)),
        ("create_time", time_human(&t.create_time)),
    ])
}

fn print_stats(out: &mut Output, st: &TopicStats) -> Result<(), WriteError> {
    if out.json() {
        return out.json_line(&json!({
            "topic": st.topic,
            "first_offset": st.first_offset,
            "next_offset": st.next_offset,
            "retained_messages": st.retained_messages,
            "retained_bytes": st.retained_bytes,
            "segments": st.segments,
            "subscriptions": st.subscriptions,
        }));
    }
    out.fields(&[
        ("topic", st.topic.clone()),
        ("first_offset", st.first_offset.to_string()),
        ("next_offset", st.next_offset.to_string()),
        ("retained_messages", st.retained_messages.to_string()),
        ("retained_bytes", bytes_human(st.retained_bytes)),
        ("segments", st.segments.to_string()),
        ("subscriptions", st.subscriptions.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(argv: &[&str]) -> TopicArgs {
        let argv = ["courier", "topic"].iter().chain(argv).copied();
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Topic(args),
            }) => args,
            other => panic!("not a topic command line: {other:?}"),
        }
    }

    #[test]
    fn create_takes_retention_limits() {
        let args = parse(&[
            "create",
            "orders",
            "--retention-max-age",
            "7days",
            "--retention-max-bytes",
            "1GiB",
        ]);
        assert_eq!(
            args.command,
            TopicCommand::Create {
                name: "orders".into(),
                retention_max_age: Some(7 * 86_400_000),
                retention_max_bytes: Some(1 << 30),
                retention_mode: None,
            }
        );
    }

    #[test]
    fn create_takes_a_retention_mode() {
        let args = parse(&[
            "create",
            "orders",
            "--retention-max-bytes",
            "1GiB",
            "--retention-mode",
            "reject-publish",
        ]);
        assert_eq!(
            args.command,
            TopicCommand::Create {
                name: "orders".into(),
                retention_max_age: None,
                retention_max_bytes: Some(1 << 30),
                retention_mode: Some(Mode::RejectPublish),
            }
        );
        let r = RetentionPolicy {
            max_age_ms: None,
            max_bytes: Some(1 << 20),
            mode: RetentionMode::RejectPublish as i32,
        };
        assert_eq!(
            retention_human(&Some(r)),
            "max bytes 1048576 (1.0 MiB), reject-publish"
        );
    }

    #[test]
    fn conn_flags_go_anywhere_after_topic() {
        let args = parse(&["--json", "list", "--server", "http://h:1"]);
        assert!(args.conn.json);
        assert_eq!(args.conn.server, "http://h:1");
        assert_eq!(args.command, TopicCommand::List);
    }

    #[test]
    fn retention_for_humans() {
        assert_eq!(retention_human(&None), "none");
        let r = RetentionPolicy {
            max_age_ms: Some(3_600_000),
            max_bytes: None,
            mode: RetentionMode::Unspecified as i32,
        };
        assert_eq!(retention_human(&Some(r)), "max age 1h");
    }
}

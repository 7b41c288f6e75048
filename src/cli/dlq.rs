//! `courier dlq ...`: list (following page tokens), redrive and purge a
//! subscription's dead-letter queue, through the Admin service.

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::UsageError;
use super::conn::Conn;
use super::output::{count, message_fields, message_json, reason_name, time_human, time_json};
use super::parse;
use super::publish::read_file;
use crate::api::pb::v1::{
    DeadLetter, DeadLetterReason, ListDeadLettersRequest, PurgeDeadLettersRequest,
    RedriveDeadLettersRequest, RedriveReplacement,
};
use crate::broker::config::{DEAD_LETTER_PAGE_MAX, REDRIVE_IDS_MAX};

/// `courier dlq`.
#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// Why a message was dead-lettered, as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reason {
    /// Delivered max_delivery_attempts times without an ack.
    AttemptsExhausted,
    /// Nacked with --reject.
    Rejected,
}

impl From<Reason> for DeadLetterReason {
    fn from(r: Reason) -> DeadLetterReason {
        match r {
            Reason::AttemptsExhausted => DeadLetterReason::AttemptsExhausted,
            Reason::Rejected => DeadLetterReason::Rejected,
        }
    }
}

/// The dead-letter queue subcommands.
#[derive(Subcommand, Debug, PartialEq)]
pub enum DlqCommand {
    /// List dead letters in offset order.
    List {
        /// Name of the subscription.
        subscription: String,
        /// Most dead letters to list, at least 1.
        #[arg(long, value_name = "N", default_value_t = 100,
              value_parser = clap::value_parser!(u64).range(1..))]
        max: u64,
    },
    /// Move dead letters back into the subscription for redelivery.
    Redrive {
        /// Name of the subscription.
        subscription: String,
        /// Only these message ids (comma-separated); default all.
        #[arg(
            long,
            value_name = "ID,...",
            value_delimiter = ',',
            conflicts_with_all = ["id", "data", "data_file", "attrs", "no_attrs"]
        )]
        ids: Vec<String>,
        /// Only this message id; with --data, --data-file, --attr or
        /// --no-attrs it is redriven with that content instead of its own.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Only dead letters with this reason.
        #[arg(long, value_enum)]
        reason: Option<Reason>,
        #[command(flatten)]
        replace: ReplaceArgs,
    },
    /// Discard the whole dead-letter queue.
    Purge {
        /// Name of the subscription.
        subscription: String,
    },
}

/// The replacement content of `courier dlq redrive --id`.
#[derive(Args, Debug, Default, PartialEq)]
pub struct ReplaceArgs {
    /// Replace the message's payload with this text.
    #[arg(
        long,
        value_name = "TEXT",
        requires = "id",
        conflicts_with = "data_file"
    )]
    data: Option<String>,
    /// Replace the message's payload with this file's bytes ('-' for stdin).
    #[arg(long, value_name = "FILE", requires = "id")]
    data_file: Option<PathBuf>,
    /// Replace all of the message's attributes with these (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse::attr, requires = "id")]
    attrs: Vec<(String, String)>,
    /// Remove all of the message's attributes.
    #[arg(long, requires = "id", conflicts_with = "attrs")]
    no_attrs: bool,
}

impl ReplaceArgs {
    /// The replacement to send, if any part is replaced.
    async fn replacement(&self) -> anyhow::Result<Option<RedriveReplacement>> {
        let data = match (&self.data, &self.data_file) {
            (Some(text), _) => Some(Bytes::from(text.clone())),
            (None, Some(path)) => Some(read_file(path).await?),
            (None, None) => None,
        };
        let replace_attributes = self.no_attrs || !self.attrs.is_empty();
        let mut attributes = HashMap::new();
        for (k, v) in &self.attrs {
            if attributes.insert(k.clone(), v.clone()).is_some() {
                return Err(UsageError(format!("attribute {k:?} given twice")).into());
            }
        }
        Ok(
            (data.is_some() || replace_attributes).then_some(RedriveReplacement {
                data,
                replace_attributes,
                attributes,
            }),
        )
    }

    /// What was replaced, for the summary line.
    fn describe(&self) -> &'static str {
        let data = self.data.is_some() || self.data_file.is_some();
        let attrs = self.no_attrs || !self.attrs.is_empty();
        match (data, attrs) {
            (true, true) => " with replaced data and attributes",
            (true, false) => " with replaced data",
            (false, true) => " with replaced attributes",
            (false, false) => "",
        }
    }
}

impl DlqArgs {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut s = self.conn.open().await?;
        let mut admin = s.client.admin();
        match self.command {
            DlqCommand::List { subscription, max } => {
                let what = format!("dlq list {subscription:?}");
                let mut listed = 0u64;
                let mut page_token = String::new();
                while listed < max {
                    let page = (max - listed).min(u64::from(DEAD_LETTER_PAGE_MAX)) as u32;
                    let response = admin
                        .list_dead_letters(ListDeadLettersRequest {
                            subscription: subscription.clone(),
                            max: page,
                            page_token: page_token.clone(),
                        })
                        .await
                        .map_err(|e| s.fail(&what, e))?
                        .into_inner();
                    for dl in response.dead_letters.iter().take((max - listed) as usize) {
                        if s.out.json() {
                            s.out.json_line(&dead_letter_json(dl))?;
                        } else {
                            if listed > 0 {
                                s.out.line("")?;
                            }
                            s.out.fields(&dead_letter_fields(dl))?;
                        }
                        listed += 1;
                    }
                    if response.next_page_token.is_empty() || response.dead_letters.is_empty() {
                        break;
                    }
                    page_token = response.next_page_token;
                }
                if listed == 0 && !s.out.json() {
                    s.out.line("(no dead letters)")?;
                }
            }
            DlqCommand::Redrive {
                subscription,
                mut ids,
                id,
                reason,
                replace,
            } => {
                let what = format!("dlq redrive {subscription:?}");
                let reason = reason.map(|r| DeadLetterReason::from(r) as i32);
                let replacement = replace.replacement().await?;
                ids.extend(id.clone());
                // Empty ids mean all: one call. Otherwise at most 1000 per call.
                let chunks: Vec<Vec<String>> = if ids.is_empty() {
                    vec![Vec::new()]
                } else {
                    ids.chunks(REDRIVE_IDS_MAX)
                        .map(<[String]>::to_vec)
                        .collect()
                };
                let mut redriven = 0;
                for message_ids in chunks {
                    redriven += admin
                        .redrive_dead_letters(RedriveDeadLettersRequest {
                            subscription: subscription.clone(),
                            message_ids,
                            reason,
                            replacement: replacement.clone(),
                        })
                        .await
                        .map_err(|e| s.fail(&what, e))?
                        .into_inner()
                        .redriven;
                }
                if s.out.json() {
                    s.out
                        .json_line(&json!({"subscription": subscription, "redriven": redriven}))?;
                } else {
                    let which = match &id {
                        Some(id) if redriven > 0 => {
                            format!(" (message {id}{})", replace.describe())
                        }
                        _ => String::new(),
                    };
                    s.out.line(format_args!(
                        "redrove {} of {subscription:?}{which}",
                        count(redriven, "dead letter")
                    ))?;
                }
            }
            DlqCommand::Purge { subscription } => {
                let purged = admin
                    .purge_dead_letters(PurgeDeadLettersRequest {
                        subscription: subscription.clone(),
                    })
                    .await
                    .map_err(|e| s.fail(format_args!("dlq purge {subscription:?}"), e))?
                    .into_inner()
                    .purged;
                if s.out.json() {
                    s.out
                        .json_line(&json!({"subscription": subscription, "purged": purged}))?;
                } else {
                    s.out.line(format_args!(
                        "purged {} of {subscription:?}",
                        count(purged, "dead letter")
                    ))?;
                }
            }
        }
        s.out.flush()?;
        Ok(())
    }
}

/// A dead letter as JSON: the message's fields plus where and why.
pub fn dead_letter_json(dl: &DeadLetter) -> Value {
    let mut obj = dl.message.as_ref().map(message_json).unwrap_or_default();
    obj.insert("subscription".into(), json!(dl.subscription));
    obj.insert("topic".into(), json!(dl.topic));
    obj.insert("offset".into(), json!(dl.offset));
    obj.insert("reason".into(), json!(reason_name(dl.reason)));
    obj.insert("reason_text".into(), json!(dl.reason_text));
    obj.insert("delivery_attempts".into(), json!(dl.delivery_attempts));
    let nacked = !dl.last_nack_reason.is_empty();
    obj.insert(
        "last_nack_reason".into(),
        json!(nacked.then_some(&dl.last_nack_reason)),
    );
    obj.insert(
        "last_nack_attempt".into(),
        json!(nacked.then_some(dl.last_nack_attempt)),
    );
    obj.insert(
        "first_delivery_time".into(),
        time_json(&dl.first_delivery_time),
    );
    obj.insert(
        "last_delivery_time".into(),
        time_json(&dl.last_delivery_time),
    );
    obj.insert("dead_letter_time".into(), time_json(&dl.dead_letter_time));
    Value::Object(obj)
}

fn dead_letter_fields(dl: &DeadLetter) -> Vec<(&'static str, String)> {
    let message = dl.message.clone().unwrap_or_default();
    let mut fields = vec![
        ("message_id", message.message_id.clone()),
        ("topic", dl.topic.clone()),
        ("offset", dl.offset.to_string()),
        ("reason", reason_name(dl.reason)),
        (
            "reason_text",
            if dl.reason_text.is_empty() {
                "-".into()
            } else {
                dl.reason_text.clone()
            },
        ),
        ("delivery_attempts", dl.delivery_attempts.to_string()),
        (
            "last_nack_reason",
            if dl.last_nack_reason.is_empty() {
                "-".into()
            } else {
                format!("{} (attempt {})", dl.last_nack_reason, dl.last_nack_attempt)
            },
        ),
        ("first_delivery_time", time_human(&dl.first_delivery_time)),
        ("last_delivery_time", time_human(&dl.last_delivery_time)),
        ("dead_letter_time", time_human(&dl.dead_letter_time)),
    ];
    fields.extend(message_fields(&message));
    fields
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(argv: &[&str]) -> Result<DlqCommand, clap::Error> {
        let argv = ["courier", "dlq"].iter().chain(argv).copied();
        match Cli::try_parse_from(argv)? {
            Cli {
                command: Command::Dlq(args),
            } => Ok(args.command),
            other => panic!("not a dlq command line: {other:?}"),
        }
    }

    #[test]
    fn dlq_subcommands_parse() {
        assert_eq!(
            parse(&["list", "s"]).unwrap(),
            DlqCommand::List {
                subscription: "s".into(),
                max: 100
            }
        );
        assert_eq!(
            parse(&[
                "redrive",
                "s",
                "--ids",
                "1,2,3",
                "--reason",
                "attempts-exhausted"
            ])
            .unwrap(),
            DlqCommand::Redrive {
                subscription: "s".into(),
                ids: vec!["1".into(), "2".into(), "3".into()],
                id: None,
                reason: Some(Reason::AttemptsExhausted),
                replace: ReplaceArgs::default(),
            }
        );
        assert_eq!(
            parse(&["redrive", "s"]).unwrap(),
            DlqCommand::Redrive {
                subscription: "s".into(),
                ids: vec![],
                id: None,
                reason: None,
                replace: ReplaceArgs::default(),
            }
        );
        assert_eq!(
            parse(&["purge", "s"]).unwrap(),
            DlqCommand::Purge {
                subscription: "s".into()
            }
        );
        assert_eq!(
            parse(&[
                "redrive",
                "s",
                "--id",
                "17",
                "--data-file",
                "fixed.json",
                "--attr",
                "k=v"
            ])
            .unwrap(),
            DlqCommand::Redrive {
                subscription: "s".into(),
                ids: vec![],
                id: Some("17".into()),
                reason: None,
                replace: ReplaceArgs {
                    data_file: Some("fixed.json".into()),
                    attrs: vec![("k".into(), "v".into())],
                    ..ReplaceArgs::default()
                },
            }
        );
        for argv in [
            &["redrive", "s", "--reason", "lost"][..],
            // A replacement needs the one id it applies to.
            &["redrive", "s", "--data", "x"],
            &["redrive", "s", "--ids", "1,2", "--data", "x"],
            &["redrive", "s", "--id", "1", "--ids", "2"],
            &[
                "redrive",
                "s",
                "--id",
                "1",
                "--data",
                "x",
                "--data-file",
                "f",
            ],
            &["redrive", "s", "--id", "1", "--attr", "k=v", "--no-attrs"],
        ] {
            assert_eq!(parse(argv).unwrap_err().exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn dead_letters_in_json() {
        let dl = DeadLetter {
            reason: DeadLetterReason::Rejected as i32,
            reason_text: "bad".into(),
            delivery_attempts: 2,
            topic: "t".into(),
            subscription: "s".into(),
            offset: 4,
            ..DeadLetter::default()
        };
        let v = dead_letter_json(&dl);
        assert_eq!(v["reason"], "rejected");
        assert_eq!(v["offset"], 4);
        assert_eq!(v["dead_letter_time"], Value::Null);
    }
}

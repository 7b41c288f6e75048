//! `courier sub ...`: create, get, list, update, delete, purge and stats
//! of subscriptions, through the Admin service. `sub update` builds the
//! update mask from the flags given and keeps what they do not name.

use clap::{ArgGroup, Args, Subcommand};
use serde_json::{Value, json};

use super::conn::{Conn, Session};
use super::output::{
    Output, WriteError, bytes_human, count, ms_human, start_position_name, time_human, time_json,
};
use super::parse;
use crate::api::pb::v1::{
    DeadLetterPolicy, DeleteSubscriptionRequest, GetSubscriptionRequest,
    GetSubscriptionStatsRequest, ListSubscriptionsRequest, PurgeSubscriptionRequest, RetryPolicy,
    StartPosition, Subscription, SubscriptionStats, UpdateSubscriptionRequest,
};
use crate::broker::config::BACKOFF_MS_MAX;

/// `courier sub`.
#[derive(Args, Debug)]
pub struct SubArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: SubCommand,
}

/// The subscription subcommands.
#[derive(Subcommand, Debug, PartialEq)]
pub enum SubCommand {
    /// Create a subscription.
    Create(CreateArgs),
    /// Show a subscription.
    Get {
        /// Name of the subscription.
        name: String,
    },
    /// List subscriptions, sorted by name.
    List {
        /// Only subscriptions of this topic.
        #[arg(long, value_name = "TOPIC")]
        topic: Option<String>,
    },
    /// Change a subscription's ack deadline, retry or dead-letter policy.
    Update(UpdateArgs),
    /// Delete a subscription with its state and dead-letter queue.
    Delete {
        /// Name of the subscription.
        name: String,
    },
    /// Acknowledge the subscription's whole backlog.
    Purge {
        /// Name of the subscription.
        name: String,
    },
    /// Show a subscription's backlog and delivery statistics.
    Stats {
        /// Name of the subscription.
        name: String,
    },
}

/// `courier sub create`.
#[derive(Args, Debug, PartialEq)]
pub struct CreateArgs {
    /// Name of the subscription.
    pub name: String,
    /// Topic to subscribe to.
    #[arg(long, value_name = "TOPIC")]
    pub topic: String,
    /// Lease duration of deliveries, 100ms to 10m [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse::duration_ms)]
    pub ack_deadline: Option<u64>,
    /// Dead-letter messages after this many deliveries (1 to 1000).
    #[arg(long, value_name = "N")]
    pub max_delivery_attempts: Option<u32>,
    /// Also publish every dead letter to this topic.
    #[arg(long, value_name = "TOPIC", requires = "max_delivery_attempts")]
    pub forward_topic: Option<String>,
    /// Redelivery delay after the first nack, doubling per attempt.
    #[arg(long, value_name = "DURATION", value_parser = parse::duration_ms)]
    pub min_backoff: Option<u64>,
    /// Upper bound of the redelivery delay [default: 10m]
    #[arg(long, value_name = "DURATION", value_parser = parse::duration_ms, requires = "min_backoff")]
    pub max_backoff: Option<u64>,
    /// Wait a random time between half the backoff and all of it (on), or
    /// exactly the backoff (off) [default: on]
    #[arg(long, value_name = "on|off", value_parser = parse::on_off, requires = "min_backoff")]
    pub jitter: Option<bool>,
    /// Start with every message the topic retains instead of only new ones.
    #[arg(long)]
    pub from_earliest: bool,
}

/// `courier sub update`. Only the named settings change; a backoff or
/// dead-letter flag given alone keeps the policy's other value.
#[derive(Args, Debug, PartialEq)]
#[command(group(
    ArgGroup::new("changes")
        .required(true)
        .multiple(true)
        .args(["ack_deadline", "max_delivery_attempts", "forward_topic", "no_dead_letter", "min_backoff", "max_backoff", "jitter"])
))]
pub struct UpdateArgs {
    /// Name of the subscription.
    pub name: String,
    /// New lease duration of deliveries, 100ms to 10m.
    #[arg(long, value_name = "DURATION", value_parser = parse::duration_ms)]
    pub ack_deadline: Option<u64>,
    /// Dead-letter messages after this many deliveries (1 to 1000).
    #[arg(long, value_name = "N", conflicts_with = "no_dead_letter")]
    pub max_delivery_attempts: Option<u32>,
    /// Also publish every dead letter to this topic ('' for none).
    #[arg(long, value_name = "TOPIC", conflicts_with = "no_dead_letter")]
    pub forward_topic: Option<String>,
    /// Remove the dead-letter policy: redeliver without limit.
    #[arg(long)]
    pub no_dead_letter: bool,
    /// Redelivery delay after the first nack, doubling per attempt.
    #[arg(long, value_name = "DURATION", value_parser = parse::duration_ms)]
    pub min_backoff: Option<u64>,
    /// Upper bound of the redelivery delay.
    #[arg(long, value_name = "DURATION", value_parser = parse::duration_ms)]
    pub max_backoff: Option<u64>,
    /// Jittered backoff (on) or exactly the backoff (off).
    #[arg(long, value_name = "on|off", value_parser = parse::on_off)]
    pub jitter: Option<bool>,
}

impl SubArgs {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut s = self.conn.open().await?;
        let mut admin = s.client.admin();
        match self.command {
            SubCommand::Create(args) => {
                let name = args.name.clone();
                let sub = admin
                    .create_subscription(args.into_subscription())
                    .await
                    .map_err(|e| s.fail(format_args!("sub create {name:?}"), e))?
                    .into_inner();
                print_sub(&mut s.out, &sub)?;
            }
            SubCommand::Get { name } => {
                let sub = get(&s, &name, "get").await?;
                print_sub(&mut s.out, &sub)?;
            }
            SubCommand::List { topic } => {
                let what = match &topic {
                    Some(t) => format!("sub list --topic {t:?}"),
                    None => "sub list".to_string(),
                };
                let subs = admin
                    .list_subscriptions(ListSubscriptionsRequest {
                        topic: topic.unwrap_or_default(),
                    })
                    .await
                    .map_err(|e| s.fail(&what, e))?
                    .into_inner()
                    .subscriptions;
                print_list(&mut s.out, &subs)?;
            }
            SubCommand::Update(args) => {
                let name = args.name.clone();
                let current = if args.needs_current() {
                    Some(get(&s, &name, "update").await?)
                } else {
                    None
                };
                let request = args.into_request(current.as_ref())?;
                let sub = admin
                    .update_subscription(request)
                    .await
                    .map_err(|e| s.fail(format_args!("sub update {name:?}"), e))?
                    .into_inner();
                print_sub(&mut s.out, &sub)?;
            }
            SubCommand::Delete { name } => {
                admin
                    .delete_subscription(DeleteSubscriptionRequest { name: name.clone() })
                    .await
                    .map_err(|e| s.fail(format_args!("sub delete {name:?}"), e))?;
                if s.out.json() {
                    s.out
                        .json_line(&json!({"subscription": name, "deleted": true}))?;
                } else {
                    s.out.line(format_args!("deleted subscription {name:?}"))?;
                }
            }
            SubCommand::Purge { name } => {
                let purged = admin
                    .purge_subscription(PurgeSubscriptionRequest { name: name.clone() })
                    .await
                    .map_err(|e| s.fail(format_args!("sub purge {name:?}"), e))?
                    .into_inner()
                    .purged_messages;
                if s.out.json() {
                    s.out
                        .json_line(&json!({"subscription": name, "purged_messages": purged}))?;
                } else {
                    s.out.line(format_args!(
                        "purged {} from {name:?}",
                        count(purged, "message")
                    ))?;
                }
            }
            SubCommand::Stats { name } => {
                let stats = admin
                    .get_subscription_stats(GetSubscriptionStatsRequest { name: name.clone() })
                    .await
                    .map_err(|e| s.fail(format_args!("sub stats {name:?}"), e))?
                    .into_inner();
                print_stats(&mut s.out, &stats)?;
            }
        }
        s.out.flush()?;
        Ok(())
    }
}

/// Fetches a subscription; `op` names the command in errors.
async fn get(s: &Session, name: &str, op: &str) -> anyhow::Result<Subscription> {
    Ok(s.client
        .admin()
        .get_subscription(GetSubscriptionRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|e| s.fail(format_args!("sub {op} {name:?}"), e))?
        .into_inner())
}

impl CreateArgs {
    /// The CreateSubscription request. A minimum backoff alone gets the
    /// longest maximum backoff.
    pub fn into_subscription(self) -> Subscription {
        let retry_policy = self.min_backoff.map(|min| RetryPolicy {
            min_backoff_ms: min,
            max_backoff_ms: self.max_backoff.unwrap_or(BACKOFF_MS_MAX),
            no_jitter: self.jitter == Some(false),
        });
        let dead_letter_policy = self.max_delivery_attempts.map(|n| DeadLetterPolicy {
            max_delivery_attempts: n,
            forward_topic: self.forward_topic.unwrap_or_default(),
        });
        let start_position = if self.from_earliest {
            StartPosition::Earliest
        } else {
            StartPosition::Latest
        };
        Subscription {
            name: self.name,
            topic: self.topic,
            ack_deadline_ms: self.ack_deadline.unwrap_or(0),
            retry_policy,
            dead_letter_policy,
            start_position: start_position as i32,
            create_time: None,
        }
    }
}

impl UpdateArgs {
    /// Whether the request depends on the subscription's current policies
    /// (a policy flag given without its partners).
    pub fn needs_current(&self) -> bool {
        let retry_given = [
            self.min_backoff.is_some(),
            self.max_backoff.is_some(),
            self.jitter.is_some(),
        ]
        .into_iter()
        .filter(|given| *given)
        .count();
        let retry_partial = retry_given > 0 && retry_given < 3;
        let dead_letter_partial =
            self.max_delivery_attempts.is_some() != self.forward_topic.is_some();
        retry_partial || dead_letter_partial
    }

    /// The UpdateSubscription request; `current` is the subscription as it
    /// is now, needed when [`Self::needs_current`].
    pub fn into_request(
        self,
        current: Option<&Subscription>,
    ) -> anyhow::Result<UpdateSubscriptionRequest> {
        let mut mask = Vec::new();
        let mut sub = Subscription {
            name: self.name.clone(),
            ..Subscription::default()
        };
        if let Some(ms) = self.ack_deadline {
            sub.ack_deadline_ms = ms;
            mask.push("ack_deadline_ms".to_string());
        }
        if self.min_backoff.is_some() || self.max_backoff.is_some() || self.jitter.is_some() {
            let now = current.and_then(|c| c.retry_policy).unwrap_or_default();
            let max_now = if now.max_backoff_ms == 0 {
                BACKOFF_MS_MAX
            } else {
                now.max_backoff_ms
            };
            sub.retry_policy = Some(RetryPolicy {
                min_backoff_ms: self.min_backoff.unwrap_or(now.min_backoff_ms),
                max_backoff_ms: self.max_backoff.unwrap_or(max_now),
                no_jitter: self.jitter.map_or(now.no_jitter, |on| !on),
            });
            mask.push("retry_policy".to_string());
        }
        if self.no_dead_letter {
            sub.dead_letter_policy = None;
            mask.push("dead_letter_policy".to_string());
        } else if self.max_delivery_attempts.is_some() || self.forward_topic.is_some() {
            let now = current.and_then(|c| c.dead_letter_policy.clone());
            let attempts = match (self.max_delivery_attempts, &now) {
                (Some(n), _) => n,
                (None, Some(p)) => p.max_delivery_attempts,
                (None, None) => anyhow::bail!(
                    "sub update {:?}: the subscription has no dead-letter policy; give --max-delivery-attempts with --forward-topic",
                    self.name
                ),
            };
            let forward_topic = match self.forward_topic {
                Some(t) => t,
                None => now.map(|p| p.forward_topic).unwrap_or_default(),
            };
            sub.dead_letter_policy = Some(DeadLetterPolicy {
                max_delivery_attempts: attempts,
                forward_topic,
            });
            mask.push("dead_letter_policy".to_string());
        }
        Ok(UpdateSubscriptionRequest {
            subscription: Some(sub),
            update_mask: mask,
        })
    }
}

/// A subscription as JSON.
pub fn sub_json(sub: &Subscription) -> Value {
    json!({
        "name": sub.name,
        "topic": sub.topic,
        "ack_deadline_ms": sub.ack_deadline_ms,
        "retry_policy": sub.retry_policy.as_ref().map(|r| json!({
            "min_backoff_ms": r.min_backoff_ms,
            "max_backoff_ms": r.max_backoff_ms,
            "no_jitter": r.no_jitter,
        })),
        "dead_letter_policy": sub.dead_letter_policy.as_ref().map(|p| json!({
            "max_delivery_attempts": p.max_delivery_attempts,
            "forward_topic": if p.forward_topic.is_empty() { None } else { Some(&p.forward_topic) },
        })),
        "start_position": start_position_name(sub.start_position),
        "create_time": time_json(&sub.create_time),
    })
}

fn retry_human(r: &Option<RetryPolicy>) -> String {
    match r {
        Some(r) if r.min_backoff_ms > 0 || r.max_backoff_ms > 0 => format!(
            "backoff {} to {}{}",
            ms_human(r.min_backoff_ms),
            ms_human(r.max_backoff_ms),
            if r.no_jitter { ", no jitter" } else { "" }
        ),
        _ => "immediate".into(),
    }
}

fn dead_letter_human(p: &Option<DeadLetterPolicy>) -> String {
    match p {
        None => "none".into(),
        Some(p) if p.forward_topic.is_empty() => {
            format!("after {} attempts", p.max_delivery_attempts)
        }
        Some(p) => format!(
            "after {} attempts, forward to {}",
            p.max_delivery_attempts, p.forward_topic
        ),
    }
}

fn print_sub(out: &mut Output, sub: &Subscription) -> Result<(), WriteError> {
    if out.json() {
        return out.json_line(&sub_json(sub));
    }
    out.fields(&[
        ("name", sub.name.clone()),
        ("topic", sub.topic.clone()),
        ("ack_deadline", ms_human(sub.ack_deadline_ms)),
        ("retry", retry_human(&sub.retry_policy)),
        ("dead_letter", dead_letter_human(&sub.dead_letter_policy)),
        ("start_position", start_position_name(sub.start_position)),
        ("create_time", time_human(&sub.create_time)),
    ])
}

fn print_list(out: &mut Output, subs: &[Subscription]) -> Result<(), WriteError> {
    if out.json() {
        for sub in subs {
            out.json_line(&sub_json(sub))?;
        }
        return Ok(());
    }
    if subs.is_empty() {
        return out.line("(no subscriptions)");
    }
    let rows: Vec<Vec<String>> = subs
        .iter()
        .map(|sub| {
            vec![
                sub.name.clone(),
                sub.topic.clone(),
                ms_human(sub.ack_deadline_ms),
                retry_human(&sub.retry_policy),
                dead_letter_human(&sub.dead_letter_policy),
            ]
        })
        .collect();
    out.table(
        &["NAME", "TOPIC", "ACK_DEADLINE", "RETRY", "DEAD_LETTER"],
        &rows,
    )
}

fn print_stats(out: &mut Output, st: &SubscriptionStats) -> Result<(), WriteError> {
    if out.json() {
        return out.json_line(&json!({
            "subscription": st.subscription,
            "backlog_messages": st.backlog_messages,
            "backlog_bytes": st.backlog_bytes,
            "in_flight_messages": st.in_flight_messages,
            "dead_lettered_messages": st.dead_lettered_messages,
            "oldest_unacked_age_ms": st.oldest_unacked_age_ms,
            "ack_floor_offset": st.ack_floor_offset,
            "dropped_by_retention": st.dropped_by_retention,
        }));
    }
    out.fields(&[
        ("subscription", st.subscription.clone()),
        ("backlog_messages", st.backlog_messages.to_string()),
        ("backlog_bytes", bytes_human(st.backlog_bytes)),
        ("in_flight_messages", st.in_flight_messages.to_string()),
        (
            "dead_lettered_messages",
            st.dead_lettered_messages.to_string(),
        ),
        (
            "oldest_unacked_age",
            st.oldest_unacked_age_ms
                .map_or_else(|| "-".to_string(), ms_human),
        ),
        ("ack_floor_offset", st.ack_floor_offset.to_string()),
        ("dropped_by_retention", st.dropped_by_retention.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(argv: &[&str]) -> Result<SubCommand, clap::Error> {
        let argv = ["courier", "sub"].iter().chain(argv).copied();
        match Cli::try_parse_from(argv)? {
            Cli {
                command: Command::Sub(args),
            } => Ok(args.command),
            other => panic!("not a sub command line: {other:?}"),
        }
    }

    fn update(argv: &[&str]) -> UpdateArgs {
        let argv: Vec<&str> = ["update", "s"].iter().chain(argv).copied().collect();
        match parse(&argv) {
            Ok(SubCommand::Update(args)) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_builds_the_subscription() {
        let Ok(SubCommand::Create(args)) = parse(&[
            "create",
            "orders-x",
            "--topic",
            "orders",
            "--ack-deadline",
            "10s",
            "--max-delivery-attempts",
            "5",
            "--forward-topic",
            "orders-dlq",
            "--min-backoff",
            "100ms",
            "--from-earliest",
        ]) else {
            panic!("not a create");
        };
        let sub = args.into_subscription();
        assert_eq!(sub.name, "orders-x");
        assert_eq!(sub.topic, "orders");
        assert_eq!(sub.ack_deadline_ms, 10_000);
        assert_eq!(
            sub.dead_letter_policy,
            Some(DeadLetterPolicy {
                max_delivery_attempts: 5,
                forward_topic: "orders-dlq".into()
            })
        );
        assert_eq!(
            sub.retry_policy,
            Some(RetryPolicy {
                min_backoff_ms: 100,
                max_backoff_ms: BACKOFF_MS_MAX,
                no_jitter: false,
            })
        );
        assert_eq!(sub.start_position, StartPosition::Earliest as i32);
    }

    #[test]
    fn create_defaults_leave_policies_unset() {
        let Ok(SubCommand::Create(args)) = parse(&["create", "s", "--topic", "t"]) else {
            panic!("not a create");
        };
        let sub = args.into_subscription();
        assert_eq!(sub.ack_deadline_ms, 0);
        assert_eq!(sub.retry_policy, None);
        assert_eq!(sub.dead_letter_policy, None);
        assert_eq!(sub.start_position, StartPosition::Latest as i32);
    }

    #[test]
    fn create_usage_errors() {
        for argv in [
            &["create", "s"][..],
            &["create", "s", "--topic", "t", "--forward-topic", "d"],
            &["create", "s", "--topic", "t", "--max-backoff", "1s"],
            &["create", "s", "--topic", "t", "--ack-deadline", "30"],
        ] {
            assert_eq!(parse(argv).unwrap_err().exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn update_needs_a_change_and_rejects_conflicts() {
        for argv in [
            &["update", "s"][..],
            &[
                "update",
                "s",
                "--no-dead-letter",
                "--max-delivery-attempts",
                "3",
            ],
            &["update", "s", "--no-dead-letter", "--forward-topic", "d"],
        ] {
            assert_eq!(parse(argv).unwrap_err().exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn update_mask_follows_the_flags() {
        let args = update(&["--ack-deadline", "45s"]);
        assert!(!args.needs_current());
        let r = args.into_request(None).unwrap();
        assert_eq!(r.update_mask, ["ack_deadline_ms"]);
        assert_eq!(r.subscription.unwrap().ack_deadline_ms, 45_000);

        let r = update(&[
            "--no-dead-letter",
            "--min-backoff",
            "1s",
            "--max-backoff",
            "1m",
        ])
        .into_request(None)
        .unwrap();
        assert_eq!(r.update_mask, ["retry_policy", "dead_letter_policy"]);
        let sub = r.subscription.unwrap();
        assert_eq!(sub.dead_letter_policy, None);
        assert_eq!(
            sub.retry_policy,
            Some(RetryPolicy {
                min_backoff_ms: 1000,
                max_backoff_ms: 60_000,
                no_jitter: false,
            })
        );
    }

    #[test]
    fn partial_policy_flags_keep_the_current_values() {
        let current = Subscription {
            name: "s".into(),
            retry_policy: Some(RetryPolicy {
                min_backoff_ms: 500,
                max_backoff_ms: 20_000,
                no_jitter: false,
            }),
            dead_letter_policy: Some(DeadLetterPolicy {
                max_delivery_attempts: 5,
                forward_topic: "dlq".into(),
            }),
            ..Subscription::default()
        };
        let args = update(&["--max-delivery-attempts", "9", "--max-backoff", "1m"]);
        assert!(args.needs_current());
        let sub = args
            .into_request(Some(&current))
            .unwrap()
            .subscription
            .unwrap();
        assert_eq!(
            sub.dead_letter_policy,
            Some(DeadLetterPolicy {
                max_delivery_attempts: 9,
                forward_topic: "dlq".into()
            })
        );
        assert_eq!(
            sub.retry_policy,
            Some(RetryPolicy {
                min_backoff_ms: 500,
                max_backoff_ms: 60_000,
                no_jitter: false,
            })
        );

        let sub = update(&["--forward-topic", ""])
            .into_request(Some(&current))
            .unwrap();
        assert_eq!(
            sub.subscription.unwrap().dead_letter_policy,
            Some(DeadLetterPolicy {
                max_delivery_attempts: 5,
                forward_topic: String::new()
            })
        );

        let bare = Subscription {
            name: "s".into(),
            ..Subscription::default()
        };
        let sub = update(&["--min-backoff", "2s"])
            .into_request(Some(&bare))
            .unwrap();
        assert_eq!(
            sub.subscription.unwrap().retry_policy,
            Some(RetryPolicy {
                min_backoff_ms: 2000,
                max_backoff_ms: BACKOFF_MS_MAX,
                no_jitter: false,
            })
        );
        assert!(
            update(&["--forward-topic", "d"])
                .into_request(Some(&bare))
                .is_err()
        );
    }
}

//! `courier publish`: publishes one message (from the command line or a
//! file) or every line of stdin (`--lines`, batched, several batches in
//! flight) and prints the assigned message ids in input order.

use std::collections::{HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::path::PathBuf;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{ArgGroup, Args};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::task::JoinHandle;
use tonic::Status;

use super::UsageError;
use super::conn::{Conn, Session};
use super::output::WriteError;
use super::parse;
use crate::api::pb::v1::PublishMessage;
use crate::broker::config::PUBLISH_BATCH_MESSAGES_MAX;

/// Most bytes of payload, attributes and ordering keys per Publish batch
/// with `--lines`, well under the broker's gRPC message limit.
const LINES_BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Default of `--in-flight`: Publish calls in flight at once with
/// `--lines`.
const LINES_BATCHES_IN_FLIGHT: usize = 4;
/// Per-message encoding overhead assumed when sizing batches.
const MESSAGE_OVERHEAD_BYTES: usize = 16;

/// `courier publish`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["message", "file", "lines"])))]
// clap puts a required group before the positionals; the topic comes first.
#[command(override_usage = "courier publish [OPTIONS] <TOPIC> <MESSAGE|--file <FILE>|--lines>")]
pub struct PublishArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Topic to publish to.
    pub topic: String,
    /// The payload, as text.
    pub message: Option<String>,
    /// Read the payload from this file ('-' for stdin).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Publish each line of stdin (without its \n or \r\n) as a message.
    #[arg(long)]
    pub lines: bool,
    /// Attribute of every message published (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse::attr)]
    pub attrs: Vec<(String, String)>,
    /// Ordering key of every message published.
    #[arg(long, value_name = "KEY")]
    pub ordering_key: Option<String>,
    /// With --lines: Publish calls (batches of up to 1000 lines) in flight
    /// at once. Concurrent batches may land in the topic in any order; 1
    /// keeps the topic in input order.
    /// [default: 4]
    #[arg(long, value_name = "N", value_parser = in_flight)]
    pub in_flight: Option<usize>,
}

fn in_flight(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number from 1 to 64")),
    }
}

impl PublishArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let template = self.template()?;
        let payload = match (&self.message, &self.file) {
            (Some(text), _) => Some(Bytes::from(text.clone().into_bytes())),
            (None, Some(path)) => Some(read_file(path).await?),
            (None, None) => None,
        };
        let mut s = self.conn.open().await?;
        // Every line is published even if nobody reads the ids.
        s.out.finish_work_if_closed();
        match payload {
            Some(data) => {
                let message = PublishMessage { data, ..template };
                let ids = s
                    .client
                    .publish(&self.topic, vec![message])
                    .await
                    .map_err(|e| s.fail(format_args!("publish {:?}", self.topic), e))?;
                print_ids(&mut s, &ids)?;
            }
            None => {
                let in_flight = self.in_flight.unwrap_or(LINES_BATCHES_IN_FLIGHT);
                publish_lines(&mut s, &self.topic, template, in_flight).await?
            }
        }
        s.out.flush()?;
        Ok(())
    }

    /// A message with the attributes and ordering key but no data.
    fn template(&self) -> anyhow::Result<PublishMessage> {
        if self.in_flight.is_some() && !self.lines {
            return Err(UsageError("--in-flight applies only with --lines".into()).into());
        }
        let mut attributes = HashMap::new();
        for (k, v) in &self.attrs {
            if attributes.insert(k.clone(), v.clone()).is_some() {
                return Err(UsageError(format!("attribute {k:?} given twice")).into());
            }
        }
        Ok(PublishMessage {
            data: Bytes::new(),
            attributes,
            ordering_key: self.ordering_key.clone().unwrap_or_default(),
        })
    }
}

pub(super) async fn read_file(path: &PathBuf) -> anyhow::Result<Bytes> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut buf)
            .await
            .context("reading stdin")?;
        return Ok(Bytes::from(buf));
    }
    let data = tokio::fs::read(path)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Bytes::from(data))
}

fn print_ids(s: &mut Session, ids: &[String]) -> Result<(), WriteError> {
    for id in ids {
        if s.out.json() {
            s.out.json_line(&json!({ "message_id": id }))?;
        } else {
            s.out.line(id)?;
        }
    }
    Ok(())
}

/// A Publish call in flight, with the stdin lines it carries (1-based).
struct InFlight {
    lines: RangeInclusive<u64>,
    call: JoinHandle<Result<Vec<String>, Status>>,
}

/// Publishes stdin line by line. Ids are printed in input order as batches
/// complete. On the first failure reading stops; batches already sent are
/// awaited (their ids printed) and the failure is reported.
async fn publish_lines(
    s: &mut Session,
    topic: &str,
    template: PublishMessage,
    max_in_flight: usize,
) -> anyhow::Result<()> {
    let template_bytes = MESSAGE_OVERHEAD_BYTES
        + template.ordering_key.len()
        + template
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut batch: Vec<PublishMessage> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut line_no = 0u64;
    let mut failure: Option<anyhow::Error> = None;

    let client = s.client.clone();
    let send = |batch: Vec<PublishMessage>, last_line: u64| -> InFlight {
        let first_line = last_line + 1 - batch.len() as u64;
        let client = client.clone();
        let topic = topic.to_string();
        InFlight {
            lines: first_line..=last_line,
            call: tokio::spawn(async move { client.publish(&topic, batch).await }),
        }
    };

    loop {
        let mut line = Vec::new();
        match stdin.read_until(b'\n', &mut line).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                failure = Some(anyhow::Error::new(e).context("reading stdin"));
                break;
            }
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        line_no += 1;
        batch_bytes += line.len() + template_bytes;
        batch.push(PublishMessage {
            data: Bytes::from(line),
            ..template.clone()
        });
        if batch.len() < PUBLISH_BATCH_MESSAGES_MAX && batch_bytes < LINES_BATCH_BYTES_MAX {
            continue;
        }
        in_flight.push_back(send(std::mem::take(&mut batch), line_no));
        batch_bytes = 0;
        if in_flight.len() >= max_in_flight {
            if let Some(done) = in_flight.pop_front() {
                if let Err(e) = finish(s, topic, done).await {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    if failure.is_none() && !batch.is_empty() {
        in_flight.push_back(send(std::mem::take(&mut batch), line_no));
    }
    while let Some(done) = in_flight.pop_front() {
        if let Err(e) = finish(s, topic, done).await {
            // Stdout failing (other than closed, see `Output`) ends
            // everything; otherwise keep the first failure and still print
            // the ids of later batches.
            if e.is::<WriteError>() {
                return Err(e);
            }
            failure.get_or_insert(e);
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Awaits one Publish call and prints its ids.
async fn finish(s: &mut Session, topic: &str, done: InFlight) -> anyhow::Result<()> {
    let what = format!(
        "publish {topic:?} (lines {}-{})",
        done.lines.start(),
        done.lines.end()
    );
    let ids = match done.call.await {
        Ok(Ok(ids)) => ids,
        Ok(Err(status)) => return Err(s.fail(what, status)),
        Err(join) => anyhow::bail!("{what}: {join}"),
    };
    print_ids(s, &ids)?;
    s.out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(argv: &[&str]) -> Result<PublishArgs, clap::Error> {
        let argv = ["courier", "publish"].iter().chain(argv).copied();
        match Cli::try_parse_from(argv)? {
            Cli {
                command: Command::Publish(args),
            } => Ok(args),
            other => panic!("not a publish command line: {other:?}"),
        }
    }

    #[test]
    fn one_source_is_required() {
        for argv in [
            &["t"][..],
            &["t", "hello", "--lines"],
            &["t", "hello", "--file", "f"],
            &["t", "--file", "f", "--lines"],
            &["t", "hello", "--attr", "novalue"],
        ] {
            assert_eq!(parse(argv).unwrap_err().exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn attributes_and_ordering_key_go_on_every_message() {
        let args = parse(&[
            "orders",
            "hello",
            "--attr",
            "a=1",
            "--attr",
            "b=x=y",
            "--ordering-key",
            "k",
        ])
        .unwrap();
        assert_eq!(args.topic, "orders");
        assert_eq!(args.message.as_deref(), Some("hello"));
        let t = args.template().unwrap();
        assert_eq!(t.attributes.get("a").map(String::as_str), Some("1"));
        assert_eq!(t.attributes.get("b").map(String::as_str), Some("x=y"));
        assert_eq!(t.ordering_key, "k");
    }

    #[test]
    fn duplicate_attributes_are_usage_errors() {
        let args = parse(&["t", "m", "--attr", "a=1", "--attr", "a=2"]).unwrap();
        assert!(args.template().unwrap_err().is::<UsageError>());
    }

    #[test]
    fn lines_and_file_parse() {
        let args = parse(&["t", "--lines"]).unwrap();
        assert!(args.lines);
        assert_eq!(args.in_flight, None);
        let args = parse(&["t", "--lines", "--in-flight", "1"]).unwrap();
        assert_eq!(args.in_flight, Some(1));
        let err = parse(&["t", "--lines", "--in-flight", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let args = parse(&["t", "m", "--in-flight", "2"]).unwrap();
        assert!(args.template().unwrap_err().is::<UsageError>());
        let args = parse(&["t", "--file", "-"]).unwrap();
        assert_eq!(args.file, Some(PathBuf::from("-")));
    }
}

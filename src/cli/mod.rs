//! The `courier` command line: argument definitions (clap derive), dispatch,
//! and the exit-code and error-line conventions shared by every command.
//!
//! One module per command or command group, each defining its clap `Args`
//! and an `async fn run(self) -> anyhow::Result<()>`:
//! `serve` (the broker), `topic`, `sub`, `publish`, `pull` (pull, ack,
//! nack, modack), `dlq`, `status` (status, stats). Shared pieces: `conn`
//! (`--server`/`--json`, connection, RPC error lines), `output` (tables,
//! JSON lines, renderings), `parse` (durations, sizes, attributes).
//! Adding a command (such as `courier bench`) means one new module plus
//! its variant in [`Command`] and arm in [`Command::run`].
//!
//! Exit codes: 0 success, 1 failure (one `error: ...` line on stderr), 2
//! usage error (clap's, or [`UsageError`]).

pub mod bench;
pub mod conn;
pub mod dlq;
pub mod output;
pub mod parse;
pub mod publish;
pub mod pull;
pub mod serve;
pub mod status;
pub mod sub;
pub mod topic;

use std::fmt;
use std::io::ErrorKind;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use output::WriteError;

/// How long leftover tasks (such as a blocked stdin read) may run once a
/// command has finished.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Courier: a durable topic/fan-out message broker with a gRPC API.
#[derive(Parser, Debug)]
#[command(
    name = "courier",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Create, inspect and delete topics.
    Topic(topic::TopicArgs),
    /// Create, inspect, change and delete subscriptions.
    #[command(visible_alias = "subscription")]
    Sub(sub::SubArgs),
    /// Publish messages to a topic.
    Publish(publish::PublishArgs),
    /// Lease messages from a subscription and print them.
    Pull(pull::PullArgs),
    /// Acknowledge deliveries.
    Ack(pull::AckArgs),
    /// Give deliveries back (or reject them to the dead-letter queue).
    Nack(pull::NackArgs),
    /// Change the lease deadline of deliveries.
    Modack(pull::ModackArgs),
    /// Inspect, redrive and purge a subscription's dead-letter queue.
    Dlq(dlq::DlqArgs),
    /// Show where one message stands in every subscription of its topic.
    Status(status::StatusArgs),
    /// Show broker-wide statistics.
    Stats(status::StatsArgs),
    /// Measure a broker: throughput, fan-out, latency, drain and backlog workloads.
    Bench(bench::BenchArgs),
}

impl Command {
    /// Runs the command to completion.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Serve(args) => args.run().await,
            Command::Topic(args) => args.run().await,
            Command::Sub(args) => args.run().await,
            Command::Publish(args) => args.run().await,
            Command::Pull(args) => args.run().await,
            Command::Ack(args) => args.run().await,
            Command::Nack(args) => args.run().await,
            Command::Modack(args) => args.run().await,
            Command::Dlq(args) => args.run().await,
            Command::Status(args) => args.run().await,
            Command::Stats(args) => args.run().await,
            Command::Bench(args) => args.run().await,
        }
    }
}

/// A command line that parses but asks for something impossible (exit
/// code 2, like clap's own usage errors).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Threads of the runtime's blocking pool.
const BLOCKING_THREADS_MAX: usize = 16;

/// Entry point of the `courier` binary: parses the command line (clap
/// prints usage errors and exits 2 itself), runs the command, and turns
/// its outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Disk work that leaves the runtime (admin reads, deletes, file
        // input) shares these; the broker's thread count stays bounded
        // whatever the number of topics or callers.
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli.command.run());
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
    report(result)
}

/// Prints a failed command's error as one line and picks the exit code.
fn report(result: anyhow::Result<()>) -> ExitCode {
    let error = match result {
        Ok(()) => return ExitCode::SUCCESS,
        Err(error) => error,
    };
    if let Some(WriteError(io)) = error.downcast_ref::<WriteError>() {
        if io.kind() == ErrorKind::BrokenPipe {
            // The reader went away (`| head`): nothing left to say.
            return ExitCode::SUCCESS;
        }
    }
    eprintln!("error: {}", one_line(&chain_text(&error)));
    if error.is::<UsageError>() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// An error and its causes joined with `: `, leaving out a cause whose
/// text the one before it already contains (a storage error names its
/// OS error and also has it as its source).
fn chain_text(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !text.is_empty() && parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// Folds a message onto one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_cause_already_named_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(2);
        let storage = crate::storage::StorageError::io("/proc/nope", io);
        let error = anyhow::Error::new(storage).context("cannot open data directory /proc/nope");
        let text = chain_text(&error);
        assert_eq!(text.matches("(os error 2)").count(), 1, "{text}");
        assert!(text.starts_with("cannot open data directory /proc/nope: I/O error on /proc/nope"));
    }

    #[test]
    fn errors_fold_onto_one_line() {
        assert_eq!(one_line("a\n  b\tc "), "a b c");
    }

    #[test]
    fn usage_errors_exit_2_and_others_1() {
        assert_eq!(report(Ok(())), ExitCode::SUCCESS);
        assert_eq!(
            report(Err(UsageError("x".into()).into())),
            ExitCode::from(2)
        );
        assert_eq!(report(Err(anyhow::anyhow!("x"))), ExitCode::FAILURE);
        let pipe = WriteError(std::io::Error::from(ErrorKind::BrokenPipe));
        assert_eq!(report(Err(pipe.into())), ExitCode::SUCCESS);
    }

    #[test]
    fn unknown_commands_and_missing_arguments_are_usage_errors() {
        for argv in [
            &["courier", "frobnicate"][..],
            &["courier", "topic", "create"],
            &["courier", "publish", "t"],
            &["courier", "pull", "s", "--max", "0"],
            &["courier", "dlq", "list", "s", "--max", "0"],
            &["courier", "pull", "s", "--max", "1001"],
            &["courier", "pull", "s", "--wait", "2m"],
            &["courier", "serve", "--fsync", "sometimes"],
        ] {
            let err = Cli::try_parse_from(argv).expect_err(&argv.join(" "));
            assert_eq!(err.exit_code(), 2, "{}", argv.join(" "));
        }
    }
}

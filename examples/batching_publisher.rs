//! Publishes one message at a time from many concurrent tasks, as a web
//! service does (one event per request), with `courier::client::Publisher`:
//! each `publish` returns its message's id once durable, while the
//! publisher batches concurrent calls onto one PublishStream.
//!
//! Start a broker (`cargo run -- serve`), then:
//!
//! ```text
//! cargo run --example batching_publisher -- --topic events --tasks 200 --count 20000
//! ```

use std::time::Instant;

use clap::Parser;
use courier::api::pb::v1::PublishMessage;
use courier::client::{Client, Publisher, PublisherSettings};
use tonic::Code;

/// Publishes numbered events, one per call, from concurrent tasks.
#[derive(Parser, Debug)]
struct Args {
    /// URL of the broker.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Topic to publish to (created if missing).
    #[arg(long, default_value = "events")]
    topic: String,
    /// Concurrent tasks, each publishing one message at a time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    tasks: u64,
    /// Messages in all.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::connect(&args.server).await?;
    match client.create_topic(&args.topic).await {
        Ok(_) => println!("created topic {:?}", args.topic),
        Err(status) if status.code() == Code::AlreadyExists => {}
        Err(status) => anyhow::bail!("creating topic {:?}: {}", args.topic, status.message()),
    }
    let publisher = Publisher::new(&client, PublisherSettings::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..args.tasks {
        let (publisher, topic) = (publisher.clone(), args.topic.clone());
        let count = args.count / args.tasks + u64::from(task < args.count % args.tasks);
        tasks.spawn(async move {
            for i in 0..count {
                let event = PublishMessage {
                    data: format!("event {i} of task {task}").into(),
                    ..PublishMessage::default()
                };
                publisher.publish(&topic, event).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "published {} messages from {} tasks in {secs:.2} s ({:.0} msgs/s)",
        args.count,
        args.tasks,
        args.count as f64 / secs
    );
    Ok(())
}

//! Publishes N messages to a topic with `courier::client::Client`, creating
//! the topic if it is missing, in batches of up to 1000.
//!
//! Start a broker (`cargo run -- serve`), then:
//!
//! ```text
//! cargo run --example publisher -- --topic demo --count 1000
//! cargo run --example publisher -- --server http://127.0.0.1:50051 --topic demo --count 10 --batch 5
//! ```

use std::time::Instant;

use bytes::Bytes;
use clap::Parser;
use courier::api::pb::v1::PublishMessage;
use courier::client::Client;
use tonic::Code;

/// Publishes numbered messages to a topic.
#[derive(Parser, Debug)]
struct Args {
    /// URL of the broker.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Topic to publish to (created if missing).
    #[arg(long, default_value = "demo")]
    topic: String,
    /// How many messages to publish.
    #[arg(long, default_value_t = 100)]
    count: u64,
    /// Messages per Publish call, 1 to 1000.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
    batch: u64,
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

    let started = Instant::now();
    let mut published = 0u64;
    while published < args.count {
        let n = args.batch.min(args.count - published);
        let messages: Vec<PublishMessage> = (published..published + n)
            .map(|i| PublishMessage {
                data: Bytes::from(format!("message {i}")),
                attributes: [("seq".to_string(), i.to_string())].into(),
                ordering_key: String::new(),
            })
            .collect();
        let ids = client.publish(&args.topic, messages).await?;
        if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
            println!("published ids {first}..={last}");
        }
        published += n;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "published {published} messages to {:?} in {secs:.3}s ({:.0} msg/s)",
        args.topic,
        published as f64 / secs.max(1e-9)
    );
    Ok(())
}

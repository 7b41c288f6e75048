//! Receives messages over StreamingPull with `courier::client::Client`,
//! printing and acknowledging each one. Creates the topic and the
//! subscription if they are missing (a new subscription starts from the
//! earliest retained message). Stops after `--count` messages, or on
//! Ctrl-C, by half-closing the stream and draining the last ack results.
//!
//! Start a broker (`cargo run -- serve`), publish some messages
//! (`cargo run --example publisher`), then:
//!
//! ```text
//! cargo run --example subscriber -- --topic demo --subscription demo-sub
//! cargo run --example subscriber -- --subscription demo-sub --count 10
//! ```

use clap::Parser;
use courier::api::pb::v1::{AckStatus, StartPosition, StreamingPullRequest, Subscription};
use courier::client::Client;
use tonic::Code;

/// Prints and acks the messages of a subscription.
#[derive(Parser, Debug)]
struct Args {
    /// URL of the broker.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Topic of the subscription (used only to create it).
    #[arg(long, default_value = "demo")]
    topic: String,
    /// Subscription to read (created if missing).
    #[arg(long, default_value = "demo-sub")]
    subscription: String,
    /// Stop after this many messages (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Flow control: most messages leased to this stream at once.
    #[arg(long, default_value_t = 100)]
    max_outstanding: u64,
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
    let subscription = Subscription {
        name: args.subscription.clone(),
        topic: args.topic.clone(),
        start_position: StartPosition::Earliest as i32,
        ..Subscription::default()
    };
    match client.create_subscription(subscription).await {
        Ok(_) => println!("created subscription {:?}", args.subscription),
        Err(status) if status.code() == Code::AlreadyExists => {}
        Err(status) => {
            anyhow::bail!(
                "creating subscription {:?}: {}",
                args.subscription,
                status.message()
            )
        }
    }

    let (requests, mut responses) = client
        .streaming_pull(&args.subscription, args.max_outstanding)
        .await?;
    let mut requests = Some(requests);
    let mut received = 0u64;
    let mut acked = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let response = tokio::select! {
            r = responses.message() => r?,
            _ = &mut ctrl_c, if requests.is_some() => {
                println!("stopping");
                requests = None; // half-close: the broker ends the stream
                continue;
            }
        };
        let Some(response) = response else { break };
        acked += response
            .ack_results
            .iter()
            .filter(|r| r.status == AckStatus::Ok as i32)
            .count() as u64;
        let Some(tx) = &requests else { continue };
        let mut ack_ids = Vec::new();
        for d in &response.received_messages {
            let m = d.message.clone().unwrap_or_default();
            println!(
                "{} (attempt {}): {}",
                m.message_id,
                d.delivery_attempt,
                String::from_utf8_lossy(&m.data)
            );
            ack_ids.push(d.ack_id.clone());
            received += 1;
        }
        if !ack_ids.is_empty() {
            let ack = StreamingPullRequest {
                ack_ids,
                ..StreamingPullRequest::default()
            };
            if tx.send(ack).await.is_err() {
                break;
            }
        }
        if args.count.is_some_and(|n| received >= n) {
            requests = None;
        }
    }
    println!("received {received} messages, {acked} acks confirmed");
    Ok(())
}

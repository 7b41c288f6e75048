//! Shared harness for end-to-end tests: a real broker on 127.0.0.1 with an
//! ephemeral port and a temp data directory, and typed gRPC clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use courier::api::pb::v1::{
    self, admin_client::AdminClient, publisher_client::PublisherClient,
    subscriber_client::SubscriberClient,
};
use courier::broker::BrokerConfig;
use courier::server::{ServeOptions, run};
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub mod powerfs;

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Small segments and a fast ticker, so edge paths run in tests.
pub fn test_config(dir: &Path) -> BrokerConfig {
    let mut config = BrokerConfig::new(dir);
    config.segment_bytes_max = 64 * 1024;
    config.tick_ms = 5;
    config
}

impl TestServer {
    pub async fn start() -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Self::start_with(test_config(&dir)).await;
        s._tmp = Some(tmp);
        s
    }

    pub async fn start_with(config: BrokerConfig) -> TestServer {
        let dir = config.data_dir.clone();
        let (tx, rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let opts = ServeOptions::new("127.0.0.1:0".parse().unwrap(), config);
        let handle = tokio::spawn(run(
            opts,
            async move {
                let _ = rx.await;
            },
            move |addr| {
                let _ = ready_tx.send(addr);
            },
        ));
        let addr = match ready_rx.await {
            Ok(addr) => addr,
            Err(_) => panic!("server failed to start: {:?}", handle.await),
        };
        TestServer {
            addr,
            dir,
            _tmp: None,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Removes `tmp` (the data directory's parent) when the server is
    /// dropped.
    pub fn keep_dir(&mut self, tmp: tempfile::TempDir) {
        self._tmp = Some(tmp);
    }

    /// Stops the server gracefully and keeps the data directory.
    pub async fn stop(mut self) -> (Option<tempfile::TempDir>, PathBuf) {
        let _ = self.shutdown.take().unwrap().send(());
        self.handle.take().unwrap().await.unwrap().unwrap();
        (self._tmp.take(), self.dir.clone())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn clients(&self) -> Clients {
        Clients::connect(&self.url()).await
    }
}

#[derive(Clone)]
pub struct Clients {
    pub publisher: PublisherClient<Channel>,
    pub subscriber: SubscriberClient<Channel>,
    pub admin: AdminClient<Channel>,
}

impl Clients {
    pub async fn connect(url: &str) -> Clients {
        let channel = Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Clients {
            publisher: PublisherClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            subscriber: SubscriberClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            admin: AdminClient::new(channel),
        }
    }

    pub async fn create_topic(&mut self, name: &str) {
        self.admin
            .create_topic(v1::CreateTopicRequest {
                name: name.into(),
                retention: None,
            })
            .await
            .unwrap();
    }

    pub async fn create_sub(&mut self, name: &str, topic: &str) {
        self.create_sub_with(v1::Subscription {
            name: name.into(),
            topic: topic.into(),
            ..Default::default()
        })
        .await;
    }

    pub async fn create_sub_with(&mut self, sub: v1::Subscription) {
        self.admin.create_subscription(sub).await.unwrap();
    }

    /// Opens a StreamingPull stream with `first` as its first request;
    /// returns the request sender (dropping it half-closes the stream) and
    /// the responses.
    pub async fn stream(
        &mut self,
        first: v1::StreamingPullRequest,
    ) -> (
        tokio::sync::mpsc::Sender<v1::StreamingPullRequest>,
        tonic::Streaming<v1::StreamingPullResponse>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(first).await.unwrap();
        let responses = self
            .subscriber
            .streaming_pull(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, responses)
    }

    /// Publishes text messages; returns their ids.
    pub async fn publish(&mut self, topic: &str, payloads: &[&str]) -> Vec<String> {
        let messages = payloads
            .iter()
            .map(|p| v1::PublishMessage {
                data: p.to_string().into(),
                ..Default::default()
            })
            .collect();
        self.publisher
            .publish(v1::PublishRequest {
                topic: topic.into(),
                messages,
            })
            .await
            .unwrap()
            .into_inner()
            .message_ids
    }

    pub async fn pull(&mut self, sub: &str, max: u32, wait_ms: u64) -> Vec<v1::ReceivedMessage> {
        self.subscriber
            .pull(v1::PullRequest {
                subscription: sub.into(),
                max_messages: max,
                wait_ms,
            })
            .await
            .unwrap()
            .into_inner()
            .received_messages
    }

    pub async fn ack(&mut self, sub: &str, ids: Vec<String>) -> Vec<v1::AckResult> {
        self.subscriber
            .acknowledge(v1::AcknowledgeRequest {
                subscription: sub.into(),
                ack_ids: ids,
            })
            .await
            .unwrap()
            .into_inner()
            .results
    }

    pub async fn nack(
        &mut self,
        sub: &str,
        ids: Vec<String>,
        reject: Option<&str>,
    ) -> Vec<v1::AckResult> {
        self.subscriber
            .nack(v1::NackRequest {
                subscription: sub.into(),
                ack_ids: ids,
                reject: reject.is_some(),
                reason: reject.unwrap_or_default().into(),
            })
            .await
            .unwrap()
            .into_inner()
            .results
    }

    /// A plain nack (redelivered later) giving `reason`.
    pub async fn nack_because(
        &mut self,
        sub: &str,
        ids: Vec<String>,
        reason: &str,
    ) -> Vec<v1::AckResult> {
        self.subscriber
            .nack(v1::NackRequest {
                subscription: sub.into(),
                ack_ids: ids,
                reject: false,
                reason: reason.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .results
    }

    /// The message's status in subscription `sub`.
    pub async fn status_in(
        &mut self,
        topic: &str,
        id: &str,
        sub: &str,
    ) -> v1::SubscriptionMessageStatus {
        let status = self
            .admin
            .get_message_status(v1::GetMessageStatusRequest {
                topic: topic.into(),
                message_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        status
            .subscriptions
            .into_iter()
            .find(|s| s.subscription == sub)
            .unwrap_or_else(|| panic!("{sub} not in the status of {topic}/{id}"))
    }

    pub async fn stats(&mut self, sub: &str) -> v1::SubscriptionStats {
        self.admin
            .get_subscription_stats(v1::GetSubscriptionStatsRequest { name: sub.into() })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn dead_letters(&mut self, sub: &str) -> Vec<v1::DeadLetter> {
        self.admin
            .list_dead_letters(v1::ListDeadLettersRequest {
                subscription: sub.into(),
                max: 1000,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .dead_letters
    }

    /// Pulls until `n` messages arrived or `timeout` passed.
    pub async fn pull_n(
        &mut self,
        sub: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<v1::ReceivedMessage> {
        let until = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n && tokio::time::Instant::now() < until {
            let want = u32::try_from(n - out.len()).unwrap().min(1000);
            out.extend(self.pull(sub, want, 200).await);
        }
        out
    }
}

pub fn text(m: &v1::ReceivedMessage) -> String {
    String::from_utf8(m.message.as_ref().unwrap().data.to_vec()).unwrap()
}

pub fn ack_ids(msgs: &[v1::ReceivedMessage]) -> Vec<String> {
    msgs.iter().map(|m| m.ack_id.clone()).collect()
}

/// A real `courier serve` child process on 127.0.0.1 (for kill -9).
pub struct ChildBroker {
    pub child: Child,
    pub url: String,
    /// Every line the broker wrote to stderr so far.
    pub log: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
}

/// Starts `courier serve` on `dir` and waits for its address.
pub fn spawn_broker(dir: &std::path::Path) -> ChildBroker {
    spawn_broker_with(dir, &[], None)
}

/// Starts `courier serve` on `dir` with extra flags and, if given, its
/// file descriptor limit (soft and hard) set to `nofile`.
pub fn spawn_broker_with(dir: &std::path::Path, args: &[&str], nofile: Option<u64>) -> ChildBroker {
    let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(args);
    if let Some(n) = nofile {
        use std::os::unix::process::CommandExt as _;
        let lim = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: setrlimit is async-signal-safe and touches only the
        // child's own limits.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = command
        .env("RUST_LOG", "info")
        .env_remove("COURIER_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start courier serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let lines = log.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            lines.lock().push(line.clone());
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr: String = rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '"')
                    .collect();
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("broker did not report its address");
    ChildBroker {
        child,
        url: format!("http://{addr}"),
        log,
    }
}

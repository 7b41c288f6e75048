//! [`Ctx`], what every workload shares: the gRPC connections (reopened
//! after a restart), the progress bars, the bench topics of the current
//! step (created as `bench-<workload>-<random>` and deleted after it unless
//! `--keep`), the spawned broker if any, and the wording of RPC errors.

use std::fmt::Display;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use tonic::Status;

use super::super::conn::{error_chain, rpc_error_line};
use super::report::thousands;
use super::spawn::SpawnedBroker;
use crate::api::pb::v1::{
    BrokerStats, CreateTopicRequest, DeleteTopicRequest, GetBrokerStatsRequest,
    GetTopicStatsRequest, Subscription, TopicStats,
};
use crate::client::Client;

/// The connections, settings and bookkeeping every workload shares.
pub(super) struct Ctx {
    pub(super) server: String,
    clients: Vec<Client>,
    connections: u32,
    show_progress: bool,
    keep: bool,
    /// Topics created by the current step, deleted by [`Ctx::cleanup`].
    topics: Vec<String>,
    pub(super) spawned: Option<SpawnedBroker>,
    /// The origin of the latency workload's timestamps.
    pub(super) epoch: Instant,
}

impl Ctx {
    /// Opens `connections` connections to `server`, with no topics yet.
    pub(super) async fn connect(
        server: &str,
        connections: u32,
        show_progress: bool,
        keep: bool,
    ) -> anyhow::Result<Ctx> {
        let mut ctx = Ctx {
            server: server.to_string(),
            clients: Vec::new(),
            connections,
            show_progress,
            keep,
            topics: Vec::new(),
            spawned: None,
            epoch: Instant::now(),
        };
        ctx.reconnect(server).await?;
        Ok(ctx)
    }

    /// Opens `connections` fresh connections to `server`.
    pub(super) async fn reconnect(&mut self, server: &str) -> anyhow::Result<()> {
        let mut clients = Vec::new();
        for _ in 0..self.connections {
            let client = Client::connect(server)
                .await
                .map_err(|e| anyhow!("cannot reach courier at {server}: {}", error_chain(&e)))?;
            clients.push(client);
        }
        self.server = server.to_string();
        self.clients = clients;
        Ok(())
    }

    /// The client of connection `i` (modulo the connection count).
    pub(super) fn client(&self, i: usize) -> &Client {
        &self.clients[i % self.clients.len()]
    }

    /// Maps a failed RPC on `what` to the CLI's error line.
    pub(super) fn err(&self, what: impl Display) -> impl FnOnce(Status) -> anyhow::Error + '_ {
        let what = what.to_string();
        move |status| rpc_error(&self.server, &what, status)
    }

    /// A new progress bar of `len` steps (hidden unless enabled).
    pub(super) fn bar(&self, len: u64, prefix: impl Into<String>) -> ProgressBar {
        if !self.show_progress {
            return ProgressBar::hidden();
        }
        let style = ProgressStyle::with_template(
            "{prefix:>20} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} {rate:>9} eta {eta}",
        )
        .map(|s| {
            s.progress_chars("=> ")
                .with_key("rate", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{}/s", thousands(state.per_sec()));
                })
        })
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        bar.set_style(style);
        bar.set_prefix(prefix.into());
        bar
    }

    pub(super) async fn broker_stats(&self) -> anyhow::Result<BrokerStats> {
        Ok(self
            .client(0)
            .admin()
            .get_broker_stats(GetBrokerStatsRequest {})
            .await
            .map_err(self.err("stats"))?
            .into_inner())
    }

    pub(super) async fn topic_stats(&self, topic: &str) -> anyhow::Result<TopicStats> {
        Ok(self
            .client(0)
            .admin()
            .get_topic_stats(GetTopicStatsRequest {
                name: topic.to_string(),
            })
            .await
            .map_err(self.err(format_args!("topic stats {topic:?}")))?
            .into_inner())
    }

    /// Creates `bench-<workload>-<random>` with `subscriptions`
    /// subscriptions `<topic>-s<i>`; returns the names.
    pub(super) async fn create(
        &mut self,
        workload: &str,
        subscriptions: u32,
    ) -> anyhow::Result<(String, Vec<String>)> {
        let topic = format!("bench-{workload}-{}", random_hex());
        self.topics.push(topic.clone());
        let subs = create_topic(&self.server, self.client(0), &topic, subscriptions).await?;
        Ok((topic, subs))
    }

    /// Creates `topics` topics `bench-<workload>-<random>-t<i>`, each with
    /// `subscriptions` subscriptions, [`ADMIN_CONCURRENCY`] at a time over
    /// the connections; returns the topic names.
    pub(super) async fn create_topics(
        &mut self,
        workload: &str,
        topics: u32,
        subscriptions: u32,
    ) -> anyhow::Result<Vec<String>> {
        if topics == 1 {
            return Ok(vec![self.create(workload, subscriptions).await?.0]);
        }
        let prefix = format!("bench-{workload}-{}", random_hex());
        let names: Vec<String> = (0..topics).map(|i| format!("{prefix}-t{i}")).collect();
        // Registered first: an interrupted creation is cleaned up too.
        self.topics.extend(names.iter().cloned());
        let bar = self.bar(u64::from(topics), format!("create {topics} topics"));
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(ADMIN_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, topic) in names.iter().enumerate() {
            let permit = gate.clone().acquire_owned().await?;
            let (server, client, topic) =
                (self.server.clone(), self.client(i).clone(), topic.clone());
            let bar = bar.clone();
            tasks.spawn(async move {
                let _permit = permit;
                create_topic(&server, &client, &topic, subscriptions).await?;
                bar.inc(1);
                anyhow::Ok(())
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.context("create task")??;
        }
        bar.finish_and_clear();
        Ok(names)
    }

    /// Deletes the topics (with their subscriptions) of the current step,
    /// unless `--keep`, [`ADMIN_CONCURRENCY`] at a time. Failures are
    /// warnings: the figures stand.
    pub(super) async fn cleanup(&mut self) {
        let topics = std::mem::take(&mut self.topics);
        if self.keep || self.clients.is_empty() {
            return;
        }
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(ADMIN_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, topic) in topics.into_iter().enumerate() {
            let Ok(permit) = gate.clone().acquire_owned().await else {
                break;
            };
            let (server, client) = (self.server.clone(), self.client(i).clone());
            tasks.spawn(async move {
                let _permit = permit;
                let request = DeleteTopicRequest {
                    name: topic.clone(),
                    force: true,
                };
                if let Err(status) = client.admin().delete_topic(request).await {
                    let line = rpc_error_line(&server, &format!("topic delete {topic:?}"), &status);
                    eprintln!("warning: {line}");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Stops a spawned broker and removes its data directory unless
    /// `--keep`.
    pub(super) async fn stop_spawned(&mut self) -> anyhow::Result<()> {
        let Some(mut broker) = self.spawned.take() else {
            return Ok(());
        };
        broker.stop().await?;
        if self.keep {
            eprintln!("kept the broker's data dir {}", broker.data_dir.display());
        } else {
            std::fs::remove_dir_all(&broker.data_dir).with_context(|| {
                format!(
                    "removing the broker's data dir {}",
                    broker.data_dir.display()
                )
            })?;
        }
        Ok(())
    }
}

/// Admin calls (create, delete) the bench makes at once.
const ADMIN_CONCURRENCY: usize = 16;

/// Creates `topic` with `subscriptions` subscriptions `<topic>-s<i>`;
/// returns their names.
async fn create_topic(
    server: &str,
    client: &Client,
    topic: &str,
    subscriptions: u32,
) -> anyhow::Result<Vec<String>> {
    client
        .admin()
        .create_topic(CreateTopicRequest {
            name: topic.to_string(),
            retention: None,
        })
        .await
        .map_err(|e| rpc_error(server, &format!("topic create {topic:?}"), e))?;
    let mut subs = Vec::new();
    for i in 0..subscriptions {
        let name = format!("{topic}-s{i}");
        let sub = Subscription {
            name: name.clone(),
            topic: topic.to_string(),
            ..Subscription::default()
        };
        client
            .create_subscription(sub)
            .await
            .map_err(|e| rpc_error(server, &format!("sub create {name:?}"), e))?;
        subs.push(name);
    }
    Ok(subs)
}

/// The error for a failed RPC, in the CLI's usual wording.
pub(super) fn rpc_error(server: &str, what: &str, status: Status) -> anyhow::Error {
    anyhow!(rpc_error_line(server, what, &status))
}

/// Eight random hex digits for unique names.
pub(super) fn random_hex() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

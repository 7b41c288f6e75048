//! Runs the broker behind its gRPC services until a shutdown signal.
//!
//! Besides Publisher, Subscriber and Admin it serves the standard gRPC
//! health service and server reflection (v1 and v1alpha), so `grpcurl` can
//! list and call everything.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;

use crate::api::pb::v1::admin_server::AdminServer;
use crate::api::pb::v1::publisher_server::PublisherServer;
use crate::api::pb::v1::subscriber_server::SubscriberServer;
use crate::api::{AdminService, PublisherService, SubscriberService, pb};
use crate::broker::{Broker, BrokerConfig};
use crate::client::{HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_STREAM_WINDOW_BYTES};

/// Largest gRPC message the server accepts or sends; the same bound as the
/// Rust client's.
const GRPC_MESSAGE_BYTES_MAX: usize = crate::client::GRPC_MESSAGE_BYTES_MAX;

/// How often the health service re-checks that every log can write.
const HEALTH_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

pub mod listener;

/// HTTP/2 keepalive: a ping after this much silence on a connection...
const HTTP2_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// ...which must be answered within this, or the connection is closed.
const HTTP2_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// What `courier serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub broker: BrokerConfig,
    /// Most connections open at once; `None` derives it from the file
    /// descriptor limit ([`listener::ConnectionLimits::for_fd_limit`]).
    pub connections_max: Option<usize>,
    /// Time a new connection has to send the HTTP/2 preface; `None` is
    /// [`listener::HANDSHAKE_TIMEOUT_DEFAULT`].
    pub handshake_timeout: Option<std::time::Duration>,
}

impl ServeOptions {
    /// Options with the defaults for everything but the broker's.
    pub fn new(listen: SocketAddr, broker: BrokerConfig) -> ServeOptions {
        ServeOptions {
            listen,
            broker,
            connections_max: None,
            handshake_timeout: None,
        }
    }
}

/// Opens the broker, serves gRPC on `opts.listen` until `shutdown`
/// completes, then stops accepting, ends open streams with UNAVAILABLE,
/// finishes in-flight RPCs, and closes (syncs) every log. `on_ready` is
/// called with the bound address once the server accepts connections.
pub async fn run(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr) + Send,
) -> anyhow::Result<()> {
    let fd_limit = listener::raise_fd_limit();
    let mut limits = listener::ConnectionLimits::for_fd_limit(fd_limit);
    if let Some(n) = opts.connections_max {
        limits.connections_max = n;
    }
    if let Some(t) = opts.handshake_timeout {
        limits.handshake_timeout = t;
    }
    tracing::info!(
        fd_limit,
        connections_max = limits.connections_max,
        handshake_timeout_ms = limits.handshake_timeout.as_millis() as u64,
        "connection limits"
    );
    let broker = Broker::open(opts.broker.clone()).await.with_context(|| {
        format!(
            "cannot open data directory {}",
            opts.broker.data_dir.display()
        )
    })?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let incoming = listener::incoming(listener, limits);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PublisherServer<PublisherService>>()
        .await;
    health
        .set_serving::<SubscriberServer<SubscriberService>>()
        .await;
    health.set_serving::<AdminServer<AdminService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let publisher = PublisherServer::new(PublisherService::new(broker.clone()))
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let subscriber = SubscriberServer::new(SubscriberService::new(broker.clone()))
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let admin = AdminServer::new(AdminService::new(broker.clone()))
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);

    // Health follows the logs: NOT_SERVING while any log cannot write (a
    // full disk, an I/O error), SERVING again once it writes.
    let watched = broker.clone();
    let reporter = health.clone();
    let health_watch = tokio::spawn(async move {
        let mut was_ok = true;
        loop {
            tokio::time::sleep(HEALTH_CHECK_EVERY).await;
            if watched.is_shutting_down() {
                return;
            }
            let problems = watched.write_problems();
            let ok = problems.is_empty();
            if ok != was_ok {
                let status = if ok {
                    tonic_health::ServingStatus::Serving
                } else {
                    tracing::error!(problems = ?problems, "health: NOT_SERVING while logs cannot write");
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                if ok {
                    tracing::info!("health: SERVING again");
                }
                was_ok = ok;
            }
        }
    });

    let signal_broker = broker.clone();
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: ending streams and finishing in-flight calls");
        health
            .set_not_serving::<PublisherServer<PublisherService>>()
            .await;
        signal_broker.begin_shutdown();
    };
    on_ready(addr);
    let served = tonic::transport::Server::builder()
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .layer(crate::api::codec::TooLargeLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(publisher)
        .add_service(subscriber)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    health_watch.abort();
    let _ = health_watch.await;
    // Returns once the data directory is unlocked.
    broker.close_and_release().await;
    served.context("gRPC server failed")?;
    tracing::info!("shut down cleanly");
    Ok(())
}

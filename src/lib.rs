//! Courier: a durable topic/fan-out message broker with a gRPC API.
//!
//! Layers, each depending only on the ones below (docs/ARCHITECTURE.md):
//! [`cli`] and [`server`] (the binary) → [`api`] (gRPC services) →
//! [`broker`] (topics, subscriptions, leases, dead letters) → [`storage`]
//! (segment logs, recovery, the state journal, metadata). [`client`] is a
//! small Rust client of the gRPC API used by the CLI, tests and benches.

pub mod api;
pub mod broker;
pub mod cli;
pub mod client;
pub mod server;
pub mod storage;

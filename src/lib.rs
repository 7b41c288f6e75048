pub mod api;
pub mod broker;
pub mod cli;
pub mod client;
pub mod server;
pub mod storage;

pub mod api;
pub mod broker;
pub mod storage;
pub mod server;

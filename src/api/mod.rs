//! The gRPC API layer: the only code that sees tonic types or builds a
//! `Status`. Each service maps requests onto [`crate::broker::Broker`]
//! calls; `status::to_status` is the one mapping from errors to codes.

pub mod admin;
pub mod codec;
pub mod convert;
pub mod pb;
pub mod publisher;
pub mod status;
pub mod subscriber;

pub use admin::AdminService;
pub use publisher::PublisherService;
pub use subscriber::SubscriberService;

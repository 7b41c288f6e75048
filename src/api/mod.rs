//! The gRPC API layer: the only code that sees tonic types or builds a
//! `Status`.

pub mod pb;

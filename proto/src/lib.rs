//! Generated protobuf and gRPC code for Baton's two APIs.
//!
//! The `.proto` files beside this crate are the source of truth; clients in
//! other languages need nothing but them. Rust code outside this crate works
//! with the domain types of `baton-common` and converts at the gRPC edge.

#![allow(missing_docs, clippy::all)]

pub mod codec;

/// `baton.agent.v1`: the stream between `baton-agent` and `batond`.
pub mod agent {
    /// Version 1 of the agent protocol.
    pub mod v1 {
        tonic::include_proto!("baton.agent.v1");
    }
}

/// `baton.control.v1`: the operator API.
pub mod control {
    /// Version 1 of the Control API.
    pub mod v1 {
        tonic::include_proto!("baton.control.v1");
    }
}

/// The encoded `FileDescriptorSet` of every Baton proto, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/baton_descriptor.bin"));

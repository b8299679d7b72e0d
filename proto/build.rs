//! Generates the gRPC code from `baton/**/*.proto` with `protox`, a pure
//! Rust protobuf compiler, so building Baton never needs a system `protoc`.
//! The encoded descriptor set is kept for server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "baton/agent/v1/agent.proto",
    "baton/control/v1/control.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&fds);
    std::fs::write(out_dir.join("baton_descriptor.bin"), encoded)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No generated `connect` constructor: it would clash with the
        // `AgentService.Connect` rpc. Clients are built from a `Channel`.
        .build_transport(false)
        // Malformed messages are INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::codec::StrictCodec")
        // Payload chunks are slices of the receive buffer, not copies.
        .bytes(".baton.agent.v1.FetchChunk.data")
        .compile_fds(fds)?;
    Ok(())
}

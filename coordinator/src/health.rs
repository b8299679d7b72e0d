//! The gRPC services whose health `batond` reports (`grpc.health.v1`):
//! serving while this coordinator serves the fleet, not serving while it
//! follows another.

/// The services, by their full gRPC names.
pub const SERVICES: &[&str] = &[
    "baton.agent.v1.AgentService",
    "baton.agent.v1.ArtifactService",
    "baton.control.v1.ControlService",
];

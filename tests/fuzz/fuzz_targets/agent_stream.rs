//! The agent stream's messages, both ways, and the metrics text an agent
//! reads for analysis: any bytes either fail to
//! decode or convert into domain types — a hello, an inventory, a command
//! update on the coordinator's side; a command on the agent's — or are
//! refused with an error, never a panic, and what converts is within the
//! documented limits.
#![no_main]

use baton_common::command::{
    Command, CommandUpdate, MAX_LOG_TAIL_BYTES, MAX_PROBE_CHARS, MAX_UPDATE_ERROR_CHARS,
};
use baton_common::host::{HostInfo, MAX_LABELS, MAX_SERVICES_PER_HOST, services_from_agent};
use baton_proto::agent::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    // What a service's metrics endpoint answers, read by its agent for
    // analysis: an error or samples, never a panic, and bounded.
    if let Ok(text) = std::str::from_utf8(data) {
        let wanted = ["x".to_owned(), "x_bucket".to_owned(), "a:b".to_owned()];
        if let Ok(samples) = baton_agent::sample::families(text, &wanted) {
            assert!(samples.len() <= baton_agent::sample::MAX_SERIES);
        }
    }
    if let Ok(msg) = pb::AgentMessage::decode(data) {
        match msg.kind {
            Some(pb::agent_message::Kind::Hello(hello)) => {
                if let Ok(info) = HostInfo::try_from(hello) {
                    assert!(info.services.len() <= MAX_SERVICES_PER_HOST);
                    assert!(info.labels.len() <= MAX_LABELS);
                }
            }
            Some(pb::agent_message::Kind::Inventory(inv)) => {
                if let Ok(services) = services_from_agent(inv.services, "inventory") {
                    assert!(services.len() <= MAX_SERVICES_PER_HOST);
                }
            }
            Some(pb::agent_message::Kind::CommandUpdate(u)) => {
                if let Ok(update) = CommandUpdate::try_from(u) {
                    assert!(update.error.chars().count() <= MAX_UPDATE_ERROR_CHARS + 1);
                    assert!(update.progress_percent <= 100);
                    // A failure's detail is bounded whatever the agent sent.
                    assert!(update.detail.probe.chars().count() <= MAX_PROBE_CHARS + 1);
                    assert!(update.detail.log_tail.len() <= MAX_LOG_TAIL_BYTES);
                }
            }
            // Log chunks are handed as they are to the one request they
            // name, within the stream's message limit: nothing to convert.
            Some(pb::agent_message::Kind::LogChunk(_)) => {}
            // Sample replies are matched to their request by id and host;
            // their numbers are read as they are (the runner skips what is
            // not finite, the judge refuses it): nothing to convert.
            Some(pb::agent_message::Kind::SampleReply(_)) => {}
            Some(pb::agent_message::Kind::Heartbeat(_)) | None => {}
        }
    }
    if let Ok(msg) = pb::CoordinatorMessage::decode(data)
        && let Some(pb::coordinator_message::Kind::Command(c)) = msg.kind
        && let Ok(command) = Command::try_from(c)
    {
        // What converts goes back to the wire and converts the same.
        let again = Command::try_from(pb::Command::from(&command)).unwrap();
        assert_eq!(again, command);
    }
});

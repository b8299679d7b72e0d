//! Analysis samples asked of agents: a `SampleRequest` down a host's
//! stream, its one `SampleReply` back, matched by id. Nothing is stored.
//! Bounded: at most [`MAX_OPEN`] requests wait at once; an answer for a
//! request that is not open, or from another host, is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_common::host::HostId;
use baton_proto::agent::v1::{CoordinatorMessage, SampleReply, SampleRequest, coordinator_message};
use tokio::sync::oneshot;

use crate::logs::AgentOut;

/// The most requests waiting for their answers at once.
pub const MAX_OPEN: usize = 65_536;

type Open = HashMap<String, (HostId, oneshot::Sender<SampleReply>)>;

/// The open requests, by id.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<Open>>);

fn lock(m: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registry {
    /// Sends `req` (its id is set here) to `host` through `agent` and waits
    /// up to `timeout` for the answer.
    pub async fn ask(
        &self,
        host: &HostId,
        agent: &AgentOut,
        mut req: SampleRequest,
        timeout: Duration,
    ) -> Result<SampleReply, String> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut open = lock(&self.0);
            if open.len() >= MAX_OPEN {
                return Err(format!(
                    "{MAX_OPEN} samples are awaited on this coordinator"
                ));
            }
            let id = loop {
                let id = format!("sample-{:016x}", fastrand::u64(..));
                if !open.contains_key(&id) {
                    break id;
                }
            };
            open.insert(id.clone(), (host.clone(), tx));
            id
        };
        req.request_id.clone_from(&id);
        let message = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::SampleRequest(req)),
        };
        let sent = agent.try_send(Ok(Box::new(message))).is_ok();
        let answer = if sent {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(reply)) if reply.error.is_empty() => Ok(reply),
                Ok(Ok(reply)) => Err(reply.error),
                Ok(Err(_)) => Err(format!("{host} is not connected")),
                Err(_) => Err(format!(
                    "{host} did not answer within {}s",
                    timeout.as_secs_f32()
                )),
            }
        } else {
            Err(format!("{host} is not connected"))
        };
        lock(&self.0).remove(&id);
        answer
    }

    /// Hands `host`'s answer to its request.
    pub fn deliver(&self, host: &HostId, reply: SampleReply) {
        let mut open = lock(&self.0);
        if open.get(&reply.request_id).is_some_and(|(h, _)| h == host)
            && let Some((_, tx)) = open.remove(&reply.request_id)
        {
            let _ = tx.send(reply);
        }
    }
}

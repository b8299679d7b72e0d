//! `baton logs`: a service's log streamed from its agent to an operator.
//! The Control API opens a request here and sends it down the agent's
//! stream; the agent's chunks come back on that stream and are handed to
//! the request they belong to. Nothing is stored.
//!
//! Bounded: at most [`MAX_OPEN`] requests at once on a coordinator, and
//! [`BUFFER`] chunks waiting per request. An operator who reads slower
//! than the agent sends loses the stream (it ends with an error) rather
//! than slowing the agent's stream, which carries its commands too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use baton_common::host::HostId;
use baton_proto::agent::v1::{
    CoordinatorMessage, LogCancel, LogChunk, LogRequest, coordinator_message,
};
use tokio::sync::mpsc;

/// The most lines a request may ask for (the agent's bound too).
pub const MAX_LINES: u32 = 10_000;

/// The most log requests open at once on a coordinator.
pub const MAX_OPEN: usize = 256;
/// Chunks waiting for a slow reader before its request is dropped.
pub const BUFFER: usize = 64;

/// Where messages to one agent go (its stream's outbound queue).
pub type AgentOut = mpsc::Sender<Result<Box<CoordinatorMessage>, Box<tonic::Status>>>;

struct Entry {
    host: HostId,
    tx: mpsc::Sender<LogChunk>,
}

/// The open requests, by id.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<HashMap<String, Entry>>>);

fn lock(m: &Mutex<HashMap<String, Entry>>) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a request could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// [`MAX_OPEN`] are open.
    #[error("{MAX_OPEN} log streams are open on this coordinator; try again later")]
    Busy,
    /// The agent's stream ended or stays full.
    #[error("host {0} is not connected")]
    NotConnected(HostId),
}

impl Registry {
    /// Opens a request for `service`'s log on `host`, whose stream is
    /// `agent`.
    pub fn open(
        &self,
        host: HostId,
        agent: AgentOut,
        service: &str,
        lines: u32,
        follow: bool,
    ) -> Result<Subscription, OpenError> {
        let (tx, rx) = mpsc::channel(BUFFER);
        let id = {
            let mut open = lock(&self.0);
            if open.len() >= MAX_OPEN {
                return Err(OpenError::Busy);
            }
            let id = loop {
                let id = format!("logs-{:016x}", fastrand::u64(..));
                if !open.contains_key(&id) {
                    break id;
                }
            };
            open.insert(
                id.clone(),
                Entry {
                    host: host.clone(),
                    tx,
                },
            );
            id
        };
        let request = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::LogRequest(LogRequest {
                request_id: id.clone(),
                service: service.to_owned(),
                lines,
                follow,
            })),
        };
        let subscription = Subscription {
            id,
            rx,
            agent: agent.clone(),
            registry: self.clone(),
        };
        // The agent's queue is small and shared with its commands: a full
        // one is an agent not reading.
        agent
            .try_send(Ok(Box::new(request)))
            .map_err(|_| OpenError::NotConnected(host))?;
        Ok(subscription)
    }

    /// Hands a chunk from `host`'s agent to its request; a chunk for a
    /// request that is not open, or not this host's, is dropped.
    pub fn deliver(&self, host: &HostId, chunk: LogChunk) {
        let mut open = lock(&self.0);
        let Some(entry) = open.get(&chunk.request_id) else {
            return;
        };
        if entry.host != *host {
            return;
        }
        if entry.tx.try_send(chunk.clone()).is_err() {
            // Too slow, or gone: the request ends (its reader sees the
            // channel close without an end chunk).
            open.remove(&chunk.request_id);
        }
    }

    /// How many requests are open.
    pub fn len(&self) -> usize {
        lock(&self.0).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One open request: its chunks, until its end. Dropping it cancels the
/// request on the agent.
pub struct Subscription {
    id: String,
    rx: mpsc::Receiver<LogChunk>,
    agent: AgentOut,
    registry: Registry,
}

/// What a request yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Log text.
    Text(String),
    /// The end of what was asked for.
    End,
    /// The agent could not serve it, why.
    Failed(String),
    /// The agent's stream ended, or the reader was too slow.
    Lost,
}

impl Subscription {
    /// The next piece of the log.
    pub async fn next(&mut self) -> Next {
        let chunk = tokio::select! {
            chunk = self.rx.recv() => chunk,
            () = self.agent.closed() => None,
        };
        match chunk {
            None => Next::Lost,
            Some(c) if !c.error.is_empty() => Next::Failed(c.error),
            Some(c) if c.eof => {
                if c.text.is_empty() {
                    Next::End
                } else {
                    // An end chunk with text: the text first (rare; the
                    // agent sends none), the end after.
                    Next::Text(c.text)
                }
            }
            Some(c) => Next::Text(c.text),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.registry.0).remove(&self.id);
        let cancel = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::LogCancel(LogCancel {
                request_id: self.id.clone(),
            })),
        };
        let _ = self.agent.try_send(Ok(Box::new(cancel)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_reach_their_request_only_from_its_host_and_a_slow_reader_is_cut() {
        let registry = Registry::default();
        let (agent, mut to_agent) = mpsc::channel(8);
        let h1 = HostId::try_from("h1").unwrap();
        let mut sub = registry.open(h1.clone(), agent, "web", 10, true).unwrap();
        let Some(Ok(msg)) = to_agent.recv().await else {
            panic!("no request sent")
        };
        let Some(coordinator_message::Kind::LogRequest(req)) = msg.kind else {
            panic!("{msg:?}")
        };
        assert_eq!(
            (req.service.as_str(), req.lines, req.follow),
            ("web", 10, true)
        );
        let chunk = |text: &str| LogChunk {
            request_id: req.request_id.clone(),
            text: text.into(),
            ..LogChunk::default()
        };
        // Another host's chunk for this request is not delivered.
        registry.deliver(&HostId::try_from("h2").unwrap(), chunk("forged"));
        registry.deliver(&h1, chunk("line\n"));
        assert_eq!(sub.next().await, Next::Text("line\n".into()));
        // A reader that falls BUFFER chunks behind loses the stream.
        for _ in 0..=BUFFER {
            registry.deliver(&h1, chunk("x\n"));
        }
        assert_eq!(registry.len(), 0);
        let mut texts = 0;
        while let Next::Text(_) = sub.next().await {
            texts += 1;
        }
        assert_eq!(texts, BUFFER);
        // Dropping it cancels the request on the agent.
        drop(sub);
        let Some(Ok(msg)) = to_agent.recv().await else {
            panic!("no cancel sent")
        };
        assert!(matches!(
            msg.kind,
            Some(coordinator_message::Kind::LogCancel(_))
        ));
    }
}

//! The fleet's domain types: host ids, labels, service inventory, and the
//! protobuf form in both packages (`wire`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

/// A message from the wire broke a rule; says which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    /// The field's path, e.g. `hello.labels`.
    pub field: String,
    /// What is wrong with it, as a sentence fragment.
    pub reason: String,
}

impl InvalidField {
    /// An error for `field` with `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub use crate::names::MAX_NAME_LEN;

/// A host's identity: what its agent certificate names, and what every
/// API uses to refer to it. 1–128 characters of `[A-Za-z0-9._-]`, starting
/// with a letter or digit, so it is safe in file names, URNs and logs.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct HostId(String);

impl HostId {
    /// The host id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HostId {
    type Error = InvalidField;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate_name(&s).map_err(|reason| InvalidField::new("host_id", reason))?;
        Ok(Self(s))
    }
}

impl TryFrom<&str> for HostId {
    type Error = InvalidField;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::try_from(s.to_owned())
    }
}

impl From<HostId> for String {
    fn from(id: HostId) -> Self {
        id.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a name (host id, service name, label key) against the one
/// grammar in [`crate::names`].
pub fn validate_name(s: &str) -> Result<(), String> {
    crate::names::check(s, None)
}

/// Host labels, as given with `--label KEY=VALUE`; matched by plan selectors.
pub type Labels = BTreeMap<String, String>;

/// The longest label value accepted.
pub const MAX_LABEL_VALUE_LEN: usize = 256;

/// The most labels one host may carry.
pub const MAX_LABELS: usize = 64;

/// The most services one host may report (in a hello or an inventory).
pub const MAX_SERVICES_PER_HOST: usize = 1000;

/// Checks a set of labels: at most [`MAX_LABELS`], keys are names (see
/// [`validate_name`], `/` also allowed), values are printable and at most
/// [`MAX_LABEL_VALUE_LEN`] bytes.
pub fn validate_labels(labels: &Labels) -> Result<(), InvalidField> {
    if labels.len() > MAX_LABELS {
        return Err(InvalidField::new(
            "labels",
            format!("{} labels, the limit is {MAX_LABELS}", labels.len()),
        ));
    }
    for (k, v) in labels {
        let field = || format!("labels[{}]", crate::text::quote(k));
        validate_name(&k.replace('/', "-"))
            .map_err(|reason| InvalidField::new(field(), format!("key {reason}")))?;
        if v.len() > MAX_LABEL_VALUE_LEN {
            return Err(InvalidField::new(field(), "value is longer than 256 bytes"));
        }
        if v.chars().any(char::is_control) {
            return Err(InvalidField::new(
                field(),
                "value contains a control character",
            ));
        }
    }
    Ok(())
}

/// Parses `KEY=VALUE` as given to `--label` or `--var`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{} is not KEY=VALUE", crate::text::quote(s))),
    }
}

/// What a service's process is doing on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Installed, not running.
    Stopped,
    /// Started, not yet past its health check.
    Starting,
    /// Running.
    Running,
    /// Exited on its own or failed to start.
    Failed,
}

impl ServiceState {
    /// The state's name in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One service installed on a host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceStatus {
    /// The service name.
    pub name: String,
    /// The version its `current` release points at.
    pub version: String,
    /// What its process is doing.
    pub state: ServiceState,
    /// Whether its health check passes right now.
    pub healthy: bool,
}

/// What an agent announces about its host in its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// The host id claimed by the hello (checked against the certificate).
    pub host_id: HostId,
    /// The agent's version.
    pub agent_version: String,
    /// The host's labels.
    pub labels: Labels,
    /// The host's services.
    pub services: Vec<ServiceStatus>,
}

/// One host as the coordinator knows it: the registry record plus whether
/// its agent is connected right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// The host id.
    pub host_id: HostId,
    /// Whether the agent holds a live stream now.
    pub connected: bool,
    /// The labels from the last hello.
    pub labels: Labels,
    /// The services from the last report.
    pub services: Vec<ServiceStatus>,
    /// The agent's version from the last hello.
    pub agent_version: String,
    /// The first registration.
    pub first_seen: SystemTime,
    /// The last message heard.
    pub last_seen: SystemTime,
    /// Where the current or last stream came from.
    pub peer_address: String,
    /// The coordinator's number for the live stream (0 when disconnected,
    /// or when the view came over the wire): a new number means the agent
    /// reconnected, even if no disconnect was seen in between.
    pub session: u64,
}

/// One host in the contract's JSON shape.
pub fn to_json(h: &HostView) -> serde_json::Value {
    serde_json::json!({
        "host_id": h.host_id,
        "connected": h.connected,
        "labels": h.labels,
        "services": h.services.iter().map(|s| serde_json::json!({
            "name": s.name,
            "version": s.version,
            "state": s.state.as_str(),
            "healthy": s.healthy,
        })).collect::<Vec<_>>(),
        "agent_version": h.agent_version,
        "first_seen": crate::time::rfc3339(h.first_seen),
        "last_seen": crate::time::rfc3339(h.last_seen),
        "peer_address": h.peer_address,
    })
}

/// The protobuf form.
#[cfg(feature = "wire")]
mod wire;
#[cfg(feature = "wire")]
pub use wire::*;

#[cfg(all(test, feature = "wire"))]
mod tests {
    use super::*;
    use baton_proto::agent::v1 as agent_pb;

    #[test]
    fn host_ids_are_checked() {
        assert!(HostId::try_from("web-01.eu_west").is_ok());
        for bad in ["", "-web", "we b", "a/b", "é", &"x".repeat(129)] {
            assert!(HostId::try_from(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn hello_validation_names_the_field() {
        let hello = agent_pb::Hello {
            host_id: "h1".into(),
            agent_version: "0.1.0".into(),
            labels: [("role".to_string(), "api".to_string())].into(),
            services: vec![agent_pb::ServiceStatus {
                name: "api".into(),
                version: "1.0.0".into(),
                state: 0,
                healthy: false,
            }],
        };
        let err = HostInfo::try_from(hello.clone()).unwrap_err();
        assert_eq!(err.field, "hello.services[0].state");

        let mut ok = hello;
        ok.services[0].state = agent_pb::ServiceState::Running.into();
        let info = HostInfo::try_from(ok.clone()).unwrap();
        assert_eq!(agent_pb::Hello::from(&info), ok);
    }

    #[test]
    fn labels_are_checked() {
        let mut labels = Labels::new();
        labels.insert("team/owner".into(), "core".into());
        assert!(validate_labels(&labels).is_ok());
        labels.insert("bad key".into(), "x".into());
        assert!(validate_labels(&labels).is_err());
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
    }
}

//! The protobuf form of hosts (`agent.v1` hellos and reports,
//! `control.v1` hosts).

use baton_proto::agent::v1 as agent_pb;
use baton_proto::control::v1 as control_pb;

use super::*;
use crate::time::{from_timestamp, to_timestamp};

// ---- agent.v1 conversions -------------------------------------------------

fn service_state_from_i32(value: i32, field: &str) -> Result<ServiceState, InvalidField> {
    match agent_pb::ServiceState::try_from(value) {
        Ok(agent_pb::ServiceState::Stopped) => Ok(ServiceState::Stopped),
        Ok(agent_pb::ServiceState::Starting) => Ok(ServiceState::Starting),
        Ok(agent_pb::ServiceState::Running) => Ok(ServiceState::Running),
        Ok(agent_pb::ServiceState::Failed) => Ok(ServiceState::Failed),
        Ok(agent_pb::ServiceState::Unspecified) => {
            Err(InvalidField::new(field, "state is unspecified"))
        }
        Err(_) => Err(InvalidField::new(
            field,
            format!("unknown service state {value}"),
        )),
    }
}

impl From<ServiceState> for agent_pb::ServiceState {
    fn from(s: ServiceState) -> Self {
        match s {
            ServiceState::Stopped => Self::Stopped,
            ServiceState::Starting => Self::Starting,
            ServiceState::Running => Self::Running,
            ServiceState::Failed => Self::Failed,
        }
    }
}

impl From<&ServiceStatus> for agent_pb::ServiceStatus {
    fn from(s: &ServiceStatus) -> Self {
        Self {
            name: s.name.clone(),
            version: s.version.clone(),
            state: agent_pb::ServiceState::from(s.state).into(),
            healthy: s.healthy,
        }
    }
}

/// Converts and validates a reported service list; `field` names it in errors.
pub fn services_from_agent(
    list: Vec<agent_pb::ServiceStatus>,
    field: &str,
) -> Result<Vec<ServiceStatus>, InvalidField> {
    if list.len() > MAX_SERVICES_PER_HOST {
        return Err(InvalidField::new(
            field,
            format!(
                "{} services, the limit is {MAX_SERVICES_PER_HOST} per host",
                list.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    if let Some(twice) = list.iter().find(|s| !seen.insert(s.name.as_str())) {
        return Err(InvalidField::new(
            field,
            format!(
                "service {} is listed twice",
                crate::text::quote(&twice.name)
            ),
        ));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, s)| {
            let at = format!("{field}[{i}]");
            validate_name(&s.name).map_err(|r| InvalidField::new(format!("{at}.name"), r))?;
            if s.version.is_empty() || s.version.len() > MAX_NAME_LEN {
                return Err(InvalidField::new(
                    format!("{at}.version"),
                    "must be 1 to 128 characters",
                ));
            }
            Ok(ServiceStatus {
                name: s.name,
                version: s.version,
                state: service_state_from_i32(s.state, &format!("{at}.state"))?,
                healthy: s.healthy,
            })
        })
        .collect()
}

impl TryFrom<agent_pb::Hello> for HostInfo {
    type Error = InvalidField;
    fn try_from(h: agent_pb::Hello) -> Result<Self, Self::Error> {
        let host_id = HostId::try_from(h.host_id)
            .map_err(|e| InvalidField::new("hello.host_id", e.reason))?;
        let labels: Labels = h.labels.into_iter().collect();
        validate_labels(&labels)
            .map_err(|e| InvalidField::new(format!("hello.{}", e.field), e.reason))?;
        if h.agent_version.len() > MAX_NAME_LEN {
            return Err(InvalidField::new(
                "hello.agent_version",
                "is longer than 128 characters",
            ));
        }
        Ok(Self {
            host_id,
            agent_version: h.agent_version,
            labels,
            services: services_from_agent(h.services, "hello.services")?,
        })
    }
}

impl From<&HostInfo> for agent_pb::Hello {
    fn from(h: &HostInfo) -> Self {
        Self {
            host_id: h.host_id.to_string(),
            agent_version: h.agent_version.clone(),
            labels: h
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            services: h.services.iter().map(Into::into).collect(),
        }
    }
}

// ---- control.v1 conversions -----------------------------------------------

impl From<ServiceState> for control_pb::ServiceState {
    fn from(s: ServiceState) -> Self {
        match s {
            ServiceState::Stopped => Self::Stopped,
            ServiceState::Starting => Self::Starting,
            ServiceState::Running => Self::Running,
            ServiceState::Failed => Self::Failed,
        }
    }
}

impl From<&HostView> for control_pb::Host {
    fn from(h: &HostView) -> Self {
        Self {
            host_id: h.host_id.to_string(),
            connected: h.connected,
            labels: h
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            services: h
                .services
                .iter()
                .map(|s| control_pb::Service {
                    name: s.name.clone(),
                    version: s.version.clone(),
                    state: control_pb::ServiceState::from(s.state).into(),
                    healthy: s.healthy,
                })
                .collect(),
            agent_version: h.agent_version.clone(),
            first_seen: Some(to_timestamp(h.first_seen)),
            last_seen: Some(to_timestamp(h.last_seen)),
            peer_address: h.peer_address.clone(),
        }
    }
}

impl TryFrom<control_pb::Host> for HostView {
    type Error = InvalidField;
    fn try_from(h: control_pb::Host) -> Result<Self, Self::Error> {
        let services = h
            .services
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let state = match control_pb::ServiceState::try_from(s.state) {
                    Ok(control_pb::ServiceState::Stopped) => ServiceState::Stopped,
                    Ok(control_pb::ServiceState::Starting) => ServiceState::Starting,
                    Ok(control_pb::ServiceState::Running) => ServiceState::Running,
                    Ok(control_pb::ServiceState::Failed) => ServiceState::Failed,
                    _ => {
                        return Err(InvalidField::new(
                            format!("host.services[{i}].state"),
                            "unknown or unspecified",
                        ));
                    }
                };
                Ok(ServiceStatus {
                    name: s.name,
                    version: s.version,
                    state,
                    healthy: s.healthy,
                })
            })
            .collect::<Result<_, _>>()?;
        let time = |t: Option<prost_types::Timestamp>, field: &str| {
            t.as_ref()
                .and_then(from_timestamp)
                .ok_or_else(|| InvalidField::new(field, "missing or invalid timestamp"))
        };
        Ok(Self {
            host_id: HostId::try_from(h.host_id)?,
            connected: h.connected,
            labels: h.labels.into_iter().collect(),
            services,
            agent_version: h.agent_version,
            first_seen: time(h.first_seen, "host.first_seen")?,
            last_seen: time(h.last_seen, "host.last_seen")?,
            peer_address: h.peer_address,
            session: 0,
        })
    }
}

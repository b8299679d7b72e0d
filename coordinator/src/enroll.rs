//! Enrollment: one-time tokens with which new hosts get their first
//! certificate (`baton enroll create`, `baton-agent --enroll-token`), and
//! renewals before certificates expire. The coordinator signs with the
//! fleet CA's key (`ca-key.pem` in its TLS directory); the identity in a
//! certificate is always the coordinator's choice, never the request's.
//!
//! Tokens are stored by their SHA-256 (`enroll/<hex>`), never in clear;
//! a use is a transaction that marks the token used and records the host
//! as enrolled (`enrolled/<host>`) together, so a token works once and a
//! host id cannot be taken over.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_common::host::HostId;
use baton_common::pki::Ca;
use baton_common::time::{from_unix_millis, rfc3339, to_timestamp, unix_millis};
use baton_common::tls::{PeerIdentity, identity_from_der};
use baton_proto::agent::v1::{
    Certificate, EnrollRequest, RenewRequest, enrollment_service_server::EnrollmentService,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::audit::Audit;
use crate::store::{Compare, Op, Store, Txn};

const UNKNOWN_TOKEN: &str = "unknown enrollment token";

/// The longest a token may be good for.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Token {
    host_id: String,
    /// Unix milliseconds.
    expires: u64,
    used: bool,
    created_by: String,
    /// Once used: the key certified (hex of its DER) and the certificate,
    /// so a retry with the same key (an answer lost on the way) gets it
    /// again rather than a refusal.
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    cert_pem: Option<String>,
}

fn token_key(token: &str) -> String {
    format!("enroll/{}", baton_common::secret::stored_id(token))
}

fn enrolled_key(host: &HostId) -> String {
    format!("enrolled/{host}")
}

/// Issues tokens and certificates.
#[derive(Clone)]
pub struct Enrollment {
    store: Arc<dyn Store>,
    ca: Option<Arc<Ca>>,
    lifetime: Duration,
    audit: Audit,
}

impl Enrollment {
    /// Signs with `ca` (enrollment is off without one), certificates valid
    /// for `lifetime`.
    pub fn new(store: Arc<dyn Store>, ca: Option<Ca>, lifetime: Duration, audit: Audit) -> Self {
        Self {
            store,
            ca: ca.map(Arc::new),
            lifetime,
            audit,
        }
    }

    fn ca(&self) -> Result<&Ca, Status> {
        self.ca.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator cannot sign certificates: put the fleet CA's key (ca-key.pem) in its TLS directory",
            )
        })
    }

    async fn enrolled(&self, host: &HostId) -> Result<bool, Status> {
        let store = |e: crate::store::StoreError| Status::internal(e.to_string());
        Ok(self
            .store
            .get(&enrolled_key(host))
            .await
            .map_err(store)?
            .is_some()
            || self
                .store
                .get(&format!("hosts/{host}"))
                .await
                .map_err(store)?
                .is_some())
    }

    /// A token for `host`, good for `ttl`.
    pub async fn create(
        &self,
        host: &HostId,
        ttl: Duration,
        by: &str,
    ) -> Result<(String, SystemTime), Status> {
        self.ca()?;
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl {} is out of range: between 1s and 24h",
                humantime::format_duration(ttl)
            )));
        }
        if self.enrolled(host).await? {
            return Err(Status::failed_precondition(format!(
                "host {host} is already enrolled; a host id cannot be taken over"
            )));
        }
        let token = baton_common::secret::new_token("bt1-")
            .map_err(|e| Status::internal(format!("no enrollment token: {e}")))?;
        let expires = baton_common::time::later(SystemTime::now(), ttl);
        let record = Token {
            host_id: host.to_string(),
            expires: unix_millis(expires),
            used: false,
            created_by: by.to_owned(),
            key: None,
            cert_pem: None,
        };
        let value = serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?;
        self.store
            .put(&token_key(&token), value)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        info!(%host, expires = %rfc3339(expires), %by, "enrollment token created");
        Ok((token, expires))
    }

    /// Spends `token` on a certificate for `host_id`.
    async fn enroll(&self, req: &EnrollRequest) -> Result<Certificate, Status> {
        let ca = self.ca()?;
        // The token first: whatever else a caller without one sends is a
        // guess, answered the same way and never audited.
        let key = token_key(&req.token);
        let raw = self
            .store
            .get(&key)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::permission_denied(UNKNOWN_TOKEN))?;
        let host = HostId::try_from(req.host_id.as_str())
            .map_err(|e| Status::invalid_argument(format!("host id {}", e.reason)))?;
        let token: Token =
            serde_json::from_slice(&raw).map_err(|e| Status::internal(e.to_string()))?;
        let key_hex = baton_common::pki::csr_public_key(&req.csr_pem)
            .map(|k| baton_common::hex::encode(&k))
            .map_err(|e| Status::invalid_argument(format!("cannot read the request: {e}")))?;
        if token.used {
            if let (Some(k), Some(cert)) = (&token.key, &token.cert_pem)
                && *k == key_hex
                && token.host_id == host.as_str()
            {
                info!(%host, "enrollment retried with the same key; answering again");
                return Ok(Certificate {
                    cert_pem: cert.clone(),
                    not_after: baton_common::tls::cert_validity(cert.as_bytes())
                        .map(|(_, until)| to_timestamp(until)),
                });
            }
            return Err(Status::permission_denied(
                "this enrollment token was already used",
            ));
        }
        if from_unix_millis(token.expires) <= SystemTime::now() {
            return Err(Status::permission_denied(format!(
                "this enrollment token expired at {}",
                rfc3339(from_unix_millis(token.expires))
            )));
        }
        if token.host_id != host.as_str() {
            return Err(Status::permission_denied(format!(
                "this enrollment token is for host {}, not {host}",
                token.host_id
            )));
        }
        if self.enrolled(&host).await? {
            return Err(Status::permission_denied(format!(
                "host {host} is already enrolled; a host id cannot be taken over"
            )));
        }
        let cert = self.sign(ca, &req.csr_pem, &host)?;
        let used = serde_json::to_vec(&Token {
            used: true,
            key: Some(key_hex),
            cert_pem: Some(cert.cert_pem.clone()),
            ..token
        })
        .map_err(|e| Status::internal(e.to_string()))?;
        let claimed = self
            .store
            .txn(Txn {
                compares: vec![
                    Compare::Equals(key.clone(), raw),
                    Compare::Absent(enrolled_key(&host)),
                ],
                ops: vec![
                    Op::Put(key, used),
                    Op::Put(enrolled_key(&host), rfc3339(SystemTime::now()).into_bytes()),
                ],
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if !claimed {
            return Err(Status::permission_denied(
                "this enrollment token was used at the same moment by another request",
            ));
        }
        info!(%host, "host enrolled");
        Ok(cert)
    }

    fn sign(&self, ca: &Ca, csr: &str, host: &HostId) -> Result<Certificate, Status> {
        let cert_pem = ca
            .sign_agent(csr, host, self.lifetime)
            .map_err(|e| Status::invalid_argument(format!("cannot sign the request: {e}")))?;
        Ok(Certificate {
            cert_pem,
            not_after: Some(to_timestamp(baton_common::time::later(
                SystemTime::now(),
                self.lifetime,
            ))),
        })
    }
}

/// `baton.agent.v1.EnrollmentService`.
pub struct EnrollmentApi(pub Enrollment);

#[tonic::async_trait]
impl EnrollmentService for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<Certificate>, Status> {
        let from = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
        let req = request.into_inner();
        let host = baton_common::text::quote(&req.host_id);
        // The caller is its address: what it claims (a host id) is in the
        // entry, but it cannot make every attempt a caller of its own and
        // so escape the audit log's rate.
        let who = format!("an enrollment from {from}");
        let result = self.0.enroll(&req).await;
        let (outcome, error) = match &result {
            Ok(_) => ("ok", format!("host {host}")),
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                ("denied", format!("host {host}: {}", s.message()))
            }
            Err(s) => ("failed", format!("host {host}: {}", s.message())),
        };
        if let Err(s) = &result {
            // Guesses come from anyone: warned of once a second at most.
            static WARNED: baton_common::time::Throttle = baton_common::time::Throttle::new();
            if WARNED.allow(std::time::Duration::from_secs(1)) {
                warn!(%who, %host, reason = %s.message(), "refused an enrollment (more this second are logged at debug level)");
            } else {
                tracing::debug!(%who, %host, reason = %s.message(), "refused an enrollment");
            }
        }
        // Guesses with no real token are logged, not stored: anyone may
        // call this, and the store must not be theirs to fill.
        let known = !matches!(&result, Err(s) if s.message() == UNKNOWN_TOKEN);
        if known {
            let audit = self.0.audit.clone();
            tokio::spawn(async move { audit.record(&who, "", "Enroll", outcome, &error).await });
        }
        result.map(Response::new)
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<Certificate>, Status> {
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| identity_from_der(c.as_ref())));
        let host = match peer {
            Some(Ok(PeerIdentity::Agent(host))) => host,
            _ => {
                return Err(Status::permission_denied(
                    "only an agent may renew, and only its own certificate",
                ));
            }
        };
        let ca = self.0.ca()?;
        // Only hosts this fleet knows (enrolled, or registered) renew.
        let result = match self.0.enrolled(&host).await {
            Ok(true) => self.0.sign(ca, &request.into_inner().csr_pem, &host),
            Ok(false) => Err(Status::permission_denied(format!(
                "host {host} is not enrolled here"
            ))),
            Err(e) => Err(e),
        };
        let error = result
            .as_ref()
            .err()
            .map(|s| s.message().to_owned())
            .unwrap_or_default();
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.0
            .audit
            .record(&format!("agent {host}"), "", "Renew", outcome, &error)
            .await;
        if result.is_ok() {
            info!(%host, "agent certificate renewed");
        }
        result.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    async fn enrollment(dir: &std::path::Path) -> Enrollment {
        baton_common::pki::init(&dir.join("tls"), &[]).unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.join("db")).unwrap());
        let ca = Ca::load(&dir.join("tls")).unwrap();
        Enrollment::new(
            store.clone(),
            ca,
            Duration::from_secs(600),
            Audit::new(store),
        )
    }

    fn request(token: &str, host: &str, key_pem: &str) -> EnrollRequest {
        EnrollRequest {
            token: token.into(),
            host_id: host.into(),
            csr_pem: baton_common::pki::csr_for(key_pem).unwrap(),
        }
    }

    #[tokio::test]
    async fn a_token_works_once_for_its_host_and_a_lost_answer_can_be_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrollment(dir.path()).await;
        let h1 = HostId::try_from("h1").unwrap();
        let (token, _) = e
            .create(&h1, Duration::from_secs(60), "test")
            .await
            .unwrap();
        let (key, _) = baton_common::pki::agent_csr().unwrap();

        let err = e.enroll(&request(&token, "h2", &key)).await.unwrap_err();
        assert!(err.message().contains("is for host h1, not h2"), "{err}");
        let first = e.enroll(&request(&token, "h1", &key)).await.unwrap();
        assert_eq!(
            baton_common::tls::identity_from_pem(first.cert_pem.as_bytes()).unwrap(),
            PeerIdentity::Agent(h1.clone())
        );
        // The same key again (the answer was lost): the same certificate.
        let again = e.enroll(&request(&token, "h1", &key)).await.unwrap();
        assert_eq!(again.cert_pem, first.cert_pem);
        // Another key with the spent token: refused.
        let (other, _) = baton_common::pki::agent_csr().unwrap();
        let err = e.enroll(&request(&token, "h1", &other)).await.unwrap_err();
        assert!(err.message().contains("already used"), "{err}");
        // h1 cannot be taken over with a new token either.
        let err = e
            .create(&h1, Duration::from_secs(60), "test")
            .await
            .unwrap_err();
        assert!(err.message().contains("already enrolled"), "{err}");
        // Guessing gets nothing.
        let err = e
            .enroll(&request("bt1-nope", "h3", &other))
            .await
            .unwrap_err();
        assert_eq!(err.message(), UNKNOWN_TOKEN);
    }
}

//! Enrollment: tokens with which new hosts get their first certificate
//! (`baton enroll create`, `baton-agent enroll`), and renewals before
//! certificates expire. The coordinator signs with the fleet CA's key
//! (`ca-key.pem` in its TLS directory); the identity in a certificate is
//! always a host id the token allows, never one already enrolled.
//!
//! Tokens are stored by their SHA-256 (`enroll/<hex>`), never in clear. A
//! token names one host, or allows up to `uses` hosts whatever their ids.
//! Each use is its own record (`enroll-use/<token hex>/<host>`, with the key
//! it certified), written in one transaction with the token's count and the
//! host's `enrolled/<host>` mark: a token is never used more often than it
//! says, a host id cannot be taken over, and a retry with the same key (an
//! answer lost on the way) gets the same certificate again. A token created
//! with `approve` parks each host as pending (`enroll-pending/<host>`) until
//! an operator accepts or rejects it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_common::host::{HostId, Labels, validate_labels};
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
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most hosts one token may enroll.
pub const MAX_TOKEN_USES: u32 = 10_000;

/// The most hosts waiting for approval at once, whatever the tokens.
pub const MAX_PENDING: usize = 10_000;

/// How often a use retries when other hosts use the same token at the
/// same moment (each round one of them wins).
const MAX_ATTEMPTS: usize = 2_000;

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Token {
    /// The one host it is for; `None`: any host id, up to `uses` of them.
    #[serde(default)]
    host_id: Option<String>,
    /// Unix milliseconds.
    expires: u64,
    /// Spent: every use taken.
    used: bool,
    created_by: String,
    /// How many hosts may use it.
    #[serde(default = "one")]
    uses: u32,
    /// How many have.
    #[serde(default)]
    spent: u32,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    approve: bool,
    /// Tokens written before uses had records of their own kept the key
    /// certified (hex of its DER) and the certificate here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cert_pem: Option<String>,
}

/// Where one use of a token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum UseState {
    Pending,
    Accepted,
    Rejected,
}

impl UseState {
    fn as_str(self) -> &'static str {
        match self {
            UseState::Pending => "pending",
            UseState::Accepted => "accepted",
            UseState::Rejected => "rejected",
        }
    }
}

/// One host's use of a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Use {
    state: UseState,
    /// The key certified (hex of its DER).
    key: String,
    /// The request, kept while pending.
    #[serde(default)]
    csr_pem: String,
    #[serde(default)]
    cert_pem: String,
    labels: Labels,
    from: String,
    /// Unix milliseconds.
    at: u64,
}

fn token_key(token: &str) -> String {
    format!("enroll/{}", token_id(token))
}

fn token_id(token: &str) -> String {
    baton_common::secret::stored_id(token)
}

fn use_key(token_id: &str, host: &HostId) -> String {
    format!("enroll-use/{token_id}/{host}")
}

fn pending_key(host: &HostId) -> String {
    format!("enroll-pending/{host}")
}

fn enrolled_key(host: &HostId) -> String {
    format!("enrolled/{host}")
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// What `create` made.
#[derive(Debug, Clone)]
pub struct Created {
    /// The secret.
    pub token: String,
    /// The secret and the CA's fingerprint: what `baton-agent enroll` takes.
    pub join_token: String,
    /// When it stops working.
    pub expires: SystemTime,
    /// How many hosts may use it.
    pub uses: u32,
}

/// What a new token allows.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    /// The one host it is for; `None` for any `uses` hosts.
    pub host: Option<HostId>,
    /// How long it is good for.
    pub ttl: Duration,
    /// How many hosts may use it; 0 means 1.
    pub uses: u32,
    /// Granted to every host enrolling with it.
    pub labels: Labels,
    /// Hosts wait as pending until an operator decides.
    pub approve: bool,
}

/// A host waiting for, or given, an operator's decision.
#[derive(Debug, Clone)]
pub struct PendingHost {
    /// Its host id.
    pub host: String,
    /// The address it asked from.
    pub from: String,
    /// When it asked.
    pub at: SystemTime,
    /// The labels its token grants.
    pub labels: Labels,
    /// The SHA-256 of the key it asked a certificate for.
    pub key_sha256: String,
    /// `pending`, `accepted` or `rejected`.
    pub state: &'static str,
}

/// Issues tokens and certificates.
#[derive(Clone)]
pub struct Enrollment {
    store: Arc<dyn Store>,
    ca: Option<Arc<Ca>>,
    /// The SHA-256 of the CA certificate's DER, hex.
    ca_sha256: String,
    lifetime: Duration,
    audit: Audit,
}

impl Enrollment {
    /// Signs with `ca` (enrollment is off without one), certificates valid
    /// for `lifetime`; `ca_sha256` is the fingerprint join tokens carry.
    pub fn new(
        store: Arc<dyn Store>,
        ca: Option<Ca>,
        ca_sha256: String,
        lifetime: Duration,
        audit: Audit,
    ) -> Self {
        Self {
            store,
            ca: ca.map(Arc::new),
            ca_sha256,
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
        Ok(self
            .store
            .get(&enrolled_key(host))
            .await
            .map_err(internal)?
            .is_some()
            || self
                .store
                .get(&format!("hosts/{host}"))
                .await
                .map_err(internal)?
                .is_some())
    }

    /// A token as `spec` says.
    pub async fn create(&self, spec: TokenSpec, by: &str) -> Result<Created, Status> {
        self.ca()?;
        let ttl = spec.ttl;
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl {} is out of range: between 1s and 7days",
                humantime::format_duration(ttl)
            )));
        }
        let uses = spec.uses.max(1);
        if uses > MAX_TOKEN_USES {
            return Err(Status::invalid_argument(format!(
                "uses {uses} is out of range: between 1 and {MAX_TOKEN_USES}"
            )));
        }
        if uses > 1 && spec.host.is_some() {
            return Err(Status::invalid_argument(
                "a token for a named host is good for one use: give either a host id or a count of uses",
            ));
        }
        validate_labels(&spec.labels)
            .map_err(|e| Status::invalid_argument(format!("labels: {e}")))?;
        if let Some(host) = &spec.host
            && self.enrolled(host).await?
        {
            return Err(Status::failed_precondition(format!(
                "host {host} is already enrolled; a host id cannot be taken over"
            )));
        }
        let token = baton_common::secret::new_token("bt1-")
            .map_err(|e| Status::internal(format!("no enrollment token: {e}")))?;
        let expires = baton_common::time::later(SystemTime::now(), ttl);
        let record = Token {
            host_id: spec.host.as_ref().map(ToString::to_string),
            expires: unix_millis(expires),
            used: false,
            created_by: by.to_owned(),
            uses,
            spent: 0,
            labels: spec.labels,
            approve: spec.approve,
            key: None,
            cert_pem: None,
        };
        let value = serde_json::to_vec(&record).map_err(internal)?;
        self.store
            .put(&token_key(&token), value)
            .await
            .map_err(internal)?;
        info!(host = ?record.host_id, uses, approve = record.approve, expires = %rfc3339(expires), %by, "enrollment token created");
        let join_token = if self.ca_sha256.is_empty() {
            token.clone()
        } else {
            format!("{token}.{}", self.ca_sha256)
        };
        Ok(Created {
            token,
            join_token,
            expires,
            uses,
        })
    }

    /// Spends one use of the request's token on a certificate (or a place
    /// in the queue of hosts awaiting approval) for its host id.
    async fn enroll(&self, req: &EnrollRequest, from: &str) -> Result<Certificate, Status> {
        let ca = self.ca()?;
        // The token first: whatever else a caller without one sends is a
        // guess, answered the same way and never audited.
        let key = token_key(&req.token);
        let tid = token_id(&req.token);
        if self.store.get(&key).await.map_err(internal)?.is_none() {
            return Err(Status::permission_denied(UNKNOWN_TOKEN));
        }
        let host = HostId::try_from(req.host_id.as_str())
            .map_err(|e| Status::invalid_argument(format!("host id {}", e.reason)))?;
        let key_hex = baton_common::pki::csr_public_key(&req.csr_pem)
            .map(|k| baton_common::hex::encode(&k))
            .map_err(|e| Status::invalid_argument(format!("cannot read the request: {e}")))?;
        for _ in 0..MAX_ATTEMPTS {
            let raw = self
                .store
                .get(&key)
                .await
                .map_err(internal)?
                .ok_or_else(|| Status::permission_denied(UNKNOWN_TOKEN))?;
            let token: Token = serde_json::from_slice(&raw).map_err(internal)?;
            // A host asking again: the answer it was given (or is owed).
            let ukey = use_key(&tid, &host);
            if let Some(prior) = self.store.get(&ukey).await.map_err(internal)? {
                let prior: Use = serde_json::from_slice(&prior).map_err(internal)?;
                if prior.key != key_hex {
                    return Err(Status::permission_denied(format!(
                        "this enrollment token was already used by host {host}, with another key"
                    )));
                }
                return match prior.state {
                    UseState::Accepted => {
                        info!(%host, "enrollment asked again with the same key; answering again");
                        Ok(self.certificate(prior.cert_pem, prior.labels))
                    }
                    UseState::Pending => Ok(Certificate {
                        pending: true,
                        labels: prior.labels.into_iter().collect(),
                        ..Certificate::default()
                    }),
                    UseState::Rejected => Err(Status::permission_denied(format!(
                        "an operator rejected host {host}'s enrollment"
                    ))),
                };
            }
            // Tokens from before uses had records of their own.
            if let (Some(k), Some(cert)) = (&token.key, &token.cert_pem)
                && *k == key_hex
                && token.host_id.as_deref() == Some(host.as_str())
            {
                info!(%host, "enrollment retried with the same key; answering again");
                return Ok(self.certificate(cert.clone(), token.labels.clone()));
            }
            if token.used || token.spent >= token.uses {
                return Err(Status::permission_denied(if token.uses > 1 {
                    format!("all {} uses of this enrollment token are spent", token.uses)
                } else {
                    "this enrollment token was already used".to_owned()
                }));
            }
            if from_unix_millis(token.expires) <= SystemTime::now() {
                return Err(Status::permission_denied(format!(
                    "this enrollment token expired at {}",
                    rfc3339(from_unix_millis(token.expires))
                )));
            }
            if let Some(only) = &token.host_id
                && only != host.as_str()
            {
                return Err(Status::permission_denied(format!(
                    "this enrollment token is for host {only}, not {host}"
                )));
            }
            if self.enrolled(&host).await? {
                return Err(Status::permission_denied(format!(
                    "host {host} is already enrolled; a host id cannot be taken over"
                )));
            }
            let spent = token.spent + 1;
            let counted = Token {
                spent,
                used: spent >= token.uses,
                ..token.clone()
            };
            let now = SystemTime::now();
            let mut record = Use {
                state: UseState::Accepted,
                key: key_hex.clone(),
                csr_pem: String::new(),
                cert_pem: String::new(),
                labels: token.labels.clone(),
                from: from.to_owned(),
                at: unix_millis(now),
            };
            let mut compares = vec![
                Compare::Equals(key.clone(), raw),
                Compare::Absent(ukey.clone()),
                Compare::Absent(enrolled_key(&host)),
            ];
            let mut ops = vec![Op::Put(
                key.clone(),
                serde_json::to_vec(&counted).map_err(internal)?,
            )];
            let answer = if token.approve {
                if self
                    .store
                    .list("enroll-pending/")
                    .await
                    .map_err(internal)?
                    .len()
                    >= MAX_PENDING
                {
                    return Err(Status::resource_exhausted(format!(
                        "{MAX_PENDING} hosts already wait for approval: accept or reject some first (baton enroll pending)"
                    )));
                }
                record.state = UseState::Pending;
                record.csr_pem = req.csr_pem.clone();
                compares.push(Compare::Absent(pending_key(&host)));
                ops.push(Op::Put(pending_key(&host), tid.clone().into_bytes()));
                Certificate {
                    pending: true,
                    labels: token.labels.clone().into_iter().collect(),
                    ..Certificate::default()
                }
            } else {
                let cert = self.sign(ca, &req.csr_pem, &host)?;
                record.cert_pem = cert.cert_pem.clone();
                ops.push(Op::Put(enrolled_key(&host), rfc3339(now).into_bytes()));
                Certificate {
                    labels: token.labels.clone().into_iter().collect(),
                    ..cert
                }
            };
            ops.push(Op::Put(
                ukey,
                serde_json::to_vec(&record).map_err(internal)?,
            ));
            if self
                .store
                .txn(Txn { compares, ops })
                .await
                .map_err(internal)?
            {
                if answer.pending {
                    info!(%host, %from, "host waits for an operator to accept its enrollment");
                } else {
                    info!(%host, %from, "host enrolled");
                }
                return Ok(answer);
            }
            // Another host took a use at the same moment (or this one
            // asked twice at once): look again.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(1..10))).await;
        }
        Err(Status::unavailable(
            "too many hosts are using this enrollment token at once; try again",
        ))
    }

    fn certificate(&self, cert_pem: String, labels: Labels) -> Certificate {
        Certificate {
            not_after: baton_common::tls::cert_validity(cert_pem.as_bytes())
                .map(|(_, until)| to_timestamp(until)),
            cert_pem,
            labels: labels.into_iter().collect(),
            pending: false,
        }
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
            labels: BTreeMap::new().into_iter().collect(),
            pending: false,
        })
    }

    /// The hosts waiting for approval, oldest first.
    pub async fn pending(&self) -> Result<Vec<PendingHost>, Status> {
        let mut out = Vec::new();
        for (key, tid) in self.store.list("enroll-pending/").await.map_err(internal)? {
            let Some(host) = key
                .strip_prefix("enroll-pending/")
                .and_then(|h| HostId::try_from(h).ok())
            else {
                continue;
            };
            let tid = String::from_utf8_lossy(&tid).into_owned();
            if let Some((_, record)) = self.read_use(&tid, &host).await? {
                out.push(pending_view(&host, &record));
            }
        }
        out.sort_by_key(|p| p.at);
        Ok(out)
    }

    async fn read_use(&self, tid: &str, host: &HostId) -> Result<Option<(Vec<u8>, Use)>, Status> {
        match self
            .store
            .get(&use_key(tid, host))
            .await
            .map_err(internal)?
        {
            Some(raw) => {
                let record = serde_json::from_slice(&raw).map_err(internal)?;
                Ok(Some((raw, record)))
            }
            None => Ok(None),
        }
    }

    /// Accepts (signs its certificate) or rejects the pending `host`.
    pub async fn decide(&self, host: &HostId, accept: bool) -> Result<PendingHost, Status> {
        let ca = self.ca()?;
        let not_pending = || Status::not_found(format!("host {host} is not waiting for approval"));
        let tid = self
            .store
            .get(&pending_key(host))
            .await
            .map_err(internal)?
            .ok_or_else(not_pending)?;
        let tid = String::from_utf8_lossy(&tid).into_owned();
        let (raw, record) = self.read_use(&tid, host).await?.ok_or_else(not_pending)?;
        if record.state != UseState::Pending {
            return Err(not_pending());
        }
        let mut ops = vec![Op::Delete(pending_key(host))];
        let mut compares = vec![Compare::Equals(use_key(&tid, host), raw)];
        let decided = if accept {
            if self.enrolled(host).await? {
                return Err(Status::failed_precondition(format!(
                    "host {host} is already enrolled; a host id cannot be taken over (reject this request)"
                )));
            }
            let cert = self.sign(ca, &record.csr_pem, host)?;
            compares.push(Compare::Absent(enrolled_key(host)));
            ops.push(Op::Put(
                enrolled_key(host),
                rfc3339(SystemTime::now()).into_bytes(),
            ));
            Use {
                state: UseState::Accepted,
                cert_pem: cert.cert_pem,
                csr_pem: String::new(),
                ..record
            }
        } else {
            Use {
                state: UseState::Rejected,
                csr_pem: String::new(),
                ..record
            }
        };
        ops.push(Op::Put(
            use_key(&tid, host),
            serde_json::to_vec(&decided).map_err(internal)?,
        ));
        if !self
            .store
            .txn(Txn { compares, ops })
            .await
            .map_err(internal)?
        {
            return Err(Status::aborted(format!(
                "host {host}'s enrollment changed at the same moment; look again"
            )));
        }
        info!(%host, accepted = accept, "enrollment decided");
        Ok(pending_view(host, &decided))
    }
}

fn pending_view(host: &HostId, record: &Use) -> PendingHost {
    let key_sha256 = baton_common::hex::decode(&record.key)
        .map(|der| baton_common::hex::sha256_hex(&der))
        .unwrap_or_default();
    PendingHost {
        host: host.to_string(),
        from: record.from.clone(),
        at: from_unix_millis(record.at),
        labels: record.labels.clone(),
        key_sha256,
        state: record.state.as_str(),
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
        let result = self.0.enroll(&req, &from).await;
        let (outcome, error) = match &result {
            Ok(c) if c.pending => ("pending", format!("host {host} waits for approval")),
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
            "ab".repeat(32),
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

    fn for_host(host: &HostId) -> TokenSpec {
        TokenSpec {
            host: Some(host.clone()),
            ttl: Duration::from_secs(60),
            ..TokenSpec::default()
        }
    }

    #[tokio::test]
    async fn a_token_works_once_for_its_host_and_a_lost_answer_can_be_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrollment(dir.path()).await;
        let h1 = HostId::try_from("h1").unwrap();
        let created = e.create(for_host(&h1), "test").await.unwrap();
        let token = created.token;
        assert_eq!(created.join_token, format!("{token}.{}", "ab".repeat(32)));
        let (key, _) = baton_common::pki::agent_csr().unwrap();

        let err = e
            .enroll(&request(&token, "h2", &key), "t")
            .await
            .unwrap_err();
        assert!(err.message().contains("is for host h1, not h2"), "{err}");
        let first = e.enroll(&request(&token, "h1", &key), "t").await.unwrap();
        assert_eq!(
            baton_common::tls::identity_from_pem(first.cert_pem.as_bytes()).unwrap(),
            PeerIdentity::Agent(h1.clone())
        );
        // The same key again (the answer was lost): the same certificate.
        let again = e.enroll(&request(&token, "h1", &key), "t").await.unwrap();
        assert_eq!(again.cert_pem, first.cert_pem);
        // Another key with the spent token: refused.
        let (other, _) = baton_common::pki::agent_csr().unwrap();
        let err = e
            .enroll(&request(&token, "h1", &other), "t")
            .await
            .unwrap_err();
        assert!(
            err.message()
                .contains("already used by host h1, with another key"),
            "{err}"
        );
        // h1 cannot be taken over with a new token either.
        let err = e.create(for_host(&h1), "test").await.unwrap_err();
        assert!(err.message().contains("already enrolled"), "{err}");
        // Guessing gets nothing.
        let err = e
            .enroll(&request("bt1-nope", "h3", &other), "t")
            .await
            .unwrap_err();
        assert_eq!(err.message(), UNKNOWN_TOKEN);
    }

    #[tokio::test]
    async fn a_token_for_many_hosts_is_used_as_often_as_it_says_and_grants_its_labels() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrollment(dir.path()).await;
        let labels: Labels = [("role".to_owned(), "api".to_owned())].into();
        let spec = TokenSpec {
            ttl: Duration::from_secs(60),
            uses: 3,
            labels: labels.clone(),
            ..TokenSpec::default()
        };
        let token = e.create(spec, "test").await.unwrap().token;
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (e, token) = (e.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let (key, _) = baton_common::pki::agent_csr().unwrap();
                e.enroll(&request(&token, &format!("m{i}"), &key), "t")
                    .await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(cert) => {
                    ok += 1;
                    assert_eq!(cert.labels.get("role").map(String::as_str), Some("api"));
                }
                Err(s) => assert!(s.message().contains("all 3 uses"), "{s}"),
            }
        }
        assert_eq!(ok, 3, "exactly as many hosts as the token allows");
        // Out of range.
        for (uses, ttl) in [(MAX_TOKEN_USES + 1, 60), (2, 8 * 24 * 3600)] {
            let spec = TokenSpec {
                ttl: Duration::from_secs(ttl),
                uses,
                ..TokenSpec::default()
            };
            assert_eq!(
                e.create(spec, "t").await.unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
        let spec = TokenSpec {
            uses: 2,
            ..for_host(&HostId::try_from("solo").unwrap())
        };
        assert!(
            e.create(spec, "t")
                .await
                .unwrap_err()
                .message()
                .contains("one use")
        );
    }

    #[tokio::test]
    async fn hosts_wait_for_approval_when_the_token_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrollment(dir.path()).await;
        let spec = TokenSpec {
            ttl: Duration::from_secs(60),
            uses: 10,
            approve: true,
            ..TokenSpec::default()
        };
        let token = e.create(spec, "test").await.unwrap().token;
        let (ka, _) = baton_common::pki::agent_csr().unwrap();
        let (kb, _) = baton_common::pki::agent_csr().unwrap();
        let a = e
            .enroll(&request(&token, "a", &ka), "10.0.0.1")
            .await
            .unwrap();
        assert!(a.pending && a.cert_pem.is_empty());
        assert!(
            e.enroll(&request(&token, "b", &kb), "t")
                .await
                .unwrap()
                .pending
        );
        let listed = e.pending().await.unwrap();
        assert_eq!(
            listed.iter().map(|p| p.host.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(listed[0].from, "10.0.0.1");
        assert_eq!(listed[0].key_sha256.len(), 64);
        // Still pending when asked again; accepted, then the certificate.
        assert!(
            e.enroll(&request(&token, "a", &ka), "t")
                .await
                .unwrap()
                .pending
        );
        let ha = HostId::try_from("a").unwrap();
        assert_eq!(e.decide(&ha, true).await.unwrap().state, "accepted");
        let cert = e.enroll(&request(&token, "a", &ka), "t").await.unwrap();
        assert!(!cert.pending);
        assert_eq!(
            baton_common::tls::identity_from_pem(cert.cert_pem.as_bytes()).unwrap(),
            PeerIdentity::Agent(ha.clone())
        );
        // Rejected: refused for good; deciding twice is not found.
        let hb = HostId::try_from("b").unwrap();
        assert_eq!(e.decide(&hb, false).await.unwrap().state, "rejected");
        let err = e.enroll(&request(&token, "b", &kb), "t").await.unwrap_err();
        assert!(err.message().contains("rejected"), "{err}");
        assert_eq!(
            e.decide(&hb, true).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert!(e.pending().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_token_stored_by_an_older_batond_still_answers_its_retry() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrollment(dir.path()).await;
        let (key, _) = baton_common::pki::agent_csr().unwrap();
        let csr = baton_common::pki::csr_for(&key).unwrap();
        let key_hex = baton_common::hex::encode(&baton_common::pki::csr_public_key(&csr).unwrap());
        let old = serde_json::json!({
            "host_id": "old", "expires": unix_millis(SystemTime::now()) + 60_000,
            "used": true, "created_by": "x", "key": key_hex, "cert_pem": "PEM",
        });
        e.store
            .put(&token_key("bt1-old"), serde_json::to_vec(&old).unwrap())
            .await
            .unwrap();
        let answer = e
            .enroll(&request("bt1-old", "old", &key), "t")
            .await
            .unwrap();
        assert_eq!(answer.cert_pem, "PEM");
        let (other, _) = baton_common::pki::agent_csr().unwrap();
        let err = e
            .enroll(&request("bt1-old", "old", &other), "t")
            .await
            .unwrap_err();
        assert!(err.message().contains("already used"), "{err}");
    }
}

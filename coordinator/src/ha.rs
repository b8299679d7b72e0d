//! Several coordinators on one etcd (`batond --store etcd://…`, built with
//! the `etcd` feature): one leads, the others follow.
//!
//! - **Election.** Every `batond` holds an etcd lease (`--lease-ttl`,
//!   renewed every third of it) and tries to create `/baton/leader` bound
//!   to that lease, holding its advertised URL. Whoever creates it leads;
//!   the others look again every [`POLL`]. When the leader dies or is cut
//!   off, its lease expires, etcd deletes the key and a follower takes over
//!   within the TTL plus a poll.
//! - **Fencing.** The leader's store ([`FencedStore`]) adds a compare to
//!   every transaction: the leader key's `create_revision` must be the one
//!   this coordinator created. A former leader that was paused past its
//!   lease and wakes up writes nothing; its first rejected write (or the
//!   failed renewal) ends its leadership, and `batond` exits so that its
//!   supervisor starts it again as a follower.
//! - **Followers** serve the same port: every Baton RPC is answered
//!   `UNAVAILABLE` with the leader's URL in the `baton-leader` header
//!   (health answers too, with the header), so agents and the CLI given
//!   several URLs find the leader.
//! - **Payloads.** etcd holds the artifact index; each follower copies
//!   every payload it lacks from the leader (as a coordinator client over
//!   mutual TLS, digest checked), so a later leader serves what an earlier
//!   one received. See ARCHITECTURE.md for why copies and not etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_common::tls::ClientTls;
use baton_proto::agent::v1::FetchRequest;
use baton_proto::agent::v1::artifact_service_client::ArtifactServiceClient;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::Endpoint;
use tonic_health::ServingStatus;
use tracing::{debug, error, info, warn};

use crate::artifacts::Artifacts;
use crate::health::SERVICES;
use crate::store::{EtcdStore, Fence, FencedStore};

/// The leader key, under `/baton/`.
pub const LEADER_KEY: &str = "leader";
/// The response header naming the leader's URL.
pub const LEADER_HEADER: &str = "baton-leader";
/// How often a follower tries to become the leader.
const POLL: Duration = Duration::from_millis(300);
/// How often a follower looks for payloads to copy.
const COPY_EVERY: Duration = Duration::from_secs(1);
/// A copy from the leader that stalls this long is abandoned (and retried).
const STALL: Duration = Duration::from_secs(30);
/// How long the follower's connections get to close once it leads.
const FOLLOWER_DRAIN: Duration = Duration::from_secs(1);

/// This coordinator leads: its fenced store, and the token cancelled when
/// it stops leading.
pub struct Leadership {
    /// Writes that only apply while this coordinator leads.
    pub store: FencedStore,
    /// Cancelled when the lease ends or a write is fenced off.
    pub lost: CancellationToken,
    client: etcd_client::Client,
    lease: Lease,
}

impl Leadership {
    /// Leads with the leader key created at `revision` under `lease`.
    fn new(etcd: &EtcdStore, lease: Lease, revision: i64) -> Self {
        let lost = lease.lost.clone();
        Self {
            store: FencedStore::new(
                etcd.clone(),
                Fence {
                    key: LEADER_KEY.to_owned(),
                    revision,
                },
                lost.clone(),
            ),
            lost,
            client: etcd.client(),
            lease,
        }
    }

    /// Gives the leadership up at once (on shutdown), so a follower takes
    /// over without waiting for the lease to expire.
    pub async fn resign(mut self) {
        match self.client.lease_revoke(self.lease.id).await {
            Ok(_) => info!("resigned the leadership"),
            Err(e) => warn!(error = %e, "cannot resign the leadership; it ends with the lease"),
        }
    }
}

/// A lease kept alive in the background; `lost` is cancelled when it
/// could not be renewed for a whole TTL, or etcd says it expired.
struct Lease {
    id: i64,
    lost: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

async fn grant(client: &etcd_client::Client, ttl: Duration) -> Result<Lease, etcd_client::Error> {
    let mut c = client.clone();
    let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
    let id = c.lease_grant(secs, None).await?.id();
    let lost = CancellationToken::new();
    let token = lost.clone();
    let keeper = tokio::spawn(async move {
        let every = ttl / 3;
        // When the last renewal that etcd granted was *asked for*: the
        // lease lasts at most TTL from then, whatever the answer's delay.
        let mut renewed = Instant::now();
        let mut stream = None;
        loop {
            tokio::time::sleep(every).await;
            // Also true right after this process was paused past its TTL.
            if renewed.elapsed() >= ttl {
                error!(lease = id, "the lease was not renewed within its TTL");
                token.cancel();
                return;
            }
            let asked = Instant::now();
            if stream.is_none() {
                stream = tokio::time::timeout(every, c.lease_keep_alive(id))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            let Some((keeper, responses)) = stream.as_mut() else {
                continue;
            };
            let renewal = tokio::time::timeout(every, async {
                keeper.keep_alive().await?;
                responses.message().await
            })
            .await;
            match renewal {
                Ok(Ok(Some(r))) if r.ttl() > 0 => renewed = asked,
                Ok(Ok(Some(_))) => {
                    error!(lease = id, "etcd says the lease expired");
                    token.cancel();
                    return;
                }
                other => {
                    debug!(lease = id, result = ?other.map(|r| r.map(|_| ())), "lease renewal failed; retrying");
                    stream = None;
                }
            }
        }
    });
    Ok(Lease { id, lost, keeper })
}

/// A coordinator that would lead.
pub struct Candidate {
    /// The shared store.
    pub etcd: EtcdStore,
    /// Its artifact store (over the unfenced store: followers only read).
    pub artifacts: Artifacts,
    /// Where others reach it.
    pub url: String,
    /// The lease's TTL.
    pub ttl: Duration,
    /// Its coordinator certificate as a client, to copy payloads.
    pub client_tls: ClientTls,
}

/// Serves as a follower on `listener` (and copies payloads from the
/// leader) until this coordinator leads; `None` if `shutdown` comes first.
pub async fn follow_then_lead(
    me: Candidate,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    listener: Arc<TcpListener>,
    shutdown: CancellationToken,
) -> Result<Option<Leadership>, tonic::transport::Error> {
    let Candidate {
        etcd,
        artifacts,
        url,
        ttl,
        client_tls,
    } = me;
    let (leader_tx, leader_rx) = watch::channel(None::<String>);
    let stop = CancellationToken::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICES {
        health
            .set_service_status(*name, ServingStatus::NotServing)
            .await;
    }
    let split = crate::listener::accept(listener, tls, stop.clone());
    let follower = crate::limits::server()
        .layer(FollowerLayer {
            leader: leader_rx.clone(),
        })
        .add_service(health_service.clone())
        .serve_with_incoming_shutdown(split.certified, stop.clone().cancelled_owned());
    // A host enrolling meanwhile is told where the leader is, too.
    let anonymous = crate::limits::anonymous_server()
        .layer(FollowerLayer {
            leader: leader_rx.clone(),
        })
        .add_service(health_service)
        .serve_with_incoming_shutdown(split.anonymous, stop.clone().cancelled_owned());
    let server = tokio::spawn(async move {
        let (served, _) = tokio::join!(follower, anonymous);
        served
    });
    let copier = tokio::spawn(copy_payloads(
        artifacts,
        leader_rx,
        url.clone(),
        client_tls,
        stop.clone(),
    ));
    info!(%url, "following; campaigning to lead");
    let led = tokio::select! {
        _ = shutdown.cancelled() => None,
        l = campaign(&etcd, &url, ttl, &leader_tx) => Some(l),
    };
    stop.cancel();
    // A copy may hang on a dead leader, and graceful shutdown waits for
    // every connection: neither may delay taking the lead.
    copier.abort();
    let server_abort = server.abort_handle();
    match tokio::time::timeout(FOLLOWER_DRAIN, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e),
        Ok(Err(e)) if e.is_cancelled() => {}
        Ok(Err(e)) => warn!(error = %e, "the follower's server task failed"),
        Err(_) => {
            warn!("follower connections still open; closing them");
            server_abort.abort();
        }
    }
    Ok(led)
}

/// Tries to create the leader key until it succeeds, telling `leader_tx`
/// who leads meanwhile.
async fn campaign(
    etcd: &EtcdStore,
    url: &str,
    ttl: Duration,
    leader_tx: &watch::Sender<Option<String>>,
) -> Leadership {
    let client = etcd.client();
    let key = format!("/baton/{LEADER_KEY}");
    loop {
        let lease = match grant(&client, ttl).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot get an etcd lease; retrying");
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        while !lease.lost.is_cancelled() {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    url,
                    Some(PutOptions::new().with_lease(lease.id)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            match client.kv_client().txn(txn).await {
                Ok(resp) if resp.succeeded() => {
                    let revision = resp.header().map_or(0, |h| h.revision());
                    info!(%url, revision, "leading");
                    leader_tx.send_replace(Some(url.to_owned()));
                    return Leadership::new(etcd, lease, revision);
                }
                Ok(resp) => {
                    let held = resp.op_responses().into_iter().find_map(|r| match r {
                        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                            (
                                kv.lease(),
                                kv.create_revision(),
                                kv.value_str().ok().map(str::to_owned),
                            )
                        }),
                        _ => None,
                    });
                    // Our own key: an earlier attempt was applied though
                    // its answer was lost (a timeout). We lead.
                    if let Some((l, revision, _)) = &held
                        && *l == lease.id
                    {
                        info!(%url, revision, "leading (the key was already ours)");
                        leader_tx.send_replace(Some(url.to_owned()));
                        return Leadership::new(etcd, lease, *revision);
                    }
                    let leader = held.and_then(|(_, _, v)| v);
                    leader_tx.send_if_modified(|l| {
                        if *l == leader {
                            return false;
                        }
                        info!(leader = ?leader, "the leader changed");
                        *l = leader;
                        true
                    });
                }
                Err(e) => warn!(error = %e, "cannot reach etcd to campaign"),
            }
            tokio::time::sleep(POLL).await;
        }
        warn!("the lease ended while following; taking a new one");
    }
}

/// Copies every payload in the index this coordinator lacks from the
/// leader, until `stop`.
async fn copy_payloads(
    artifacts: Artifacts,
    leader: watch::Receiver<Option<String>>,
    me: String,
    tls: ClientTls,
    stop: CancellationToken,
) {
    loop {
        let from = leader.borrow().clone().filter(|l| *l != me);
        if let Some(from) = from {
            match artifacts.list().await {
                Ok(list) => {
                    for record in list {
                        if stop.is_cancelled()
                            || record.origin.is_some()
                            || artifacts.has_blob(&record.digest)
                        {
                            continue;
                        }
                        match copy_one(&artifacts, &from, &tls, &record.digest).await {
                            Ok(size) => {
                                info!(name = %record.name, version = %record.version, digest = %record.digest, size, %from, "copied a payload from the leader")
                            }
                            Err(e) => {
                                warn!(digest = %record.digest, %from, error = %e, "cannot copy a payload from the leader yet")
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot list artifacts to copy"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(COPY_EVERY) => {}
        }
    }
}

async fn copy_one(
    artifacts: &Artifacts,
    from: &str,
    tls: &ClientTls,
    digest: &str,
) -> Result<u64, String> {
    let endpoint = Endpoint::from_shared(from.to_owned())
        .map_err(|e| e.to_string())?
        .tls_config(tls.to_tonic())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect();
    // A paused leader accepts TCP and never finishes TLS.
    let channel = tokio::time::timeout(Duration::from_secs(10), channel)
        .await
        .map_err(|_| "no TLS handshake within 10s".to_owned())?
        .map_err(|e| baton_common::error_chain(&e))?;
    let mut stream = ArtifactServiceClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .fetch(FetchRequest {
            digest: digest.to_owned(),
            offset: 0,
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut copy = artifacts.copy_blob(digest).map_err(|e| e.to_string())?;
    let mut size = 0u64;
    loop {
        let next = tokio::time::timeout(STALL, stream.message())
            .await
            .map_err(|_| format!("the leader sent nothing for {}s", STALL.as_secs()))?;
        let Some(chunk) = next.map_err(|s| s.message().to_owned())? else {
            break;
        };
        size += chunk.data.len() as u64;
        copy.write(&chunk.data).map_err(|e| e.to_string())?;
    }
    tokio::task::spawn_blocking(move || copy.finish())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(size)
}

/// Makes a server a follower's: Baton RPCs are answered `UNAVAILABLE` with
/// the leader's URL; the rest (health) passes, with the URL in a header.
#[derive(Clone)]
struct FollowerLayer {
    leader: watch::Receiver<Option<String>>,
}

impl<S> tower::Layer<S> for FollowerLayer {
    type Service = Follower<S>;

    fn layer(&self, inner: S) -> Follower<S> {
        Follower {
            inner,
            leader: self.leader.clone(),
        }
    }
}

#[derive(Clone)]
struct Follower<S> {
    inner: S,
    leader: watch::Receiver<Option<String>>,
}

type BoxFuture<T, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for Follower<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let leader = self.leader.borrow().clone();
        let header = leader
            .as_deref()
            .and_then(|l| http::HeaderValue::from_str(l).ok());
        if req.uri().path().starts_with("/baton.") {
            let mut status = tonic::Status::unavailable(match &leader {
                Some(l) => format!("this batond follows; the leader is {l}"),
                None => "this batond follows and no leader is elected yet; retry shortly".into(),
            });
            if let Some(l) = &leader
                && let Ok(v) = l.parse()
            {
                status.metadata_mut().insert(LEADER_HEADER, v);
            }
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            if let Some(v) = header {
                resp.headers_mut().insert(LEADER_HEADER, v);
            }
            Ok(resp)
        })
    }
}

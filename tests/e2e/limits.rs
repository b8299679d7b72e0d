//! Bad input on the wire: ten thousand idle connections, an oversized
//! message, malformed protobuf, unknown and zero enum values, NUL bytes.
//! Each gets a precise status, nothing is persisted, memory stays bounded
//! and other clients are served throughout.

use std::time::Instant;

use baton_common::tls::TLS_HANDSHAKE_TIMEOUT;
use baton_proto::control::v1 as pb;
use baton_proto::control::v1::control_service_client::ControlServiceClient;
use baton_tests::{Batond, SOON, TestEnv, wait_until};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// Sends raw bytes as a message; ignores the answer's content.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn raw(channel: Channel, method: &str, body: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        PathAndQuery::try_from(format!("/baton.control.v1.ControlService/{method}")).unwrap();
    match grpc.unary(tonic::Request::new(body), path, RawCodec).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// How many connections wait in the accept queue of the listener on
/// `addr` (an IPv4 address), from `/proc/net/tcp`: for a socket in LISTEN
/// state the receive-queue column is that count.
fn accept_queue(addr: std::net::SocketAddr) -> Option<usize> {
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("accept_queue reads /proc/net/tcp, which has IPv4 sockets only");
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.get(1) != Some(&local.as_str()) || cols.get(3) != Some(&"0A") {
            return None;
        }
        let (_, rx) = cols.get(4)?.split_once(':')?;
        usize::from_str_radix(rx, 16).ok()
    })
}

#[test]
fn malformed_oversized_and_odd_messages_get_precise_statuses_and_change_nothing() {
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = env.channel(&url, "operator").await;
        // Not protobuf at all.
        assert_eq!(
            raw(ch.clone(), "GetHost", vec![0xff; 64]).await,
            Code::InvalidArgument
        );
        // A field of the wrong wire type, and a truncated one.
        assert_eq!(
            raw(ch.clone(), "GetHost", vec![0x0a, 0x05, b'h']).await,
            Code::InvalidArgument
        );
        let mut client = ControlServiceClient::new(ch.clone());
        // 100 MB in one message.
        let err = client
            .get_host(pb::GetHostRequest {
                host_id: "h".repeat(100 << 20),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
        // NUL bytes in names and plans.
        let err = client
            .get_host(pb::GetHostRequest {
                host_id: "h\0st".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = client
            .start_rollout(pb::StartRolloutRequest {
                plan: "[[service]]\nname = \"a\0b\"\nversion = \"1\"\n".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Zero and unknown enum values.
        for action in [0, 99] {
            let err = client
                .control_rollout(pb::ControlRolloutRequest {
                    id: "r-1".into(),
                    action,
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
            assert!(err.message().contains("unspecified or unknown"), "{err}");
        }
        // A plan over the size limit.
        let err = client
            .plan_rollout(pb::StartRolloutRequest {
                plan: "#".repeat(2 << 20),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains("above the limit"), "{err}");
        // Nothing was persisted, and the server still serves.
        let rollouts = client
            .list_rollouts(pb::ListRolloutsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(rollouts.rollouts.is_empty());
        let hosts = client
            .list_hosts(pb::ListHostsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(hosts.hosts.is_empty());
    });
}

#[test]
fn ten_thousand_idle_connections_leave_memory_bounded_and_others_served() {
    // Room for the connections on both ends (batond raises its own limit).
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if hard < 12_000 {
        eprintln!("SKIPPED: the open-file hard limit ({hard}) is below 12,000");
        return;
    }
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let pid = batond.proc.pid().as_raw();
    let before = rss_kib(pid);

    // Ten thousand connections that never say a word, opened in batches
    // that batond has accepted before the next (so none waits on a full
    // accept queue). Accepted means the listener's queue is empty: counting
    // batond's descriptors would not do, since on a loaded machine the first
    // batches reach their handshake timeout before the last is open.
    let opened = Instant::now();
    let mut idle: Vec<std::net::TcpStream> = Vec::with_capacity(10_000);
    for _ in 0..10 {
        idle.extend((0..1_000).map(|_| std::net::TcpStream::connect(batond.addr).unwrap()));
        wait_until("batond to accept the batch", SOON, || {
            (accept_queue(batond.addr)? == 0).then_some(())
        });
    }
    // Others are served meanwhile.
    let out = env.baton(&url, &env.tls(), &["hosts", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let during = rss_kib(pid);
    assert!(
        during < before + 300 * 1024,
        "10,000 idle connections took {} MiB",
        (during - before) / 1024
    );

    // Each is dropped once it failed to handshake in time.
    for s in &idle {
        s.set_read_timeout(Some(SOON)).unwrap();
    }
    let mut buf = [0u8; 1];
    for s in idle.iter().step_by(500) {
        match std::io::Read::read(&mut &*s, &mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was not closed: {other:?}"),
        }
    }
    assert!(
        opened.elapsed() >= TLS_HANDSHAKE_TIMEOUT,
        "dropped before the handshake timeout"
    );
    drop(idle);
    wait_until("batond to let go of the connections", SOON, || {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        (fds < 1_000).then_some(())
    });
    let out = env.baton(&url, &env.tls(), &["hosts", "--json"]);
    assert!(out.status.success(), "{out:?}");
}

/// Everything a client without a certificate can hold at once — idle
/// sockets, handshakes that stop halfway, HTTP/2 connections with half-sent
/// messages on every stream, rapid resets, huge headers — from many
/// addresses: `batond` stays within 64 MiB more memory, and a certified
/// operator and a new host enrolling are served throughout.
#[test]
fn clients_without_a_certificate_hold_at_most_64_mib_while_others_are_served() {
    use baton_tests::abuse;
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if hard < 8_000 {
        eprintln!("SKIPPED: the open-file hard limit ({hard}) is below 8,000");
        return;
    }
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &[]);
    let (addr, url, pid) = (batond.addr, batond.url(), batond.proc.pid().as_raw());
    let ca = std::fs::read(env.tls().join("ca.pem")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let before = rss_kib(pid);
    let held = rt.block_on(async {
        let mut sockets = Vec::new();
        // 3,000 connections that never say a word, from 30 addresses.
        for i in 0..3_000 {
            sockets.push(
                abuse::connect_from(abuse::attacker(i % 30), addr)
                    .await
                    .unwrap(),
            );
        }
        // 1,500 handshakes that stop after the ClientHello, from 10
        // addresses: more than may run at once from one address.
        for i in 0..1_500 {
            sockets.push(abuse::stalled_handshake(abuse::attacker(100 + i % 10), addr, &ca).await);
        }
        // HTTP/2 without a certificate from 10 addresses, 20 connections
        // each (8 per address get through), each trying 50 streams that
        // announce a 16,000-byte message and send half of it.
        let mut streams = Vec::new();
        let mut admitted = 0;
        for i in 0..200 {
            let Some(send) = abuse::anonymous_h2(abuse::attacker(200 + i % 10), addr, &ca).await
            else {
                continue;
            };
            let open = abuse::half_sent_messages(send, 50, 16_000, 8_000).await;
            if !open.is_empty() {
                admitted += 1;
            }
            streams.push(open);
        }
        // Rapid resets and 100 KB of headers, from two more addresses.
        for i in 0..8 {
            if let Some(send) = abuse::anonymous_h2(abuse::attacker(300), addr, &ca).await {
                abuse::rapid_resets(send, if i < 4 { 5_000 } else { 0 }).await;
            }
            if let Some(send) = abuse::anonymous_h2(abuse::attacker(301), addr, &ca).await {
                abuse::huge_headers(send, 100_000).await;
            }
        }
        (sockets, streams, admitted)
    });
    let during = rss_kib(pid);
    eprintln!(
        "batond: {} MiB before, {} MiB with the attackers connected ({} HTTP/2 connections without a certificate opened streams)",
        before / 1024,
        during / 1024,
        held.2
    );
    assert!(
        during < before + 64 * 1024,
        "clients without a certificate took {} MiB",
        (during - before) / 1024
    );
    // Per address, no more than 8 connections without a certificate are
    // served at once.
    let answered = rt.block_on(async {
        let mut connections = Vec::new();
        for _ in 0..20 {
            connections.extend(abuse::anonymous_h2(abuse::attacker(400), addr, &ca).await);
        }
        let mut answered = 0;
        for send in &connections {
            answered += usize::from(abuse::enroll_answers(send).await);
        }
        answered
    });
    assert_eq!(
        answered, 8,
        "answered on {answered} of 20 connections from one address"
    );
    // A certified operator is served…
    let out = env.baton(&url, &env.tls(), &["hosts", "--json"]);
    assert!(out.status.success(), "{out:?}");
    // …and so is a new host enrolling (its token is wrong: the answer
    // says so, which means enrollment answered).
    rt.block_on(async {
        let channel = env.anonymous_channel(&url).await;
        let err = baton_tests::abuse::enroll_with_a_guessed_token(channel).await;
        assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    });
    drop(held);
}

/// Opens `/api/live` from `from` and returns the status and, for a stream,
/// the socket to hold it open.
fn open_live(
    web: std::net::SocketAddr,
    from: std::net::Ipv4Addr,
    cookie: Option<&str>,
) -> (u16, std::net::TcpStream) {
    use std::io::{BufRead, Write};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt
        .block_on(baton_tests::abuse::connect_from(from, web))
        .unwrap()
        .into_std()
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    let mut stream = stream;
    stream.set_read_timeout(Some(SOON)).unwrap();
    let cookie = cookie.map_or(String::new(), |c| format!("Cookie: baton_session={c}\r\n"));
    write!(
        stream,
        "GET /api/live HTTP/1.1\r\nHost: {web}\r\n{cookie}Accept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, stream)
}

/// Readers of the dashboard who did not sign in have a pool of their own,
/// counted per address: however many open it, a signed-in operator still
/// gets a live view.
#[test]
fn dashboard_readers_without_a_sign_in_cannot_lock_operators_out() {
    use baton_coordinator::web::{MAX_ANONYMOUS_LIVE, MAX_ANONYMOUS_LIVE_PER_ADDRESS};
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &["--http-listen", "127.0.0.1:0"]);
    let web = batond.dashboard.unwrap();
    let mut held = Vec::new();
    // One address: only its share.
    let mut ok = 0;
    for _ in 0..10 {
        let (status, s) = open_live(web, std::net::Ipv4Addr::new(127, 2, 0, 1), None);
        ok += usize::from(status == 200);
        held.push(s);
    }
    assert_eq!(ok, MAX_ANONYMOUS_LIVE_PER_ADDRESS);
    // Many addresses: the pool, and no more.
    for i in 0..100u8 {
        let (status, s) = open_live(web, std::net::Ipv4Addr::new(127, 2, 1, i), None);
        ok += usize::from(status == 200);
        held.push(s);
    }
    assert_eq!(ok, MAX_ANONYMOUS_LIVE);
    // A signed-in reader is served all the same.
    let out = env.baton(
        &batond.url(),
        &env.tls(),
        &["dashboard", "token", "--role", "viewer", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let token: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (status, _stream) = open_live(web, std::net::Ipv4Addr::LOCALHOST, token["token"].as_str());
    assert_eq!(status, 200);
    // A slot is given back when its reader leaves.
    drop(held);
    wait_until("a slot to be free again", SOON, || {
        (open_live(web, std::net::Ipv4Addr::new(127, 2, 0, 1), None).0 == 200).then_some(())
    });
}

/// `n` services in a plan, each depending on the next; `ring` closes it.
fn chain_plan(n: usize, ring: bool) -> String {
    let mut text = String::new();
    for i in 0..n {
        let dep = match (i + 1 < n, ring) {
            (true, _) => format!("\"s{}\"", i + 1),
            (false, true) => "\"s0\"".to_owned(),
            (false, false) => String::new(),
        };
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nversion = \"1.0.0\"\nhosts = {{ role = \"x\" }}\ndepends_on = [{dep}]\n"
        ));
    }
    text
}

/// Plans built to hurt — rings and chains of 10,000 services, a 400 KB
/// line, a deadline of 300 billion years — are each answered at once with
/// a precise, short error; nothing is stored; batond keeps serving.
#[test]
fn hostile_plans_are_answered_at_once_precisely_and_batond_keeps_serving() {
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let out = baton_tests::bin_command("baton")
        .arg("--tls-dir")
        .arg(env.tls())
        .args(["certs", "issue-operator", "viewer", "--role", "viewer"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut viewer = ControlServiceClient::new(env.channel(&url, "viewer").await);
        let mut operator = ControlServiceClient::new(env.channel(&url, "operator").await);
        let cases: Vec<(String, &str)> = vec![
            (chain_plan(10_000, true), "10000 services, more than the limit of 256"),
            (chain_plan(10_000, false), "10000 services, more than the limit of 256"),
            (chain_plan(256, true), "depends_on has a cycle: s0 -> s1"),
            (chain_plan(256, false), "no artifact of this service has been pushed"),
            (
                format!("[[service]]\nname = \"a\"\nversion = \"1.0.0\"\noops = {}\n", "x".repeat(400_000)),
                "line 4, column 8",
            ),
            (
                "[[service]]\nname = \"a\"\nversion = \"1.0.0\"\nhealthy_deadline = \"300000000000y\"\n"
                    .to_owned(),
                "longer than the maximum of 1day",
            ),
        ];
        for (plan, expected) in cases {
            // A viewer's dry run, then an operator's start: both refused.
            let started = Instant::now();
            let err = viewer
                .plan_rollout(pb::StartRolloutRequest { plan: plan.clone() })
                .await
                .unwrap_err();
            let took = started.elapsed();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
            assert!(err.message().contains(expected), "{}", err.message());
            assert!(err.message().len() <= 2_000, "{} bytes", err.message().len());
            // Generous for a loaded machine; the old cubic ordering and its
            // recursion took seconds, or the process, here.
            assert!(took < std::time::Duration::from_secs(10), "{took:?}");
            let err = operator
                .start_rollout(pb::StartRolloutRequest { plan })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        }
        // Rollout ids that cannot be are invalid, not unknown.
        for id in ["r-1\0x", "../hosts/h1", &"r".repeat(100_000)] {
            let err = viewer
                .get_rollout(pb::GetRolloutRequest { id: id.to_owned() })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
            assert!(err.message().len() < 400, "{}", err.message());
        }
        let rollouts = viewer
            .list_rollouts(pb::ListRolloutsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(rollouts.rollouts.is_empty());
    });
    let out = env.baton(&url, &env.tls(), &["hosts", "--json"]);
    assert!(out.status.success(), "{out:?}");
}

/// The agent stream, spoken wrongly by a certified agent: a second hello
/// and an inventory of 20,000 services end the stream with
/// `INVALID_ARGUMENT` saying why.
#[test]
fn the_agent_stream_refuses_a_second_hello_and_a_huge_inventory_precisely() {
    use baton_proto::agent::v1 as agent;
    let env = TestEnv::new(&["h1"]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let hello = || agent::AgentMessage {
        kind: Some(agent::agent_message::Kind::Hello(agent::Hello {
            host_id: "h1".into(),
            agent_version: "0.1.0".into(),
            labels: Default::default(),
            services: vec![],
        })),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let huge = agent::AgentMessage {
            kind: Some(agent::agent_message::Kind::Inventory(
                agent::InventoryUpdate {
                    services: (0..20_000)
                        .map(|i| agent::ServiceStatus {
                            name: format!("s{i}"),
                            version: "1.0.0".into(),
                            state: agent::ServiceState::Running as i32,
                            healthy: true,
                        })
                        .collect(),
                },
            )),
        };
        for (second, expected) in [
            (hello(), "a second hello on one stream"),
            (huge, "20000 services, the limit is 1000 per host"),
        ] {
            let channel = env.channel(&url, "agent-h1").await;
            let mut client = agent::agent_service_client::AgentServiceClient::new(channel);
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(hello()).await.unwrap();
            let mut inbound = client
                .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            // The welcome first.
            inbound.message().await.unwrap().unwrap();
            tx.send(second).await.unwrap();
            let status = loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended without a status"),
                    Err(status) => break status,
                }
            };
            assert_eq!(status.code(), Code::InvalidArgument, "{status}");
            assert!(status.message().contains(expected), "{status}");
        }
    });
}

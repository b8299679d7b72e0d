//! What a hostile client without a certificate does to `batond`, below
//! gRPC: TCP connections from chosen loopback addresses, TLS handshakes
//! that stop halfway, and HTTP/2 connections that open streams and send
//! half a message, reset streams as fast as they open them, or send huge
//! headers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tonic::codegen::http;

/// A TCP connection to `to` from the loopback address `from` (any
/// 127.x.y.z works as a source on Linux), so that per-address limits see
/// an attacker apart from the test's own clients on 127.0.0.1.
pub async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(to).await
}

/// The address `n` of the attackers' range, 127.1.x.y.
pub fn attacker(n: u32) -> Ipv4Addr {
    let [_, _, a, b] = (n + 1).to_be_bytes();
    Ipv4Addr::new(127, 1, a, b)
}

fn client_config(ca_pem: &[u8]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Opens a connection from `from` and sends a real TLS ClientHello, then
/// nothing more: `batond` answers and waits for a handshake that never
/// finishes. The socket is returned to be held open.
pub async fn stalled_handshake(from: Ipv4Addr, to: SocketAddr, ca_pem: &[u8]) -> TcpStream {
    let mut tcp = connect_from(from, to).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = rustls::ClientConnection::new(client_config(ca_pem), name).unwrap();
    let mut hello = Vec::new();
    while tls.wants_write() {
        tls.write_tls(&mut hello).unwrap();
    }
    tcp.write_all(&hello).await.unwrap();
    tcp
}

/// An HTTP/2 connection without a client certificate, from `from`.
/// `None` when `batond` closes it (a limit on such connections).
pub async fn anonymous_h2(
    from: Ipv4Addr,
    to: SocketAddr,
    ca_pem: &[u8],
) -> Option<h2::client::SendRequest<Bytes>> {
    let tcp = connect_from(from, to).await.ok()?;
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.ok()?;
    let (send, connection) = h2::client::handshake(tls).await.ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send.ready().await.ok()
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Opens up to `streams` enrollment calls, each announcing a
/// `declared`-byte message and sending only `sent` bytes of it, and keeps
/// them open (the returned streams must be held).
pub async fn half_sent_messages(
    mut send: h2::client::SendRequest<Bytes>,
    streams: usize,
    declared: u32,
    sent: usize,
) -> Vec<h2::SendStream<Bytes>> {
    let mut open = Vec::new();
    for _ in 0..streams {
        let Ok(ready) = send.clone().ready().await else {
            break;
        };
        send = ready;
        let Ok((_, mut body)) = send.send_request(
            grpc_request("/baton.agent.v1.EnrollmentService/Enroll"),
            false,
        ) else {
            break;
        };
        let mut frame = vec![0u8];
        frame.extend_from_slice(&declared.to_be_bytes());
        frame.resize(5 + sent, b'x');
        body.reserve_capacity(frame.len());
        if body.send_data(Bytes::from(frame), false).is_err() {
            break;
        }
        open.push(body);
    }
    open
}

/// Opens `n` streams and resets each at once (HTTP/2 "rapid reset").
/// Returns how many went out before the connection was closed.
pub async fn rapid_resets(mut send: h2::client::SendRequest<Bytes>, n: usize) -> usize {
    for i in 0..n {
        let Ok(ready) = send.clone().ready().await else {
            return i;
        };
        send = ready;
        let Ok((response, mut body)) = send.send_request(grpc_request("/x/y"), false) else {
            return i;
        };
        body.send_reset(h2::Reason::CANCEL);
        drop(response);
    }
    n
}

/// Sends one request with `bytes` of headers; returns whether `batond`
/// answered it with anything but a refusal of the connection or stream.
pub async fn huge_headers(send: h2::client::SendRequest<Bytes>, bytes: usize) -> bool {
    let Ok(mut send) = send.ready().await else {
        return false;
    };
    let mut request = grpc_request("/baton.agent.v1.EnrollmentService/Enroll");
    for i in 0..bytes / 1000 {
        request.headers_mut().insert(
            http::HeaderName::try_from(format!("x-junk-{i}")).unwrap(),
            http::HeaderValue::from_str(&"j".repeat(990)).unwrap(),
        );
    }
    let Ok((response, _)) = send.send_request(request, true) else {
        return false;
    };
    response.await.is_ok()
}

/// Makes one complete enrollment call (an empty message) and says whether
/// `batond` answered it with a gRPC status.
pub async fn enroll_answers(send: &h2::client::SendRequest<Bytes>) -> bool {
    let Ok(mut send) = send.clone().ready().await else {
        return false;
    };
    let Ok((response, mut body)) = send.send_request(
        grpc_request("/baton.agent.v1.EnrollmentService/Enroll"),
        false,
    ) else {
        return false;
    };
    if body
        .send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .is_err()
    {
        return false;
    }
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), response).await;
    let Ok(Ok(response)) = answer else {
        return false;
    };
    if response.headers().contains_key("grpc-status") {
        return true;
    }
    let mut body = response.into_body();
    while body.data().await.is_some() {}
    matches!(body.trailers().await, Ok(Some(t)) if t.contains_key("grpc-status"))
}

/// Enrolls as `h1` with a token `batond` never issued, over `channel`, and
/// returns the refusal (`batond` must refuse: the test fails otherwise).
pub async fn enroll_with_a_guessed_token(channel: tonic::transport::Channel) -> tonic::Status {
    use baton_proto::agent::v1 as agent;
    agent::enrollment_service_client::EnrollmentServiceClient::new(channel)
        .enroll(agent::EnrollRequest {
            token: "bt1-guess".into(),
            host_id: "h1".into(),
            csr_pem: String::new(),
        })
        .await
        .expect_err("an enrollment with a guessed token must be refused")
}

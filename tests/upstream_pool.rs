//! The HTTP/1.1 upstream connection pool, seen from a raw-TCP upstream that
//! counts its connections: reuse, replacement of connections the upstream
//! closed, the idle timeout, and no reuse of a connection whose response was
//! not read to the end.

mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use upstream::Front;

/// How the fake upstream treats each connection.
#[derive(Clone, Copy)]
enum Mode {
    /// Answers every request, keeps the connection open.
    KeepAlive,
    /// Closes the connection after each answer, without saying so (as a
    /// server whose keep-alive timeout fired).
    CloseAfterEach,
    /// `GET /stall` gets 1000 bytes of a 1 MiB answer, then nothing;
    /// everything else as `KeepAlive`.
    Stall,
}

/// A raw HTTP/1.1 upstream on loopback. Answers `conn=<n> host=<Host>`,
/// `n` counting connections from 1.
struct RawUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(mode: Mode) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (acc, clo) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let n = acc.fetch_add(1, Ordering::SeqCst) + 1;
                let clo = clo.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break Some(i + 4);
                            }
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => break None,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        };
                        let Some(end) = head_end else { break };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let host = head
                            .lines()
                            .find_map(|l| l.strip_prefix("host: ").or(l.strip_prefix("Host: ")))
                            .unwrap_or("-")
                            .to_owned();
                        if matches!(mode, Mode::Stall) && head.starts_with("GET /base/stall ") {
                            let part = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
                                1 << 20,
                                "x".repeat(1000)
                            );
                            let _ = tcp.write_all(part.as_bytes()).await;
                            // Until the sidecar gives up on this connection.
                            while matches!(tcp.read(&mut chunk).await, Ok(k) if k > 0) {}
                            break;
                        }
                        let body = format!("conn={n} host={host}");
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if tcp.write_all(answer.as_bytes()).await.is_err() {
                            break;
                        }
                        if matches!(mode, Mode::CloseAfterEach) {
                            break;
                        }
                    }
                    drop(tcp);
                    clo.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawUpstream {
            addr,
            accepted,
            closed,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/base/", self.addr)
    }
}

async fn get(client: &reqwest::Client, url: String) -> (u16, String) {
    let resp = client.get(url).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

engines! {
#[tokio::test]
async fn sequential_requests_reuse_one_connection_with_the_upstreams_host() {
    let up = RawUpstream::start(Mode::KeepAlive).await;
    let front = Front::start(&up.url(), "").await;
    let client = support::client();
    for _ in 0..5 {
        let (status, body) = get(&client, front.url("/x")).await;
        assert_eq!(status, 200);
        assert_eq!(body, format!("conn=1 host={}", up.addr));
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_requests_open_connections_then_reuse_them() {
    let up = RawUpstream::start(Mode::KeepAlive).await;
    let front = Front::start(&up.url(), "").await;
    let client = support::client();
    for _ in 0..3 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (client, url) = (client.clone(), front.url("/x"));
            batch.spawn(async move { get(&client, url).await });
        }
        while let Some(done) = batch.join_next().await {
            assert_eq!(done.unwrap().0, 200);
        }
    }
    let opened = up.accepted.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&opened),
        "12 requests, 4 at a time, opened {opened} connections"
    );
}

#[tokio::test]
async fn connections_the_upstream_closed_are_replaced_without_errors() {
    let up = RawUpstream::start(Mode::CloseAfterEach).await;
    let front = Front::start(&up.url(), "").await;
    let client = support::client();
    for i in 1..=5 {
        let (status, body) = get(&client, front.url("/x")).await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(body.starts_with("conn="), "{body}");
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn idle_connections_close_after_pool_idle_timeout() {
    let up = RawUpstream::start(Mode::KeepAlive).await;
    let front = Front::start(&up.url(), r#"proxy.pool_idle_timeout = "300ms""#).await;
    let client = support::client();
    assert_eq!(get(&client, front.url("/x")).await.0, 200);
    let closed = up.closed.clone();
    support::eventually(
        Duration::from_secs(10),
        "the idle upstream connection is closed",
        || {
            let closed = closed.clone();
            async move { closed.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    // The next request opens a new one.
    let (status, body) = get(&client, front.url("/x")).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("conn=2 "), "{body}");
}

#[tokio::test]
async fn a_response_not_read_to_the_end_does_not_return_its_connection() {
    let up = RawUpstream::start(Mode::Stall).await;
    let front = Front::start(&up.url(), "").await;
    let client = support::client();
    // Headers only, then the client goes away mid-body.
    let resp = client.get(front.url("/stall")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    drop(client);
    let closed = up.closed.clone();
    support::eventually(
        Duration::from_secs(10),
        "the abandoned upstream connection is closed",
        || {
            let closed = closed.clone();
            async move { closed.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    // A fresh client: the answer comes on a new connection.
    let client = support::client();
    let (status, body) = get(&client, front.url("/x")).await;
    assert_eq!(status, 200);
    assert_eq!(body, format!("conn=2 host={}", up.addr));
}
}

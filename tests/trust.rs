//! Which certificate authorities the two clients trust: a private CA given
//! only by `SSL_CERT_FILE` (the operating system's trust store, read by
//! rustls-native-certs) for both the token endpoint and the upstream; and a
//! `proxy.ca_file` replaced on disk, which applies to new connections without
//! a restart, while a replacement that does not parse keeps the previous roots,
//! is logged and counted.

#[path = "support/binary.rs"]
mod binary;
#[path = "support/logs.rs"]
mod logs;
mod sidecar_process;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::net::SocketAddr;
use std::path::Path;

use http::Response;
use token_sidecar::fake::{self, World};
use tokio::net::{TcpListener, TcpStream};
use upstream::{Front, Leaf, TestBody, TestCa, Upstream};

/// A TLS front presenting `leaf` for the plain HTTP server at `backend`.
async fn tls_front(leaf: &Leaf, backend: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = leaf.acceptor_with(&[b"http/1.1"]);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    if let Ok(mut plain) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_ca_given_only_by_ssl_cert_file_is_trusted_by_both_clients() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca.write_pem(dir.path());
    let leaf = ca.issue(&["127.0.0.1"]);

    let world = World::new(300.0);
    let auth = fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let token_tls = tls_front(&leaf, auth.addr).await;
    let up = Upstream::start_tls_http1(&leaf, |_| async {
        Response::new(TestBody::text("through TLS"))
    })
    .await;
    let toml = support::base_toml(
        &world,
        &format!("https://{token_tls}/oauth/token"),
        &format!("https://{}/base/", up.addr),
    );
    // No ca_file anywhere: the CA is only in SSL_CERT_FILE (and SSL_CERT_DIR,
    // which would add the machine's store, is unset).
    assert!(!toml.contains("ca_file"));
    let sidecar = binary::Process::spawn_with(
        &toml,
        &[("SSL_CERT_FILE", ca_pem.to_str().unwrap())],
        &["SSL_CERT_DIR"],
    )
    .await;

    // A token came over TLS from the token endpoint...
    sidecar.ready().await;
    // ...and a request reaches the upstream over TLS.
    let r = support::client()
        .get(sidecar.url("/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "through TLS");
    assert_eq!(up.seen().len(), 1);

    let loaded = sidecar.event("trust store loaded");
    assert_eq!(loaded["system"], 1, "{loaded}");
    assert_eq!(loaded["source"], "SSL_CERT_FILE / SSL_CERT_DIR", "{loaded}");
}

/// Replaces `path` the way a Kubernetes volume update does: the new content
/// appears at once under the same name (a rename, never a partial write).
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_replaced_ca_file_applies_to_new_connections_and_a_broken_one_keeps_the_old_roots() {
    let logs = logs::LogBuffer::capture();
    let (old_ca, new_ca) = (TestCa::new(), TestCa::new());
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, old_ca.pem()).unwrap();
    // The upstream's certificate is the new CA's; it closes every connection,
    // so each request below is a new TLS handshake.
    let up = Upstream::start_tls_http1(&new_ca.issue(&["127.0.0.1"]), |_| async {
        upstream::response(200, &[("connection", "close")], TestBody::text("ok"))
    })
    .await;
    let front = Front::start(
        &format!("https://{}/base/", up.addr),
        &format!("proxy.ca_file = {:?}", ca_file.to_str().unwrap()),
    )
    .await;
    let client = support::client();
    let get = || async {
        let r = client.get(front.url("/x")).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    };
    let errors = || token_sidecar::tls::ca_file_reload_errors().get();
    let errors_before = errors();

    // The old CA did not issue the upstream's certificate.
    let (status, body) = get().await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("TLS"), "{body}");

    // The new CA, swapped in on disk: the same running sidecar now trusts it.
    replace(&ca_file, &new_ca.pem());
    assert_eq!(get().await, (200, "ok".to_owned()));
    assert_eq!(get().await.0, 200);
    assert_eq!(errors(), errors_before);

    // A replacement that does not parse: the previous roots stay, the error is
    // logged and counted once (not at every handshake).
    replace(&ca_file, "this is not a certificate\n");
    assert_eq!(get().await, (200, "ok".to_owned()));
    assert_eq!(get().await.0, 200);
    assert_eq!(errors(), errors_before + 1);

    let logged: Vec<_> = logs
        .lines()
        .into_iter()
        .filter(|l| {
            l["message"] == "ca_file changed but cannot be used; keeping the previous roots"
        })
        .collect();
    assert_eq!(logged.len(), 1, "{}", logs.text());
    assert_eq!(logged[0]["level"], "ERROR");
    let admin = front.sidecar.admin_addr;
    let page = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        support::metric(&page, "token_sidecar_ca_file_reload_errors_total"),
        Some(errors() as f64)
    );

    // Reloading goes on after a bad file: back to the old CA, which fails again.
    replace(&ca_file, &old_ca.pem());
    assert_eq!(get().await.0, 502);
}

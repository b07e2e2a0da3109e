//! The whole path over real sockets: password grant against the fake token
//! endpoint, token injected into a proxied call to the fake backoffice.

mod support;

use support::Harness;

#[tokio::test]
async fn injects_the_bearer_token_and_replaces_the_clients_authorization() {
    let h = Harness::start(300.0, "").await;
    let resp = support::client()
        .get(h.url("/backoffice/api/merchants?limit=5&q=a%20b"))
        .header("authorization", "Basic bm90OnRoaXM=")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["path"], "/base/backoffice/api/merchants");
    assert_eq!(echo["query"], "limit=5&q=a%20b");
    let auth = echo["headers"]["authorization"].as_str().unwrap();
    assert!(auth.starts_with("Bearer fake-access-1-"), "{auth}");
    assert_eq!(h.world.with(|w| w.password_grants), 1);
}

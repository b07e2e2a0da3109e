//! The token request exactly as it goes on the wire, seen by the fake token
//! endpoint: for every `params_in` x `client_auth`, the method, `Accept`,
//! client authentication, where the parameters go and how awkward values are
//! encoded, for the password grant, the client_credentials grant (RFC 6749
//! 4.4, a `[credentials.NAME]` profile with `grant = "client_credentials"`)
//! and the refresh_token grant.

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use support::Harness;
use token_sidecar::fake::{self, SeenRequest, World};

/// Characters that differ under form-urlencoding: space, `/`, `+`.
const CLIENT_ID: &str = "cli ent/id+1";
/// The same values form-urlencoded, written out by hand (RFC 6749 2.3.1).
const CLIENT_ID_FORM: &str = "cli+ent%2Fid%2B1";
const CLIENT_SECRET: &str = "s3cr3t+/=";
const CLIENT_SECRET_FORM: &str = "s3cr3t%2B%2F%3D";
const USERNAME: &str = "back office@user";
/// Every character that breaks naive query building, plus non-ASCII.
const PASSWORD: &str = "p&ss+w=rd %20 é ü/?#";

/// `extra_params` as TOML, and what they must decode to.
const EXTRA_TOML: &str = r#"extra_params = { audience = "backoffice api", "x&y" = "1+1=2" }"#;
const EXTRA: [(&str, &str); 2] = [("audience", "backoffice api"), ("x&y", "1+1=2")];

/// A world whose client and user credentials all need encoding.
fn awkward_world(expires_in: f64) -> Arc<World> {
    let world = World::new(expires_in);
    world.with(|w| {
        w.client_id = CLIENT_ID.into();
        w.client_secret = CLIENT_SECRET.into();
        w.username = USERNAME.into();
        w.password = PASSWORD.into();
    });
    world
}

/// A sidecar in the given modes, with 1.2 s tokens so a refresh follows soon
/// (at half the lifetime once `min_interval` allows it).
async fn start(params_in: &str, client_auth: &str, scope: &str) -> Harness {
    let overrides = format!(
        r#"
[oauth]
params_in = "{params_in}"
client_auth = "{client_auth}"
scope = "{scope}"
{EXTRA_TOML}
[refresh]
min_interval = "100ms"
"#
    );
    Harness::start_with_world(awkward_world(1.2), &overrides).await
}

/// The first request the fake saw with this `grant_type`.
fn seen_grant(h: &Harness, grant: &str) -> SeenRequest {
    h.world.with(|w| {
        w.seen
            .iter()
            .find(|s| s.param("grant_type") == Some(grant))
            .cloned()
            .unwrap_or_else(|| panic!("no {grant} grant among {} requests", w.seen.len()))
    })
}

fn header<'a>(seen: &'a SeenRequest, name: &str) -> Vec<&'a str> {
    seen.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ASCII header"))
        .collect()
}

/// Decodes a raw `a=b&c=d` string, checking on the way that every name and
/// value is percent-encoded (only unreserved characters, `%XX` and `+`).
fn decode_raw(raw: &str) -> Vec<(String, String)> {
    for pair in raw.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        for part in [k, v] {
            assert!(
                part.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~*%+".contains(&b)),
                "not percent-encoded: {part:?} in {raw:?}"
            );
        }
    }
    url::form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .collect()
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

/// The expected parameters: `own` plus the extra params, plus the client
/// credentials when `client_auth = "body"`.
fn expected(own: &[(&str, &str)], client_auth: &str, scope: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = own
        .iter()
        .chain(EXTRA.iter())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if !scope.is_empty() {
        v.push(("scope".into(), scope.into()));
    }
    if client_auth == "body" {
        v.push(("client_id".into(), CLIENT_ID.into()));
        v.push(("client_secret".into(), CLIENT_SECRET.into()));
    }
    sorted(v)
}

/// Everything about one token request on the wire.
fn assert_wire(seen: &SeenRequest, params_in: &str, client_auth: &str, want: &[(String, String)]) {
    assert_eq!(seen.method, "POST");
    assert_eq!(header(seen, "accept"), ["application/json"]);
    let auth = header(seen, "authorization");
    match client_auth {
        "basic" => assert_eq!(
            auth,
            [format!(
                "Basic {}",
                STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
            )]
        ),
        "basic-rfc" => assert_eq!(
            auth,
            [format!(
                "Basic {}",
                STANDARD.encode(format!("{CLIENT_ID_FORM}:{CLIENT_SECRET_FORM}"))
            )]
        ),
        "body" => assert!(auth.is_empty(), "no Authorization expected: {auth:?}"),
        other => unreachable!("{other}"),
    }
    match params_in {
        "query" => {
            let (path, raw) = seen
                .target
                .split_once('?')
                .unwrap_or_else(|| panic!("no query in {:?}", seen.target));
            assert_eq!(path, "/oauth/token");
            assert!(seen.body.is_empty(), "body {:?}", seen.body);
            assert_eq!(header(seen, "content-length"), ["0"]);
            assert!(header(seen, "content-type").is_empty());
            assert_eq!(sorted(decode_raw(raw)), want);
        }
        "form" => {
            assert_eq!(seen.target, "/oauth/token", "no query expected");
            assert_eq!(
                header(seen, "content-type"),
                ["application/x-www-form-urlencoded"]
            );
            let raw = std::str::from_utf8(&seen.body).expect("ASCII body");
            assert_eq!(sorted(decode_raw(raw)), want);
        }
        other => unreachable!("{other}"),
    }
    // What the server decodes is what was meant: nothing more, nothing less.
    assert_eq!(sorted(seen.params.clone()), want);
}

/// One cell of the matrix: the password grant, then (after 0.6 s) the
/// refresh_token grant, in the same placement and client authentication.
async fn wire_case(params_in: &str, client_auth: &str) {
    let h = start(params_in, client_auth, "").await;
    h.ready().await;
    let password = seen_grant(&h, "password");
    assert_wire(
        &password,
        params_in,
        client_auth,
        &expected(
            &[
                ("grant_type", "password"),
                ("username", USERNAME),
                ("password", PASSWORD),
            ],
            client_auth,
            "",
        ),
    );

    let world = h.world.clone();
    support::eventually(Duration::from_secs(5), "a refresh_token grant", || {
        let world = world.clone();
        async move { world.with(|w| w.refresh_grants) >= 1 }
    })
    .await;
    let refresh = seen_grant(&h, "refresh_token");
    // The fake counts a refresh only for a refresh token it issued.
    let rt = refresh
        .param("refresh_token")
        .unwrap_or_default()
        .to_owned();
    assert!(rt.starts_with("fake-refresh-1-"), "{rt}");
    assert_wire(
        &refresh,
        params_in,
        client_auth,
        &expected(
            &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
            client_auth,
            "",
        ),
    );
    assert_eq!(
        header(&refresh, "authorization"),
        header(&password, "authorization")
    );
}

#[tokio::test]
async fn query_with_basic() {
    wire_case("query", "basic").await;
}

#[tokio::test]
async fn query_with_basic_rfc() {
    wire_case("query", "basic-rfc").await;
}

#[tokio::test]
async fn query_with_body_credentials() {
    wire_case("query", "body").await;
}

#[tokio::test]
async fn form_with_basic() {
    wire_case("form", "basic").await;
}

#[tokio::test]
async fn form_with_basic_rfc() {
    wire_case("form", "basic-rfc").await;
}

#[tokio::test]
async fn form_with_body_credentials() {
    wire_case("form", "body").await;
}

/// A sidecar of the routes form whose one profile, `api`, uses the
/// client_credentials grant in the given modes, with 1.2 s tokens.
async fn start_client_credentials(
    world: &Arc<World>,
    params_in: &str,
    client_auth: &str,
) -> (
    fake::FakeServer,
    fake::FakeServer,
    token_sidecar::app::Running,
) {
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let api = fake::backoffice(world.clone(), loopback).await.unwrap();
    let tables = support::profile_toml(
        "api",
        world,
        &auth.url("/oauth/token"),
        "client_credentials",
    ) + &format!(
        "params_in = \"{params_in}\"\nclient_auth = \"{client_auth}\"\n{EXTRA_TOML}\n"
    ) + &support::route_toml("api", "/", &api.url("/"), "api");
    let config = support::routes_config(&tables, "[refresh]\nmin_interval = \"100ms\"");
    let running = support::start_sidecar(&config).await;
    running
        .token("api")
        .expect("profile api")
        .wait_usable(0, Duration::from_secs(10))
        .await
        .expect("a token");
    (auth, api, running)
}

/// The requests the fake saw with this `grant_type`, once there are `n`.
async fn grants_seen(world: &Arc<World>, grant: &str, n: usize) -> Vec<SeenRequest> {
    let of_grant = |w: &fake::WorldState| -> Vec<SeenRequest> {
        w.seen
            .iter()
            .filter(|s| s.param("grant_type") == Some(grant))
            .cloned()
            .collect()
    };
    let w = world.clone();
    support::eventually(
        Duration::from_secs(5),
        &format!("{n} {grant} grants"),
        || {
            let w = w.clone();
            async move { w.with(|w| of_grant(w).len()) >= n }
        },
    )
    .await;
    world.with(|w| of_grant(w))
}

/// One cell of the client_credentials matrix: the first grant and the due
/// refresh (a new client_credentials grant: the server issued no refresh
/// token), in the same placement and client authentication.
async fn client_credentials_case(params_in: &str, client_auth: &str) {
    let world = awkward_world(1.2);
    let (_auth, _api, running) = start_client_credentials(&world, params_in, client_auth).await;
    let seen = grants_seen(&world, "client_credentials", 2).await;
    let want = expected(&[("grant_type", "client_credentials")], client_auth, "");
    for s in &seen {
        assert_wire(s, params_in, client_auth, &want);
        assert!(s.param("username").is_none() && s.param("password").is_none());
    }
    assert_eq!(
        header(&seen[0], "authorization"),
        header(&seen[1], "authorization")
    );
    assert_eq!(
        world.with(|w| (w.password_grants, w.refresh_grants)),
        (0, 0)
    );
    running.shutdown_now().await;
}

#[tokio::test]
async fn client_credentials_query_with_basic() {
    client_credentials_case("query", "basic").await;
}

#[tokio::test]
async fn client_credentials_query_with_basic_rfc() {
    client_credentials_case("query", "basic-rfc").await;
}

#[tokio::test]
async fn client_credentials_query_with_body_credentials() {
    client_credentials_case("query", "body").await;
}

#[tokio::test]
async fn client_credentials_form_with_basic() {
    client_credentials_case("form", "basic").await;
}

#[tokio::test]
async fn client_credentials_form_with_basic_rfc() {
    client_credentials_case("form", "basic-rfc").await;
}

#[tokio::test]
async fn client_credentials_form_with_body_credentials() {
    client_credentials_case("form", "body").await;
}

#[tokio::test]
async fn client_credentials_refreshes_with_the_refresh_token_when_one_was_issued() {
    let world = awkward_world(1.2);
    world.with(|w| w.refresh_token_with_client_credentials = true);
    let (_auth, _api, running) = start_client_credentials(&world, "form", "body").await;
    let refresh = grants_seen(&world, "refresh_token", 1).await;
    let rt = refresh[0]
        .param("refresh_token")
        .unwrap_or_default()
        .to_owned();
    assert!(rt.starts_with("fake-refresh-1-"), "{rt}");
    assert_wire(
        &refresh[0],
        "form",
        "body",
        &expected(
            &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
            "body",
            "",
        ),
    );
    assert_eq!(world.with(|w| w.client_credentials_grants), 1);
    running.shutdown_now().await;
}

#[tokio::test]
async fn basic_rfc_encodes_a_colon_in_the_client_id() {
    // With raw Basic a colon in the id would move the split point; the RFC
    // form encodes it, so the server splits at the one real colon.
    let world = awkward_world(300.0);
    world.with(|w| w.client_id = "cli:ent id".into());
    let h = Harness::start_with_world(world, "[oauth]\nclient_auth = \"basic-rfc\"").await;
    h.ready().await;
    let seen = seen_grant(&h, "password");
    assert_eq!(
        header(&seen, "authorization"),
        [format!(
            "Basic {}",
            STANDARD.encode(format!("cli%3Aent+id:{CLIENT_SECRET_FORM}"))
        )]
    );
}

#[tokio::test]
async fn scope_is_sent_with_both_grants_when_set() {
    let scope = "read write:all";
    let h = start("form", "basic", scope).await;
    h.ready().await;
    let password = seen_grant(&h, "password");
    assert_eq!(password.param("scope"), Some(scope));
    let world = h.world.clone();
    support::eventually(Duration::from_secs(5), "a refresh_token grant", || {
        let world = world.clone();
        async move { world.with(|w| w.refresh_grants) >= 1 }
    })
    .await;
    let refresh = seen_grant(&h, "refresh_token");
    assert_eq!(refresh.param("scope"), Some(scope));
    // Exactly once each, next to the extra params.
    for seen in [&password, &refresh] {
        assert_eq!(seen.params.iter().filter(|(k, _)| k == "scope").count(), 1);
        assert_eq!(seen.param("audience"), Some("backoffice api"));
    }
}

#[tokio::test]
async fn the_documented_paymentiq_example_byte_for_byte() {
    // ../shared/seed/password-grant-flow.md: query parameters, raw Basic.
    let world = World::new(86399.0);
    world.with(|w| {
        w.client_id = "ca4acb869f604555ae57ea933abd6a65".into();
        w.client_secret = "51ab4e67beca45db83e16c3447f61b96".into();
        w.username = "test".into();
        w.password = "test".into();
    });
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let api = fake::backoffice(world.clone(), loopback).await.unwrap();
    let config = support::config_for(
        &world,
        &auth.url("/paymentiq/oauth/token"),
        &api.url("/paymentiq/"),
        "[oauth]\nparams_in = \"query\"\nclient_auth = \"basic\"",
    );
    let running = support::start_sidecar(&config).await;
    running
        .token("default")
        .expect("profile default")
        .wait_usable(0, Duration::from_secs(10))
        .await
        .expect("a token");

    let seen = world.with(|w| w.seen[0].clone());
    assert_eq!(seen.method, "POST");
    assert_eq!(
        seen.target,
        "/paymentiq/oauth/token?grant_type=password&username=test&password=test"
    );
    assert_eq!(
        header(&seen, "authorization"),
        ["Basic Y2E0YWNiODY5ZjYwNDU1NWFlNTdlYTkzM2FiZDZhNjU6NTFhYjRlNjdiZWNhNDVkYjgzZTE2YzM0NDdmNjFiOTY="]
    );
    assert_eq!(header(&seen, "accept"), ["application/json"]);
    assert!(seen.body.is_empty());
    running.shutdown_now().await;
}

#[tokio::test]
async fn query_params_follow_a_query_the_token_url_already_has() {
    let world = World::new(300.0);
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let api = fake::backoffice(world.clone(), loopback).await.unwrap();
    let config = support::config_for(
        &world,
        &auth.url("/oauth/token?tenant=t1"),
        &api.url("/"),
        "[oauth]\nparams_in = \"query\"",
    );
    let running = support::start_sidecar(&config).await;
    running
        .token("default")
        .expect("profile default")
        .wait_usable(0, Duration::from_secs(10))
        .await
        .expect("a token");
    let seen = world.with(|w| w.seen[0].clone());
    assert_eq!(
        seen.target,
        "/oauth/token?tenant=t1&grant_type=password&username=demo-user&password=demo-password"
    );
    running.shutdown_now().await;
}

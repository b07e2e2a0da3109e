//! The token endpoint's wire format: building a grant request and parsing the
//! answer. [`TokenEndpoint`] is the seam between the refresh loop and HTTP, so
//! lifecycle tests can run on tokio's paused clock with an in-memory endpoint.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::form_urlencoded;

use super::error::{ErrorCode, GrantKind, TokenError};
use crate::config::{ClientAuth, OAuthConfig, ParamsIn};
use crate::secret::{redact_text, SecretFileError};

/// Largest token response read; a larger one is an error, not a buffer.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// One grant to perform.
#[derive(Clone)]
pub enum Grant {
    Password,
    RefreshToken(SecretString),
}

impl Grant {
    pub fn kind(&self) -> GrantKind {
        match self {
            Grant::Password => GrantKind::Password,
            Grant::RefreshToken(_) => GrantKind::RefreshToken,
        }
    }
}

/// The secrets a grant may send, as read just before it (by the token task,
/// which reads secret files afresh for every attempt; see
/// [`crate::secret::LiveSecret`]).
pub struct Credentials {
    pub client_secret: SecretString,
    /// Sent only with the password grant.
    pub password: SecretString,
}

impl Credentials {
    /// Both secrets read now, as configured (`check --live`).
    pub fn load(cfg: &OAuthConfig) -> Result<Self, SecretFileError> {
        Ok(Credentials {
            client_secret: cfg.client_secret.load()?,
            password: cfg.password.load()?,
        })
    }
}

/// A successful token response.
#[derive(Debug)]
pub struct TokenResponse {
    pub access_token: SecretString,
    /// From `expires_in`, the JWT `exp`, or `oauth.default_lifetime`.
    pub lifetime: Duration,
    pub refresh_token: Option<SecretString>,
    pub scope: Option<String>,
}

/// Something that answers grants: the real HTTP endpoint, or a test's stand-in.
pub trait TokenEndpoint: Send + Sync + 'static {
    /// Performs one grant with `credentials`; must give up after `timeout`.
    fn request(
        &self,
        grant: &Grant,
        credentials: &Credentials,
        timeout: Duration,
    ) -> impl Future<Output = Result<TokenResponse, TokenError>> + Send;
}

/// The token endpoint over HTTP, as `[oauth]` describes it.
pub struct HttpTokenClient {
    http: reqwest::Client,
    cfg: OAuthConfig,
}

impl HttpTokenClient {
    pub fn new(cfg: OAuthConfig, tls: rustls::ClientConfig) -> Result<Self, reqwest::Error> {
        // reqwest honours HTTPS_PROXY / NO_PROXY by default, like the upstream client.
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("token-sidecar/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpTokenClient { http, cfg })
    }

    /// The grant parameters, form-urlencoded (also right for a query string).
    fn params(
        &self,
        grant: &Grant,
        password: Option<&SecretString>,
        secret: &SecretString,
    ) -> String {
        let mut params = form_urlencoded::Serializer::new(String::new());
        params.append_pair("grant_type", grant.kind().as_str());
        match grant {
            Grant::Password => {
                params.append_pair("username", &self.cfg.username);
                params.append_pair("password", password.map_or("", |p| p.expose_secret()));
            }
            Grant::RefreshToken(rt) => {
                params.append_pair("refresh_token", rt.expose_secret());
            }
        }
        if !self.cfg.scope.is_empty() {
            params.append_pair("scope", &self.cfg.scope);
        }
        for (k, v) in &self.cfg.extra_params {
            params.append_pair(k, v);
        }
        if self.cfg.client_auth == ClientAuth::Body {
            params.append_pair("client_id", &self.cfg.client_id);
            params.append_pair("client_secret", secret.expose_secret());
        }
        params.finish()
    }

    async fn send(
        &self,
        grant: &Grant,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<TokenResponse, TokenError> {
        let secret = &credentials.client_secret;
        let password = match grant {
            Grant::Password => Some(&credentials.password),
            Grant::RefreshToken(_) => None,
        };
        let params = self.params(grant, password, secret);

        let mut url = self.cfg.token_url.clone();
        let body = match self.cfg.params_in {
            ParamsIn::Query => {
                let q = match url.query() {
                    Some(existing) if !existing.is_empty() => format!("{existing}&{params}"),
                    _ => params,
                };
                url.set_query(Some(&q));
                None
            }
            ParamsIn::Form => Some(params),
        };
        let mut req = self
            .http
            .post(url)
            .timeout(timeout)
            .header(http::header::ACCEPT, "application/json");
        if let Some(auth) = basic_auth(
            self.cfg.client_auth,
            &self.cfg.client_id,
            secret.expose_secret(),
        ) {
            let mut value = http::HeaderValue::try_from(auth).map_err(|_| {
                TokenError::Invalid("client id or secret holds characters a header cannot carry")
            })?;
            value.set_sensitive(true);
            req = req.header(http::header::AUTHORIZATION, value);
        }
        req = match body {
            Some(b) => req
                .header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(b),
            None => req.header(http::header::CONTENT_LENGTH, "0"),
        };
        let resp = req.send().await.map_err(|e| transport(e, timeout))?;
        let status = resp.status().as_u16();
        let body = read_capped(resp, timeout).await?;
        let known: Vec<&str> = [
            Some(secret.expose_secret()),
            password.map(|p| p.expose_secret()),
        ]
        .into_iter()
        .flatten()
        .chain(match grant {
            Grant::RefreshToken(rt) => Some(rt.expose_secret()),
            Grant::Password => None,
        })
        .collect();
        parse_token_response(
            status,
            &body,
            self.cfg.default_lifetime,
            SystemTime::now(),
            &known,
        )
    }
}

impl TokenEndpoint for HttpTokenClient {
    fn request(
        &self,
        grant: &Grant,
        credentials: &Credentials,
        timeout: Duration,
    ) -> impl Future<Output = Result<TokenResponse, TokenError>> + Send {
        self.send(grant, credentials, timeout)
    }
}

/// The `Authorization: Basic` value for `client_auth`, or `None` for `body`.
pub fn basic_auth(mode: ClientAuth, id: &str, secret: &str) -> Option<String> {
    let raw = match mode {
        ClientAuth::Basic => format!("{id}:{secret}"),
        ClientAuth::BasicRfc => {
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            format!("{}:{}", enc(id), enc(secret))
        }
        ClientAuth::Body => return None,
    };
    Some(format!("Basic {}", STANDARD.encode(raw)))
}

/// reqwest's error text includes the URL, which holds the password when
/// `params_in = "query"`: strip it before the error goes anywhere.
fn transport(e: reqwest::Error, timeout: Duration) -> TokenError {
    if e.is_timeout() {
        TokenError::Timeout(timeout)
    } else {
        TokenError::Transport(e.without_url())
    }
}

async fn read_capped(
    mut resp: reqwest::Response,
    timeout: Duration,
) -> Result<Vec<u8>, TokenError> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(TokenError::TooLarge(MAX_RESPONSE_BYTES));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport(e, timeout))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(TokenError::TooLarge(MAX_RESPONSE_BYTES));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Parses a token endpoint answer.
///
/// Lenient where servers differ (`token_type` in any case, `expires_in` as a
/// number or numeric string, unknown fields, any `Content-Type`), strict where
/// it matters (an access token, a bearer type, a positive lifetime). Error
/// messages never quote the body, which holds tokens; an `error_description`
/// is redacted with `known` secrets and token-like runs removed.
pub fn parse_token_response(
    status: u16,
    body: &[u8],
    default_lifetime: Duration,
    now: SystemTime,
    known: &[&str],
) -> Result<TokenResponse, TokenError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        let code = json.as_ref().and_then(|j| error_code(j, known));
        return Err(match code {
            Some(code) => TokenError::Rejected {
                status,
                code,
                description: json
                    .as_ref()
                    .and_then(|j| j.get("error_description"))
                    .and_then(Value::as_str)
                    .map(|d| redact_text(d, known)),
            },
            None => TokenError::Status { status },
        });
    }
    let json = match json {
        Some(j) => j,
        None => {
            return Err(serde_json::from_slice::<Value>(body)
                .map(|_| ())
                .map_or_else(TokenError::NotJson, |_| {
                    TokenError::Invalid("not a JSON object")
                }))
        }
    };
    let obj = json
        .as_object()
        .ok_or(TokenError::Invalid("not a JSON object"))?;
    if obj.contains_key("error") {
        // Some servers answer 200 with an error body.
        return Err(TokenError::Rejected {
            status,
            code: error_code(&json, known).unwrap_or_else(|| "unknown_error".into()),
            description: obj
                .get("error_description")
                .and_then(Value::as_str)
                .map(|d| redact_text(d, known)),
        });
    }
    let access = obj
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(TokenError::Invalid("no access_token"))?;
    if !access.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(TokenError::Invalid(
            "access_token holds characters a header cannot carry",
        ));
    }
    match obj.get("token_type").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case("bearer") => {}
        Some(_) => return Err(TokenError::Invalid("token_type is not bearer")),
        None => return Err(TokenError::Invalid("no token_type")),
    }
    let expires_in: Option<f64> = match obj.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => Some(
            s.trim()
                .parse::<f64>()
                .map_err(|_| TokenError::Invalid("expires_in is not a number"))?,
        ),
        Some(_) => return Err(TokenError::Invalid("expires_in is not a number")),
    };
    let jwt_left = jwt_exp(access).and_then(|exp| {
        let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
        (exp > now).then(|| Duration::from_secs_f64(exp - now))
    });
    let lifetime = match expires_in {
        Some(s) if s.is_finite() && s > 0.0 => {
            Duration::from_secs_f64(s.min(10.0 * 365.0 * 86400.0))
        }
        Some(_) => jwt_left.ok_or(TokenError::Invalid(
            "expires_in is not positive and the token carries no future exp",
        ))?,
        None => jwt_left.unwrap_or(default_lifetime),
    };
    let refresh_token = obj
        .get("refresh_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(|s| SecretString::from(s.to_owned()));
    Ok(TokenResponse {
        access_token: SecretString::from(access.to_owned()),
        lifetime,
        refresh_token,
        scope: obj.get("scope").and_then(Value::as_str).map(str::to_owned),
    })
}

/// The OAuth `error` code of an answer, if it looks like one (short, printable
/// ASCII). Kept raw for classification; it is shown redacted like the
/// description, since a server may put anything there.
fn error_code(json: &Value, known: &[&str]) -> Option<ErrorCode> {
    json.get("error")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty() && c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()))
        .map(|c| ErrorCode::new(c, known))
}

/// The `exp` claim of a JWT, read without verifying it: the sidecar only
/// needs to know when the server will stop accepting the token.
fn jwt_exp(token: &str) -> Option<f64> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn parse(status: u16, body: &str) -> Result<TokenResponse, TokenError> {
        parse_token_response(
            status,
            body.as_bytes(),
            Duration::from_secs(300),
            UNIX_EPOCH + Duration::from_secs(NOW),
            &["s3cret"],
        )
    }

    fn jwt(exp: u64) -> String {
        let payload = URL_SAFE_NO_PAD.encode(format!("{{\"exp\":{exp}}}"));
        format!("eyJhbGciOiJIUzI1NiJ9.{payload}.sig")
    }

    #[test]
    fn parses_the_documented_example() {
        let body = include_str!("../../tests/data/paymentiq-token-response.json");
        let t = parse(200, body).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(86399));
        assert!(t.refresh_token.is_some());
        assert_eq!(t.scope.as_deref(), Some("default"));
    }

    #[test]
    fn lenient_fields() {
        let t = parse(
            200,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":"60","x":1}"#,
        )
        .unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(60));
        let t = parse(200, r#"{"access_token":"a","token_type":"BEARER"}"#).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(300));
    }

    #[test]
    fn lifetime_from_jwt_exp_when_missing_or_not_positive() {
        let body = format!(
            r#"{{"access_token":"{}","token_type":"bearer"}}"#,
            jwt(NOW + 120)
        );
        assert_eq!(
            parse(200, &body).unwrap().lifetime,
            Duration::from_secs(120)
        );
        let body = format!(
            r#"{{"access_token":"{}","token_type":"bearer","expires_in":0}}"#,
            jwt(NOW + 50)
        );
        assert_eq!(parse(200, &body).unwrap().lifetime, Duration::from_secs(50));
        let body = format!(
            r#"{{"access_token":"{}","token_type":"bearer","expires_in":-5}}"#,
            jwt(NOW - 50)
        );
        assert!(matches!(parse(200, &body), Err(TokenError::Invalid(_))));
        assert!(matches!(
            parse(
                200,
                r#"{"access_token":"a","token_type":"bearer","expires_in":0}"#
            ),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn rejects_what_cannot_be_used() {
        assert!(matches!(
            parse(200, r#"{"access_token":"a","token_type":"mac"}"#),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            parse(200, r#"{"token_type":"bearer"}"#),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            parse(200, r#"{"access_token":"a","#),
            Err(TokenError::NotJson(_))
        ));
        assert!(matches!(parse(200, "<html>"), Err(TokenError::NotJson(_))));
        assert!(matches!(parse(200, "[1]"), Err(TokenError::Invalid(_))));
        assert!(matches!(
            parse(200, r#"{"access_token":"a b","token_type":"bearer"}"#),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn oauth_errors_are_parsed_whatever_the_status_and_redacted() {
        let e = parse(
            401,
            r#"{"error":"invalid_token","error_description":"Invalid refresh token: eyJhbGciOiJIUzI1NiJ9abcdefghijkl"}"#,
        )
        .unwrap_err();
        match e {
            TokenError::Rejected {
                status,
                code,
                description,
            } => {
                assert_eq!((status, code.as_str()), (401, "invalid_token"));
                assert!(code.is("invalid_token"));
                assert_eq!(
                    description.as_deref(),
                    Some("Invalid refresh token: [redacted]")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse(503, "<html>down</html>"),
            Err(TokenError::Status { status: 503 })
        ));
        let e = parse(
            400,
            r#"{"error":"invalid_grant","error_description":"bad s3cret"}"#,
        )
        .unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn registered_codes_are_classified_and_shown_as_sent() {
        use crate::token::{ErrorClass, GrantKind};
        // 23 characters: once redacted before classification, and so
        // retried as slowly as a refused login.
        let e = parse(400, r#"{"error":"temporarily_unavailable"}"#).unwrap_err();
        assert_eq!(e.code(), "temporarily_unavailable");
        assert_eq!(e.class(GrantKind::Password), ErrorClass::Transient);
        let e = parse(
            400,
            r#"{"error":"unsupported_grant_type","error_description":"Unsupported grant type: None"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "token endpoint answered 400 unsupported_grant_type: Unsupported grant type: None"
        );
        // A code that is a known secret is shown redacted, classified raw.
        let e = parse(400, r#"{"error":"s3cret"}"#).unwrap_err();
        assert_eq!(e.code(), "[redacted]");
    }

    #[test]
    fn basic_auth_modes() {
        assert_eq!(
            basic_auth(ClientAuth::Basic, "a b", "c:d").unwrap(),
            format!("Basic {}", STANDARD.encode("a b:c:d"))
        );
        assert_eq!(
            basic_auth(ClientAuth::BasicRfc, "a b", "c:d").unwrap(),
            format!("Basic {}", STANDARD.encode("a+b:c%3Ad"))
        );
        assert!(basic_auth(ClientAuth::Body, "a", "b").is_none());
    }
}

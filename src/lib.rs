//! token-sidecar: holds an OAuth2 bearer token for a legacy application and
//! injects it into every call the application makes to a backoffice API.
//!
//! # Architecture
//! Data flows one way: [`config`] -> [`token`] source -> [`proxy`]; the
//! [`admin`] server only reads.
//!
//! - [`config`]: the TOML file plus `TOKEN_SIDECAR_<SECTION>__<KEY>`
//!   environment overrides, validated in one pass that reports every problem.
//!   It names the routes (a path prefix, an upstream and a credentials
//!   profile) and the credentials profiles (token sources); the
//!   single-upstream form is one of each, both named `default`.
//! - [`token`]: per credentials profile, one background task
//!   ([`token::refresher`]) is the only caller of its token endpoint
//!   ([`token::client`]: the password, client_credentials and refresh_token
//!   grants). It publishes the current token
//!   into an `ArcSwap` and refreshes it ahead of expiry on a pure schedule
//!   ([`token::schedule`]), riding out auth-server faults with classified
//!   errors ([`token::error`]).
//! - [`proxy`]: the reverse proxy on loopback: one policy
//!   ([`proxy::policy`]: admission, header edits, the 401 replay, local
//!   answers, logging) applied by two HTTP engines, the fast lane
//!   ([`proxy::lane`], plain HTTP/1.1 parsed in place) and hyper
//!   ([`proxy::hyper_engine`], everything else, or everything with
//!   `proxy.fast_lane = false`). A request's route is the first decision
//!   (the longest prefix of its path, looked up without allocating); it
//!   then loads that route's profile's token once
//!   (lock-free), replaces the client's `Authorization`, strips hop-by-hop
//!   headers and streams both bodies. A 401 `invalid_token` from the upstream
//!   invalidates that token generation and replays the request once (twice
//!   if the replay's new token was itself revoked in flight).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/status`, and two control
//!   endpoints, on their own listener.
//! - [`app`] assembles these; [`serve`] holds the accept loops, the hyper
//!   connection serving both servers use, and graceful shutdown (it knows
//!   no engine: each server hands it a [`serve::Handler`]); [`runtime`] the
//!   tokio scheduler; [`lifecycle`] the draining state; [`metrics`] the
//!   Prometheus registry; [`secret`] the redacting secret types; [`tls`] the
//!   one TLS policy of both clients; [`fake`] the stand-in servers of the
//!   demo, soak and tests; [`differential`] a test and fuzz harness that
//!   runs the same bytes through both proxy engines.
//!
//! # Token lifecycle
//! For each profile: obtained with its own grant (password or
//! client_credentials) at start (requests wait up to `proxy.token_wait` for
//! it), refreshed at 75-80% of its lifetime with the refresh_token grant when
//! the server issued a refresh token (else, or when it is refused, with the
//! profile's own grant), injected until its expiry less a margin and never
//! after; during an outage the requests of its routes get 503
//! `token_unavailable` with `Retry-After` once the token has run out.

pub mod admin;
pub mod app;
pub mod check;
pub mod config;
pub mod demo;
pub mod differential;
pub mod fake;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod runtime;
pub mod secret;
pub mod serve;
pub mod tls;
pub mod token;

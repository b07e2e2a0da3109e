//! Routes: which upstream, credentials and settings a request gets, chosen
//! by the longest prefix of its raw path. The first decision of the
//! policy: both engines look a request's route up here, for every protocol,
//! before any other rule applies.
//!
//! A route with prefix `/merchants/` takes `/merchants/...` and the prefix
//! without its slash (`/merchants`); the rest of the path, from its `/`,
//! goes to the route's upstream base path. The lookup is a scan of at most
//! a handful of prefixes, longest first: no allocation, no lock, and for
//! the single-route form (`/`) one byte compared.

use std::sync::Arc;

use super::error::ProxyError;
use super::policy::Policy;
use crate::metrics::{Metrics, RouteMetrics};

/// One route: its policy and the engines' ways to its upstream (`L`: the
/// fast lane's, `H`: hyper's; generic so that this module, which both
/// engines read, depends on neither).
pub struct Route<L, H> {
    pub policy: Policy,
    /// `None` when `proxy.fast_lane` is off or an egress proxy is in the way.
    pub lane: Option<L>,
    pub hyper: H,
}

/// What looking a path up found: its route and the rest of the path after
/// the route's prefix, or the answer to give instead.
pub type Found<'r, 'p, L, H> = Result<(&'r Arc<Route<L, H>>, &'p [u8]), ProxyError>;

/// The routes one listener serves.
pub struct Routes<L, H> {
    /// Longest prefix first.
    routes: Vec<Arc<Route<L, H>>>,
    /// The series of requests that match no route (`route=""`).
    pub no_route: Arc<RouteMetrics>,
    pub metrics: Arc<Metrics>,
    /// `proxy.access_log`, for requests that match no route.
    pub access_log: bool,
}

impl<L, H> Routes<L, H> {
    pub fn new(mut routes: Vec<Arc<Route<L, H>>>, metrics: Arc<Metrics>, access_log: bool) -> Self {
        routes.sort_by_key(|r| std::cmp::Reverse(r.policy.route.prefix.len()));
        Routes {
            routes,
            no_route: Arc::new(metrics.route("")),
            metrics,
            access_log,
        }
    }

    /// Every route, longest prefix first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route<L, H>>> {
        self.routes.iter()
    }

    /// The route of a raw request path and the rest of the path after the
    /// route's prefix (from its `/`). A target that is not a path (`*`) is
    /// 400; a path under no prefix is 404 `no_route`.
    #[inline]
    pub fn find<'p>(&self, path: &'p [u8]) -> Found<'_, 'p, L, H> {
        if path.first() != Some(&b'/') {
            return Err(ProxyError::BadRequest("the request target must be a path"));
        }
        for route in &self.routes {
            if let Some(rest) = route.policy.rest_of(path) {
                return Ok((route, rest));
            }
        }
        Err(ProxyError::NoRoute)
    }

    /// The series a request counts in, given what [`Routes::find`] said:
    /// its route's; for a target that is no path (`CONNECT`, `*`), the
    /// route of `/` if there is one (it takes every path); else those of
    /// no route (`route=""`).
    pub fn stats(&self, found: &Found<'_, '_, L, H>) -> Arc<RouteMetrics> {
        match found {
            Ok((route, _)) => route.policy.stats.clone(),
            Err(ProxyError::NoRoute) => self.no_route.clone(),
            Err(_) => self
                .routes
                .last()
                .filter(|r| r.policy.route.prefix == "/")
                .map_or_else(|| self.no_route.clone(), |r| r.policy.stats.clone()),
        }
    }
}

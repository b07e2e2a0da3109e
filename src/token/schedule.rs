//! Pure policy: when to refresh, how long to back off, how long a token may be
//! used. Functions of numbers (and an injected jitter in `[0, 1)`), so they are
//! tested exactly, without clocks.

use std::time::Duration;

use crate::config::RefreshConfig;

/// The refresh band: a token is refreshed between 75% and 80% of its lifetime,
/// uniformly (so a fleet started together does not refresh together).
///
/// Worked example with the PaymentIQ lifetime of 86399 s: 75% is 64799 s
/// (18.0 h) and 80% is 69119 s (19.2 h); `refresh.min_remaining` (30 s) is far
/// from binding, so the first refresh falls between 18.0 h and 19.2 h.
pub const REFRESH_BAND: (f64, f64) = (0.75, 0.80);

/// Ceiling on the default expiry margin: a token is not injected in its last
/// 5 s (or last 10% of a short lifetime), so clock skew and the request's own
/// travel time cannot make the upstream see it expired.
pub const DEFAULT_MAX_MARGIN: Duration = Duration::from_secs(5);

/// When to refresh a token of `lifetime`, counted from when it was requested.
///
/// Uniformly inside `REFRESH_BAND` (75-80%), but never later than
/// `min_remaining` before expiry, where `min_remaining` is capped at half the
/// lifetime so that a 3 s token is refreshed at all; and never sooner than
/// `min_interval`. When `min_remaining` binds, the whole band slides down
/// below that latest point instead of collapsing onto it, so short tokens
/// keep their jitter (pods of a fleet holding one shared token then do not
/// all refresh at the same instant).
///
/// Examples (defaults): 86399 s -> 18.0-19.2 h; 150 s and longer -> 75-80%;
/// 120 s -> 84-90 s; 3 s -> 1.35-1.5 s; 1 s -> 1 s (`min_interval`).
pub fn refresh_after(lifetime: Duration, jitter: f64, cfg: &RefreshConfig) -> Duration {
    let width = REFRESH_BAND.1 - REFRESH_BAND.0;
    let min_remaining = cfg.min_remaining.min(lifetime / 2);
    let latest = lifetime.saturating_sub(min_remaining);
    let top = lifetime.mul_f64(REFRESH_BAND.1).min(latest);
    let early_by = lifetime.mul_f64(width * (1.0 - jitter.clamp(0.0, 1.0)));
    top.saturating_sub(early_by).max(cfg.min_interval)
}

/// The mean of [`refresh_after`] over the jitter, for capacity planning and the
/// soak's stampede bound.
pub fn mean_refresh_after(lifetime: Duration, cfg: &RefreshConfig) -> Duration {
    (refresh_after(lifetime, 0.0, cfg) + refresh_after(lifetime, 1.0, cfg)) / 2
}

/// How long before its true expiry a token stops being injected:
/// `refresh.expiry_margin`, or by default the smaller of 5 s and 10% of the
/// lifetime (so 3 s tokens keep 2.7 s of use).
pub fn expiry_margin(lifetime: Duration, cfg: &RefreshConfig) -> Duration {
    match cfg.expiry_margin {
        Some(m) => m.min(lifetime),
        None => DEFAULT_MAX_MARGIN.min(lifetime / 10),
    }
}

/// Delay before retrying after the `failures`-th transient error in a row:
/// exponential from `backoff_base` up to `backoff_max`, full jitter, never
/// below `min_interval`; while a token is still usable for `usable_left`, at
/// most half of that, so the retry happens before the token runs out; and
/// while none is (`usable_left` is `None`), at most
/// `backoff_max_without_token`, since every request meanwhile gets a 503 and
/// the first attempt after the endpoint comes back ends the outage.
///
/// Example (defaults): the 7th failure in a row waits up to 60 s with a
/// token left, up to 5 s without one.
pub fn transient_backoff(
    failures: u32,
    jitter: f64,
    usable_left: Option<Duration>,
    cfg: &RefreshConfig,
) -> Duration {
    let max = match usable_left {
        Some(_) => cfg.backoff_max,
        None => cfg.backoff_max.min(cfg.backoff_max_without_token),
    };
    let exp = exponential(cfg.backoff_base.min(max), max, failures);
    let mut d = exp.mul_f64(jitter.clamp(0.0, 1.0));
    if let Some(left) = usable_left {
        d = d.min(left / 2);
    }
    d.max(cfg.min_interval)
}

/// Delay after the `failures`-th permanent error (a refused login) in a row:
/// a step doubling from `rejected_backoff_min`, and a delay uniformly between
/// the step and twice the step, never above `rejected_backoff_max`. So the
/// first retry comes 1-2 min after a refused login, later ones 2-4, 4-8, ...
/// up to 30 min (defaults): a fleet spreads out, and never retries a refused
/// login sooner than `rejected_backoff_min` (failed logins lock users).
pub fn rejected_backoff(failures: u32, jitter: f64, cfg: &RefreshConfig) -> Duration {
    let step = exponential(cfg.rejected_backoff_min, cfg.rejected_backoff_max, failures);
    (step + step.mul_f64(jitter.clamp(0.0, 1.0)))
        .min(cfg.rejected_backoff_max)
        .max(cfg.min_interval)
}

/// Delay before restarting the token task after its `restarts`-th panic in
/// a row: exponential from `min_interval` up to `backoff_max`, full jitter,
/// never below `min_interval` (a restarted task logs in at once, and no two
/// token calls come closer than that). Defaults: up to 1, 2, 4, 8, 16 s.
pub fn restart_backoff(restarts: u32, jitter: f64, cfg: &RefreshConfig) -> Duration {
    exponential(
        cfg.min_interval,
        cfg.backoff_max.max(cfg.min_interval),
        restarts,
    )
    .mul_f64(jitter.clamp(0.0, 1.0))
    .max(cfg.min_interval)
}

fn exponential(base: Duration, max: Duration, failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << shift).min(max)
}

/// Whole seconds a client should wait before retrying, at least 1.
pub fn retry_after_secs(until_next_attempt: Duration) -> u64 {
    until_next_attempt.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> RefreshConfig {
        RefreshConfig {
            min_remaining: Duration::from_secs(30),
            min_interval: Duration::from_secs(1),
            expiry_margin: None,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_max_without_token: Duration::from_secs(5),
            rejected_backoff_min: Duration::from_secs(60),
            rejected_backoff_max: Duration::from_secs(1800),
            secret_poll_interval: Duration::from_secs(2),
        }
    }

    #[test]
    fn paymentiq_lifetime_refreshes_between_18_and_19_2_hours() {
        let l = Duration::from_secs(86399);
        assert_eq!(refresh_after(l, 0.0, &cfg()).as_secs(), 64799);
        assert_eq!(refresh_after(l, 1.0, &cfg()).as_secs(), 69119);
    }

    #[test]
    fn short_tokens_slide_the_band_below_min_remaining() {
        let ms = Duration::from_millis;
        // 3 s: min_remaining capped at 1.5 s; band 1.35-1.5 s.
        assert_eq!(refresh_after(ms(3000), 0.0, &cfg()), ms(1350));
        assert_eq!(refresh_after(ms(3000), 1.0, &cfg()), ms(1500));
        // 120 s: at most 90 s (30 s before expiry); band 84-90 s.
        assert_eq!(refresh_after(ms(120_000), 0.0, &cfg()), ms(84_000));
        assert_eq!(refresh_after(ms(120_000), 1.0, &cfg()), ms(90_000));
        // 150 s: the band itself, 112.5-120 s.
        assert_eq!(refresh_after(ms(150_000), 0.0, &cfg()), ms(112_500));
        assert_eq!(refresh_after(ms(150_000), 1.0, &cfg()), ms(120_000));
        // min_interval wins for sub-second tokens.
        assert_eq!(refresh_after(ms(500), 0.0, &cfg()), ms(1000));
    }

    #[test]
    fn margins() {
        assert_eq!(
            expiry_margin(Duration::from_secs(3), &cfg()),
            Duration::from_millis(300)
        );
        assert_eq!(
            expiry_margin(Duration::from_secs(86399), &cfg()),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn backoffs_grow_and_cap() {
        let c = cfg();
        assert_eq!(transient_backoff(1, 1.0, None, &c), Duration::from_secs(1));
        assert_eq!(transient_backoff(3, 1.0, None, &c), Duration::from_secs(4));
        assert_eq!(
            transient_backoff(30, 1.0, Some(Duration::from_secs(10)), &c),
            Duration::from_secs(5)
        );
        assert_eq!(transient_backoff(30, 0.0, None, &c), Duration::from_secs(1));
        // Without a usable token: backoff_max_without_token.
        assert_eq!(transient_backoff(30, 1.0, None, &c), Duration::from_secs(5));
        assert_eq!(transient_backoff(3, 1.0, None, &c), Duration::from_secs(4));
        assert_eq!(
            transient_backoff(30, 1.0, Some(Duration::from_secs(1000)), &c),
            Duration::from_secs(60)
        );
        assert_eq!(rejected_backoff(1, 0.0, &c), Duration::from_secs(60));
        assert_eq!(rejected_backoff(1, 1.0, &c), Duration::from_secs(120));
        assert_eq!(rejected_backoff(3, 0.5, &c), Duration::from_secs(360));
        assert_eq!(rejected_backoff(5, 1.0, &c), Duration::from_secs(1800));
        assert_eq!(rejected_backoff(20, 0.0, &c), Duration::from_secs(1800));
    }

    #[test]
    fn restarts_back_off_from_min_interval() {
        let c = cfg();
        let s = Duration::from_secs;
        assert_eq!(restart_backoff(1, 1.0, &c), s(1));
        assert_eq!(restart_backoff(5, 1.0, &c), s(16));
        assert_eq!(restart_backoff(30, 1.0, &c), s(60));
        assert_eq!(restart_backoff(5, 0.0, &c), s(1));
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }

    proptest! {
        #[test]
        fn refresh_is_inside_bounds(secs in 1u64..=30 * 86400, millis in 0u64..1000, jitter in 0.0f64..1.0) {
            let c = cfg();
            let l = Duration::from_secs(secs) + Duration::from_millis(millis);
            let at = refresh_after(l, jitter, &c);
            // never sooner than min_interval
            prop_assert!(at >= c.min_interval);
            // never later than min_remaining (capped at half the lifetime) before expiry,
            // unless the lifetime is so short that min_interval wins
            let min_remaining = c.min_remaining.min(l / 2);
            prop_assert!(at <= l.saturating_sub(min_remaining).max(c.min_interval));
            // never later than 80% of the lifetime; inside 75-80% when
            // min_remaining does not bind; a band 5% wide in any case
            prop_assert!(at <= l.mul_f64(0.80).max(c.min_interval) + Duration::from_nanos(1));
            if l >= Duration::from_secs(150) {
                prop_assert!(at >= l.mul_f64(0.75) - Duration::from_nanos(1));
            }
            let lo = refresh_after(l, 0.0, &c);
            let hi = refresh_after(l, 1.0, &c);
            prop_assert!(lo <= at && at <= hi);
            if lo > c.min_interval {
                prop_assert!(hi - lo >= l.mul_f64(0.05) - Duration::from_micros(1));
            }
            // the token is still usable when the refresh is due
            if l >= Duration::from_secs(2) {
                prop_assert!(at < l - expiry_margin(l, &c));
            }
        }

        #[test]
        fn refused_logins_back_off_between_min_and_max(n in 1u32..64, jitter in 0.0f64..1.0) {
            let c = cfg();
            let d = rejected_backoff(n, jitter, &c);
            prop_assert!(d >= c.rejected_backoff_min && d <= c.rejected_backoff_max);
            prop_assert!(d >= rejected_backoff(n.saturating_sub(1).max(1), jitter, &c));
        }

        #[test]
        fn without_a_token_retries_come_at_most_backoff_max_without_token_apart(
            n in 1u32..100,
            jitter in 0.0f64..1.0,
            cap_ms in 1u64..120_000,
            min_ms in 1u64..10_000,
        ) {
            let mut c = cfg();
            c.backoff_max_without_token = Duration::from_millis(cap_ms);
            c.min_interval = Duration::from_millis(min_ms);
            let d = transient_backoff(n, jitter, None, &c);
            prop_assert!(d >= c.min_interval);
            prop_assert!(d <= c.backoff_max_without_token.max(c.min_interval));
            prop_assert!(d <= c.backoff_max.max(c.min_interval));
        }

        #[test]
        fn transient_retry_happens_while_the_token_is_usable(n in 1u32..100, jitter in 0.0f64..1.0, left_ms in 2_001u64..10_000_000) {
            let c = cfg();
            let left = Duration::from_millis(left_ms);
            let d = transient_backoff(n, jitter, Some(left), &c);
            prop_assert!(d < left);
            prop_assert!(d >= c.min_interval);
        }
    }
}

//! Local rate limiting of a workload's inbound HTTP traffic, from the
//! mesh's `RateLimitPolicy` (in the spirit of Linkerd's
//! `HTTPLocalRateLimitPolicy`).
//!
//! One [`RateLimiter`] is built from one policy and asked, for every
//! inbound request, whether it may pass ([`RateLimiter::check`]).
//!
//! # Limits
//!
//! - `total`: one token bucket shared by every request.
//! - `perIdentity`: one bucket per client identity. The identity is the
//!   caller's SPIFFE ID (`spiffe://td/ns/<ns>/sa/<sa>`) when it presented a
//!   mesh certificate, or its IP address as a string for plaintext callers.
//! - `overrides`: tried in order, the first match wins. An override matches
//!   when its `clients` list is empty or contains the identity, **and** its
//!   `routes` list is empty or one of its routes matches. A route matches
//!   when its `path` (if set) matches the request path and its `methods`
//!   list is empty or contains the request method. A matching override's
//!   limit *replaces* `perIdentity` for that request: it is a separate
//!   per-identity bucket, keyed by identity and override index.
//!
//! Path matching follows [`StringMatch`]: `exact` is string equality,
//! `prefix` is a string prefix, `regex` (RE2 syntax) must match the whole
//! path. The path is the request's URI path; a query string (`?…`) passed
//! along with it is ignored. Methods compare case-sensitively, as HTTP
//! methods do (`GET` is not `get`).
//!
//! # Buckets
//!
//! `requestsPerSecond` is the refill rate and `burst` the bucket size
//! (defaults to `requestsPerSecond`); buckets start full. A request needs a
//! token from `total` (if set) and one from the per-identity or override
//! bucket that applies to it (if any). Both buckets are checked before
//! either is taken from, so a limited request consumes nothing: a client
//! over its own limit does not drain the shared `total` bucket, and a
//! request refused by `total` does not drain the client's bucket.
//!
//! Bucket levels are kept in integer nano-tokens, so refill is exact (no
//! floating-point drift) and times are plain [`Instant`]s supplied by the
//! caller, which makes the limiter deterministic under test. A `now` older
//! than one already seen refills nothing (it never panics or underflows).
//!
//! # Limited requests
//!
//! A limited request is answered `429 Too Many Requests` by the caller,
//! with `Retry-After` set to the `retry_after` of [`Decision::Limited`]: the whole
//! number of seconds (at least 1) until every bucket the request needs has
//! a token. `scope` says which bucket refused it (`"total"`,
//! `"per-identity"` or `"override"`); when both are empty it names the one
//! that refills last, `"total"` on a tie.
//!
//! # Memory
//!
//! Per-identity state is bounded: at most [`MAX_IDENTITIES`] identities are
//! tracked per policy. When a new identity arrives at the cap, identities
//! whose buckets are all full (idle) are dropped first (that loses nothing:
//! a new bucket starts full); if that does not free enough room, the least
//! recently used identities are dropped. Room is freed in batches
//! (1/32 of the cap) so the sweep is amortised rather than paid per request.
//! A request that only the `total` bucket (or nothing) applies to adds no
//! state, and neither does a new identity refused by `total`.
//!
//! # Cost
//!
//! [`RateLimiter::check`] matches overrides without any lock, then takes one
//! [`std::sync::Mutex`] lock (none at all when no bucket applies). Known
//! identities are looked up by `&str` and allocate nothing; only a new
//! identity allocates (its key and room for the buckets it can use).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use mesh_api::networking::{RateLimit, RateLimitPolicySpec, StringMatch};
use regex::Regex;

/// Most client identities tracked per policy.
pub const MAX_IDENTITIES: usize = 10_000;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Bucket levels are in nano-tokens: with the rate in tokens per second,
/// one nanosecond refills exactly `rate` nano-tokens.
const ONE_TOKEN: u64 = NANOS_PER_SEC;

/// Per-identity bucket slot of `perIdentity`; override `i` uses `i + 1`.
const PER_IDENTITY_SLOT: usize = 0;

/// The answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Answer 429 with `Retry-After: retry_after.as_secs()`.
    Limited {
        /// Whole seconds, at least 1.
        retry_after: Duration,
        /// `"total"`, `"per-identity"` or `"override"`.
        scope: &'static str,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed)
    }
}

/// Token-bucket limits for every request of one workload's policy.
#[derive(Debug)]
pub struct RateLimiter {
    total: Option<Limit>,
    per_identity: Option<Limit>,
    overrides: Vec<Override>,
    max_identities: usize,
    state: Mutex<State>,
}

#[derive(Clone, Copy, Debug)]
struct Limit {
    /// Tokens per second, i.e. nano-tokens per nanosecond.
    rate: u64,
    /// Bucket size in nano-tokens.
    capacity: u64,
}

#[derive(Debug)]
struct Override {
    clients: HashSet<String>,
    routes: Vec<Route>,
    limit: Limit,
}

#[derive(Debug)]
struct Route {
    path: Option<PathMatch>,
    methods: Vec<String>,
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, Default)]
struct State {
    /// Created full on first use.
    total: Option<Bucket>,
    identities: HashMap<Box<str>, Client>,
    /// Recency stamp handed to the client touched by each check; unique,
    /// so least-recently-used eviction is exact.
    tick: u64,
}

#[derive(Debug)]
struct Client {
    last_used: u64,
    /// `(slot, bucket)`, only for the slots this client has used. Capacity
    /// is reserved up front for every slot that can apply to the identity,
    /// so adding one later never reallocates.
    buckets: Vec<(usize, Bucket)>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Nano-tokens, at most the limit's capacity.
    tokens: u64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl RateLimiter {
    /// Builds the limiter of one policy. Fails, naming the field, on an
    /// invalid regex, a zero `requestsPerSecond` or `burst`, or a path match
    /// without exactly one of `exact`, `prefix` or `regex`.
    pub fn new(spec: &RateLimitPolicySpec) -> Result<RateLimiter, String> {
        let total = spec
            .total
            .as_ref()
            .map(|l| Limit::new("spec.total", l))
            .transpose()?;
        let per_identity = spec
            .per_identity
            .as_ref()
            .map(|l| Limit::new("spec.perIdentity", l))
            .transpose()?;
        let mut overrides = Vec::with_capacity(spec.overrides.len());
        for (i, o) in spec.overrides.iter().enumerate() {
            let p = format!("spec.overrides[{i}]");
            let mut routes = Vec::with_capacity(o.routes.len());
            for (j, r) in o.routes.iter().enumerate() {
                let path = r
                    .path
                    .as_ref()
                    .map(|m| PathMatch::new(&format!("{p}.routes[{j}].path"), m))
                    .transpose()?;
                routes.push(Route {
                    path,
                    methods: r.methods.clone(),
                });
            }
            overrides.push(Override {
                clients: o.clients.iter().cloned().collect(),
                routes,
                limit: Limit::new(&format!("{p}.limit"), &o.limit)?,
            });
        }
        Ok(RateLimiter {
            total,
            per_identity,
            overrides,
            max_identities: MAX_IDENTITIES,
            state: Mutex::new(State::default()),
        })
    }

    /// Decides one request from `identity` (SPIFFE ID, or IP address for
    /// plaintext callers) for `method` and `path`, at time `now`, and takes
    /// its tokens when it is allowed.
    pub fn check(&self, identity: &str, method: &str, path: &str, now: Instant) -> Decision {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let client_limit = match self
            .overrides
            .iter()
            .position(|o| o.matches(identity, method, path))
        {
            Some(i) => self.overrides.get(i).map(|o| (i + 1, o.limit, "override")),
            None => self
                .per_identity
                .map(|l| (PER_IDENTITY_SLOT, l, "per-identity")),
        };
        if self.total.is_none() && client_limit.is_none() {
            return Decision::Allowed;
        }

        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *guard;
        let total = match self.total {
            Some(limit) => {
                let bucket = state.total.get_or_insert(Bucket::full(limit, now));
                bucket.refill(limit, now);
                Some((limit, bucket))
            }
            None => None,
        };
        let Some((slot, limit, scope)) = client_limit else {
            return decide(total, None);
        };

        let tick = state.tick;
        state.tick = state.tick.wrapping_add(1);
        if let Some(client) = state.identities.get_mut(identity) {
            client.last_used = tick;
            let bucket = client.bucket(slot, limit, now);
            bucket.refill(limit, now);
            return decide(total, Some((limit, bucket, scope)));
        }

        // A new identity: its bucket starts full, so only `total` can refuse
        // it, and a refused request adds no state.
        let decision = decide(total, None);
        if decision.is_allowed() {
            if state.identities.len() >= self.max_identities {
                self.make_room(&mut state.identities, now);
            }
            let mut client = Client {
                last_used: tick,
                buckets: Vec::with_capacity(self.slots_for(identity)),
            };
            let bucket = client.bucket(slot, limit, now);
            bucket.tokens = bucket.tokens.saturating_sub(ONE_TOKEN);
            state.identities.insert(Box::from(identity), client);
        }
        decision
    }

    /// Identities currently holding per-identity or override buckets.
    pub fn tracked_identities(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .identities
            .len()
    }

    /// How many per-identity slots can ever apply to `identity`.
    fn slots_for(&self, identity: &str) -> usize {
        usize::from(self.per_identity.is_some())
            + self
                .overrides
                .iter()
                .filter(|o| o.clients.is_empty() || o.clients.contains(identity))
                .count()
    }

    fn slot_limit(&self, slot: usize) -> Option<Limit> {
        match slot.checked_sub(1) {
            None => self.per_identity,
            Some(i) => self.overrides.get(i).map(|o| o.limit),
        }
    }

    /// Frees room for at least one new identity, and for a batch of them so
    /// that the sweep is not repeated for every new identity: drops idle
    /// (all buckets full) identities, then the least recently used.
    fn make_room(&self, identities: &mut HashMap<Box<str>, Client>, now: Instant) {
        identities.retain(|_, c| {
            !c.buckets.iter().all(|(slot, b)| {
                self.slot_limit(*slot)
                    .is_none_or(|l| b.level(l, now) >= l.capacity)
            })
        });
        let batch = (self.max_identities / 32).max(1);
        let target = self.max_identities.saturating_sub(batch);
        let excess = identities.len().saturating_sub(target);
        if excess == 0 {
            return;
        }
        let mut stamps: Vec<u64> = identities.values().map(|c| c.last_used).collect();
        if excess >= stamps.len() {
            identities.clear();
            return;
        }
        // Stamps are unique: exactly `excess` identities are at or below.
        let (_, &mut newest_evicted, _) = stamps.select_nth_unstable(excess - 1);
        identities.retain(|_, c| c.last_used > newest_evicted);
    }

    #[cfg(test)]
    fn tracks(&self, identity: &str) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .identities
            .contains_key(identity)
    }
}

/// Takes a token from every bucket if all have one; otherwise says which
/// refuses the request and for how long. Buckets are already refilled.
fn decide(
    total: Option<(Limit, &mut Bucket)>,
    client: Option<(Limit, &mut Bucket, &'static str)>,
) -> Decision {
    let mut limited: Option<(u64, &'static str)> = None;
    if let Some((limit, bucket)) = &total {
        let wait = bucket.wait_nanos(*limit);
        if wait > 0 {
            limited = Some((wait, "total"));
        }
    }
    if let Some((limit, bucket, scope)) = &client {
        let wait = bucket.wait_nanos(*limit);
        if wait > 0 && limited.is_none_or(|(w, _)| wait > w) {
            limited = Some((wait, scope));
        }
    }
    if let Some((wait, scope)) = limited {
        return Decision::Limited {
            retry_after: Duration::from_secs(wait.div_ceil(NANOS_PER_SEC).max(1)),
            scope,
        };
    }
    if let Some((_, bucket)) = total {
        bucket.tokens = bucket.tokens.saturating_sub(ONE_TOKEN);
    }
    if let Some((_, bucket, _)) = client {
        bucket.tokens = bucket.tokens.saturating_sub(ONE_TOKEN);
    }
    Decision::Allowed
}

impl Limit {
    fn new(path: &str, l: &RateLimit) -> Result<Limit, String> {
        if l.requests_per_second == 0 {
            return Err(format!("{path}.requestsPerSecond: must be at least 1"));
        }
        let burst = l.burst.unwrap_or(l.requests_per_second);
        if burst == 0 {
            return Err(format!("{path}.burst: must be at least 1"));
        }
        Ok(Limit {
            rate: u64::from(l.requests_per_second),
            // At most u32::MAX * 1e9, well inside u64.
            capacity: u64::from(burst).saturating_mul(ONE_TOKEN),
        })
    }
}

impl Bucket {
    fn full(limit: Limit, now: Instant) -> Bucket {
        Bucket {
            tokens: limit.capacity,
            updated: now,
        }
    }

    /// The level at `now`, without changing the bucket.
    fn level(&self, limit: Limit, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos();
        let level = elapsed
            .saturating_mul(u128::from(limit.rate))
            .saturating_add(u128::from(self.tokens))
            .min(u128::from(limit.capacity));
        u64::try_from(level).unwrap_or(limit.capacity)
    }

    fn refill(&mut self, limit: Limit, now: Instant) {
        self.tokens = self.level(limit, now);
        if now > self.updated {
            self.updated = now;
        }
    }

    /// Nanoseconds until the bucket holds a whole token; 0 if it does.
    fn wait_nanos(&self, limit: Limit) -> u64 {
        ONE_TOKEN
            .saturating_sub(self.tokens)
            .div_ceil(limit.rate.max(1))
    }
}

impl Client {
    fn bucket(&mut self, slot: usize, limit: Limit, now: Instant) -> &mut Bucket {
        let i = match self.buckets.iter().position(|(s, _)| *s == slot) {
            Some(i) => i,
            None => {
                self.buckets.push((slot, Bucket::full(limit, now)));
                self.buckets.len() - 1
            }
        };
        &mut self.buckets[i].1
    }
}

impl Override {
    fn matches(&self, identity: &str, method: &str, path: &str) -> bool {
        (self.clients.is_empty() || self.clients.contains(identity))
            && (self.routes.is_empty() || self.routes.iter().any(|r| r.matches(method, path)))
    }
}

impl Route {
    fn matches(&self, method: &str, path: &str) -> bool {
        self.path.as_ref().is_none_or(|m| m.matches(path))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
    }
}

impl PathMatch {
    fn new(path: &str, m: &StringMatch) -> Result<PathMatch, String> {
        match (&m.exact, &m.prefix, &m.regex) {
            (Some(s), None, None) => Ok(PathMatch::Exact(s.clone())),
            (None, Some(s), None) => Ok(PathMatch::Prefix(s.clone())),
            (None, None, Some(re)) => mesh_api::validate::compile_regex(re)
                .map(PathMatch::Regex)
                .map_err(|e| {
                    let e = e.to_string();
                    let e = e.split_whitespace().collect::<Vec<_>>().join(" ");
                    format!("{path}.regex: invalid regex {re:?}: {e}")
                }),
            (None, None, None) => Err(format!("{path}: one of exact, prefix or regex must be set")),
            _ => Err(format!(
                "{path}: only one of exact, prefix or regex may be set"
            )),
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(s) => path == s,
            PathMatch::Prefix(s) => path.starts_with(s.as_str()),
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::networking::{RateLimitOverride, RateLimitRoute};

    const ALICE: &str = "spiffe://cluster.local/ns/shop/sa/alice";
    const BOB: &str = "spiffe://cluster.local/ns/shop/sa/bob";
    const ADMIN: &str = "spiffe://cluster.local/ns/ops/sa/admin";

    fn limit(rps: u32, burst: Option<u32>) -> RateLimit {
        RateLimit {
            requests_per_second: rps,
            burst,
        }
    }

    fn limiter(spec: RateLimitPolicySpec) -> RateLimiter {
        match RateLimiter::new(&spec) {
            Ok(l) => l,
            Err(e) => panic!("valid spec rejected: {e}"),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn get(l: &RateLimiter, id: &str, now: Instant) -> Decision {
        l.check(id, "GET", "/", now)
    }

    fn limited(scope: &'static str) -> Decision {
        Decision::Limited {
            retry_after: Duration::from_secs(1),
            scope,
        }
    }

    /// Sends `n` requests; returns how many were allowed.
    fn allowed(l: &RateLimiter, id: &str, method: &str, path: &str, n: usize, t: Instant) -> usize {
        (0..n)
            .filter(|_| l.check(id, method, path, t).is_allowed())
            .count()
    }

    fn route(path: Option<StringMatch>, methods: &[&str]) -> RateLimitRoute {
        RateLimitRoute {
            path,
            methods: methods.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn burst_then_steady_rate() {
        let l = limiter(RateLimitPolicySpec {
            total: Some(limit(10, Some(20))),
            ..Default::default()
        });
        let t0 = Instant::now();
        for i in 0..20 {
            assert_eq!(get(&l, ALICE, t0), Decision::Allowed, "request {i}");
        }
        assert_eq!(get(&l, ALICE, t0), limited("total"));
        // 10 rps: one token every 100ms.
        assert_eq!(get(&l, ALICE, t0 + ms(99)), limited("total"));
        assert_eq!(get(&l, ALICE, t0 + ms(100)), Decision::Allowed);
        assert_eq!(get(&l, ALICE, t0 + ms(100)), limited("total"));
        // A further second brings exactly ten more.
        assert_eq!(allowed(&l, ALICE, "GET", "/", 15, t0 + ms(1100)), 10);
        // Idle long enough refills to the burst, not beyond.
        assert_eq!(allowed(&l, ALICE, "GET", "/", 30, t0 + ms(60_000)), 20);
    }

    #[test]
    fn refill_has_no_rounding_drift() {
        // 3 rps does not divide a second evenly; many small steps must add
        // up to exactly the same tokens as one big one. (Burst 2, so that
        // no refill is cut off at the bucket size.)
        let l = limiter(RateLimitPolicySpec {
            total: Some(limit(3, Some(2))),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(allowed(&l, ALICE, "GET", "/", 2, t0), 2);
        let mut passed = 0;
        for step in 1..=3000u64 {
            // 1ms steps for 3 seconds: exactly 9 tokens.
            if get(&l, ALICE, t0 + ms(step)).is_allowed() {
                passed += 1;
            }
        }
        assert_eq!(passed, 9);
    }

    #[test]
    fn burst_defaults_to_rate() {
        let l = limiter(RateLimitPolicySpec {
            per_identity: Some(limit(5, None)),
            ..Default::default()
        });
        assert_eq!(allowed(&l, ALICE, "GET", "/", 10, Instant::now()), 5);
    }

    #[test]
    fn per_identity_buckets_are_separate() {
        let l = limiter(RateLimitPolicySpec {
            per_identity: Some(limit(2, None)),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(allowed(&l, ALICE, "GET", "/", 2, t0), 2);
        assert_eq!(get(&l, ALICE, t0), limited("per-identity"));
        assert_eq!(allowed(&l, BOB, "GET", "/", 3, t0), 2);
        // Plaintext callers are keyed by IP address.
        assert_eq!(allowed(&l, "10.0.0.7", "GET", "/", 3, t0), 2);
        assert_eq!(allowed(&l, "10.0.0.8", "GET", "/", 3, t0), 2);
        assert_eq!(l.tracked_identities(), 4);
    }

    #[test]
    fn total_and_per_identity_interplay() {
        let l = limiter(RateLimitPolicySpec {
            total: Some(limit(3, None)),
            per_identity: Some(limit(2, None)),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(allowed(&l, ALICE, "GET", "/", 2, t0), 2);
        assert_eq!(get(&l, ALICE, t0), limited("per-identity"));
        assert_eq!(get(&l, BOB, t0), Decision::Allowed);
        // Bob still has a per-identity token, but the shared bucket is empty.
        assert_eq!(get(&l, BOB, t0), limited("total"));
        // A new identity refused by `total` is not tracked.
        assert_eq!(get(&l, "10.1.1.1", t0), limited("total"));
        assert_eq!(l.tracked_identities(), 2);
    }

    #[test]
    fn limited_request_does_not_consume_total() {
        let l = limiter(RateLimitPolicySpec {
            total: Some(limit(1, Some(10))),
            per_identity: Some(limit(1, Some(1))),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(get(&l, ALICE, t0), Decision::Allowed);
        for _ in 0..50 {
            assert_eq!(get(&l, ALICE, t0), limited("per-identity"));
        }
        // Nine tokens are left in `total` for everyone else.
        let others = (0..20)
            .filter(|i| get(&l, &format!("10.0.0.{i}"), t0).is_allowed())
            .count();
        assert_eq!(others, 9);
    }

    #[test]
    fn limited_request_does_not_consume_per_identity() {
        let l = limiter(RateLimitPolicySpec {
            total: Some(limit(2, Some(1))),
            per_identity: Some(limit(1, Some(2))),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(get(&l, ALICE, t0), Decision::Allowed); // alice 1 left
        for _ in 0..5 {
            assert_eq!(get(&l, ALICE, t0), limited("total"));
        }
        // Alice's bucket still holds 1, +1 refill = 2 (full); total has 1.
        assert_eq!(get(&l, ALICE, t0 + ms(1000)), Decision::Allowed); // 1 left
        // 500ms later total has 1 again and alice 1.5: allowed. Had the
        // refused requests drained her bucket she would have 0.5 here.
        assert_eq!(get(&l, ALICE, t0 + ms(1500)), Decision::Allowed);
    }

    #[test]
    fn override_by_client() {
        let l = limiter(RateLimitPolicySpec {
            per_identity: Some(limit(1, None)),
            overrides: vec![RateLimitOverride {
                clients: vec![ADMIN.to_string()],
                routes: vec![],
                limit: limit(5, None),
            }],
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(allowed(&l, ADMIN, "GET", "/", 5, t0), 5);
        assert_eq!(get(&l, ADMIN, t0), limited("override"));
        assert_eq!(allowed(&l, ALICE, "GET", "/", 5, t0), 1);
        assert_eq!(get(&l, ALICE, t0), limited("per-identity"));
    }

    #[test]
    fn override_by_route_prefix_has_its_own_bucket() {
        let l = limiter(RateLimitPolicySpec {
            per_identity: Some(limit(3, None)),
            overrides: vec![RateLimitOverride {
                clients: vec![],
                routes: vec![route(Some(StringMatch::prefix("/api/")), &[])],
                limit: limit(1, None),
            }],
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(l.check(ALICE, "GET", "/api/orders", t0), Decision::Allowed);
        assert_eq!(
            l.check(ALICE, "POST", "/api/users", t0),
            limited("override")
        );
        // Other paths use alice's per-identity bucket, untouched so far.
        assert_eq!(allowed(&l, ALICE, "GET", "/api", 5, t0), 3);
        // The override bucket is per identity too.
        assert_eq!(l.check(BOB, "GET", "/api/orders", t0), Decision::Allowed);
        assert_eq!(l.check(BOB, "GET", "/api/orders", t0), limited("override"));
    }

    #[test]
    fn override_by_regex_and_method() {
        let l = limiter(RateLimitPolicySpec {
            per_identity: Some(limit(100, None)),
            overrides: vec![RateLimitOverride {
                clients: vec![],
                routes: vec![route(
                    Some(StringMatch::regex("/users/[0-9]+")),
                    &["POST", "PUT"],
                )],
                limit: limit(1, None),
            }],
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(allowed(&l, ALICE, "POST", "/users/12", 3, t0), 1);
        assert_eq!(l.check(ALICE, "PUT", "/users/7", t0), limited("override"));
        // The query string is not part of the path.
        assert_eq!(
            l.check(ALICE, "POST", "/users/12?dry=1", t0),
            limited("override")
        );
        // Other method, or a path the regex does not match as a whole.
        assert_eq!(allowed(&l, ALICE, "GET", "/users/12", 3, t0), 3);
        assert_eq!(allowed(&l, ALICE, "POST", "/users/12/avatar", 3, t0), 3);
        assert_eq!(allowed(&l, ALICE, "POST", "/v2/users/12", 3, t0), 3);
        assert_eq!(allowed(&l, ALICE, "post", "/users/12", 3, t0), 3);
    }

    #[test]
    fn override_exact_path_and_any_route() {
        let l = limiter(RateLimitPolicySpec {
            overrides: vec![RateLimitOverride {
                clients: vec![],
                routes: vec![
                    route(Some(StringMatch::exact("/login")), &[]),
                    route(None, &["DELETE"]),
                ],
                limit: limit(1, None),
            }],
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(l.check(ALICE, "POST", "/login", t0), Decision::Allowed);
        // Same bucket whichever route of the override matched.
        assert_eq!(l.check(ALICE, "DELETE", "/x", t0), limited("override"));
        // Nothing applies: no limit and no state.
        assert_eq!(allowed(&l, BOB, "GET", "/login/x", 10, t0), 10);
        assert!(!l.tracks(BOB));
    }

    #[test]
    fn override_needs_client_and_route() {
        let l = limiter(RateLimitPolicySpec {
            per_identity: Some(limit(10, None)),
            overrides: vec![RateLimitOverride {
                clients: vec![ADMIN.to_string()],
                routes: vec![route(Some(StringMatch::prefix("/admin")), &[])],
                limit: limit(1, None),
            }],
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(allowed(&l, ADMIN, "GET", "/admin/x", 3, t0), 1);
        assert_eq!(allowed(&l, ALICE, "GET", "/admin/x", 3, t0), 3);
        assert_eq!(allowed(&l, ADMIN, "GET", "/public", 3, t0), 3);
    }

    #[test]
    fn first_matching_override_wins() {
        let l = limiter(RateLimitPolicySpec {
            overrides: vec![
                RateLimitOverride {
                    clients: vec![ADMIN.to_string()],
                    routes: vec![],
                    limit: limit(4, None),
                },
                RateLimitOverride {
                    clients: vec![],
                    routes: vec![route(Some(StringMatch::prefix("/")), &[])],
                    limit: limit(2, None),
                },
            ],
            ..Default::default()
        });
        let t0 = Instant::now();
        assert_eq!(allowed(&l, ADMIN, "GET", "/a", 10, t0), 4);
        assert_eq!(allowed(&l, ALICE, "GET", "/a", 10, t0), 2);
    }

    #[test]
    fn retry_after_is_whole_seconds_until_a_token() {
        let l = limiter(RateLimitPolicySpec {
            total: Some(limit(1, None)),
            ..Default::default()
        });
        let t0 = Instant::now();
        assert!(get(&l, ALICE, t0).is_allowed());
        // 1s away, then 1ms away: both round up to one whole second.
        assert_eq!(get(&l, ALICE, t0), limited("total"));
        assert_eq!(get(&l, ALICE, t0 + ms(999)), limited("total"));
        assert!(get(&l, ALICE, t0 + ms(1000)).is_allowed());

        // 1000 rps: 1ms to the next token, still reported as 1s.
        let fast = limiter(RateLimitPolicySpec {
            per_identity: Some(limit(1000, Some(1))),
            ..Default::default()
        });
        assert!(get(&fast, ALICE, t0).is_allowed());
        match get(&fast, ALICE, t0) {
            Decision::Limited { retry_after, scope } => {
                assert_eq!(retry_after, Duration::from_secs(1));
                assert_eq!(retry_after.subsec_nanos(), 0);
                assert_eq!(scope, "per-identity");
            }
            Decision::Allowed => panic!("expected a limit"),
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let now = Instant::now();
        let one_rps = Limit {
            rate: 1,
            capacity: ONE_TOKEN,
        };
        let mut empty = Bucket {
            tokens: 0,
            updated: now,
        };
        assert_eq!(empty.wait_nanos(one_rps), NANOS_PER_SEC);
        let mut almost = Bucket {
            tokens: ONE_TOKEN - 1,
            updated: now,
        };
        assert_eq!(almost.wait_nanos(one_rps), 1);
        // 1ns away is still reported as one whole second.
        assert_eq!(
            decide(None, Some((one_rps, &mut almost, "override"))),
            limited("override")
        );
        // A zero rate cannot be built, but must not divide by zero either.
        let zero = Limit { rate: 0, ..one_rps };
        assert_eq!(
            decide(None, Some((zero, &mut empty, "override"))),
            limited("override")
        );
    }

    #[test]
    fn identity_cap_evicts_least_recently_used() {
        let l = limiter(RateLimitPolicySpec {
            per_identity: Some(limit(1, None)),
            ..Default::default()
        });
        let t0 = Instant::now();
        for i in 0..MAX_IDENTITIES {
            assert!(get(&l, &format!("10.0.{}.{}", i / 256, i % 256), t0).is_allowed());
        }
        assert_eq!(l.tracked_identities(), MAX_IDENTITIES);
        let oldest = "10.0.0.0";
        let second = "10.0.0.1";
        let newest = "10.0.39.15"; // 9999
        assert!(l.tracks(newest));
        // Touching the oldest makes it the most recently used.
        assert_eq!(get(&l, oldest, t0), limited("per-identity"));

        // None is idle (all drained at t0), so the least recently used go.
        assert!(get(&l, "newcomer", t0).is_allowed());
        let tracked = l.tracked_identities();
        assert!(tracked <= MAX_IDENTITIES, "{tracked}");
        assert!(tracked >= MAX_IDENTITIES * 9 / 10, "{tracked}");
        assert!(l.tracks("newcomer"));
        assert!(l.tracks(oldest));
        assert!(l.tracks(newest));
        assert!(!l.tracks(second));
        // Evicted identities come back with a full bucket; kept ones
        // remember they are empty.
        assert_eq!(get(&l, newest, t0), limited("per-identity"));
        assert_eq!(get(&l, oldest, t0), limited("per-identity"));
        assert!(get(&l, second, t0).is_allowed());

        // Further newcomers never push past the cap.
        for i in 0..3 * MAX_IDENTITIES {
            get(&l, &format!("n{i}"), t0 + ms(i as u64 / 1000));
            assert!(l.tracked_identities() <= MAX_IDENTITIES);
        }
    }

    #[test]
    fn identity_cap_evicts_idle_first() {
        let l = limiter(RateLimitPolicySpec {
            // Busy `/fast` clients refill in 100ms...
            per_identity: Some(limit(10, Some(1))),
            // ...`/slow` ones take 10s.
            overrides: vec![RateLimitOverride {
                clients: vec![],
                routes: vec![route(Some(StringMatch::prefix("/slow")), &[])],
                limit: limit(1, Some(10)),
            }],
            ..Default::default()
        });
        let t0 = Instant::now();
        let half = MAX_IDENTITIES / 2;
        // The slow half is used first (least recently)...
        for i in 0..half {
            assert!(
                l.check(&format!("slow-{i}"), "GET", "/slow", t0)
                    .is_allowed()
            );
        }
        // ...the fast half later.
        for i in 0..half {
            assert!(
                l.check(&format!("fast-{i}"), "GET", "/fast", t0 + ms(10))
                    .is_allowed()
            );
        }
        assert_eq!(l.tracked_identities(), MAX_IDENTITIES);
        // At 500ms the fast buckets are full again (idle), the slow ones
        // are not: the idle ones go although more recently used.
        assert!(get(&l, "newcomer", t0 + ms(500)).is_allowed());
        assert_eq!(l.tracked_identities(), half + 1);
        assert!(l.tracks("slow-0"));
        assert!(!l.tracks("fast-0"));
        assert!(!l.tracks(&format!("fast-{}", half - 1)));
    }

    #[test]
    fn invalid_regex_names_the_field() {
        let spec = RateLimitPolicySpec {
            overrides: vec![RateLimitOverride {
                clients: vec![],
                routes: vec![
                    route(Some(StringMatch::regex("/ok/.*")), &[]),
                    route(Some(StringMatch::regex("/users/(")), &[]),
                ],
                limit: limit(1, None),
            }],
            ..Default::default()
        };
        let err = RateLimiter::new(&spec).map(|_| ()).unwrap_err();
        assert!(
            err.starts_with("spec.overrides[0].routes[1].path.regex: invalid regex \"/users/(\""),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn other_invalid_fields_are_named() {
        let err = |spec: RateLimitPolicySpec| RateLimiter::new(&spec).map(|_| ()).unwrap_err();
        assert_eq!(
            err(RateLimitPolicySpec {
                total: Some(limit(0, Some(5))),
                ..Default::default()
            }),
            "spec.total.requestsPerSecond: must be at least 1"
        );
        assert_eq!(
            err(RateLimitPolicySpec {
                per_identity: Some(limit(5, Some(0))),
                ..Default::default()
            }),
            "spec.perIdentity.burst: must be at least 1"
        );
        let both = StringMatch {
            exact: Some("/a".into()),
            prefix: Some("/a".into()),
            regex: None,
        };
        assert_eq!(
            err(RateLimitPolicySpec {
                overrides: vec![
                    RateLimitOverride {
                        clients: vec![ADMIN.into()],
                        routes: vec![],
                        limit: limit(1, None),
                    },
                    RateLimitOverride {
                        clients: vec![],
                        routes: vec![route(Some(both), &[])],
                        limit: limit(1, None),
                    },
                ],
                ..Default::default()
            }),
            "spec.overrides[1].routes[0].path: only one of exact, prefix or regex may be set"
        );
        assert_eq!(
            err(RateLimitPolicySpec {
                overrides: vec![RateLimitOverride {
                    clients: vec![ADMIN.into()],
                    routes: vec![],
                    limit: limit(0, None),
                }],
                ..Default::default()
            }),
            "spec.overrides[0].limit.requestsPerSecond: must be at least 1"
        );
    }

    #[test]
    fn no_limits_allow_everything_without_state() {
        let l = limiter(RateLimitPolicySpec::default());
        assert_eq!(allowed(&l, ALICE, "GET", "/", 1000, Instant::now()), 1000);
        assert_eq!(l.tracked_identities(), 0);
    }

    #[test]
    fn time_going_backwards_or_far_forward_is_safe() {
        let l = limiter(RateLimitPolicySpec {
            total: Some(limit(u32::MAX, None)),
            per_identity: Some(limit(1, Some(2))),
            ..Default::default()
        });
        let t0 = Instant::now();
        let later = t0 + ms(5000);
        assert!(get(&l, ALICE, later).is_allowed());
        // An older instant (another thread read the clock first) refills
        // nothing and does not move the bucket's time back.
        assert!(get(&l, ALICE, t0).is_allowed());
        assert_eq!(get(&l, ALICE, t0), limited("per-identity"));
        assert_eq!(get(&l, ALICE, later + ms(999)), limited("per-identity"));
        assert!(get(&l, ALICE, later + ms(1000)).is_allowed());
        // Years of idleness saturate at the burst.
        let far = t0 + Duration::from_secs(100 * 365 * 24 * 3600);
        assert_eq!(allowed(&l, ALICE, "GET", "/", 5, far), 2);
    }

    #[test]
    fn reads_the_policy_yaml() {
        let yaml = r#"
apiVersion: networking.mesh.dev/v1
kind: RateLimitPolicy
metadata:
  name: api
  namespace: shop
spec:
  total:
    requestsPerSecond: 100
  perIdentity:
    requestsPerSecond: 2
    burst: 3
  overrides:
  - clients: ["spiffe://cluster.local/ns/ops/sa/admin"]
    limit:
      requestsPerSecond: 50
  - routes:
    - path: {prefix: /checkout}
      methods: [POST]
    limit:
      requestsPerSecond: 1
"#;
        let res =
            mesh_api::load::parse_resource("rlp.yaml", 1, yaml, mesh_api::Kind::RateLimitPolicy);
        let spec = match res {
            Ok(mesh_api::Resource::RateLimitPolicy(p)) => p.spec,
            other => panic!("unexpected {other:?}"),
        };
        let l = limiter(spec);
        let t0 = Instant::now();
        assert_eq!(allowed(&l, ADMIN, "POST", "/checkout", 60, t0), 50);
        assert_eq!(allowed(&l, ALICE, "POST", "/checkout", 5, t0), 1);
        assert_eq!(allowed(&l, ALICE, "GET", "/checkout", 5, t0), 3);
        assert_eq!(l.check(ALICE, "POST", "/checkout", t0), limited("override"));
    }

    #[test]
    fn concurrent_checks_share_the_buckets() {
        let l = limiter(RateLimitPolicySpec {
            total: Some(limit(1, Some(1000))),
            ..Default::default()
        });
        let t0 = Instant::now();
        let passed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let l = &l;
                    s.spawn(move || allowed(l, &format!("10.0.0.{i}"), "GET", "/", 200, t0))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(passed, 1000);
    }

    #[test]
    fn limiter_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RateLimiter>();
    }
}

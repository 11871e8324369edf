//! Consistent-hash load-balancing tables, built the way Envoy builds them for
//! Istio's `DestinationRule.trafficPolicy.loadBalancer.consistentHash`
//! (`ringHash` and `maglev`).
//!
//! Both tables map a 64-bit *request hash* (whatever the route's hash policy
//! produced: header, cookie, source IP, query parameter) to an index into the
//! host slice they were built from. Hosts are identified by their *host key*:
//! the string Envoy hashes, i.e. `host->address()->asString()` (for example
//! `"10.0.0.1:9080"` or `"[fd00::1]:9080"`), or the hostname when
//! `use_hostname_for_hashing` is set. Given the same host keys, weights and
//! table parameters, the tables here place hosts exactly where Envoy's
//! `RingHashLoadBalancer::Ring` and `OriginalMaglevTable` do (both use
//! xxHash64 with seed 0, Envoy's `HashUtil::xxHash64`).
//!
//! Envoy builds one table per priority level from the hosts it considers
//! (healthy hosts, or all hosts in panic mode); callers wanting identical picks
//! must pass the same host set. Locality-weighted variants and
//! `hash_balance_factor` (bounded load) are not implemented here.
//!
//! Nothing in this module panics on any input: weights of 0 are treated as 1,
//! sizes are clamped or rejected, and lookups on empty tables return `None`.

use std::fmt;
use std::fmt::Write as _;

// ---------------------------------------------------------------------------
// xxHash64
// ---------------------------------------------------------------------------

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline]
fn read_u64(b: &[u8]) -> u64 {
    // Callers always pass exactly 8 bytes (chunks_exact); the fallback is unreachable.
    u64::from_le_bytes(<[u8; 8]>::try_from(b).unwrap_or([0; 8]))
}

#[inline]
fn read_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(<[u8; 4]>::try_from(b).unwrap_or([0; 4]))
}

#[inline]
fn xxh_round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

#[inline]
fn xxh_merge(acc: u64, v: u64) -> u64 {
    (acc ^ xxh_round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 (xxHash, 64-bit variant, spec v0.1.1) of `data` with `seed`.
///
/// Envoy hashes ring entries and Maglev offsets with `HashUtil::xxHash64(key)`
/// (seed 0) and Maglev skips with seed 1.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let mut stripes = data.chunks_exact(32);
    let mut h = if data.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        for stripe in &mut stripes {
            for (acc, lane) in v.iter_mut().zip(stripe.chunks_exact(8)) {
                *acc = xxh_round(*acc, read_u64(lane));
            }
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for acc in v {
            h = xxh_merge(h, acc);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(data.len() as u64);

    let mut words = stripes.remainder().chunks_exact(8);
    for w in &mut words {
        h ^= xxh_round(0, read_u64(w));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
    }
    let mut rest = words.remainder();
    if rest.len() >= 4 {
        let (w, r) = rest.split_at(4);
        h ^= u64::from(read_u32(w)).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = r;
    }
    for &b in rest {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }

    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Envoy host weights are >= 1; a 0 here is treated as 1.
#[inline]
fn effective_weight(w: u32) -> u64 {
    u64::from(w.max(1))
}

/// Envoy's `normalizeHostWeights` (without locality weighting):
/// `weight / sum` in `f64`, plus the min and max normalized weight.
/// Unlike Envoy we do not reject a weight sum above `u32::MAX`; it is
/// accumulated in `u64` and cannot overflow for any slice that fits in memory.
fn normalized_weights(hosts: &[(String, u32)]) -> (Vec<f64>, f64, f64) {
    let sum: u64 = hosts.iter().map(|(_, w)| effective_weight(*w)).sum();
    let sum = sum as f64;
    let mut min = f64::INFINITY;
    let mut max = 0.0_f64;
    let weights = hosts
        .iter()
        .map(|(_, w)| {
            let n = effective_weight(*w) as f64 / sum;
            min = min.min(n);
            max = max.max(n);
            n
        })
        .collect();
    (weights, min, max)
}

/// Shared fallback walk for `pick_with`: visits host indices produced by
/// `candidates` in order, calls `usable` at most once per distinct host, and
/// gives up as soon as every host present in the table has been rejected.
fn first_usable(
    candidates: impl Iterator<Item = usize>,
    num_hosts: usize,
    hosts_in_table: usize,
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut rejected: Vec<bool> = Vec::new();
    let mut remaining = hosts_in_table;
    for host in candidates {
        if rejected.get(host).copied().unwrap_or(false) {
            continue;
        }
        if usable(host) {
            return Some(host);
        }
        if rejected.is_empty() {
            // Allocate only once the fast path (first candidate usable) failed.
            rejected = vec![false; num_hosts];
        }
        if let Some(slot) = rejected.get_mut(host) {
            *slot = true;
        }
        remaining = remaining.saturating_sub(1);
        if remaining == 0 {
            break;
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Ring hash
// ---------------------------------------------------------------------------

/// Envoy's default `minimum_ring_size`.
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;

/// Envoy's default (and largest allowed) `maximum_ring_size`: 8M entries.
pub const MAX_RING_SIZE: u64 = 8_388_608;

/// Ketama-style hash ring, built like Envoy's `RingHashLoadBalancer::Ring`
/// (`source/extensions/load_balancing_policies/ring_hash/ring_hash_lb.cc`)
/// with `hash_function: XX_HASH` (the default) and
/// `maximum_ring_size` = 8,388,608 (the default and the proto's upper bound).
///
/// Construction:
/// * weights are normalized (`w / sum`);
/// * `scale = min(ceil(min_w * minimum_ring_size) / min_w, max_ring_size)`, so
///   the lightest host gets a whole number of entries (at least one unless the
///   8M cap bites) and the ring does not exceed the cap (give or take one
///   entry of floating-point rounding in the running sums, as in Envoy);
/// * hosts are walked in the given order keeping running sums
///   (`target += scale * w`; emit while `current < target`), host `h` emitting
///   entries `xxh64("<host_key>_<i>", 0)` for `i = 0, 1, ...`;
/// * entries are sorted by hash. Envoy uses an unstable `std::sort`; we break
///   ties between equal hashes by host index so the ring is deterministic.
///
/// Note that a host's entry count depends on the whole host set (the ring
/// keeps roughly the same total size), so removing a host also adds entries for
/// the remaining hosts. That costs some extra key movement versus fixed-vnode
/// ketama, especially with few hosts; this is Envoy's behaviour, kept on
/// purpose so picks match Envoy sidecars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingHash {
    /// `(hash, host index)`, sorted.
    ring: Vec<(u64, u32)>,
    num_hosts: usize,
    hosts_on_ring: usize,
}

impl RingHash {
    /// Builds the ring for `hosts` (`(host_key, weight)`; weight 0 is treated as
    /// 1). `minimum_ring_size` is clamped to `1..=MAX_RING_SIZE` (Envoy rejects
    /// values above the maximum at config time; a 0 would give Envoy an empty
    /// ring, here it yields one entry per lightest host). Use
    /// [`DEFAULT_MIN_RING_SIZE`] for Envoy's default. Hosts beyond index
    /// `u32::MAX` are ignored.
    pub fn new(hosts: &[(String, u32)], minimum_ring_size: u64) -> RingHash {
        let hosts = hosts
            .get(..hosts.len().min(u32::MAX as usize))
            .unwrap_or(&[]);
        if hosts.is_empty() {
            return RingHash {
                ring: Vec::new(),
                num_hosts: 0,
                hosts_on_ring: 0,
            };
        }
        let (weights, min_w, _) = normalized_weights(hosts);
        let min_ring_size = minimum_ring_size.clamp(1, MAX_RING_SIZE) as f64;
        let scale = ((min_w * min_ring_size).ceil() / min_w).min(MAX_RING_SIZE as f64);
        // `scale` is finite and in [1, 8M] here, so the cast is exact enough.
        let ring_size = scale.ceil() as usize;

        let mut ring: Vec<(u64, u32)> = Vec::with_capacity(ring_size.saturating_add(1));
        let mut key = String::new();
        let mut current = 0.0_f64;
        let mut target = 0.0_f64;
        let mut hosts_on_ring = 0;
        for (idx, ((host_key, _), w)) in hosts.iter().zip(&weights).enumerate() {
            key.clear();
            key.push_str(host_key);
            key.push('_');
            let base = key.len();
            target += scale * w;
            let mut i: u64 = 0;
            while current < target {
                key.truncate(base);
                // Writing into a String cannot fail.
                let _ = write!(key, "{i}");
                // idx < u32::MAX thanks to the truncation above.
                ring.push((xxh64(key.as_bytes(), 0), idx as u32));
                i += 1;
                current += 1.0;
            }
            if i > 0 {
                hosts_on_ring += 1;
            }
        }
        ring.sort_unstable();
        RingHash {
            ring,
            num_hosts: hosts.len(),
            hosts_on_ring,
        }
    }

    /// Position of the first ring entry with `entry.hash >= hash`, wrapping to
    /// the start of the ring (Envoy's port of ketama's `ketama_get_server`).
    fn slot(&self, hash: u64) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let p = self.ring.partition_point(|&(h, _)| h < hash);
        Some(if p == self.ring.len() { 0 } else { p })
    }

    /// Index into the `hosts` slice for a request hash: the host owning the
    /// first ring entry whose hash is `>= hash` (wrapping). `None` if the ring
    /// is empty.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        let slot = self.slot(hash)?;
        self.ring.get(slot).map(|&(_, host)| host as usize)
    }

    /// Like [`pick`](Self::pick), but skips hosts for which `usable(i)` is
    /// false by walking clockwise around the ring, so the fallback is itself
    /// consistent. `usable` is called at most once per host; returns `None`
    /// when no host on the ring is usable.
    ///
    /// Envoy's retry path (`chooseHost(h, attempt)`) instead steps `attempt`
    /// entries past the original one without consulting health; walking until
    /// a usable host is the predicate-driven equivalent.
    pub fn pick_with(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.slot(hash)?;
        let len = self.ring.len();
        let candidates = (0..len).filter_map(|off| {
            self.ring
                .get((start + off) % len)
                .map(|&(_, host)| host as usize)
        });
        first_usable(candidates, self.num_hosts, self.hosts_on_ring, usable)
    }

    /// Number of ring entries (Envoy's `ring_hash_lb.size` gauge, up to
    /// rounding of the running sums).
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// True when the ring has no entries (no hosts).
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Maglev
// ---------------------------------------------------------------------------

/// Envoy's default Maglev table size (a prime).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;

/// Largest table size Envoy accepts (`MaglevLbConfig.table_size` is validated
/// `lte: 5000011`).
pub const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;

/// Marks an unfilled slot while building.
const EMPTY: u32 = u32::MAX;

/// Why a Maglev table could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaglevError {
    /// Envoy: "The table size of maglev must be prime number".
    NotPrime(u64),
    /// Above Envoy's proto limit of 5,000,011 slots.
    TooLarge(u64),
    /// Fewer slots than hosts: some hosts could never be picked.
    TooSmall { table_size: u64, hosts: usize },
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaglevError::NotPrime(n) => {
                write!(f, "maglev table size {n} is not a prime number")
            }
            MaglevError::TooLarge(n) => write!(
                f,
                "maglev table size {n} exceeds the maximum of {MAX_MAGLEV_TABLE_SIZE}"
            ),
            MaglevError::TooSmall { table_size, hosts } => write!(
                f,
                "maglev table size {table_size} is smaller than the number of hosts ({hosts})"
            ),
        }
    }
}

impl std::error::Error for MaglevError {}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3_u64;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Maglev lookup table (Eisenbud et al., "Maglev: A Fast and Reliable Software
/// Network Load Balancer", NSDI 2016, pseudocode listing 1), built like Envoy's
/// `OriginalMaglevTable` / `CompactMaglevTable`
/// (`source/extensions/load_balancing_policies/maglev/maglev_lb.cc`):
///
/// * hosts are first sorted by host key so the table does not depend on the
///   order hosts were delivered in (ties, which Envoy breaks by pointer, are
///   broken by input index here);
/// * per host: `offset = xxh64(key, 0) % M`, `skip = xxh64(key, 1) % (M - 1) + 1`,
///   permutation `(offset + skip * next) % M`;
/// * weighted filling: in round `iteration = 1, 2, ...` a host claims its next
///   free preferred slot only if `iteration * w >= target`, after which
///   `target += max_w` (normalized weights), so a host with half the maximum
///   weight claims a slot every other round.
///
/// The table stores host indices as `u32` (4 bytes per slot: 256 KiB at the
/// default size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
    num_hosts: usize,
    hosts_in_table: usize,
}

struct BuildEntry {
    host: u32,
    offset: u64,
    skip: u64,
    weight: f64,
    target: f64,
    next: u64,
}

impl Maglev {
    /// Builds the table for `hosts` (`(host_key, weight)`; weight 0 is treated
    /// as 1). `table_size` must be a prime no larger than
    /// [`MAX_MAGLEV_TABLE_SIZE`] and at least the number of hosts; use
    /// [`DEFAULT_MAGLEV_TABLE_SIZE`] for Envoy's default. An empty host list
    /// gives an empty table whose lookups return `None`.
    pub fn new(hosts: &[(String, u32)], table_size: u64) -> Result<Maglev, MaglevError> {
        if table_size > MAX_MAGLEV_TABLE_SIZE {
            return Err(MaglevError::TooLarge(table_size));
        }
        if !is_prime(table_size) {
            return Err(MaglevError::NotPrime(table_size));
        }
        if hosts.len() as u64 > table_size {
            return Err(MaglevError::TooSmall {
                table_size,
                hosts: hosts.len(),
            });
        }
        if hosts.is_empty() {
            return Ok(Maglev {
                table: Vec::new(),
                num_hosts: 0,
                hosts_in_table: 0,
            });
        }

        let size = table_size;
        let (weights, _, max_w) = normalized_weights(hosts);

        // Stable order: sort by host key (Envoy sorts (key, host, weight) tuples).
        let mut order: Vec<usize> = (0..hosts.len()).collect();
        order.sort_by(|&a, &b| hosts[a].0.cmp(&hosts[b].0).then(a.cmp(&b)));

        // hosts.len() <= table_size <= 5,000,011, so indices fit in u32.
        let mut entries: Vec<BuildEntry> = order
            .iter()
            .map(|&i| {
                let key = hosts[i].0.as_bytes();
                BuildEntry {
                    host: i as u32,
                    offset: xxh64(key, 0) % size,
                    skip: xxh64(key, 1) % (size - 1) + 1,
                    weight: weights[i],
                    target: 0.0,
                    next: 0,
                }
            })
            .collect();

        let mut table = vec![EMPTY; size as usize];
        let mut counts = vec![0_u64; hosts.len()];
        let mut filled: u64 = 0;
        // The heaviest host claims a slot every round, so at most `size` rounds.
        let mut iteration: u32 = 1;
        while filled < size {
            for e in entries.iter_mut() {
                if filled >= size {
                    break;
                }
                if f64::from(iteration) * e.weight < e.target {
                    continue;
                }
                e.target += max_w;
                // skip * next < M^2 <= 2.5e13: no overflow; wrapping keeps C++ semantics anyway.
                let mut c = e.offset.wrapping_add(e.skip.wrapping_mul(e.next)) % size;
                // `size` is prime and skip in [1, M-1], so the permutation visits
                // every slot and a free one exists while filled < size.
                while table[c as usize] != EMPTY {
                    e.next += 1;
                    c = e.offset.wrapping_add(e.skip.wrapping_mul(e.next)) % size;
                }
                table[c as usize] = e.host;
                counts[e.host as usize] += 1;
                e.next += 1;
                filled += 1;
            }
            iteration = iteration.saturating_add(1);
        }

        Ok(Maglev {
            table,
            num_hosts: hosts.len(),
            hosts_in_table: counts.iter().filter(|&&c| c > 0).count(),
        })
    }

    /// Index into the `hosts` slice for a request hash: `table[hash % M]`.
    /// `None` if there are no hosts.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let slot = (hash % self.table.len() as u64) as usize;
        self.table.get(slot).map(|&h| h as usize)
    }

    /// Like [`pick`](Self::pick), but when the selected host is not usable,
    /// probes the following slots (`hash % M + 1`, `+ 2`, ..., wrapping) until
    /// a usable host is found. `usable` is called at most once per host;
    /// returns `None` when no host in the table is usable.
    ///
    /// Envoy's retry path instead re-hashes with `hash ^ (!0 - attempt + 1)`;
    /// linear probing keeps the fallback deterministic per request hash and
    /// spread according to the table's weights.
    pub fn pick_with(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let len = self.table.len();
        let start = (hash % len as u64) as usize;
        let candidates =
            (0..len).filter_map(|off| self.table.get((start + off) % len).map(|&h| h as usize));
        first_usable(candidates, self.num_hosts, self.hosts_in_table, usable)
    }

    /// Number of slots (the table size, or 0 when built without hosts).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when the table was built without hosts.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(spec: &[(&str, u32)]) -> Vec<(String, u32)> {
        spec.iter().map(|&(k, w)| (k.to_string(), w)).collect()
    }

    fn n_hosts(n: usize) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("10.0.{}.{}:9080", i / 250, i % 250 + 1), 1))
            .collect()
    }

    /// Request hashes: xxh64 of a little-endian counter.
    fn request_hash(i: u64) -> u64 {
        xxh64(&i.to_le_bytes(), 0)
    }

    const KEYS: u64 = 100_000;

    #[test]
    fn xxh64_published_vectors() {
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        // python-xxhash README
        assert_eq!(xxh64(b"xxhash", 0), 0x32DD_3895_2C4B_C720);
        assert_eq!(xxh64(b"xxhash", 20_141_025), 0xB559_B98D_844E_0635);
        // >= 32 bytes: exercises the stripe loop and merge rounds.
        assert_eq!(
            xxh64(b"Nobody inspects the spammish repetition", 0),
            0xFBCE_A83C_8A37_8BF1
        );
        assert_eq!(
            xxh64(b"The quick brown fox jumps over the lazy dog", 0),
            0x0B24_2D36_1FDA_71BC
        );
        assert_eq!(
            xxh64(b"I want an unsigned 64-bit seed!", 0),
            0xD4CB_0A70_A2B8_C7C1
        );
        assert_eq!(
            xxh64(b"I want an unsigned 64-bit seed!", 1),
            0xCE50_87F1_2470_D961
        );
    }

    #[test]
    fn empty_hosts_give_none() {
        let ring = RingHash::new(&[], DEFAULT_MIN_RING_SIZE);
        assert!(ring.is_empty());
        assert_eq!(ring.pick(42), None);
        assert_eq!(ring.pick_with(42, |_| true), None);

        let maglev = Maglev::new(&[], DEFAULT_MAGLEV_TABLE_SIZE).unwrap();
        assert!(maglev.is_empty());
        assert_eq!(maglev.pick(42), None);
        assert_eq!(maglev.pick_with(42, |_| true), None);
    }

    #[test]
    fn ring_size_follows_envoy_scaling() {
        // Equal weights: ceil(1024 / 3) = 342 per host.
        let ring = RingHash::new(&n_hosts(3), DEFAULT_MIN_RING_SIZE);
        assert_eq!(ring.len(), 3 * 342);
        // 1,1,2: min share 0.25 -> scale 1024 -> 256, 256, 512.
        let ring = RingHash::new(
            &hosts(&[("a:1", 1), ("b:1", 1), ("c:1", 2)]),
            DEFAULT_MIN_RING_SIZE,
        );
        assert_eq!(ring.len(), 1024);
        let per_host = |i: u32| ring.ring.iter().filter(|&&(_, h)| h == i).count();
        assert_eq!((per_host(0), per_host(1), per_host(2)), (256, 256, 512));
        // More hosts than the minimum: one entry each.
        let ring = RingHash::new(&n_hosts(2000), DEFAULT_MIN_RING_SIZE);
        assert_eq!(ring.len(), 2000);
        // 0 treated as 1: one entry per (equal-weight) host.
        let ring = RingHash::new(&n_hosts(5), 0);
        assert_eq!(ring.len(), 5);
        // Minimum clamped to the 8M cap, and extreme weight skew (the lightest
        // host would need 2^32 entries for a whole hash): scale is capped at
        // 8,388,608 and the light host, walked first, still gets one entry.
        let ring = RingHash::new(&hosts(&[("a:1", 1), ("b:1", u32::MAX)]), u64::MAX);
        assert_eq!(ring.len() as u64, MAX_RING_SIZE);
        assert_eq!(ring.ring.iter().filter(|&&(_, h)| h == 0).count(), 1);
    }

    #[test]
    fn ring_entries_are_envoy_keys() {
        // Single host, minimum ring 3: entries are xxh64("<key>_0".."<key>_2").
        let ring = RingHash::new(&hosts(&[("10.0.0.1:9080", 1)]), 3);
        let mut expected: Vec<(u64, u32)> = (0..3)
            .map(|i| (xxh64(format!("10.0.0.1:9080_{i}").as_bytes(), 0), 0))
            .collect();
        expected.sort_unstable();
        assert_eq!(ring.ring, expected);
    }

    #[test]
    fn zero_weight_treated_as_one() {
        let a = RingHash::new(&hosts(&[("a:1", 0), ("b:1", 1)]), 1024);
        let b = RingHash::new(&hosts(&[("a:1", 1), ("b:1", 1)]), 1024);
        assert_eq!(a, b);
        let a = Maglev::new(&hosts(&[("a:1", 0), ("b:1", 1)]), 101).unwrap();
        let b = Maglev::new(&hosts(&[("a:1", 1), ("b:1", 1)]), 101).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn deterministic() {
        let hs = hosts(&[
            ("10.0.0.1:9080", 1),
            ("10.0.0.2:9080", 3),
            ("10.0.0.3:9080", 2),
        ]);
        assert_eq!(
            RingHash::new(&hs, DEFAULT_MIN_RING_SIZE),
            RingHash::new(&hs, DEFAULT_MIN_RING_SIZE)
        );
        assert_eq!(
            Maglev::new(&hs, DEFAULT_MAGLEV_TABLE_SIZE).unwrap(),
            Maglev::new(&hs, DEFAULT_MAGLEV_TABLE_SIZE).unwrap()
        );
    }

    #[test]
    fn maglev_independent_of_host_order() {
        let hs = hosts(&[
            ("10.0.0.1:9080", 1),
            ("10.0.0.2:9080", 3),
            ("10.0.0.3:9080", 2),
        ]);
        let mut rev = hs.clone();
        rev.reverse();
        let a = Maglev::new(&hs, DEFAULT_MAGLEV_TABLE_SIZE).unwrap();
        let b = Maglev::new(&rev, DEFAULT_MAGLEV_TABLE_SIZE).unwrap();
        for i in 0..10_000 {
            let h = request_hash(i);
            assert_eq!(hs[a.pick(h).unwrap()].0, rev[b.pick(h).unwrap()].0);
        }
    }

    fn shares(pick: impl Fn(u64) -> Option<usize>, n: usize) -> Vec<f64> {
        let mut counts = vec![0_u64; n];
        for i in 0..KEYS {
            counts[pick(request_hash(i)).unwrap()] += 1;
        }
        counts.iter().map(|&c| c as f64 / KEYS as f64).collect()
    }

    fn assert_within_10pct(shares: &[f64], expected: &[f64]) {
        for (s, e) in shares.iter().zip(expected) {
            assert!(
                (s - e).abs() <= 0.10 * e,
                "share {s:.4} vs expected {e:.4} ({shares:?})"
            );
        }
    }

    const WEIGHTED: [(&str, u32); 3] = [
        ("10.0.0.1:9080", 1),
        ("10.0.0.2:9080", 1),
        ("10.0.0.3:9080", 2),
    ];

    #[test]
    fn ring_distribution_follows_weights() {
        let ring = RingHash::new(&hosts(&WEIGHTED), DEFAULT_MIN_RING_SIZE);
        assert_within_10pct(&shares(|h| ring.pick(h), 3), &[0.25, 0.25, 0.5]);
    }

    #[test]
    fn maglev_distribution_follows_weights() {
        let m = Maglev::new(&hosts(&WEIGHTED), DEFAULT_MAGLEV_TABLE_SIZE).unwrap();
        // Slot counts are exact up to rounding: 16384.25 / 16384.25 / 32768.5.
        let mut slots = [0_u64; 3];
        for &h in &m.table {
            slots[h as usize] += 1;
        }
        for (s, e) in slots.iter().zip([0.25, 0.25, 0.5]) {
            assert!((*s as f64 - e * 65537.0).abs() <= 2.0, "{slots:?}");
        }
        assert_within_10pct(&shares(|h| m.pick(h), 3), &[0.25, 0.25, 0.5]);
    }

    /// Fraction of keys that did not map to `removed` before and map to the
    /// same host (by key) after it is removed.
    fn kept_fraction(
        before: &[(String, u32)],
        removed: usize,
        pick_before: impl Fn(u64) -> Option<usize>,
        pick_after: impl Fn(u64) -> Option<usize>,
        after: &[(String, u32)],
    ) -> f64 {
        let (mut total, mut kept) = (0_u64, 0_u64);
        for i in 0..KEYS {
            let h = request_hash(i);
            let b = pick_before(h).unwrap();
            if b == removed {
                continue;
            }
            total += 1;
            if before[b].0 == after[pick_after(h).unwrap()].0 {
                kept += 1;
            }
        }
        kept as f64 / total as f64
    }

    fn without(hs: &[(String, u32)], idx: usize) -> Vec<(String, u32)> {
        let mut v = hs.to_vec();
        v.remove(idx);
        v
    }

    #[test]
    fn ring_minimal_disruption_on_removal() {
        // 20 equal hosts: ceil(1024/20) = 52 entries each, 54 each once one is
        // removed. Every possible removal keeps >= 95% of the other keys
        // (worst case measured: 95.3%).
        let before = n_hosts(20);
        let rb = RingHash::new(&before, DEFAULT_MIN_RING_SIZE);
        for removed in 0..before.len() {
            let after = without(&before, removed);
            let ra = RingHash::new(&after, DEFAULT_MIN_RING_SIZE);
            let kept = kept_fraction(&before, removed, |h| rb.pick(h), |h| ra.pick(h), &after);
            assert!(kept >= 0.95, "removed {removed}: kept {kept:.4}");
        }
        // 50 equal hosts: 21 entries each before and after (ceil(1024/49) = 21),
        // so the survivors' entries are unchanged and no other key moves.
        let before = n_hosts(50);
        let rb = RingHash::new(&before, DEFAULT_MIN_RING_SIZE);
        let after = without(&before, 17);
        let ra = RingHash::new(&after, DEFAULT_MIN_RING_SIZE);
        let kept = kept_fraction(&before, 17, |h| rb.pick(h), |h| ra.pick(h), &after);
        assert_eq!(kept, 1.0);
    }

    #[test]
    fn ring_disruption_with_few_hosts_follows_envoy_rescaling() {
        // Envoy rescales per-host entry counts when the host set changes
        // (1,1,2 -> 1,2 goes from 256/256/512 to 342/684 entries), so keys also
        // move between surviving hosts: measured 90.7% / 91.6% / 83.6% kept for
        // removing host 0 / 1 / 2. This is Envoy-compatible behaviour, not the
        // fixed-vnode ideal; guard the measured range.
        let before = hosts(&WEIGHTED);
        let rb = RingHash::new(&before, DEFAULT_MIN_RING_SIZE);
        for removed in 0..before.len() {
            let after = without(&before, removed);
            let ra = RingHash::new(&after, DEFAULT_MIN_RING_SIZE);
            let kept = kept_fraction(&before, removed, |h| rb.pick(h), |h| ra.pick(h), &after);
            assert!(kept >= 0.80, "removed {removed}: kept {kept:.4}");
        }
    }

    #[test]
    fn maglev_minimal_disruption_on_removal() {
        for before in [hosts(&WEIGHTED), n_hosts(20)] {
            for removed in [0, before.len() - 1] {
                let after = without(&before, removed);
                let mb = Maglev::new(&before, DEFAULT_MAGLEV_TABLE_SIZE).unwrap();
                let ma = Maglev::new(&after, DEFAULT_MAGLEV_TABLE_SIZE).unwrap();
                let kept = kept_fraction(&before, removed, |h| mb.pick(h), |h| ma.pick(h), &after);
                assert!(
                    kept >= 0.90,
                    "{} hosts, removed {removed}: kept {kept:.4}",
                    before.len()
                );
            }
        }
    }

    #[test]
    fn pick_with_skips_unusable_hosts() {
        let hs = n_hosts(5);
        let ring = RingHash::new(&hs, DEFAULT_MIN_RING_SIZE);
        let maglev = Maglev::new(&hs, DEFAULT_MAGLEV_TABLE_SIZE).unwrap();
        for i in 0..2_000 {
            let h = request_hash(i);
            // All usable: same as pick.
            assert_eq!(ring.pick_with(h, |_| true), ring.pick(h));
            assert_eq!(maglev.pick_with(h, |_| true), maglev.pick(h));
            // Primary down: never returned, and some other host is.
            let down = ring.pick(h).unwrap();
            let alt = ring.pick_with(h, |i| i != down).unwrap();
            assert_ne!(alt, down);
            let down = maglev.pick(h).unwrap();
            let alt = maglev.pick_with(h, |i| i != down).unwrap();
            assert_ne!(alt, down);
            // Only host 3 usable.
            assert_eq!(ring.pick_with(h, |i| i == 3), Some(3));
            assert_eq!(maglev.pick_with(h, |i| i == 3), Some(3));
            // Nothing usable.
            assert_eq!(ring.pick_with(h, |_| false), None);
            assert_eq!(maglev.pick_with(h, |_| false), None);
        }
    }

    #[test]
    fn pick_with_calls_predicate_once_per_host() {
        use std::cell::Cell;
        let hs = n_hosts(7);
        let ring = RingHash::new(&hs, DEFAULT_MIN_RING_SIZE);
        let maglev = Maglev::new(&hs, 101).unwrap();
        let calls = Cell::new(0);
        let count = |_| {
            calls.set(calls.get() + 1);
            false
        };
        assert_eq!(ring.pick_with(1, count), None);
        assert_eq!(calls.get(), 7);
        calls.set(0);
        assert_eq!(maglev.pick_with(1, count), None);
        assert_eq!(calls.get(), 7);
    }

    #[test]
    fn ring_fallback_is_consistent() {
        // With host 0 down, its keys spread over others, and other keys stay put.
        let hs = n_hosts(10);
        let ring = RingHash::new(&hs, DEFAULT_MIN_RING_SIZE);
        let mut moved_to = vec![0_u64; hs.len()];
        for i in 0..KEYS {
            let h = request_hash(i);
            let p = ring.pick(h).unwrap();
            let q = ring.pick_with(h, |i| i != 0).unwrap();
            if p != 0 {
                assert_eq!(p, q);
            } else {
                moved_to[q] += 1;
            }
        }
        assert_eq!(moved_to[0], 0);
        assert!(
            moved_to.iter().filter(|&&c| c > 0).count() >= 5,
            "{moved_to:?}"
        );
    }

    #[test]
    fn maglev_rejects_bad_sizes() {
        let hs = n_hosts(3);
        for bad in [0, 1, 4, 9, 65536, 65535, 1_000_000] {
            assert_eq!(Maglev::new(&hs, bad), Err(MaglevError::NotPrime(bad)));
        }
        assert_eq!(
            Maglev::new(&hs, 5_000_017),
            Err(MaglevError::TooLarge(5_000_017))
        );
        assert_eq!(
            Maglev::new(&hs, u64::MAX),
            Err(MaglevError::TooLarge(u64::MAX))
        );
        assert_eq!(
            Maglev::new(&n_hosts(12), 11),
            Err(MaglevError::TooSmall {
                table_size: 11,
                hosts: 12
            })
        );
        assert!(Maglev::new(&hs, 2).is_err());
        assert!(Maglev::new(&n_hosts(11), 11).is_ok());
        assert!(Maglev::new(&hs, MAX_MAGLEV_TABLE_SIZE).is_ok());
        assert!(Maglev::new(&n_hosts(2), 2).is_ok());
        assert!(!MaglevError::NotPrime(4).to_string().is_empty());
    }

    #[test]
    fn maglev_tiny_and_skewed_tables_fill_completely() {
        let m = Maglev::new(&hosts(&[("a:1", 1), ("b:1", u32::MAX)]), 3).unwrap();
        assert!(m.table.iter().all(|&h| h != EMPTY));
        let m = Maglev::new(&n_hosts(2), 2).unwrap();
        assert!(m.table.iter().all(|&h| h != EMPTY));
        let m = Maglev::new(&n_hosts(1), DEFAULT_MAGLEV_TABLE_SIZE).unwrap();
        assert!(m.table.iter().all(|&h| h == 0));
        assert_eq!(m.pick(u64::MAX), Some(0));
    }

    #[test]
    fn arbitrary_inputs_build_valid_tables() {
        // Pseudo-random host sets: weights 0..=1000, duplicate and
        // empty keys, small prime tables. Every slot must be filled, every pick
        // in range, and every host with an entry reachable via pick_with.
        let primes = [2_u64, 3, 5, 7, 13, 31, 101, 257];
        for case in 0..200_u64 {
            let r = request_hash(case);
            let n = (r % 9) as usize + 1;
            let hs: Vec<(String, u32)> = (0..n)
                .map(|i| {
                    let x = request_hash(case * 100 + i as u64);
                    // (Skews like 1 vs u32::MAX hit the 8M cap; covered above.)
                    let w = match x % 4 {
                        0 => 0,
                        1 => 1000,
                        _ => (x >> 8) as u32 % 1000,
                    };
                    let key = match x % 7 {
                        0 => String::new(),
                        1 => "dup:1".to_string(),
                        _ => format!("10.1.{}.{}:80", x % 256, i),
                    };
                    (key, w)
                })
                .collect();
            let ring = RingHash::new(&hs, r % 3000);
            let size = primes[(r >> 20) as usize % primes.len()];
            let maglev = Maglev::new(&hs, size);
            if (n as u64) > size {
                assert!(maglev.is_err());
            }
            for k in 0..50 {
                let h = request_hash(case ^ (k << 32));
                assert!(ring.pick(h).is_some_and(|i| i < n));
                if let Ok(m) = &maglev {
                    assert!(m.table.iter().all(|&x| (x as usize) < n));
                    assert!(m.pick(h).is_some_and(|i| i < n));
                    let only = m.pick(h.rotate_left(7)).unwrap_or(0);
                    assert_eq!(m.pick_with(h, |i| i == only), Some(only));
                }
                let only = ring.pick(h.rotate_left(7)).unwrap_or(0);
                assert_eq!(ring.pick_with(h, |i| i == only), Some(only));
            }
        }
    }

    #[test]
    fn ring_pick_wraps_and_handles_extremes() {
        let ring = RingHash::new(&n_hosts(4), DEFAULT_MIN_RING_SIZE);
        let first = ring.ring[0];
        let last = ring.ring[ring.len() - 1];
        assert_eq!(ring.pick(0), Some(first.1 as usize));
        assert_eq!(ring.pick(first.0), Some(first.1 as usize));
        assert_eq!(ring.pick(last.0), Some(last.1 as usize));
        if last.0 < u64::MAX {
            assert_eq!(ring.pick(last.0 + 1), Some(first.1 as usize));
        }
        assert!(ring.pick(u64::MAX).is_some());
    }
}

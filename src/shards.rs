//! Kinesis shard maps: the open shards' hash key ranges, as `ListShards` reports them, and
//! which shard a record goes to. A record's hash key is its explicit hash key, or the MD5
//! of its partition key read as a 128-bit big-endian integer.
//! <https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecordsRequestEntry.html>

use md5::{Digest, Md5};

use crate::batch::records::Rng;

/// One open shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub id: String,
    pub start: u128,
    pub end: u128,
}

/// The open shards of a stream, sorted by hash range, each with a few partition keys that
/// Kinesis sends to it.
#[derive(Clone, Debug)]
pub struct ShardMap {
    shards: Vec<Shard>,
    /// The shards' range starts, apart, so that a lookup in thousands of shards stays in
    /// cache.
    starts: Vec<u128>,
    /// Up to [`KEYS_PER_SHARD`] partition keys per shard whose MD5 falls in its range, with
    /// that MD5, found by trying random keys: shard `i`'s are at `i * KEYS_PER_SHARD`, and
    /// `found[i]` of them are there (none for a shard too narrow to hit in [`KEY_TRIES`]
    /// tries per shard).
    keys: Vec<([u8; KEY_LEN], u128)>,
    found: Vec<u8>,
}

/// Two maps are the same when their shards are; the keys are only one choice of many.
impl PartialEq for ShardMap {
    fn eq(&self, other: &Self) -> bool {
        self.shards == other.shards
    }
}

const KEY_LEN: usize = 32;

/// Keys kept per shard: random partition keys are drawn from these, so that a record's
/// shard is known without hashing its key, and consumers still see more than one key per
/// shard.
pub const KEYS_PER_SHARD: usize = 4;

/// Random keys tried per shard, in all, to find each shard a key. Shards from even splits
/// need about ln(shards) each; a shard this rarely hit is narrower than 1/4096 of its
/// share of the hash space.
const KEY_TRIES: usize = 64;

impl ShardMap {
    /// A map from `ListShards` results; shards with overlapping ranges (a parent and its
    /// children during a reshard) keep the one that starts later in the list, so pass
    /// open shards only. An empty list gives one shard over the whole hash space.
    pub fn new(mut shards: Vec<Shard>) -> Self {
        if shards.is_empty() {
            shards.push(Shard {
                id: String::new(),
                start: 0,
                end: u128::MAX,
            });
        }
        shards.sort_by_key(|s| s.start);
        let mut map = ShardMap {
            keys: vec![([0; KEY_LEN], 0); shards.len() * KEYS_PER_SHARD],
            found: vec![0; shards.len()],
            starts: shards.iter().map(|s| s.start).collect(),
            shards,
        };
        map.find_keys();
        map
    }

    /// Finds each shard its partition keys by hashing random ones.
    fn find_keys(&mut self) {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut rng = Rng::new(seed);
        let mut missing = self.shards.len() * KEYS_PER_SHARD;
        let mut key = Vec::with_capacity(KEY_LEN);
        for _ in 0..KEY_TRIES * self.shards.len() {
            key.clear();
            rng.key(&mut key);
            let hash = hash_key(&key);
            let i = self.shard_of(hash);
            let n = self.found[i] as usize;
            if n < KEYS_PER_SHARD {
                self.keys[i * KEYS_PER_SHARD + n] = (key[..].try_into().expect("32 digits"), hash);
                self.found[i] += 1;
                missing -= 1;
                if missing == 0 {
                    break;
                }
            }
        }
    }

    /// A partition key that Kinesis sends to shard `i`, and its hash key, if one was found.
    pub fn key_for(&self, i: usize) -> Option<(&[u8], u128)> {
        self.random_key(i, 0)
    }

    /// One of shard `i`'s partition keys, chosen by `rand`, and its hash key.
    pub fn random_key(&self, i: usize, rand: u64) -> Option<(&[u8], u128)> {
        let n = self.found[i] as u64;
        (n > 0).then(|| {
            let (k, h) = &self.keys[i * KEYS_PER_SHARD + (rand % n) as usize];
            (&k[..], *h)
        })
    }

    /// `n` shards that split the hash space evenly, as CreateStream lays them out (for
    /// tests, benchmarks and the fake endpoint).
    pub fn even(n: usize) -> Self {
        let (n, step) = (n as u128, u128::MAX / n as u128);
        ShardMap::new(
            (0..n)
                .map(|i| Shard {
                    id: format!("shardId-{i:012}"),
                    start: i * step,
                    end: if i == n - 1 {
                        u128::MAX
                    } else {
                        (i + 1) * step - 1
                    },
                })
                .collect(),
        )
    }

    /// Until the stream's shards are known: one shard over the whole hash space.
    pub fn unknown() -> Self {
        ShardMap::new(vec![])
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The index of the shard whose range holds `hash`.
    pub fn shard_of(&self, hash: u128) -> usize {
        let i = self.starts.partition_point(|&s| s <= hash);
        i.saturating_sub(1)
    }

    /// A hash key inside shard `i`'s range, spread by `rand` over it.
    pub fn hash_in(&self, i: usize, rand: u128) -> u128 {
        let s = &self.shards[i];
        let width = s.end - s.start;
        if width == u128::MAX {
            rand
        } else {
            s.start + rand % (width + 1)
        }
    }
}

/// The hash key Kinesis computes for a partition key.
pub fn hash_key(partition_key: &[u8]) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_shards_by_hash_key() {
        let m = ShardMap::even(4);
        assert_eq!(m.shard_of(0), 0);
        assert_eq!(m.shard_of(u128::MAX / 4 - 1), 0);
        assert_eq!(m.shard_of(u128::MAX / 4), 1);
        assert_eq!(m.shard_of(u128::MAX), 3);
        for i in 0..4 {
            for r in [0u128, 1, 12345, u128::MAX] {
                assert_eq!(m.shard_of(m.hash_in(i, r)), i);
            }
        }
        assert_eq!(ShardMap::unknown().shard_of(42), 0);
    }

    #[test]
    fn every_shard_gets_a_key_that_lands_on_it() {
        for n in [1usize, 2, 7, 4096] {
            let m = ShardMap::even(n);
            for i in 0..n {
                let (k, h) = m.key_for(i).expect("a key for every even shard");
                assert_eq!(h, hash_key(k));
                assert_eq!(m.shard_of(h), i);
                let mut distinct = std::collections::BTreeSet::new();
                for r in 0..64 {
                    let (k, h) = m.random_key(i, r).unwrap();
                    assert_eq!(m.shard_of(hash_key(k)), i);
                    assert_eq!(h, hash_key(k));
                    distinct.insert(k.to_vec());
                }
                if n <= 8 {
                    assert_eq!(distinct.len(), KEYS_PER_SHARD, "every table is full");
                }
            }
        }
        // A sliver of the hash space gets no key: aggregates for it use an explicit hash key.
        let m = ShardMap::new(vec![
            Shard {
                id: "wide".into(),
                start: 0,
                end: u128::MAX - 1000,
            },
            Shard {
                id: "sliver".into(),
                start: u128::MAX - 999,
                end: u128::MAX,
            },
        ]);
        assert!(m.key_for(0).is_some() && m.key_for(1).is_none());
        let again = ShardMap::new(m.shards().to_vec());
        assert_eq!(m, again, "maps compare by shards, not keys");
    }

    #[test]
    fn hash_keys_are_md5_big_endian() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(hash_key(b"a"), 0x0cc175b9c0f1b6a831c399e269772661);
    }
}

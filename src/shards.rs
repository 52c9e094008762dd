//! Kinesis shard maps: the open shards' hash key ranges, as `ListShards` reports them, and
//! which shard a record goes to. A record's hash key is its explicit hash key, or the MD5
//! of its partition key read as a 128-bit big-endian integer.
//! <https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecordsRequestEntry.html>

use md5::{Digest, Md5};

/// One open shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub id: String,
    pub start: u128,
    pub end: u128,
}

/// The open shards of a stream, sorted by hash range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    shards: Vec<Shard>,
}

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
        ShardMap { shards }
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
        let i = self.shards.partition_point(|s| s.start <= hash);
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

    fn even(n: u128) -> ShardMap {
        let step = u128::MAX / n;
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

    #[test]
    fn finds_shards_by_hash_key() {
        let m = even(4);
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
    fn hash_keys_are_md5_big_endian() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(hash_key(b"a"), 0x0cc175b9c0f1b6a831c399e269772661);
    }
}

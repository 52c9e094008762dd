//! The Kinesis and Firehose sinks through the real binary and the real SDK, against moto
//! server: streams of 1 and 4 shards, plain, aggregated and compressed, read back from
//! every shard with boto3 and AWS's deaggregator; and a Firehose delivery stream into S3.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;

use crate::emulators::Emulator;
use crate::frames::{Mode, Time, connect, frame, read_acks, record};
use crate::harness::Sluice;

/// Sends `n` events tagged `tag` in acked PackedForward frames of 100, and waits for every
/// ack: the events are then accepted by the sink's service.
pub fn send_acked(addr: SocketAddr, tag: &str, client: &str, n: usize) {
    let mut conn = connect(addr);
    let frames = n.div_ceil(100);
    for f in 0..frames {
        let events: Vec<_> = (f * 100..((f + 1) * 100).min(n))
            .map(|k| {
                (
                    Time::FixExt8(1_700_000_000, k as u32),
                    record(client, k, 200),
                )
            })
            .collect();
        conn.write_all(&frame(
            Mode::PackedBin,
            tag,
            &events,
            Some(&format!("{tag}-{f}")),
        ))
        .unwrap();
    }
    assert_eq!(read_acks(&mut conn, frames).len(), frames);
}

/// Checks that the events of `client` came back exactly once; returns them per shard.
pub fn exactly_once(
    records: &[serde_json::Value],
    client: &str,
    n: usize,
) -> BTreeMap<String, usize> {
    let mut seen = vec![0; n];
    let mut per_shard = BTreeMap::new();
    for r in records {
        let data = r["data"].as_str().unwrap();
        for line in data.lines().filter(|l| !l.is_empty()) {
            let ev: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not an event ({e}): {line:?}"));
            if ev["client"] == client {
                seen[ev["seq"].as_u64().unwrap() as usize] += 1;
                *per_shard
                    .entry(r["shard"].as_str().unwrap_or_default().to_string())
                    .or_insert(0) += 1;
            }
        }
    }
    let wrong: Vec<_> = seen
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != 1)
        .take(10)
        .collect();
    assert!(
        wrong.is_empty(),
        "{client}: (seq, times) not exactly once: {wrong:?}"
    );
    per_shard
}

// moto's `Shard.put_record` "is not safe for concurrency": two PutRecords to one shard at
// once can give two records the same sequence number, and one overwrites the other. So each
// sink here sends one request at a time (the fake in faults.rs covers concurrency).
const KINESIS: &str = r#"
[engine]
workers = 2
stats_interval = "1s"
dead_letter_dir = "{dir}/dead"

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"

[sinks.plain1]
type = "kinesis"
stream = "one"
endpoint = "{endpoint}"
linger = "100ms"
max_concurrency = 1

[sinks.plain4]
type = "kinesis"
stream = "four"
endpoint = "{endpoint}"
linger = "100ms"
max_concurrency = 1

[sinks.explicit4]
type = "kinesis"
stream = "four-explicit-zstd"
endpoint = "{endpoint}"
partition_key = "explicit"
compression = "zstd"
linger = "100ms"
max_concurrency = 1

[sinks.agg4]
type = "kinesis"
stream = "four-agg"
endpoint = "{endpoint}"
aggregate = true
linger = "100ms"
max_concurrency = 1

[sinks.agg1gz]
type = "kinesis"
stream = "one-agg-gzip"
endpoint = "{endpoint}"
aggregate = true
compression = "gzip"
linger = "100ms"
max_concurrency = 1

[[routes]]
match = "plain1"
sinks = "plain1"
tag_key = "tag"

[[routes]]
match = "plain4"
sinks = "plain4"

[[routes]]
match = "explicit4"
sinks = "explicit4"

[[routes]]
match = "agg4"
sinks = "agg4"

[[routes]]
match = "agg1gz"
sinks = "agg1gz"
"#;

const N: usize = 1000;

#[test]
fn kinesis_streams_plain_aggregated_and_compressed_on_moto() {
    let moto = Emulator::moto();
    for (name, shards) in [
        ("one", "1"),
        ("four", "4"),
        ("four-explicit-zstd", "4"),
        ("four-agg", "4"),
        ("one-agg-gzip", "1"),
    ] {
        moto.tool(&["create-stream", name, shards]);
    }
    let mut s = Sluice::start(
        "kinesis-moto",
        &KINESIS.replace("{endpoint}", &moto.endpoint),
    );
    s.wait_log("sinks ready", |l| {
        l.contains("Kinesis sink ready") && l.contains("one-agg-gzip") && l.contains("shards=1")
    });
    let fwd = s.addr("fwd");
    let tags = ["plain1", "plain4", "explicit4", "agg4", "agg1gz"];
    std::thread::scope(|scope| {
        for tag in tags {
            scope.spawn(move || send_acked(fwd, tag, tag, N));
        }
    });

    let one = moto.read_stream("one", None);
    assert_eq!(one.len(), N, "plain: one record per event");
    let per = exactly_once(&one, "plain1", N);
    assert_eq!(per.len(), 1);
    assert!(
        one.iter()
            .all(|r| r["data"].as_str().unwrap().contains("\"tag\":\"plain1\""))
    );

    let four = moto.read_stream("four", None);
    let per = exactly_once(&four, "plain4", N);
    eprintln!("four shards, random keys: {per:?}");
    assert_eq!(per.len(), 4, "random keys reach every shard");
    assert!(per.values().all(|&n| n > N / 8), "{per:?}");

    let explicit = moto.read_stream("four-explicit-zstd", Some("zstd"));
    let per = exactly_once(&explicit, "explicit4", N);
    eprintln!("four shards, explicit hash keys: {per:?}");
    assert_eq!(per.len(), 4);
    assert!(
        per.values().all(|&n| n.abs_diff(N / 4) <= N / 40),
        "explicit keys spread evenly: {per:?}"
    );

    let agg = moto.read_stream("four-agg", None);
    assert!(
        agg.iter()
            .all(|r| r["aggregated"] == true && r["in_shard"] == true),
        "every record is in a KPL aggregate whose keys map to its shard"
    );
    let per = exactly_once(&agg, "agg4", N);
    eprintln!("four shards, aggregated: {per:?}");
    let records = s.wait_stat("sink.agg4.events", |n| n == N as u64)["sink.agg4.records"];
    assert!(
        records < (N / 10) as u64,
        "{records} aggregates for {N} events"
    );

    let gz = moto.read_stream("one-agg-gzip", Some("gzip"));
    assert!(
        gz.iter()
            .all(|r| r["aggregated"] == true && r["in_shard"] == true)
    );
    exactly_once(&gz, "agg1gz", N);
    s.assert_healthy();
}

const FIREHOSE: &str = r#"
[engine]
workers = 2
stats_interval = "1s"
dead_letter_dir = "{dir}/dead"

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"

[sinks.s3]
type = "firehose"
delivery_stream = "logs-to-s3"
endpoint = "{endpoint}"
linger = "100ms"

[[routes]]
match = "**"
sinks = "s3"
tag_key = "tag"
"#;

#[test]
fn firehose_into_s3_on_moto_packs_lines() {
    let moto = Emulator::moto();
    moto.tool(&["create-bucket", "sluice-logs"]);
    moto.tool(&["create-delivery-stream", "logs-to-s3", "sluice-logs"]);
    let mut s = Sluice::start(
        "firehose-moto",
        &FIREHOSE.replace("{endpoint}", &moto.endpoint),
    );
    s.wait_log("packing", |l| {
        l.contains("Firehose sink ready") && l.contains("line_packing=true")
    });
    send_acked(s.addr("fwd"), "app.web", "fh", 3000);
    let objects = moto.tool(&["read-bucket", "sluice-logs"]);
    let records: Vec<serde_json::Value> = vec![serde_json::json!({"shard": "s3", "data": objects})];
    exactly_once(&records, "fh", 3000);
    let stats = s.wait_stat("sink.s3.events", |n| n == 3000);
    assert!(
        stats["sink.s3.records"] * 20 < 3000,
        "lines are packed: {} records for 3000 events",
        stats["sink.s3.records"]
    );
    s.assert_healthy();
}

const RESHARD: &str = r#"
[engine]
workers = 2
stats_interval = "250ms"
dead_letter_dir = "{dir}/dead"

[inputs.fwd]
type = "forward"
address = "127.0.0.1:0"

[sinks.k]
type = "kinesis"
stream = "resharded"
endpoint = "{endpoint}"
partition_key = "explicit"
linger = "100ms"

[[routes]]
match = "**"
sinks = "k"
"#;

/// The stream goes from 2 shards to 4 while events flow. The scheduled refresh is a
/// minute away, so the new map can only come from records landing on shards other than
/// the predicted ones.
#[test]
fn resharding_mid_run_on_kinesis_local_loses_nothing_and_spreads_evenly() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let kl = Emulator::kinesis_local();
    kl.tool(&["create-stream", "resharded", "2"]);
    let mut s = Sluice::start("reshard", &RESHARD.replace("{endpoint}", &kl.endpoint));
    s.wait_log("ready", |l| {
        l.contains("Kinesis sink ready") && l.contains("shards=2")
    });
    let (stop, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let client = {
        let (addr, stop, sent) = (s.addr("fwd"), stop.clone(), sent.clone());
        std::thread::spawn(move || crate::faults::keep_sending(addr, stop, sent))
    };
    s.wait_stat("sink.k.events", |n| n >= 1000);
    kl.tool(&["update-shard-count", "resharded", "4"]);
    let at = s.wait_stat("sink.k.shard_refreshes", |n| n == 1)["sink.k.events"];
    s.wait_log("new map", |l| {
        l.contains("The stream's shards changed") && l.contains("shards=4")
    });
    s.wait_stat("sink.k.events", |n| n >= at + 2000);
    stop.store(true, Ordering::Relaxed);
    let n = client.join().expect("every chunk acked");

    let records = kl.read_stream("resharded", None);
    let per_shard = exactly_once(&records, "f", n);
    let open: Vec<String> = kl
        .tool(&["shards", "resharded"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|s| s["open"] == true)
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    eprintln!("{n} events over the reshard; per shard: {per_shard:?}; open now: {open:?}");
    assert_eq!(open.len(), 4);
    let new: Vec<usize> = open
        .iter()
        .map(|id| per_shard.get(id).copied().unwrap_or(0))
        .collect();
    let mean = new.iter().sum::<usize>() / 4;
    assert!(mean >= 400, "enough events on the new shards: {new:?}");
    assert!(
        new.iter().all(|&c| c.abs_diff(mean) <= mean / 10),
        "the new shards share the load evenly: {new:?}"
    );
    s.assert_healthy();
}

//! A fault-injecting fake of the Kinesis and Firehose JSON APIs on loopback, for what the
//! emulators cannot do: throttling, partial failures, 5xx, outages, and speed. It answers
//! PutRecords, ListShards, PutRecordBatch and DescribeDeliveryStream; records go to shards
//! by explicit hash key or by the MD5 of their partition key, as Kinesis does. Faults are
//! switched while it runs. It speaks plain HTTP or, like the real endpoints, TLS, with a
//! certificate from a test CA made at start-up. Shared by the integration tests and the
//! load generator.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::{Value, json};

/// What goes wrong, and how often (fractions of records or requests).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Records failed with ProvisionedThroughputExceededException inside 200 answers.
    pub throttle_records: f64,
    /// Whole requests refused with ProvisionedThroughputExceededException.
    pub throttle_requests: f64,
    /// Whole requests answered with HTTP 500.
    pub server_errors: f64,
    /// Until then, connections are closed without an answer.
    pub outage_until: Option<Instant>,
    /// Behave like the service: each shard (each delivery stream, for Firehose) takes at
    /// most `(records, bytes)` per second, with a second's worth of burst, and throttles
    /// the excess record by record.
    pub capacity: Option<(f64, f64)>,
    /// Every answer waits this long: a slow service.
    pub delay: Option<Duration>,
}

/// A shard's allowance under [`Faults::capacity`].
#[derive(Clone, Copy, Debug)]
struct Allowance {
    records: f64,
    bytes: f64,
    at: Instant,
}

/// What the fake has seen.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: u64,
    pub records: u64,
    pub bytes: u64,
    /// Kinesis PUT payload units: each accepted record's data plus key, per 25 KiB.
    pub payload_units: u64,
    /// Accepted records' data (when kept).
    pub data: Vec<Vec<u8>>,
    pub throttled_records: u64,
    pub throttled_requests: u64,
    pub server_errors: u64,
    pub dropped_connections: u64,
    /// Per second since the fake started: records accepted and records throttled.
    pub accepted_per_sec: Vec<u64>,
    pub throttled_per_sec: Vec<u64>,
}

impl Seen {
    fn tally(&mut self, since: Instant, accepted: bool) {
        let sec = since.elapsed().as_secs() as usize;
        let v = match accepted {
            true => &mut self.accepted_per_sec,
            false => &mut self.throttled_per_sec,
        };
        if v.len() <= sec {
            v.resize(sec + 1, 0);
        }
        v[sec] += 1;
    }
}

pub struct Fake {
    pub addr: SocketAddr,
    pub faults: Arc<Mutex<Faults>>,
    pub seen: Arc<Mutex<Seen>>,
    /// The test CA's certificate (PEM), when the fake speaks TLS.
    pub ca_pem: Option<String>,
    stop: Arc<AtomicBool>,
}

struct Shared {
    shards: Vec<(String, u128, u128)>,
    /// Delivery streams and streams that exist; others are "not found".
    streams: Vec<String>,
    keep: bool,
    faults: Arc<Mutex<Faults>>,
    seen: Arc<Mutex<Seen>>,
    rng: Mutex<u64>,
    started: Instant,
    /// Under [`Faults::capacity`]: each shard's allowance (one for all of Firehose).
    allowance: Mutex<Vec<Option<Allowance>>>,
}

/// A CA made for one run, and a server certificate it signed for 127.0.0.1 and localhost.
fn test_tls() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(vec![]).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sluice test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], der)
    .unwrap();
    (ca_cert.pem(), Arc::new(config))
}

impl Fake {
    /// Starts the fake, plain HTTP, with `shards` shards over the hash space; `streams`
    /// names what exists; `keep` stores accepted records' data.
    pub fn start(shards: usize, streams: &[&str], keep: bool) -> Fake {
        Fake::start_with(shards, streams, keep, false)
    }

    /// As [`Fake::start`], over TLS when `tls`.
    pub fn start_with(shards: usize, streams: &[&str], keep: bool, tls: bool) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shards: Vec<(String, u128, u128)> = sluice::shards::ShardMap::even(shards)
            .shards()
            .iter()
            .map(|s| (s.id.clone(), s.start, s.end))
            .collect();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let seen = Arc::new(Mutex::new(Seen { ..Seen::default() }));
        let allowance = Mutex::new(vec![None; shards.len().max(1)]);
        let shared = Arc::new(Shared {
            shards,
            streams: streams.iter().map(|s| s.to_string()).collect(),
            keep,
            faults: faults.clone(),
            seen: seen.clone(),
            rng: Mutex::new(0x9e37_79b9_7f4a_7c15),
            started: Instant::now(),
            allowance,
        });
        let (ca_pem, tls) = match tls {
            true => {
                let (pem, config) = test_tls();
                (Some(pem), Some(config))
            }
            false => (None, None),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                let shared = shared.clone();
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    None => serve(conn, &shared),
                    Some(config) => {
                        let Ok(session) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        serve(rustls::StreamOwned::new(session, conn), &shared);
                    }
                });
            }
        });
        Fake {
            addr,
            faults,
            seen,
            ca_pem,
            stop,
        }
    }

    pub fn endpoint(&self) -> String {
        match self.ca_pem {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    pub fn set(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

impl Shared {
    fn chance(&self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        let mut s = self.rng.lock().unwrap();
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        (*s >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// Whether shard `i` takes a record of `bytes` now, under `capacity`.
    fn admits(&self, i: usize, bytes: usize, capacity: (f64, f64)) -> bool {
        let now = Instant::now();
        let mut all = self.allowance.lock().unwrap();
        let a = all[i].get_or_insert(Allowance {
            records: capacity.0,
            bytes: capacity.1,
            at: now,
        });
        let dt = now.duration_since(a.at).as_secs_f64();
        a.at = now;
        a.records = (a.records + dt * capacity.0).min(capacity.0);
        a.bytes = (a.bytes + dt * capacity.1).min(capacity.1);
        if a.records >= 1.0 && a.bytes >= bytes as f64 {
            a.records -= 1.0;
            a.bytes -= bytes as f64;
            true
        } else {
            false
        }
    }

    /// The shards are even ranges in order, so the one holding `hash` is found by bisection.
    fn shard_of(&self, hash: u128) -> usize {
        self.shards
            .partition_point(|s| s.2 < hash)
            .min(self.shards.len() - 1)
    }
}

/// Serves one keep-alive connection.
fn serve<S: Read + Write>(conn: S, shared: &Shared) {
    let mut reader = BufReader::with_capacity(64 << 10, conn);
    loop {
        let mut target = String::new();
        let mut len = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                match k.to_ascii_lowercase().as_str() {
                    "x-amz-target" => target = v.trim().to_string(),
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let faults = shared.faults.lock().unwrap().clone();
        if faults.outage_until.is_some_and(|t| Instant::now() < t) {
            shared.seen.lock().unwrap().dropped_connections += 1;
            return;
        }
        let (status, reply) = answer(&target, &body, &faults, shared);
        if let Some(d) = faults.delay {
            std::thread::sleep(d);
        }
        // One write: a head and body written apart meet Nagle and delayed acks (40 ms).
        let whole = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nx-amzn-RequestId: fake\r\n\r\n{reply}",
            reply.len()
        );
        let out = reader.get_mut();
        if out
            .write_all(whole.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
    }
}

fn error(status: u16, kind: &str) -> (u16, String) {
    let body = json!({"__type": kind, "message": "injected by the fake"});
    (status, body.to_string())
}

/// A request, borrowed from its body so that the fake keeps up with sluice under load.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct Req<'a> {
    #[serde(borrow)]
    stream_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    delivery_stream_name: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "StreamARN")]
    stream_arn: Option<Cow<'a, str>>,
    #[serde(borrow)]
    records: Vec<Rec<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Rec<'a> {
    #[serde(borrow)]
    data: Cow<'a, str>,
    #[serde(borrow, default)]
    partition_key: Cow<'a, str>,
    #[serde(borrow, default)]
    explicit_hash_key: Option<Cow<'a, str>>,
}

/// The length of what base64 `text` decodes to.
fn decoded_len(text: &str) -> usize {
    let pad = text.bytes().rev().take_while(|&b| b == b'=').count();
    text.len() / 4 * 3 - pad
}

fn answer(target: &str, body: &[u8], faults: &Faults, shared: &Shared) -> (u16, String) {
    let req: Req = serde_json::from_slice(body).unwrap_or_default();
    let op = target.rsplit('.').next().unwrap_or_default();
    let stream = req
        .stream_name
        .as_deref()
        .or(req.delivery_stream_name.as_deref())
        .or_else(|| req.stream_arn.as_deref().and_then(|a| a.rsplit('/').next()))
        .unwrap_or_default();
    match op {
        "ListShards" => {
            let shards: Vec<Value> = shared
                .shards
                .iter()
                .map(|(id, s, e)| {
                    json!({"ShardId": id, "HashKeyRange": {"StartingHashKey": s.to_string(), "EndingHashKey": e.to_string()},
                           "SequenceNumberRange": {"StartingSequenceNumber": "0"}})
                })
                .collect();
            (200, json!({"Shards": shards}).to_string())
        }
        "DescribeDeliveryStream" => (
            200,
            json!({"DeliveryStreamDescription": {
                "DeliveryStreamName": stream, "DeliveryStreamARN": format!("arn:aws:firehose:us-east-1:123456789012:deliverystream/{stream}"),
                "DeliveryStreamStatus": "ACTIVE", "DeliveryStreamType": "DirectPut", "VersionId": "1", "HasMoreDestinations": false,
                "Destinations": [{"DestinationId": "d-1", "ExtendedS3DestinationDescription": {
                    "RoleARN": "arn:aws:iam::123456789012:role/f", "BucketARN": "arn:aws:s3:::b",
                    "BufferingHints": {"SizeInMBs": 5, "IntervalInSeconds": 300}, "CompressionFormat": "UNCOMPRESSED",
                    "EncryptionConfiguration": {"NoEncryptionConfig": "NoEncryption"}}}]}})
            .to_string(),
        ),
        "PutRecords" | "PutRecordBatch" => {
            let mut seen = shared.seen.lock().unwrap();
            seen.requests += 1;
            if !shared.streams.iter().any(|s| *s == stream) {
                return error(400, "ResourceNotFoundException");
            }
            if shared.chance(faults.throttle_requests) {
                seen.throttled_requests += 1;
                return error(400, "ProvisionedThroughputExceededException");
            }
            if shared.chance(faults.server_errors) {
                seen.server_errors += 1;
                return error(500, "InternalFailure");
            }
            let kinesis = op == "PutRecords";
            let mut results = String::with_capacity(req.records.len() * 64);
            let mut failed = 0;
            for r in &req.records {
                if !results.is_empty() {
                    results.push(',');
                }
                let hash = r
                    .explicit_hash_key
                    .as_deref()
                    .and_then(|h| h.parse::<u128>().ok())
                    .unwrap_or_else(|| {
                        use md5::{Digest, Md5};
                        u128::from_be_bytes(Md5::digest(r.partition_key.as_bytes()).into())
                    });
                let shard = if kinesis { shared.shard_of(hash) } else { 0 };
                let len = decoded_len(&r.data);
                let over = faults.capacity.is_some_and(|c| {
                    !shared.admits(shard, len + r.partition_key.len(), c)
                });
                if over || shared.chance(faults.throttle_records) {
                    failed += 1;
                    seen.throttled_records += 1;
                    seen.tally(shared.started, false);
                    let code = if kinesis {
                        "ProvisionedThroughputExceededException"
                    } else {
                        "ServiceUnavailableException"
                    };
                    let _ = write!(results, r#"{{"ErrorCode":"{code}","ErrorMessage":"injected"}}"#);
                    continue;
                }
                seen.tally(shared.started, true);
                seen.records += 1;
                seen.bytes += len as u64;
                seen.payload_units += (len + r.partition_key.len()).div_ceil(25 * 1024) as u64;
                if shared.keep {
                    let data = aws_smithy_types::base64::decode(&*r.data).unwrap();
                    seen.data.push(data);
                }
                let n = seen.records;
                if kinesis {
                    let id = &shared.shards[shard].0;
                    let _ = write!(results, r#"{{"SequenceNumber":"{n}","ShardId":"{id}"}}"#);
                } else {
                    let _ = write!(results, r#"{{"RecordId":"{n}"}}"#);
                }
            }
            let reply = if kinesis {
                format!(r#"{{"FailedRecordCount":{failed},"Records":[{results}]}}"#)
            } else {
                format!(
                    r#"{{"FailedPutCount":{failed},"Encrypted":false,"RequestResponses":[{results}]}}"#
                )
            };
            (200, reply)
        }
        _ => error(400, "UnknownOperationException"),
    }
}

/// Waits until `pred` holds of what the fake has seen.
pub fn wait_seen(fake: &Fake, what: &str, patience: Duration, pred: impl Fn(&Seen) -> bool) {
    let start = Instant::now();
    while !pred(&fake.seen.lock().unwrap()) {
        assert!(start.elapsed() < patience, "the fake never saw {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

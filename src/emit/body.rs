//! Request bodies and answers without the SDK's per-record types. The `PutRecords` and
//! `PutRecordBatch` JSON is written straight from a batch's records (base64 data, partition
//! keys, explicit hash keys) into one reused buffer, which `request` signs and sends. A
//! successful answer is kept for [`read_accepted`] or [`read_answer`], which read it
//! without a struct or `String` per record.

use bytes::Bytes;

use super::request::Request;
use super::retry::{self, Outcome};
use crate::batch::Batch;
use crate::batch::json::write_str;
use crate::budget::Budget;

/// Where a request goes, as its body names it.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    StreamName(&'a str),
    StreamArn(&'a str),
    DeliveryStream(&'a str),
}

/// The bytes a record's entry adds to a body beyond its base64 data and its key: the
/// punctuation and field names, and an explicit hash key (39 digits at most).
const ENTRY_OVERHEAD: usize = 96;

/// Writes the body of a request for records `idx` of `batch` to `target` into `out`:
/// `{"Records":[{"Data":…,"PartitionKey":…,"ExplicitHashKey":…},…],"StreamName":…}` for
/// Kinesis, `{"Records":[{"Data":…},…],"DeliveryStreamName":…}` for Firehose.
/// At least the length of the body for records `idx` of `batch`.
pub fn len(batch: &Batch, idx: &[usize]) -> usize {
    let entries: usize = idx
        .iter()
        .map(|&i| {
            let r = &batch.records[i];
            base64_simd::STANDARD.encoded_length((r.end - r.start) as usize)
                + (r.key_end - r.key_start) as usize
                + ENTRY_OVERHEAD
        })
        .sum();
    entries + 256
}

pub fn write(out: &mut Vec<u8>, target: Target<'_>, batch: &Batch, idx: &[usize]) {
    out.clear();
    out.reserve(len(batch, idx));
    let kinesis = !matches!(target, Target::DeliveryStream(_));
    out.extend_from_slice(b"{\"Records\":[");
    for (n, &i) in idx.iter().enumerate() {
        let r = &batch.records[i];
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"Data\":\"");
        base64_simd::STANDARD.encode_append(batch.data_of(r), out);
        out.push(b'"');
        if kinesis {
            out.extend_from_slice(b",\"PartitionKey\":");
            write_str(out, batch.key_of(r).as_bytes());
            if let Some(h) = r.hash {
                out.extend_from_slice(b",\"ExplicitHashKey\":\"");
                out.extend_from_slice(itoa::Buffer::new().format(h).as_bytes());
                out.push(b'"');
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],");
    let (field, name): (&[u8], &str) = match target {
        Target::StreamName(s) => (b"\"StreamName\":", s),
        Target::StreamArn(s) => (b"\"StreamARN\":", s),
        Target::DeliveryStream(s) => (b"\"DeliveryStreamName\":", s),
    };
    out.extend_from_slice(field);
    write_str(out, name.as_bytes());
    out.push(b'}');
}

/// One record's result in an answer: accepted (with the shard it went to, for Kinesis),
/// or its error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    Accepted { shard: Option<&'a str> },
    Failed { code: &'a str },
}

/// simd-json's buffers and tape, kept from answer to answer so that reading one allocates
/// nothing once they have grown to fit.
#[derive(Default)]
pub struct Scratch {
    buffers: simd_json::Buffers,
    tape: Option<simd_json::Tape<'static>>,
    /// The longest answer read, which the buffers grew to fit.
    largest: usize,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scratch")
    }
}

/// Reads the per-record results of a successful answer (`list` is `Records` for Kinesis,
/// `RequestResponses` for Firehose), handing each to `each` in order, and returns how many
/// there were. `None` if the answer is not JSON of that shape (`each` may have seen some
/// of it). The answer is parsed in place.
pub fn read_answer<'a>(
    answer: &'a mut [u8],
    list: &str,
    scratch: &mut Scratch,
    each: impl FnMut(Entry<'a>),
) -> Option<usize> {
    let mut tape = scratch
        .tape
        .take()
        .unwrap_or(simd_json::Tape(Vec::new()))
        .reset();
    let read = simd_json::fill_tape(answer, &mut scratch.buffers, &mut tape)
        .ok()
        .and_then(|()| walk(&tape.0, list, each));
    scratch.tape = Some(tape.reset());
    read
}

fn walk<'a>(
    nodes: &[simd_json::Node<'a>],
    list: &str,
    mut each: impl FnMut(Entry<'a>),
) -> Option<usize> {
    use simd_json::Node;
    // The index after the value at `i`.
    let skip = |i: usize| match nodes.get(i) {
        Some(Node::Object { count, .. } | Node::Array { count, .. }) => i + count + 1,
        _ => i + 1,
    };
    let Some(Node::Object { len, .. }) = nodes.first() else {
        return None;
    };
    let mut i = 1;
    for _ in 0..*len {
        let key = match nodes.get(i)? {
            Node::String(k) => *k,
            _ => return None,
        };
        if key != list {
            i = skip(i + 1);
            continue;
        }
        let Node::Array { len: n, .. } = nodes.get(i + 1)? else {
            return None;
        };
        let mut j = i + 2;
        for _ in 0..*n {
            let Node::Object { len: fields, .. } = nodes.get(j)? else {
                return None;
            };
            let (mut shard, mut code) = (None, None);
            let mut k = j + 1;
            for _ in 0..*fields {
                let field = match nodes.get(k)? {
                    Node::String(f) => *f,
                    _ => return None,
                };
                if let Some(Node::String(v)) = nodes.get(k + 1) {
                    match field {
                        "ErrorCode" => code = Some(*v),
                        "ShardId" => shard = Some(*v),
                        _ => {}
                    }
                }
                k = skip(k + 1);
            }
            each(match code {
                Some(code) => Entry::Failed { code },
                None => Entry::Accepted { shard },
            });
            j = k;
        }
        return Some(*n);
    }
    None
}

/// Reads an answer that failed no record without parsing it: its failed count is 0 and its
/// list has `n` entries, each `ShardId` (Kinesis) or `RecordId` (Firehose) handed to `each`
/// in order. `None` if it is not exactly of that form: then it is parsed whole.
pub fn read_accepted<'a>(
    answer: &'a [u8],
    list: &str,
    n: usize,
    mut each: impl FnMut(&'a [u8]),
) -> Option<()> {
    let (count, id): (&[u8], &[u8]) = match list {
        "Records" => (b"\"FailedRecordCount\":", b"\"ShardId\":\""),
        _ => (b"\"FailedPutCount\":", b"\"RecordId\":\""),
    };
    let at = memchr::memmem::find(answer, count)? + count.len();
    let rest = answer[at..].trim_ascii_start();
    if rest.first() != Some(&b'0') || rest.get(1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let mut seen = 0;
    for start in memchr::memmem::find_iter(answer, id) {
        let v = start + id.len();
        let value = &answer[v..v + memchr::memchr(b'"', &answer[v..])?];
        if value.contains(&b'\\') {
            return None;
        }
        each(value);
        seen += 1;
    }
    (seen == n).then_some(())
}

/// One request's buffers, reused from request to request: its body, and its answer.
#[derive(Debug, Default)]
pub struct Wire {
    body: Vec<u8>,
    answer: Vec<u8>,
    scratch: Scratch,
    /// What it is charged to the memory budget while a delivery uses it.
    charged: usize,
}

impl Wire {
    /// Sends records `idx` of `batch` to `target` with `req`, and keeps the answer for
    /// [`Wire::read`].
    pub async fn send(
        &mut self,
        req: &Request,
        target: Target<'_>,
        batch: &Batch,
        idx: &[usize],
    ) -> Result<(), Outcome> {
        let mut body = std::mem::take(&mut self.body);
        write(&mut body, target, batch, idx);
        let body = Bytes::from(body);
        let sent = req.send(body.clone(), &mut self.answer).await;
        self.reclaim(body);
        sent
    }

    /// Makes room for the body of records `idx` of `batch` and charges the budget for it,
    /// before the request is let go.
    pub fn reserve(&mut self, batch: &Batch, idx: &[usize], budget: &Budget) {
        let need = len(batch, idx);
        if self.body.capacity() < need {
            self.body.reserve(need);
        }
        self.charge(budget);
    }

    /// Charges the budget for what its buffers have grown (or shrunk) to. simd-json's
    /// buffers are not visible; they are counted as three times the largest answer read.
    pub fn charge(&mut self, budget: &Budget) {
        let answer = self.answer.capacity();
        let tape = self.scratch.tape.as_ref().map_or(0, |t| {
            t.0.capacity() * size_of::<simd_json::Node<'static>>()
        });
        let now = self.body.capacity() + answer + tape + 3 * self.scratch.largest;
        budget.adjust(self.charged, now);
        self.charged = now;
    }

    /// Gives back its charge as it goes back to the pool: pooled buffers are reused, not
    /// charged, and there are never more of them than were in use at once.
    pub fn settle(&mut self, budget: &Budget) {
        budget.adjust(self.charged, 0);
        self.charged = 0;
    }

    /// Takes back the body's buffer once the request is done with it (a fresh one next
    /// time if the HTTP client still holds it).
    fn reclaim(&mut self, body: Bytes) {
        if let Ok(b) = body.try_into_mut() {
            self.body = Vec::from(b);
            self.body.clear();
        }
    }

    /// What the kept answer says of each of `n` records (its list named `list`), and
    /// whether an accepted record went to another shard than `predicted(position)`. An
    /// answer that cannot be read, or does not match the request, is sent again whole.
    pub fn read<'a>(
        &mut self,
        list: &str,
        n: usize,
        predicted: &dyn Fn(usize) -> Option<&'a str>,
    ) -> (Outcome, bool) {
        let answer = &mut self.answer;
        let mut stale = false;
        let mut p = 0;
        let clean = read_accepted(answer, list, n, |id| {
            if let Some(want) = predicted(p) {
                stale |= id != want.as_bytes();
            }
            p += 1;
        });
        if clean.is_some() {
            return (Outcome::Records(vec![None; n]), stale);
        }
        stale = false;
        let mut codes = Vec::with_capacity(n);
        let read = read_answer(answer, list, &mut self.scratch, |e| {
            codes.push(match e {
                Entry::Accepted { shard } => {
                    if let (Some(got), Some(want)) = (shard, predicted(codes.len())) {
                        stale |= got != want;
                    }
                    None
                }
                Entry::Failed { code } => Some(retry::code(code)),
            })
        });
        if read != Some(n) {
            let unreadable = Outcome::Failed {
                code: None,
                status: Some(500),
            };
            return (unreadable, false);
        }
        (Outcome::Records(codes), stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Record;
    use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
    use aws_smithy_runtime_api::box_error::BoxError;
    use aws_smithy_runtime_api::client::interceptors::Intercept;
    use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
    use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
    use aws_smithy_types::Blob;
    use aws_smithy_types::config_bag::ConfigBag;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    /// Takes the body the SDK serialized, then stops the request before it is signed.
    #[derive(Debug, Default, Clone)]
    struct Capture(Arc<Mutex<Option<Vec<u8>>>>);

    impl Intercept for Capture {
        fn name(&self) -> &'static str {
            "Capture"
        }

        fn read_before_signing(
            &self,
            context: &BeforeTransmitInterceptorContextRef<'_>,
            _runtime_components: &RuntimeComponents,
            _cfg: &mut ConfigBag,
        ) -> Result<(), BoxError> {
            let body = context.request().body().bytes().unwrap().to_vec();
            *self.0.lock().unwrap() = Some(body);
            Err("captured".into())
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// What the SDK's own serializer makes of records `idx` of `batch`.
    fn sdk_kinesis(
        rt: &tokio::runtime::Runtime,
        target: Target<'_>,
        batch: &Batch,
        idx: &[usize],
    ) -> Vec<u8> {
        use aws_sdk_kinesis::types::PutRecordsRequestEntry;
        let conf = aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("a", "b", None, None, "test"))
            .build();
        let client = aws_sdk_kinesis::Client::from_conf(conf);
        let entries = idx
            .iter()
            .map(|&i| {
                let r = &batch.records[i];
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(batch.data_of(r)))
                    .partition_key(batch.key_of(r))
                    .set_explicit_hash_key(r.hash.map(|h| h.to_string()))
                    .build()
                    .unwrap()
            })
            .collect();
        let req = client.put_records().set_records(Some(entries));
        let req = match target {
            Target::StreamName(s) => req.stream_name(s),
            Target::StreamArn(s) => req.stream_arn(s),
            Target::DeliveryStream(_) => unreachable!(),
        };
        let cap = Capture::default();
        let _ = rt.block_on(req.customize().interceptor(cap.clone()).send());
        let body = cap.0.lock().unwrap().take();
        body.expect("the SDK serialized a body")
    }

    fn sdk_firehose(
        rt: &tokio::runtime::Runtime,
        stream: &str,
        batch: &Batch,
        idx: &[usize],
    ) -> Vec<u8> {
        use aws_sdk_firehose::config::{BehaviorVersion, Credentials, Region};
        let conf = aws_sdk_firehose::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("a", "b", None, None, "test"))
            .build();
        let client = aws_sdk_firehose::Client::from_conf(conf);
        let records = idx
            .iter()
            .map(|&i| {
                aws_sdk_firehose::types::Record::builder()
                    .data(Blob::new(batch.data_of(&batch.records[i])))
                    .build()
                    .unwrap()
            })
            .collect();
        let req = client
            .put_record_batch()
            .delivery_stream_name(stream)
            .set_records(Some(records));
        let cap = Capture::default();
        let _ = rt.block_on(req.customize().interceptor(cap.clone()).send());
        let body = cap.0.lock().unwrap().take();
        body.expect("the SDK serialized a body")
    }

    /// A batch of `records`: data, partition key, explicit hash key.
    fn batch_of(records: &[(Vec<u8>, String, Option<u128>)]) -> Batch {
        let mut b = Batch::default();
        for (data, key, hash) in records {
            let (start, key_start) = (b.data.len() as u32, b.keys.len() as u32);
            b.data.extend_from_slice(data);
            b.keys.extend_from_slice(key.as_bytes());
            b.records.push(Record {
                start,
                end: b.data.len() as u32,
                key_start,
                key_end: b.keys.len() as u32,
                hash: *hash,
                target: 0,
                events: 1,
                oversize: false,
            });
        }
        b
    }

    fn json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(body));
        })
    }

    fn record() -> impl Strategy<Value = (Vec<u8>, String, Option<u128>)> {
        (
            prop::collection::vec(any::<u8>(), 0..300),
            // Keys with quotes, backslashes, controls and non-ASCII, as field keys may be.
            "[a-z0-9\"\\\\\u{1}\u{1f}é€😀 ]{1,40}",
            prop::option::of(any::<u128>()),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The body we write parses to what the SDK's serializer writes for the same
        /// records, for a whole batch and for a retry of any subset of it.
        #[test]
        fn bodies_match_the_sdk_serializer(
            records in prop::collection::vec(record(), 1..40),
            subset in prop::collection::vec(any::<bool>(), 40),
            arn in any::<bool>(),
        ) {
            let rt = runtime();
            let batch = batch_of(&records);
            let all: Vec<usize> = (0..records.len()).collect();
            let retry: Vec<usize> = all.iter().copied().filter(|&i| subset[i]).collect();
            let target = match arn {
                true => Target::StreamArn("arn:aws:kinesis:us-east-1:123456789012:stream/s-1"),
                false => Target::StreamName("s-1"),
            };
            let mut out = Vec::new();
            for idx in [&all, &retry] {
                if idx.is_empty() {
                    continue;
                }
                write(&mut out, target, &batch, idx);
                prop_assert_eq!(json(&out), json(&sdk_kinesis(&rt, target, &batch, idx)));
                write(&mut out, Target::DeliveryStream("d-1"), &batch, idx);
                prop_assert_eq!(json(&out), json(&sdk_firehose(&rt, "d-1", &batch, idx)));
            }
        }
    }

    #[test]
    fn an_answer_that_failed_nothing_is_read_without_a_parse() {
        let a = br#"{"FailedRecordCount":0,"Records":[{"SequenceNumber":"49","ShardId":"shardId-000000000001"},{"SequenceNumber":"50","ShardId":"shardId-000000000000"}],"EncryptionType":"NONE"}"#;
        let mut ids = Vec::new();
        assert_eq!(read_accepted(a, "Records", 2, |id| ids.push(id)), Some(()));
        assert_eq!(ids, [&b"shardId-000000000001"[..], b"shardId-000000000000"]);
        let f = br#"{"FailedPutCount":0,"Encrypted":false,"RequestResponses":[{"RecordId":"a"},{"RecordId":"b"},{"RecordId":"c"}]}"#;
        assert_eq!(read_accepted(f, "RequestResponses", 3, |_| {}), Some(()));
        // Anything else is parsed whole: a failure, a count that does not match, a count
        // of 10, spacing it does not expect.
        for (bad, n) in [
            (
                &br#"{"FailedRecordCount":1,"Records":[{"ShardId":"s"}]}"#[..],
                1,
            ),
            (br#"{"FailedRecordCount":0,"Records":[{"ShardId":"s"}]}"#, 2),
            (
                br#"{"FailedRecordCount":01,"Records":[{"ShardId":"s"}]}"#,
                1,
            ),
            (
                br#"{"FailedRecordCount":0,"Records":[{"ShardId" : "s"}]}"#,
                1,
            ),
            (br#"{"Records":[{"ShardId":"s"}]}"#, 1),
        ] {
            assert_eq!(read_accepted(bad, "Records", n, |_| {}), None, "{bad:?}");
        }
        // Through a Wire, the fast path and the parse agree on what they report.
        let mut w = Wire::default();
        for (answer, want) in [
            (&a[..], "shardId-000000000001"),
            (&a[..], "shardId-000000000009"),
        ] {
            w.answer = answer.to_vec();
            let (outcome, stale) = w.read("Records", 2, &|p| (p == 0).then_some(want));
            assert!(matches!(&outcome, Outcome::Records(c) if c == &[None, None]));
            assert_eq!(stale, want != "shardId-000000000001");
        }
    }

    #[test]
    fn answers_are_read_record_by_record() {
        // As Kinesis answers: accepted records with their shard, failed ones with a code.
        let mut a = br#"{"FailedRecordCount":1,"Records":[{"SequenceNumber":"4955","ShardId":"shardId-000000000001"},
            {"ErrorCode":"ProvisionedThroughputExceededException","ErrorMessage":"Rate exceeded for shard"},
            {"SequenceNumber":"4956","ShardId":"shardId-000000000000","Extra":{"nested":[1,2]}}],"EncryptionType":"NONE"}"#
            .to_vec();
        let mut got = Vec::new();
        let mut scratch = Scratch::default();
        assert_eq!(
            read_answer(&mut a, "Records", &mut scratch, |e| got.push(e)),
            Some(3)
        );
        assert_eq!(
            got,
            [
                Entry::Accepted {
                    shard: Some("shardId-000000000001")
                },
                Entry::Failed {
                    code: "ProvisionedThroughputExceededException"
                },
                Entry::Accepted {
                    shard: Some("shardId-000000000000")
                },
            ]
        );
        // As Firehose answers, the list after other fields.
        let mut a = br#"{"Encrypted":false,"FailedPutCount":1,"RequestResponses":[{"ErrorCode":"ServiceUnavailableException","ErrorMessage":"Slow down."},{"RecordId":"x"}]}"#.to_vec();
        let mut got = Vec::new();
        assert_eq!(
            read_answer(&mut a, "RequestResponses", &mut scratch, |e| got.push(e)),
            Some(2)
        );
        assert_eq!(
            got,
            [
                Entry::Failed {
                    code: "ServiceUnavailableException"
                },
                Entry::Accepted { shard: None }
            ]
        );
        // Not an answer of that shape.
        for bad in [
            &b"[]"[..],
            b"{\"Records\":{}}",
            b"{\"Other\":[]}",
            b"{\"Records\":[1]}",
            b"not json",
        ] {
            let mut b = bad.to_vec();
            assert_eq!(
                read_answer(&mut b, "Records", &mut scratch, |_| {}),
                None,
                "{bad:?}"
            );
        }
    }
}

//! AWS clients and requests: the standard credential chain (environment, profile, web
//! identity, ECS task role, IMDS), an optional role to assume, an endpoint override, and
//! the SDK's own retries turned off so that ours are never stacked on them. The control
//! plane (`ListShards`, `DescribeDeliveryStream`) goes through the SDK's clients; the data
//! plane through `request`, with bodies written by `body`. Every answer becomes an
//! [`Outcome`] for the pure classifier in `retry`.

use std::time::Duration;

use super::body::{Target, Wire};
use super::request::Request;
use super::retry::Outcome;
use crate::batch::Batch;
use crate::config::{Aws, FirehoseSink, KinesisSink, LinePacking};
use crate::shards::{Shard, ShardMap};
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_firehose::error::ProvideErrorMetadata;
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::SdkError;

/// Loads the SDK configuration for one sink.
pub async fn sdk_config(aws: &Aws) -> SdkConfig {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_timeout(aws.request_timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts.clone());
    if let Some(r) = &aws.region {
        loader = loader.region(Region::new(r.clone()));
    }
    let base = loader.load().await;
    let Some(role) = &aws.role_arn else {
        return base;
    };
    let provider = aws_config::sts::AssumeRoleProvider::builder(role.clone())
        .session_name("sluice")
        .configure(&base)
        .build()
        .await;
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts)
        .credentials_provider(provider);
    if let Some(r) = &aws.region {
        loader = loader.region(Region::new(r.clone()));
    }
    loader.load().await
}

/// What a sink's clients are made from: the SDK's configuration, the region requests are
/// signed for, and the endpoint override (the sink's `endpoint` or `AWS_ENDPOINT_URL`).
struct Located {
    conf: SdkConfig,
    region: String,
    endpoint: Option<String>,
}

impl Located {
    async fn new(aws: &Aws) -> Result<Self, String> {
        let conf = sdk_config(aws).await;
        let region = conf.region().map(|r| r.to_string()).ok_or(
            "no AWS region: set `region` on the sink, or AWS_REGION, or a profile's region",
        )?;
        let endpoint = (aws.endpoint.clone()).or(conf.endpoint_url().map(str::to_string));
        Ok(Located {
            conf,
            region,
            endpoint,
        })
    }

    /// The data plane's request for `target` on `url`, which the service's resolver gave.
    fn request(
        &self,
        url: &str,
        service: &'static str,
        target: &'static str,
        aws: &Aws,
    ) -> Result<Request, String> {
        let creds = self.conf.credentials_provider();
        let timeout = aws.request_timeout;
        Request::new(url, self.region.clone(), service, target, creds, timeout)
    }
}

/// A Kinesis stream, by name or ARN.
#[derive(Debug)]
pub struct Kinesis {
    client: aws_sdk_kinesis::Client,
    put: Request,
    stream: String,
}

impl Kinesis {
    pub async fn new(sink: &KinesisSink) -> Result<Self, String> {
        use aws_sdk_kinesis::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
        let at = Located::new(&sink.aws).await?;
        // What the SDK would resolve for PutRecords (a stream ARN has endpoints of its own).
        let arn = sink.stream.starts_with("arn:").then(|| sink.stream.clone());
        let params = Params::builder()
            .region(at.region.clone())
            .set_use_fips(at.conf.use_fips())
            .set_use_dual_stack(at.conf.use_dual_stack())
            .set_endpoint(at.endpoint.clone())
            .operation_type("data")
            .set_stream_arn(arn)
            .build()
            .map_err(|e| e.to_string())?;
        let url = DefaultResolver::new()
            .resolve_endpoint(&params)
            .await
            .map_err(|e| format!("cannot resolve the Kinesis endpoint: {e}"))?;
        let put = at.request(
            url.url(),
            "kinesis",
            "Kinesis_20131202.PutRecords",
            &sink.aws,
        )?;
        let mut b = aws_sdk_kinesis::config::Builder::from(&at.conf);
        b.set_endpoint_url(at.endpoint);
        Ok(Kinesis {
            client: aws_sdk_kinesis::Client::from_conf(b.build()),
            put,
            stream: sink.stream.clone(),
        })
    }

    fn is_arn(&self) -> bool {
        self.stream.starts_with("arn:")
    }

    fn target(&self) -> Target<'_> {
        match self.is_arn() {
            true => Target::StreamArn(&self.stream),
            false => Target::StreamName(&self.stream),
        }
    }

    /// Sends records `idx` of `batch` in one PutRecords request through `wire`. Returns
    /// the outcome, and whether a record went to another shard than `predicted(position)`.
    pub async fn put<'a>(
        &self,
        batch: &Batch,
        idx: &[usize],
        wire: &mut Wire,
        predicted: &(dyn Fn(usize) -> Option<&'a str> + Sync),
    ) -> (Outcome, bool) {
        match wire.send(&self.put, self.target(), batch, idx).await {
            Ok(()) => wire.read("Records", idx.len(), predicted),
            Err(outcome) => (outcome, false),
        }
    }

    /// Sends dead-lettered records again with the SDK's PutRecords, keys and all. Returns
    /// each record's error code, `None` for the accepted.
    pub async fn put_sdk(
        &self,
        records: &[&super::dlq::DeadRecord],
    ) -> Result<Vec<Option<String>>, String> {
        use aws_sdk_kinesis::primitives::Blob;
        use aws_sdk_kinesis::types::PutRecordsRequestEntry;
        let mut req = self.client.put_records();
        req = match self.is_arn() {
            true => req.stream_arn(&self.stream),
            false => req.stream_name(&self.stream),
        };
        for r in records {
            let e = PutRecordsRequestEntry::builder()
                .data(Blob::new(r.data.clone()))
                .partition_key(&r.partition_key)
                .set_explicit_hash_key(r.explicit_hash_key.clone())
                .build()
                .map_err(|e| e.to_string())?;
            req = req.records(e);
        }
        let out = req.send().await.map_err(|e| describe(&e))?;
        Ok(out
            .records()
            .iter()
            .map(|r| r.error_code().map(str::to_string))
            .collect())
    }

    /// The stream's open shards.
    pub async fn shards(&self) -> Result<ShardMap, String> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self.client.list_shards();
            req = match &token {
                Some(t) => req.next_token(t),
                None if self.is_arn() => req.stream_arn(&self.stream),
                None => req.stream_name(&self.stream),
            };
            let out = req.send().await.map_err(|e| describe(&e))?;
            for s in out.shards() {
                let open = s
                    .sequence_number_range()
                    .is_none_or(|r| r.ending_sequence_number().is_none());
                let range = s.hash_key_range();
                let (Some(start), Some(end)) = (
                    range.and_then(|r| r.starting_hash_key().parse::<u128>().ok()),
                    range.and_then(|r| r.ending_hash_key().parse::<u128>().ok()),
                ) else {
                    continue;
                };
                if open {
                    shards.push(Shard {
                        id: s.shard_id().to_string(),
                        start,
                        end,
                    });
                }
            }
            token = out.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        if shards.is_empty() {
            return Err(format!("stream {} has no open shards", self.stream));
        }
        Ok(ShardMap::new(shards))
    }
}

/// A Firehose delivery stream.
#[derive(Debug)]
pub struct Firehose {
    client: aws_sdk_firehose::Client,
    put: Request,
    stream: String,
}

impl Firehose {
    pub async fn new(sink: &FirehoseSink) -> Result<Self, String> {
        use aws_sdk_firehose::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
        let at = Located::new(&sink.aws).await?;
        let params = Params::builder()
            .region(at.region.clone())
            .set_use_fips(at.conf.use_fips())
            .set_use_dual_stack(at.conf.use_dual_stack())
            .set_endpoint(at.endpoint.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let url = DefaultResolver::new()
            .resolve_endpoint(&params)
            .await
            .map_err(|e| format!("cannot resolve the Firehose endpoint: {e}"))?;
        let target = "Firehose_20150804.PutRecordBatch";
        let put = at.request(url.url(), "firehose", target, &sink.aws)?;
        let mut b = aws_sdk_firehose::config::Builder::from(&at.conf);
        b.set_endpoint_url(at.endpoint);
        Ok(Firehose {
            client: aws_sdk_firehose::Client::from_conf(b.build()),
            put,
            stream: sink.delivery_stream.clone(),
        })
    }

    /// Sends dead-lettered records again with the SDK's PutRecordBatch, as
    /// [`Kinesis::put_sdk`].
    pub async fn put_sdk(
        &self,
        records: &[&super::dlq::DeadRecord],
    ) -> Result<Vec<Option<String>>, String> {
        use aws_sdk_firehose::primitives::Blob;
        use aws_sdk_firehose::types::Record;
        let mut req = self
            .client
            .put_record_batch()
            .delivery_stream_name(&self.stream);
        for r in records {
            let rec = Record::builder()
                .data(Blob::new(r.data.clone()))
                .build()
                .map_err(|e| e.to_string())?;
            req = req.records(rec);
        }
        let out = req.send().await.map_err(|e| describe(&e))?;
        Ok(out
            .request_responses()
            .iter()
            .map(|r| r.error_code().map(str::to_string))
            .collect())
    }

    /// Sends records `idx` of `batch` in one PutRecordBatch request, as [`Kinesis::put`].
    pub async fn put(&self, batch: &Batch, idx: &[usize], wire: &mut Wire) -> Outcome {
        let target = Target::DeliveryStream(&self.stream);
        match wire.send(&self.put, target, batch, idx).await {
            Ok(()) => wire.read("RequestResponses", idx.len(), &|_| None).0,
            Err(outcome) => outcome,
        }
    }

    /// Whether to pack lines: asked of the delivery stream when `auto` (every destination
    /// is S3), and off when it cannot be told.
    pub async fn packs_lines(&self, packing: LinePacking) -> bool {
        match packing {
            LinePacking::On => true,
            LinePacking::Off => false,
            LinePacking::Auto => {
                let req = self
                    .client
                    .describe_delivery_stream()
                    .delivery_stream_name(&self.stream);
                match req.send().await {
                    Ok(out) => {
                        let dests = out
                            .delivery_stream_description()
                            .map(|d| d.destinations())
                            .unwrap_or_default();
                        let s3 = !dests.is_empty()
                            && dests.iter().all(|d| {
                                d.extended_s3_destination_description().is_some()
                                    || d.s3_destination_description().is_some()
                            });
                        tracing::info!(
                            stream = %self.stream,
                            line_packing = s3,
                            "Firehose line packing {} (destinations are {}S3)",
                            if s3 { "on" } else { "off" },
                            if s3 { "" } else { "not all " }
                        );
                        s3
                    }
                    Err(e) => {
                        tracing::warn!(
                            stream = %self.stream,
                            error = %describe(&e),
                            "Cannot describe the delivery stream; line packing off (set line_packing to choose)"
                        );
                        false
                    }
                }
            }
        }
    }
}

/// A one-line account of an SDK error, for logs.
pub fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &SdkError<E, HttpResponse>,
) -> String {
    match e {
        SdkError::ServiceError(s) => format!(
            "{}: {}",
            s.err().code().unwrap_or("service error"),
            s.err().message().unwrap_or_default()
        ),
        other => {
            let mut msg = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            msg
        }
    }
}

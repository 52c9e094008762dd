//! AWS clients and requests: the standard credential chain (environment, profile, web
//! identity, ECS task role, IMDS), an optional role to assume, an endpoint override, and
//! the SDK's own retries turned off so that ours are never stacked on them. Request bodies
//! are written by `body` and put on the SDK's requests before signing. Every answer becomes
//! an [`Outcome`] for the pure classifier in `retry`.

use std::time::Duration;

use super::body::{FIREHOSE_STUB, KINESIS_STUB, Target, Wire};
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

/// Maps an SDK error to an outcome: the service's code and HTTP status if it answered,
/// "unreachable" if it did not.
fn outcome_of<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> Outcome {
    match e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => Outcome::Unreachable,
        SdkError::ServiceError(s) => Outcome::Failed {
            code: s.err().code().map(str::to_string),
            status: Some(s.raw().status().as_u16()),
        },
        SdkError::ResponseError(r) => Outcome::Failed {
            code: None,
            status: Some(r.raw().status().as_u16()),
        },
        // A request the SDK could not build is ours to fix: never retried.
        _ => Outcome::Failed {
            code: Some("ConstructionFailure".into()),
            status: None,
        },
    }
}

/// A Kinesis stream, by name or ARN.
#[derive(Clone, Debug)]
pub struct Kinesis {
    client: aws_sdk_kinesis::Client,
    stream: String,
}

impl Kinesis {
    pub async fn new(sink: &KinesisSink) -> Self {
        let conf = sdk_config(&sink.aws).await;
        let mut b = aws_sdk_kinesis::config::Builder::from(&conf);
        if let Some(e) = &sink.aws.endpoint {
            b = b.endpoint_url(e);
        }
        Kinesis {
            client: aws_sdk_kinesis::Client::from_conf(b.build()),
            stream: sink.stream.clone(),
        }
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
        let (body, answer, bytes) = wire.prepare(self.target(), batch, idx, KINESIS_STUB);
        let req = self.client.put_records().set_records(Some(vec![]));
        let req = if self.is_arn() {
            req.stream_arn(&self.stream)
        } else {
            req.stream_name(&self.stream)
        };
        let sent = req
            .customize()
            .interceptor(body)
            .interceptor(answer)
            .send()
            .await;
        wire.reclaim(bytes);
        match sent {
            Ok(_) => wire.read("Records", idx.len(), predicted),
            Err(e) => (outcome_of(&e), false),
        }
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
#[derive(Clone, Debug)]
pub struct Firehose {
    client: aws_sdk_firehose::Client,
    stream: String,
}

impl Firehose {
    pub async fn new(sink: &FirehoseSink) -> Self {
        let conf = sdk_config(&sink.aws).await;
        let mut b = aws_sdk_firehose::config::Builder::from(&conf);
        if let Some(e) = &sink.aws.endpoint {
            b = b.endpoint_url(e);
        }
        Firehose {
            client: aws_sdk_firehose::Client::from_conf(b.build()),
            stream: sink.delivery_stream.clone(),
        }
    }

    /// Sends records `idx` of `batch` in one PutRecordBatch request, as [`Kinesis::put`].
    pub async fn put(&self, batch: &Batch, idx: &[usize], wire: &mut Wire) -> Outcome {
        let (body, answer, bytes) = wire.prepare(
            Target::DeliveryStream(&self.stream),
            batch,
            idx,
            FIREHOSE_STUB,
        );
        let sent = self
            .client
            .put_record_batch()
            .delivery_stream_name(&self.stream)
            .set_records(Some(vec![]))
            .customize()
            .interceptor(body)
            .interceptor(answer)
            .send()
            .await;
        wire.reclaim(bytes);
        match sent {
            Ok(_) => wire.read("RequestResponses", idx.len(), &|_| None).0,
            Err(e) => outcome_of(&e),
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

//! One data-plane request (`PutRecords`, `PutRecordBatch`) without the SDK's orchestrator:
//! the body sluice wrote is hashed once, signed with `aws-sigv4` over the SDK's credential
//! chain, and sent on the SDK's own HTTP/TLS client (`aws-smithy-http-client`, rustls). The
//! endpoint is the SDK's resolver's answer, asked once. The orchestrator's interceptors,
//! config layers and endpoint resolution cost more per request than signing does, and
//! a request here has nothing for them to do: its body is built, its retries are ours.

use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_async::rt::sleep::TokioSleep;
use aws_smithy_http_client::Connector;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::retry::Outcome;

/// How much of an error answer is kept to read its code from.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Credentials older than this are asked for again even if they do not expire (what the
/// SDK's own identity cache does), and expiring ones this long before they expire.
const CREDENTIALS_REFRESH: Duration = Duration::from_secs(15 * 60);
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(5 * 60);

/// One operation on one endpoint.
pub struct Request {
    connector: Connector,
    /// The endpoint and path, and its authority for `Host`.
    uri: String,
    host: String,
    region: String,
    /// The signing name (`kinesis`, `firehose`) and the operation's `X-Amz-Target`.
    service: &'static str,
    target: &'static str,
    keys: Keys,
    timeout: Duration,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("uri", &self.uri)
            .field("target", &self.target)
            .finish()
    }
}

impl Request {
    /// `endpoint` is what the SDK's resolver said, for `region`.
    pub fn new(
        endpoint: &str,
        region: String,
        service: &'static str,
        target: &'static str,
        credentials: Option<SharedCredentialsProvider>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let uri = format!("{}/", endpoint.trim_end_matches('/'));
        let parsed: http::Uri = uri
            .parse()
            .map_err(|e| format!("the endpoint {endpoint} is not a URI: {e}"))?;
        let host = parsed
            .authority()
            .ok_or_else(|| format!("the endpoint {endpoint} has no host"))?
            .to_string();
        let settings = HttpConnectorSettings::builder()
            .connect_timeout(Duration::from_secs(5))
            .build();
        let connector = Connector::builder()
            .connector_settings(settings)
            .sleep_impl(TokioSleep::new())
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .build();
        Ok(Request {
            connector,
            uri,
            host,
            region,
            service,
            target,
            keys: Keys::new(credentials),
            timeout,
        })
    }

    /// Sends `body` and collects the answer into `answer`: `Ok` if the service took the
    /// request (its answer says what became of each record), or what went wrong.
    pub async fn send(&self, body: Bytes, answer: &mut Vec<u8>) -> Result<(), Outcome> {
        match tokio::time::timeout(self.timeout, self.exchange(body, answer)).await {
            Ok(r) => r,
            Err(_) => Err(Outcome::Unreachable),
        }
    }

    async fn exchange(&self, body: Bytes, answer: &mut Vec<u8>) -> Result<(), Outcome> {
        let identity = self.keys.get().await.map_err(|e| {
            tracing::warn!(error = %e, "Cannot get AWS credentials; retrying");
            Outcome::Unreachable
        })?;
        let req = self
            .signed(body, &identity, SystemTime::now())
            .map_err(|e| Outcome::Failed {
                code: Some(format!("SigningFailure: {e}")),
                status: None,
            })?;
        let resp = self
            .connector
            .call(req)
            .await
            .map_err(|_| Outcome::Unreachable)?;
        let status = resp.status().as_u16();
        let header_code = resp
            .headers()
            .get("x-amzn-errortype")
            .map(|c| sanitize(c).to_string());
        let limit = if status == 200 {
            usize::MAX
        } else {
            MAX_ERROR_BODY
        };
        answer.clear();
        collect(resp.into_body(), answer, limit)
            .await
            .map_err(|_| Outcome::Unreachable)?;
        if status == 200 {
            return Ok(());
        }
        Err(Outcome::Failed {
            code: header_code.or_else(|| code_in(answer)),
            status: Some(status),
        })
    }

    /// The request for `body`, signed at `time` (the payload's SHA-256 computed once, here).
    pub fn signed(
        &self,
        body: Bytes,
        identity: &Identity,
        time: SystemTime,
    ) -> Result<HttpRequest, String> {
        let hash = hex(&Sha256::digest(&body));
        let mut req = http::Request::builder()
            .method("POST")
            .uri(&self.uri)
            .header("host", &self.host)
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", self.target)
            .header("content-length", body.len())
            .body(SdkBody::from(body))
            .map_err(|e| e.to_string())?;
        let params = v4::SigningParams::builder()
            .identity(identity)
            .region(&self.region)
            .name(self.service)
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| e.to_string())?
            .into();
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or_default()));
        let signable = SignableRequest::new(
            "POST",
            self.uri.as_str(),
            headers,
            SignableBody::Precomputed(hash),
        )
        .map_err(|e| e.to_string())?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| e.to_string())?
            .into_parts();
        instructions.apply_to_request_http1x(&mut req);
        HttpRequest::try_from(req).map_err(|e| e.to_string())
    }
}

/// Reads `body` into `into`, keeping at most `limit` bytes of it.
async fn collect(mut body: SdkBody, into: &mut Vec<u8>, limit: usize) -> Result<(), String> {
    use http_body::Body;
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => return Ok(()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    let room = limit.saturating_sub(into.len());
                    into.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
        }
    }
}

/// The error code of an awsJson 1.1 error body: its `__type` (or `code`).
fn code_in(body: &[u8]) -> Option<String> {
    use simd_json::prelude::*;
    let mut copy = body.to_vec();
    let v = simd_json::to_borrowed_value(&mut copy).ok()?;
    let code = v
        .get("__type")
        .or_else(|| v.get("code"))
        .and_then(|c| c.as_str())?;
    Some(sanitize(code).to_string())
}

/// The code without its namespace (`aws.protocoltests#Code`) or URI suffix
/// (`Code:http://internal.amazon.com/…`), as the SDK reads it.
fn sanitize(code: &str) -> &str {
    let code = code.split(':').next().unwrap_or_default();
    code.rsplit('#').next().unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The SDK's credential chain, asked again before what it gave expires.
struct Keys {
    provider: Option<SharedCredentialsProvider>,
    cached: RwLock<Option<(Identity, SystemTime)>>,
    /// One refresh at a time; the others wait for it rather than ask too.
    refresh: tokio::sync::Mutex<()>,
}

impl Keys {
    fn new(provider: Option<SharedCredentialsProvider>) -> Self {
        Keys {
            provider,
            cached: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    fn fresh(&self, now: SystemTime) -> Option<Identity> {
        let cached = self.cached.read().unwrap_or_else(|p| p.into_inner());
        cached
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(id, _)| id.clone())
    }

    async fn get(&self) -> Result<Identity, String> {
        if let Some(id) = self.fresh(SystemTime::now()) {
            return Ok(id);
        }
        let _one = self.refresh.lock().await;
        let now = SystemTime::now();
        if let Some(id) = self.fresh(now) {
            return Ok(id);
        }
        let provider = self.provider.as_ref().ok_or(
            "no credentials provider (set AWS_ACCESS_KEY_ID, a profile, or a role to assume)",
        )?;
        let creds = provider
            .provide_credentials()
            .await
            .map_err(|e| describe(&e))?;
        let until = match creds.expiry() {
            Some(exp) => {
                let left = exp.duration_since(now).unwrap_or_default();
                now + left.saturating_sub(CREDENTIALS_MARGIN).max(left / 2)
            }
            None => now + CREDENTIALS_REFRESH,
        };
        let id = Identity::from(creds);
        *self.cached.write().unwrap_or_else(|p| p.into_inner()) = Some((id.clone(), until));
        Ok(id)
    }
}

fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_read_as_the_sdk_reads_them() {
        assert_eq!(
            sanitize(
                "ProvisionedThroughputExceededException:http://internal.amazon.com/coral/com.amazon.coral.service/"
            ),
            "ProvisionedThroughputExceededException"
        );
        assert_eq!(
            sanitize("com.amazonaws.kinesis.v20131202#ResourceNotFoundException"),
            "ResourceNotFoundException"
        );
        assert_eq!(
            code_in(br#"{"__type":"ResourceNotFoundException","message":"no"}"#).as_deref(),
            Some("ResourceNotFoundException")
        );
        assert_eq!(
            code_in(br#"{"code":"ValidationException"}"#).as_deref(),
            Some("ValidationException")
        );
        assert_eq!(code_in(b"<html>busy</html>"), None);
    }

    /// SigV4 worked out from its specification, apart from aws-sigv4: the signature on
    /// the request must be the one the canonical request of what is sent gives.
    #[test]
    fn the_signature_covers_what_is_sent() {
        use aws_credential_types::Credentials;
        use hmac::{Hmac, Mac};
        let mac = |key: &[u8], data: &str| {
            let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
            m.update(data.as_bytes());
            m.finalize().into_bytes().to_vec()
        };
        let r = Request::new(
            "https://kinesis.eu-west-1.amazonaws.com",
            "eu-west-1".into(),
            "kinesis",
            "Kinesis_20131202.PutRecords",
            None,
            Duration::from_secs(1),
        )
        .unwrap();
        let id = Identity::from(Credentials::new(
            "AKID",
            "SECRET",
            Some("TOKEN".into()),
            None,
            "t",
        ));
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let sig_of = |body: &'static [u8]| {
            let req = r.signed(Bytes::from_static(body), &id, time).unwrap();
            let h = |n: &str| req.headers().get(n).unwrap_or_default().to_string();
            assert_eq!(req.body().bytes(), Some(body));
            assert_eq!(h("content-length"), body.len().to_string());
            assert_eq!(h("x-amz-security-token"), "TOKEN");
            let auth = h("authorization");
            let field = |name: &str| {
                let at = auth.find(name).unwrap() + name.len();
                auth[at..].split([',', ' ']).next().unwrap().to_string()
            };
            assert!(
                auth.starts_with(
                    "AWS4-HMAC-SHA256 Credential=AKID/20231114/eu-west-1/kinesis/aws4_request"
                ),
                "{auth}"
            );
            let signed = field("SignedHeaders=");
            for must in [
                "content-type",
                "host",
                "x-amz-date",
                "x-amz-security-token",
                "x-amz-target",
            ] {
                assert!(
                    signed.split(';').any(|s| s == must),
                    "{must} is not signed: {signed}"
                );
            }
            let mut canonical = String::from("POST\n/\n\n");
            for name in signed.split(';') {
                canonical += &format!("{name}:{}\n", h(name).trim());
            }
            canonical += &format!("\n{signed}\n{}", hex(&Sha256::digest(body)));
            let date = h("x-amz-date");
            assert_eq!(date, "20231114T221320Z");
            let to_sign = format!(
                "AWS4-HMAC-SHA256\n{date}\n20231114/eu-west-1/kinesis/aws4_request\n{}",
                hex(&Sha256::digest(canonical.as_bytes()))
            );
            let mut key = mac(b"AWS4SECRET", "20231114");
            for part in ["eu-west-1", "kinesis", "aws4_request"] {
                key = mac(&key, part);
            }
            assert_eq!(field("Signature="), hex(&mac(&key, &to_sign)));
            field("Signature=")
        };
        assert_ne!(sig_of(br#"{"Records":[]}"#), sig_of(br#"{"Records":[{}]}"#));
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}

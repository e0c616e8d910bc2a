//! AWS MSK IAM logins: `sasl: { mechanism: AWS_MSK_IAM, region: us-east-1 }`.
//!
//! Amazon MSK authenticates IAM principals over SASL/OAUTHBEARER. The "token" is not a
//! JWT but a SigV4-presigned URL, `https://kafka.<region>.amazonaws.com/?Action=
//! kafka-cluster%3AConnect&X-Amz-…`, signed for the `kafka-cluster` service with the
//! AWS credentials of the process, and sent base64url-encoded without padding, as AWS's
//! own signers (Go, Python, Java) make it. The broker checks the signature and the IAM
//! policy (`kafka-cluster:Connect` and the topic and group actions).
//!
//! librdkafka asks for a token when a client starts and again before the last one
//! expires (tokens live 15 minutes, or less when the credentials expire sooner); the
//! client contexts answer with [`token`]. Credentials come from the AWS SDK's default
//! chain: the environment (`AWS_ACCESS_KEY_ID`, …), the profile files (`AWS_PROFILE`),
//! SSO, web identity (EKS service accounts), container and instance roles. They are
//! looked up anew for each token, so rotated credentials are picked up.
//!
//! What is tested: the signature against an independent SigV4 check (the test broker's
//! SASL front, `tests/it/kafka/sasl_proxy.py`), a Kafka round trip through it, and a
//! refused login. What is not: a real MSK cluster (none is reachable from the test
//! machine), and the chain's network sources (instance and container roles, SSO).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rdkafka::client::OAuthToken;

/// The mechanism's name in `sasl.mechanism`.
pub const MECHANISM: &str = "AWS_MSK_IAM";

/// How long a token is valid, as AWS's signers make them.
const LIFETIME: Duration = Duration::from_secs(900);

/// A token for `region` (or the region of the AWS configuration), signed with the
/// credentials the default chain finds now.
pub fn token(region: Option<&str>) -> Result<OAuthToken, String> {
    // librdkafka asks on its own threads, which may be inside the pipeline's runtime:
    // the chain's lookups (which may call the instance metadata service) run on a thread
    // of their own with a runtime of their own.
    let (credentials, region) = std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting the AWS credential lookup: {e}"))?
                .block_on(credentials(region))
        })
        .join()
        .unwrap_or_else(|_| Err("the AWS credential lookup panicked".into()))
    })?;
    let token = presigned_token(&credentials, &region, SystemTime::now())?;
    Ok(OAuthToken {
        token: token.text,
        principal_name: "aws-msk-iam".into(),
        lifetime_ms: token
            .expires
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    })
}

async fn credentials(region: Option<&str>) -> Result<(Credentials, String), String> {
    // rustls on ring: the SDK's default client would build aws-lc with cmake.
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    let config = loader.load().await;
    let region = config
        .region()
        .map(ToString::to_string)
        .ok_or("the AWS_MSK_IAM login needs a region: give `sasl.region`, or set AWS_REGION")?;
    let provider = config
        .credentials_provider()
        .ok_or("the AWS configuration has no credential provider")?;
    let credentials = provider.provide_credentials().await.map_err(|e| {
        format!(
            "no AWS credentials for the AWS_MSK_IAM login (looked in the environment, the \
             profile files, SSO, web identity, container and instance roles): {}",
            sluice_engine::error::error_chain(&e)
        )
    })?;
    Ok((credentials, region))
}

/// A signed token and when it stops being accepted.
#[derive(Debug)]
pub struct Token {
    pub text: String,
    pub expires: SystemTime,
}

/// The presigned `kafka-cluster:Connect` URL for `region`, signed at `now`, as MSK reads
/// it: base64url without padding.
pub fn presigned_token(
    credentials: &Credentials,
    region: &str,
    now: SystemTime,
) -> Result<Token, String> {
    let url = format!("https://kafka.{region}.amazonaws.com/?Action=kafka-cluster%3AConnect");
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(LIFETIME);
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("kafka-cluster")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| format!("signing the AWS_MSK_IAM token: {e}"))?
        .into();
    let request = SignableRequest::new(
        "GET",
        url.as_str(),
        std::iter::empty(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| format!("signing the AWS_MSK_IAM token: {e}"))?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| format!("signing the AWS_MSK_IAM token: {e}"))?
        .into_parts();
    let mut signed = url;
    for (name, value) in instructions.params() {
        signed.push('&');
        signed.push_str(name);
        signed.push('=');
        signed.push_str(&encode(value));
    }
    // Not signed, as AWS's signers add it: for the broker's logs.
    signed.push_str("&User-Agent=");
    signed.push_str(&encode(concat!("sluice/", env!("CARGO_PKG_VERSION"))));
    let mut expires = now + LIFETIME;
    if let Some(end) = credentials.expiry() {
        expires = expires.min(end);
    }
    Ok(Token {
        text: URL_SAFE_NO_PAD.encode(signed),
        expires,
    })
}

/// Percent-encoding as SigV4 wants it: all but `A-Z a-z 0-9 - _ . ~`.
fn encode(value: &str) -> String {
    const SIGV4: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    utf8_percent_encode(value, SIGV4).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token of AWS's published example credentials at a fixed time, checked
    /// against botocore's SigV4 presigner (the one AWS's Python MSK signer uses):
    ///
    /// ```python
    /// from botocore.auth import SigV4QueryAuth; from botocore.awsrequest import AWSRequest
    /// from botocore.credentials import Credentials; import datetime, unittest.mock as m
    /// r = AWSRequest(method="GET", url="https://kafka.us-east-1.amazonaws.com/",
    ///                params={"Action": "kafka-cluster:Connect"})
    /// with m.patch("botocore.auth.get_current_datetime",
    ///              return_value=datetime.datetime(2026, 12, 4, 21, 0, 0)):
    ///     SigV4QueryAuth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
    ///                    "kafka-cluster", "us-east-1", expires=900).add_auth(r)
    /// print(r.url)  # botocore 1.43.11
    /// ```
    #[test]
    fn the_token_is_the_presigned_url_botocore_makes() {
        let credentials = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        );
        let at = UNIX_EPOCH + Duration::from_secs(1_796_418_000); // 2026-12-04T21:00:00Z
        let token = presigned_token(&credentials, "us-east-1", at).unwrap();
        let url = String::from_utf8(URL_SAFE_NO_PAD.decode(&token.text).unwrap()).unwrap();
        let (signed, agent) = url.split_once("&User-Agent=").unwrap();
        assert!(agent.starts_with("sluice%2F"), "{agent}");
        let mut params: Vec<&str> = signed.split_once('?').unwrap().1.split('&').collect();
        params.sort();
        assert_eq!(params, BOTOCORE.split('&').collect::<Vec<_>>(), "{url}");
        assert!(url.starts_with("https://kafka.us-east-1.amazonaws.com/?"));
        assert_eq!(token.expires, at + LIFETIME);
        assert!(!token.text.contains('='), "no padding");
    }

    /// botocore's query parameters (sorted) for the example above.
    const BOTOCORE: &str = "Action=kafka-cluster%3AConnect\
        &X-Amz-Algorithm=AWS4-HMAC-SHA256\
        &X-Amz-Credential=AKIDEXAMPLE%2F20261204%2Fus-east-1%2Fkafka-cluster%2Faws4_request\
        &X-Amz-Date=20261204T210000Z\
        &X-Amz-Expires=900\
        &X-Amz-Signature=ed880ecc5d29bc826d1fbc4bda9dfcb249d127c3ccf514bacebb13a279fe8c2b\
        &X-Amz-SignedHeaders=host";

    #[test]
    fn temporary_credentials_sign_their_session_token_and_end_the_token_with_them() {
        let at = UNIX_EPOCH + Duration::from_secs(1_796_418_000);
        let credentials = Credentials::new(
            "ASIAEXAMPLE",
            "secret",
            Some("the/session+token".into()),
            Some(at + Duration::from_secs(60)),
            "test",
        );
        let token = presigned_token(&credentials, "eu-west-1", at).unwrap();
        let url = String::from_utf8(URL_SAFE_NO_PAD.decode(&token.text).unwrap()).unwrap();
        assert!(
            url.contains("X-Amz-Security-Token=the%2Fsession%2Btoken"),
            "{url}"
        );
        assert!(url.contains("kafka.eu-west-1.amazonaws.com"));
        assert_eq!(token.expires, at + Duration::from_secs(60));
        assert!(!url.contains("secret"));
    }
}

//! What a failed Kinesis call means, and how long to wait before the next try.

use std::time::Duration;

use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use backon::{BackoffBuilder, ExponentialBuilder};
use sluice_engine::Error;
use sluice_engine::error::error_chain;

/// How a failed call is handled.
#[derive(Debug)]
pub enum Fault {
    /// Over the shard's or the account's limits: wait (with backoff and jitter) and retry.
    Throttled,
    /// The shard iterator is older than five minutes: get a new one from the position (or
    /// a listing's page token expired: list from the first page again).
    Expired,
    /// The service or the network failed in a way that may pass: wait and retry.
    Transient(String),
    /// No try can succeed until a person changes something (no such stream, no
    /// permission, a bad argument): the run stops with this error.
    Stop(Error),
}

const THROTTLED: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "LimitExceededException",
    "KMSThrottlingException",
    "ThrottlingException",
];
const REFUSED: &[&str] = &[
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "ExpiredTokenException",
    "KMSAccessDeniedException",
];

/// Classifies a failed call of `what` (`GetRecords on plays/shardId-000000000001`).
pub fn classify<E>(what: &str, e: &SdkError<E, HttpResponse>) -> Fault
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.code().unwrap_or("");
            let message = err.message().unwrap_or("");
            if THROTTLED.contains(&code) {
                Fault::Throttled
            } else if code == "ExpiredIteratorException" {
                Fault::Expired
            } else if REFUSED.contains(&code) {
                Fault::Stop(Error::Refused {
                    system: "kinesis",
                    message: format!("{what}: {code}: {message}"),
                })
            } else if code == "ExpiredNextTokenException" {
                Fault::Expired
            } else if service.raw().status().is_server_error() {
                // InternalFailure, ServiceUnavailable: the service's side, which passes.
                Fault::Transient(format!("{what}: {code}: {message}"))
            } else {
                // The request's fault (no such stream, a bad argument, a validation error):
                // the same request fails again.
                Fault::Stop(Error::External {
                    system: "kinesis",
                    message: format!("{what}: {code}: {message}"),
                })
            }
        }
        SdkError::ConstructionFailure(_) => Fault::Stop(Error::External {
            system: "kinesis",
            message: format!("{what}: {}", error_chain(e)),
        }),
        // Refused connections, timeouts, broken responses: an outage that may pass.
        _ => Fault::Transient(format!("{what}: {}", error_chain(e))),
    }
}

/// Waits between tries of one call: exponential from 100 ms to 5 s, with full jitter, so
/// that the shards of a stream do not retry in step. Starts again after a success.
pub struct Backoff {
    delays: Option<backon::ExponentialBackoff>,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff { delays: None }
    }

    pub fn next(&mut self) -> Duration {
        self.delays
            .get_or_insert_with(|| {
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .without_max_times()
                    .build()
            })
            .next()
            .unwrap_or(Duration::from_secs(5))
    }

    pub fn reset(&mut self) {
        self.delays = None;
    }
}

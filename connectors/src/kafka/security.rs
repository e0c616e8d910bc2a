//! Secured Kafka clusters: TLS and SASL in the pipeline's words, translated to librdkafka's.
//!
//! ```yaml
//! source:
//!   type: kafka
//!   bootstrap_servers: b-1.example.kafka.us-east-1.amazonaws.com:9096
//!   tls: { ca: certs/ca.pem }                  # or `tls: {}` for the system's roots
//!   sasl: { mechanism: SCRAM-SHA-512, username: "${KAFKA_USER}", password: "${KAFKA_PASSWORD}" }
//! ```
//!
//! On Amazon MSK with IAM access control: `sasl: { mechanism: AWS_MSK_IAM, region:
//! us-east-1 }`, with the credentials of the AWS SDK's default chain (see [`msk_iam`]).
//!
//! `tls` and `sasl` set `security.protocol` (SSL, SASL_PLAINTEXT or SASL_SSL) and the
//! `ssl.*` and `sasl.*` properties; setting those under `options:` as well is refused, so
//! that one place says how a client connects. Files are checked when the pipeline is
//! validated. A broker that refuses the credentials or whose certificate cannot be
//! verified stops the run with a sentence naming the broker and what to check (see
//! [`refusal`]); librdkafka alone would retry for ever. The password is never shown:
//! [`KafkaSasl`]'s `Debug` hides it, and no message quotes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::msk_iam;

use rdkafka::client::OAuthToken;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::{ClientContext, config::RDKafkaLogLevel};
use serde::Deserialize;
use sluice_engine::config::{Location, Node, Problems};

/// `tls:` — an encrypted connection to the brokers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTls {
    /// The certificate authorities (PEM) that signed the brokers' certificates; default:
    /// the system's.
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for brokers that authenticate clients by
    /// certificate (mutual TLS); give `key` with it.
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `cert`.
    pub key: Option<PathBuf>,
    /// Verify the brokers' certificates and host names (default true). Turn off only to
    /// try a test cluster.
    #[serde(default = "yes")]
    pub verify: bool,
}

fn yes() -> bool {
    true
}

/// `sasl:` — the client's login.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or AWS_MSK_IAM.
    pub mechanism: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// AWS_MSK_IAM: the cluster's region; default: the AWS configuration's
    /// (`AWS_REGION`, the profile).
    pub region: Option<String>,
}

impl std::fmt::Debug for KafkaSasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("region", &self.region)
            .finish()
    }
}

const MECHANISMS: [&str; 4] = [
    "PLAIN",
    "SCRAM-SHA-256",
    "SCRAM-SHA-512",
    msk_iam::MECHANISM,
];

/// Properties `tls:` and `sasl:` own: not to be set under `options:` too.
const SECURITY_PREFIXES: [&str; 4] = ["security.protocol", "ssl.", "enable.ssl.", "sasl."];

/// Whether a librdkafka property says how to connect (TLS, SASL) rather than how to read
/// or write.
pub fn is_security_property(key: &str) -> bool {
    SECURITY_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Checks `tls` and `sasl` of the client config at `path` in `node`.
pub fn validate(
    tls: Option<&KafkaTls>,
    sasl: Option<&KafkaSasl>,
    options: &BTreeMap<String, String>,
    node: &Node,
    path: &Location,
    problems: &mut Problems,
) {
    if let Some(tls) = tls {
        let tls_node = node.get("tls").unwrap_or(node);
        let tls_path = path.key("tls");
        for (key, file) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
            if let Some(file) = file
                && !file.is_file()
            {
                problems.at_key(
                    tls_node,
                    &tls_path,
                    key,
                    format!(
                        "`{}` is not a file (a PEM file is expected)",
                        file.display()
                    ),
                );
            }
        }
        if tls.cert.is_some() != tls.key.is_some() {
            let (given, missing) = if tls.cert.is_some() {
                ("cert", "key")
            } else {
                ("key", "cert")
            };
            problems.at_key(
                tls_node,
                &tls_path,
                given,
                format!(
                    "give `{missing}` with `{given}`: a client certificate needs its private key"
                ),
            );
        }
    }
    if let Some(sasl) = sasl {
        let sasl_node = node.get("sasl").unwrap_or(node);
        let sasl_path = path.key("sasl");
        if !MECHANISMS.contains(&sasl.mechanism.as_str()) {
            problems.at_key(
                sasl_node,
                &sasl_path,
                "mechanism",
                format!(
                    "`{}` is not a SASL mechanism Sluice speaks; use one of {}",
                    sasl.mechanism,
                    MECHANISMS.join(", ")
                ),
            );
        }
        let msk = sasl.mechanism == msk_iam::MECHANISM;
        for (key, value) in [("username", &sasl.username), ("password", &sasl.password)] {
            if msk && value.is_some() {
                problems.at_key(
                    sasl_node,
                    &sasl_path,
                    key,
                    format!(
                        "AWS_MSK_IAM signs with the AWS credentials of the process (AWS_PROFILE, \
                         AWS_ACCESS_KEY_ID, an instance or task role): remove `{key}`"
                    ),
                );
            } else if !msk && value.as_deref().is_none_or(str::is_empty) {
                problems.at_key(
                    sasl_node,
                    &sasl_path,
                    key,
                    format!(
                        "{} needs a `{key}` (from the environment: `\"${{KAFKA_{}}}\"`)",
                        sasl.mechanism,
                        key.to_uppercase()
                    ),
                );
            }
        }
        if !msk && sasl.region.is_some() {
            problems.at_key(
                sasl_node,
                &sasl_path,
                "region",
                format!("`region` is for AWS_MSK_IAM, not {}", sasl.mechanism),
            );
        }
    }
    if tls.is_some() || sasl.is_some() {
        for key in options.keys() {
            if is_security_property(key) {
                problems.at_key(
                    node,
                    path,
                    "options",
                    format!("`{key}` is set by `tls:`/`sasl:`: set it in one place"),
                );
            }
        }
    }
}

/// The librdkafka properties of `tls`, `sasl` and the client's other `options`.
pub fn client_options(
    tls: Option<&KafkaTls>,
    sasl: Option<&KafkaSasl>,
    options: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut all = properties(tls, sasl);
    all.extend(options.clone());
    all
}

/// The librdkafka properties of `tls` and `sasl`.
pub fn properties(tls: Option<&KafkaTls>, sasl: Option<&KafkaSasl>) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    let protocol = match (tls.is_some(), sasl.is_some()) {
        (false, false) => return p,
        (true, false) => "SSL",
        (false, true) => "SASL_PLAINTEXT",
        (true, true) => "SASL_SSL",
    };
    p.insert("security.protocol".into(), protocol.into());
    let path = |f: &Path| f.display().to_string();
    if let Some(tls) = tls {
        if let Some(ca) = &tls.ca {
            p.insert("ssl.ca.location".into(), path(ca));
        }
        if let Some(cert) = &tls.cert {
            p.insert("ssl.certificate.location".into(), path(cert));
        }
        if let Some(key) = &tls.key {
            p.insert("ssl.key.location".into(), path(key));
        }
        if !tls.verify {
            p.insert("enable.ssl.certificate.verification".into(), "false".into());
            p.insert(
                "ssl.endpoint.identification.algorithm".into(),
                "none".into(),
            );
        } else {
            p.insert(
                "ssl.endpoint.identification.algorithm".into(),
                "https".into(),
            );
        }
    }
    if let Some(sasl) = sasl
        && sasl.mechanism == msk_iam::MECHANISM
    {
        // The token is made by the client contexts (`oauth_token`), which read the
        // region back from here.
        p.insert("sasl.mechanisms".into(), "OAUTHBEARER".into());
        let mut config = msk_iam::MECHANISM.to_owned();
        if let Some(region) = &sasl.region {
            config.push_str(" region=");
            config.push_str(region);
        }
        p.insert("sasl.oauthbearer.config".into(), config);
    } else if let Some(sasl) = sasl {
        p.insert("sasl.mechanisms".into(), sasl.mechanism.clone());
        if let Some(user) = &sasl.username {
            p.insert("sasl.username".into(), user.clone());
        }
        if let Some(password) = &sasl.password {
            p.insert("sasl.password".into(), password.clone());
        }
    }
    p
}

/// A client error that no retry can cure, said for a person: the broker refused the login,
/// or its certificate (or this client's) failed verification. `None` for the errors
/// librdkafka rides out (a broker away, a timeout).
pub fn refusal(
    error: &KafkaError,
    reason: &str,
    bootstrap: &str,
    sasl: Option<&KafkaSasl>,
) -> Option<String> {
    let code = match error {
        KafkaError::Global(code) => *code,
        _ => return None,
    };
    match code {
        RDKafkaErrorCode::Authentication => Some(match sasl {
            Some(s) if s.mechanism == msk_iam::MECHANISM => {
                if reason.contains("OAUTHBEARER token") {
                    format!("no AWS_MSK_IAM login for the Kafka broker at {bootstrap}: {reason}")
                } else {
                    format!(
                        "the Kafka broker at {bootstrap} refused the SASL AWS_MSK_IAM login: \
                         {reason}; check the AWS credentials the process finds (AWS_PROFILE, \
                         AWS_ACCESS_KEY_ID, the instance or task role) and that their IAM \
                         policy allows kafka-cluster:Connect"
                    )
                }
            }
            Some(s) => format!(
                "the Kafka broker at {bootstrap} refused the SASL {} login of `{}`: {reason}; \
                 check `sasl.username` and `sasl.password`",
                s.mechanism,
                s.username.as_deref().unwrap_or_default()
            ),
            None => format!(
                "the Kafka broker at {bootstrap} requires authentication ({reason}); give a \
                 `sasl:` section"
            ),
        }),
        RDKafkaErrorCode::SSL => Some(if reason.contains("verify failed") {
            format!(
                "the certificate of the Kafka broker at {bootstrap} is not trusted: {reason}; \
                 give the authority that signed it in `tls.ca`"
            )
        } else {
            format!("the TLS connection to the Kafka broker at {bootstrap} failed: {reason}")
        }),
        _ => None,
    }
}

/// The OAUTHBEARER token librdkafka asks for, from `sasl.oauthbearer.config` as
/// [`properties`] wrote it.
pub fn oauth_token(config: Option<&str>) -> Result<OAuthToken, Box<dyn std::error::Error>> {
    let mut words = config.unwrap_or_default().split_whitespace();
    if words.next() != Some(msk_iam::MECHANISM) {
        return Err(
            "Sluice makes OAUTHBEARER tokens for `sasl: { mechanism: AWS_MSK_IAM }` \
                    only"
                .into(),
        );
    }
    let region = words.find_map(|w| w.strip_prefix("region="));
    Ok(msk_iam::token(region)?)
}

/// The context of Sluice's short-lived Kafka clients (the lag reader, `sluice dlq`): it
/// logs as the others do and answers librdkafka's token requests (AWS_MSK_IAM).
#[derive(Debug, Default, Clone, Copy)]
pub struct LoginContext;

impl ClientContext for LoginContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        super::log(level, fac, message);
    }

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        oauth_token(config)
    }
}

impl ConsumerContext for LoginContext {}

impl ProducerContext for LoginContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

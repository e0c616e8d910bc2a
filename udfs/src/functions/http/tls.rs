//! `tls:` of an https endpoint: a private authority and a client identity for mutual TLS.

use serde::Deserialize;
use sluice_engine::{Error, plan_err};

/// `tls:` of an https endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HttpTls {
    ca: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
}

impl HttpTls {
    /// Adds the authority and the client identity to `builder`.
    pub(super) fn apply(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> sluice_engine::Result<reqwest::ClientBuilder> {
        let read = |f: &std::path::Path| {
            std::fs::read(f).map_err(|e| Error::Plan(format!("cannot read `{}`: {e}", f.display())))
        };
        if let Some(ca) = &self.ca {
            let pem = read(ca)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::Plan(format!("`{}` holds no PEM certificate: {e}", ca.display()))
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let identity = reqwest::Identity::from_pkcs8_pem(&read(cert)?, &read(key)?)
                    .map_err(|e| {
                        Error::Plan(format!(
                            "`{}` and `{}` are not a PEM certificate and PKCS #8 key: {e}",
                            cert.display(),
                            key.display()
                        ))
                    })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => return plan_err!("give `tls.cert` and `tls.key` together"),
        }
        Ok(builder)
    }
}

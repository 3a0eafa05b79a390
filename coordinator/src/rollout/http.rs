//! A small HTTP(S) client for Prometheus, Alertmanager and webhooks: one
//! request at a time, a timeout on the whole exchange, a bounded response
//! body. TLS uses the system's root certificates.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The largest response body read (a Prometheus answer or an error page).
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL could not be used.
    #[error("bad URL {url}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// No answer within the timeout.
    #[error("no answer from {url} within {}", humantime::format_duration(*timeout))]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout.
        timeout: Duration,
    },
    /// Connecting or exchanging failed.
    #[error("{url}: {reason}")]
    Transport {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// The client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpClient {
    /// A client trusting the system's root certificates (none if they
    /// cannot be read: https then fails with a certificate error, which is
    /// reported where it is used).
    pub fn new() -> Self {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = match HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider.clone())
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "no system root certificates; https requests will fail");
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let connector = builder.https_or_http().enable_http1().build();
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sends one request and reads the answer (status and body), all
    /// within `timeout`.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<(String, &'static str)>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let url_error = |reason: String| HttpError::Url {
            url: url.to_string(),
            reason,
        };
        let mut request = Request::builder().method(method).uri(url).header(
            header::USER_AGENT,
            concat!("baton-coordinator/", env!("CARGO_PKG_VERSION")),
        );
        let payload = match body {
            Some((text, content_type)) => {
                request = request.header(header::CONTENT_TYPE, content_type);
                Bytes::from(text)
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|e| url_error(e.to_string()))?;
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|e| HttpError::Transport {
                        url: url.to_string(),
                        reason: error_chain(&e),
                    })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| HttpError::Transport {
                    url: url.to_string(),
                    reason: format!("reading the answer: {e}"),
                })?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                url: url.to_string(),
                timeout,
            })?
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

/// An error and its sources, joined ("client error (Connect): tcp connect
/// error: Connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

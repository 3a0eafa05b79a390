//! Asking Prometheus (`/api/v1/query`) and Alertmanager (`/api/v2/alerts`).

use std::collections::BTreeMap;
use std::time::Duration;

use http::Method;
use serde::Deserialize;

use super::http::{HttpClient, HttpError};

/// Why an answer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request failed or timed out.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The server answered with an error status.
    #[error("{url} answered {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The answer was not what the API documents.
    #[error("{url}: unexpected answer: {reason}")]
    Decode {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// One series of an instant vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Its labels.
    pub metric: BTreeMap<String, String>,
    /// Its value, as Prometheus writes it.
    pub value: String,
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self
            .metric
            .get("__name__")
            .map(String::as_str)
            .unwrap_or("");
        let labels: Vec<String> = self
            .metric
            .iter()
            .filter(|(k, _)| *k != "__name__")
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        write!(f, "{name}{{{}}} = {}", labels.join(", "), self.value)
    }
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters stay).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn body_start(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim().to_string()
}

async fn get_json<T: for<'de> Deserialize<'de>>(
    http: &HttpClient,
    url: &str,
    timeout: Duration,
) -> Result<T, QueryError> {
    let (status, body) = http.send(Method::GET, url, None, timeout).await?;
    if !status.is_success() {
        return Err(QueryError::Status {
            url: url.to_string(),
            status: status.as_u16(),
            body: body_start(&body),
        });
    }
    serde_json::from_slice(&body).map_err(|e| QueryError::Decode {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

#[derive(Deserialize)]
struct ApiAnswer {
    status: String,
    #[serde(default)]
    data: Option<ApiData>,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiData {
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct VectorItem {
    metric: BTreeMap<String, String>,
    value: (serde_json::Value, String),
}

/// Runs an instant query at `base` (a Prometheus URL) and returns its
/// series. A scalar or string result is an error: the gate needs a vector
/// (empty = healthy).
pub async fn query(
    http: &HttpClient,
    base: &str,
    promql: &str,
    timeout: Duration,
) -> Result<Vec<Sample>, QueryError> {
    let url = format!(
        "{base}/api/v1/query?query={}&timeout={}ms",
        encode(promql),
        timeout.as_millis()
    );
    let answer: ApiAnswer = get_json(http, &url, timeout).await?;
    let decode = |reason: String| QueryError::Decode {
        url: format!("{base}/api/v1/query"),
        reason,
    };
    if answer.status != "success" {
        return Err(decode(format!(
            "status {}: {}",
            answer.status, answer.error
        )));
    }
    let data = answer.data.ok_or_else(|| decode("no data".to_string()))?;
    if data.result_type != "vector" {
        return Err(decode(format!(
            "the query returns a {}, not an instant vector",
            data.result_type
        )));
    }
    let items: Vec<VectorItem> =
        serde_json::from_value(data.result).map_err(|e| decode(e.to_string()))?;
    Ok(items
        .into_iter()
        .map(|i| Sample {
            metric: i.metric,
            value: i.value.1,
        })
        .collect())
}

/// The names among `names` of alerts Prometheus says are firing (its
/// `ALERTS` series).
pub async fn firing_in_prometheus(
    http: &HttpClient,
    base: &str,
    names: &[String],
    timeout: Duration,
) -> Result<Vec<String>, QueryError> {
    let samples = query(http, base, "ALERTS{alertstate=\"firing\"}", timeout).await?;
    Ok(firing_among(
        samples
            .iter()
            .filter_map(|s| s.metric.get("alertname").cloned()),
        names,
    ))
}

#[derive(Deserialize)]
struct AmAlert {
    labels: BTreeMap<String, String>,
    #[serde(default)]
    status: Option<AmStatus>,
}

#[derive(Deserialize)]
struct AmStatus {
    state: String,
}

/// The names among `names` of alerts Alertmanager holds as active (not
/// silenced, not inhibited).
pub async fn firing_in_alertmanager(
    http: &HttpClient,
    base: &str,
    names: &[String],
    timeout: Duration,
) -> Result<Vec<String>, QueryError> {
    let url = format!("{base}/api/v2/alerts?active=true&silenced=false&inhibited=false");
    let alerts: Vec<AmAlert> = get_json(http, &url, timeout).await?;
    Ok(firing_among(
        alerts
            .into_iter()
            .filter(|a| a.status.as_ref().is_none_or(|s| s.state == "active"))
            .filter_map(|a| a.labels.get("alertname").cloned()),
        names,
    ))
}

fn firing_among(firing: impl Iterator<Item = String>, names: &[String]) -> Vec<String> {
    let mut hits: Vec<String> = firing.filter(|n| names.contains(n)).collect();
    hits.sort();
    hits.dedup();
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            encode("up{job=\"a b\"} == 0"),
            "up%7Bjob%3D%22a%20b%22%7D%20%3D%3D%200"
        );
    }

    #[test]
    fn samples_print_like_promql() {
        let s = Sample {
            metric: [
                ("__name__".to_string(), "up".to_string()),
                ("job".to_string(), "node".to_string()),
            ]
            .into(),
            value: "0".to_string(),
        };
        assert_eq!(s.to_string(), "up{job=\"node\"} = 0");
    }
}

//! A client of a coordinator's HTTP API (see [`crate::api`]), shared by the operator commands
//! ([`super::ops`]) and by following a backfill ([`super::watch`]).

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::{RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ApiArgs;
use crate::api::ErrorBody;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the coordinator's HTTP API.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) base: String,
    http: reqwest::Client,
}

/// A failed request: the coordinator could not be reached, or it answered with an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// No connection (nothing listening, wrong host).
    #[error("cannot reach the coordinator at {url}: is `warpline serve` running? ({source})")]
    Unreachable {
        /// The API's base URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The request failed on the way (timeout, connection reset, unreadable answer).
    #[error("request to the coordinator at {url} failed: {source}")]
    Transport {
        /// The API's base URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The coordinator answered with an error status.
    #[error("{message} (HTTP {status} from {url})")]
    Refused {
        /// The API's base URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The coordinator's message.
        message: String,
    },
}

impl ClientError {
    /// True when trying again later may work (the coordinator is down, restarting or failing
    /// over to a standby), as opposed to a refusal of the request itself.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Transport { .. } => true,
            ClientError::Refused { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl Client {
    /// A client for the API at `args.url`.
    pub(crate) fn new(args: &ApiArgs) -> anyhow::Result<Client> {
        let base = args.url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("invalid --api `{base}`: expected an http:// or https:// URL");
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = args
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| anyhow::anyhow!("invalid --token: it must be printable ASCII"))?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .default_headers(headers)
            .build()
            .context("cannot build an HTTP client")?;
        Ok(Client { base, http })
    }

    /// `GET path`.
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// `POST path` with a JSON body.
    pub(crate) async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    async fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, ClientError> {
        let url = self.base.clone();
        let resp = req.send().await.map_err(|source| {
            if source.is_connect() {
                ClientError::Unreachable {
                    url: url.clone(),
                    source,
                }
            } else {
                ClientError::Transport {
                    url: url.clone(),
                    source,
                }
            }
        })?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or_else(|_| format!("unexpected answer: {}", text.trim()));
            return Err(ClientError::Refused {
                url,
                status,
                message,
            });
        }
        resp.json()
            .await
            .map_err(|source| ClientError::Transport { url, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_and_503_are_transient_but_refusals_are_not() {
        let refused = |status| ClientError::Refused {
            url: "http://x".into(),
            status,
            message: "m".into(),
        };
        assert!(refused(StatusCode::SERVICE_UNAVAILABLE).is_transient());
        assert!(!refused(StatusCode::NOT_FOUND).is_transient());
        assert_eq!(
            refused(StatusCode::NOT_FOUND).to_string(),
            "m (HTTP 404 Not Found from http://x)"
        );
    }
}

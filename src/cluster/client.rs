//! A client of the node API ([`super::api`]): HTTPS to one node, verified against the cluster
//! CA, authenticated by the bearer token (users) or by a node certificate (peers).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::api::ApiError;

/// Why a call failed. `is_unreachable()` tells a node that is not there from one that answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP with {addr} failed: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("{addr} took longer than {} s to answer", .limit.as_secs())]
    Timeout { addr: String, limit: Duration },
    #[error("{addr} answered {status}: {message}")]
    Status {
        addr: String,
        status: u16,
        message: String,
    },
    #[error("{addr} answered something that is not the expected JSON: {source}")]
    Decode {
        addr: String,
        source: serde_json::Error,
    },
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
    #[error("cannot build the request: {0}")]
    Request(String),
}

impl ClientError {
    /// No answer came: nothing listens at the address, the connection broke before an
    /// answer (TLS or HTTP), or the answer was too slow.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::Tls { .. }
                | ClientError::Http { .. }
                | ClientError::Timeout { .. }
        )
    }

    /// The HTTP status the node answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One node's API.
#[derive(Clone)]
pub struct ApiClient {
    /// `host:port`.
    addr: String,
    /// The name its certificate carries (the node's name).
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
    timeout: Duration,
}

impl ApiClient {
    /// A client of the node named `node` at `addr` (`host:port`). `tls` trusts the cluster CA
    /// (and carries a node certificate for peer calls); `token` is sent as a bearer token.
    pub fn new(
        addr: String,
        node: &str,
        tls: Arc<rustls::ClientConfig>,
        token: Option<String>,
    ) -> Result<Self, ClientError> {
        let server_name = ServerName::try_from(node.to_string())
            .map_err(|_| ClientError::ServerName(node.to_string()))?;
        Ok(ApiClient {
            addr,
            server_name,
            tls,
            token,
            timeout: Duration::from_secs(10),
        })
    }

    /// The longest a call may take, connection included (10 s unless set).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `GET path`, decoded as JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.call("GET", path).await?;
        self.decode(status, &body)
    }

    /// One request; the status and the body, whatever the status.
    pub async fn call(&self, method: &str, path: &str) -> Result<(u16, Bytes), ClientError> {
        self.limited(self.call_inner(method, path)).await
    }

    async fn call_inner(&self, method: &str, path: &str) -> Result<(u16, Bytes), ClientError> {
        let mut sender = self.connect(false).await?;
        let req = self
            .request(method, path)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Request(format!("{method} {path}: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| self.http(e))?;
        self.read(resp).await
    }

    /// `POST path` with a JSON body; the status and the body, whatever the status.
    pub async fn post_json(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<(u16, Bytes), ClientError> {
        self.send_json("POST", path, body).await
    }

    /// `METHOD path` with a JSON body; the status and the body, whatever the status.
    pub async fn send_json(
        &self,
        method: &str,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<(u16, Bytes), ClientError> {
        let body = serde_json::to_vec(body).map_err(|source| ClientError::Decode {
            addr: self.addr.clone(),
            source,
        })?;
        let fut = async {
            let mut sender = self.connect(false).await?;
            let req = self
                .request(method, path)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| ClientError::Request(format!("{method} {path}: {e}")))?;
            let resp = sender.send_request(req).await.map_err(|e| self.http(e))?;
            self.read(resp).await
        };
        self.limited(fut).await
    }

    /// `POST path` asking to switch the connection to `protocol`: the raw TLS stream once the
    /// node answers 101 (the migration stream between nodes).
    pub async fn upgrade(
        &self,
        path: &str,
        protocol: &str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let fut = async {
            let mut sender = self.connect(true).await?;
            let req = self
                .request("POST", path)
                .header(hyper::header::CONNECTION, "upgrade")
                .header(hyper::header::UPGRADE, protocol)
                .body(Full::new(Bytes::new()))
                .map_err(|e| ClientError::Request(format!("POST {path}: {e}")))?;
            let resp = sender.send_request(req).await.map_err(|e| self.http(e))?;
            if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                let (status, body) = self.read(resp).await?;
                return Err(self.status_error(status, &body));
            }
            let upgraded = hyper::upgrade::on(resp).await.map_err(|e| self.http(e))?;
            Ok(TokioIo::new(upgraded))
        };
        self.limited(fut).await
    }

    async fn limited<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                addr: self.addr.clone(),
                limit: self.timeout,
            }),
        }
    }

    /// A response's status and whole body.
    async fn read(
        &self,
        resp: hyper::Response<hyper::body::Incoming>,
    ) -> Result<(u16, Bytes), ClientError> {
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http(e))?
            .to_bytes();
        Ok((status, body))
    }

    fn http(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            addr: self.addr.clone(),
            source,
        }
    }

    fn request(&self, method: &str, path: &str) -> hyper::http::request::Builder {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        req
    }

    /// A TLS connection to the node with HTTP/1.1 on it; `upgrades` keeps it open for a
    /// protocol switch.
    async fn connect(
        &self,
        upgrades: bool,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let addr = self.addr.clone();
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Tls {
                addr: addr.clone(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.http(e))?;
        if upgrades {
            tokio::spawn(conn.with_upgrades());
        } else {
            tokio::spawn(conn);
        }
        Ok(sender)
    }

    fn decode<T: DeserializeOwned>(&self, status: u16, body: &[u8]) -> Result<T, ClientError> {
        if status >= 300 {
            return Err(self.status_error(status, body));
        }
        serde_json::from_slice(body).map_err(|source| ClientError::Decode {
            addr: self.addr.clone(),
            source,
        })
    }

    fn status_error(&self, status: u16, body: &[u8]) -> ClientError {
        let message = serde_json::from_slice::<ApiError>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string());
        ClientError::Status {
            addr: self.addr.clone(),
            status,
            message,
        }
    }
}

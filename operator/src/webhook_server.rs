//! The webhook's HTTPS server: `POST /mutate` takes an AdmissionReview (`admission.k8s.io/v1`) of a
//! pod, answers it with [`admission::review`] over the [`PolicySource`]'s policies of the pod's
//! namespace, and `GET /healthz` says it serves. TLS (rustls on aws-lc-rs) with a certificate and key
//! read once from PEM files; HTTP/1.1.
//!
//! A body that is not an AdmissionReview gets 400, one over the size limit 413, each with the reason
//! as text: the API server then admits the pod as it is (the webhook is registered with
//! `failurePolicy: Ignore`), so a broken webhook never blocks pod creation.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject as _};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::admission;
use crate::identity::PodCheckpointIndex;
use crate::metrics::{Metrics, Outcome};
use crate::policies::PolicySource;

/// The largest AdmissionReview accepted, in bytes (the API server's own request limit is 3 MiB).
pub const MAX_BODY: usize = 4 << 20;
/// A body is read (and dropped) up to this many times the limit before the connection is closed, so
/// that a client slightly over the limit still reads its 413.
const DRAIN_FACTOR: usize = 4;
/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate or key could not be made into a TLS server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The PEM of a file could not be parsed, or holds nothing of the kind needed.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: pem::Error,
    },
    /// rustls refused the certificate chain and key (a key that is not the certificate's, say).
    #[error("the certificate and key make no TLS server: {0}")]
    Config(#[from] rustls::Error),
}

/// The TLS configuration of the webhook from a PEM certificate chain (leaf first) and its PEM
/// private key (PKCS#8, PKCS#1 or SEC1), as a `kubernetes.io/tls` Secret holds them.
pub fn load_tls_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source });
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let pem_error = |path: &Path, source| TlsError::Pem { path: path.into(), source };
    let chain =
        CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(cert, e))?;
    if chain.is_empty() {
        return Err(pem_error(cert, pem::Error::NoItemsFound));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_error(key, e))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why a `POST /mutate` was not answered with an AdmissionReview.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The body is larger than the limit.
    #[error("the body is over the webhook's limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body could not be read.
    #[error("reading the body failed: {0}")]
    Read(String),
    /// The body is not an AdmissionReview of a pod.
    #[error("the body is not an admission.k8s.io/v1 AdmissionReview of a pod: {0}")]
    NotAReview(String),
    /// The decision failed (a panic in it).
    #[error("the admission decision failed: {0}")]
    Internal(String),
}

impl Refusal {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Read(_) | Refusal::NotAReview(_) => StatusCode::BAD_REQUEST,
            Refusal::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// What the webhook answers with: its policies, the store index, its metrics.
pub struct Webhook {
    policies: Arc<dyn PolicySource>,
    index: Arc<dyn PodCheckpointIndex + Send + Sync>,
    metrics: Metrics,
    max_body: usize,
}

impl Webhook {
    /// A webhook deciding with `policies` and `index`, counting into `metrics`, accepting bodies up
    /// to [`MAX_BODY`].
    pub fn new(
        policies: Arc<dyn PolicySource>,
        index: Arc<dyn PodCheckpointIndex + Send + Sync>,
        metrics: Metrics,
    ) -> Self {
        Webhook { policies, index, metrics, max_body: MAX_BODY }
    }

    /// The same, accepting bodies up to `bytes`.
    pub fn with_max_body(self, bytes: usize) -> Self {
        Webhook { max_body: bytes, ..self }
    }

    /// The AdmissionReview (JSON) answering the AdmissionReview `body`, and whether it patches.
    pub async fn mutate(&self, body: &[u8]) -> Result<(Vec<u8>, Outcome), Refusal> {
        let review: AdmissionReview<Pod> =
            serde_json::from_slice(body).map_err(|e| Refusal::NotAReview(e.to_string()))?;
        let types = (review.types.api_version.as_str(), review.types.kind.as_str());
        if types != ("admission.k8s.io/v1", "AdmissionReview") {
            return Err(Refusal::NotAReview(format!("apiVersion {:?}, kind {:?}", types.0, types.1)));
        }
        let request: AdmissionRequest<Pod> = review
            .try_into()
            .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| Refusal::NotAReview(e.to_string()))?;
        let (policies, index) = (self.policies.clone(), self.index.clone());
        // The store index blocks (it lists the store on a runtime of its own).
        let answer = tokio::task::spawn_blocking(move || {
            let namespace = request.namespace.clone().or_else(|| request.object.as_ref()?.metadata.namespace.clone());
            let policies = policies.policies(namespace.as_deref().unwrap_or_default());
            admission::review(&request, &policies, index.as_ref())
        })
        .await
        .map_err(|e| Refusal::Internal(e.to_string()))?;
        let patched = answer.response.as_ref().is_some_and(|r| r.patch.is_some());
        let mut json = serde_json::to_value(&answer).map_err(|e| Refusal::Internal(e.to_string()))?;
        base64_patch(&mut json);
        let bytes = serde_json::to_vec(&json).map_err(|e| Refusal::Internal(e.to_string()))?;
        Ok((bytes, if patched { Outcome::Patched } else { Outcome::Unchanged }))
    }

    /// The body of `body`, at most the limit; a body over it is read on (and dropped) up to
    /// [`DRAIN_FACTOR`] times the limit, so that the client reads the 413 before the connection ends.
    async fn read_body(&self, mut body: Incoming) -> Result<Vec<u8>, Refusal> {
        let mut buf = Vec::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Refusal::Read(e.to_string()))?;
            let Some(data) = frame.data_ref() else { continue };
            seen = seen.saturating_add(data.len());
            if seen <= self.max_body {
                buf.extend_from_slice(data);
            } else if seen > self.max_body.saturating_mul(DRAIN_FACTOR) {
                break;
            } else {
                buf = Vec::new();
            }
        }
        if seen > self.max_body {
            return Err(Refusal::TooLarge { limit: self.max_body });
        }
        Ok(buf)
    }

    /// The answer to one request.
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/mutate") => {
                let answer = match self.read_body(req.into_body()).await {
                    Ok(body) => self.mutate(&body).await,
                    Err(refusal) => Err(refusal),
                };
                match answer {
                    Ok((json, outcome)) => {
                        self.metrics.record(outcome);
                        text(StatusCode::OK, "application/json", json)
                    }
                    Err(refusal) => {
                        self.metrics.record(Outcome::Error);
                        tracing::warn!(error = %refusal, "refused an admission request");
                        text(refusal.status(), "text/plain; charset=utf-8", format!("{refusal}\n"))
                    }
                }
            }
            (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
            (_, "/mutate") => text(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "use POST\n"),
            (_, "/healthz") => text(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "use GET\n"),
            _ => text(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "see /mutate and /healthz\n"),
        }
    }
}

/// kube-core writes `response.patch` (bytes) as an array of numbers; the API server reads a Go
/// `[]byte`, which in JSON is base64 (kube-rs/kube#1781).
fn base64_patch(review: &mut Value) {
    let Some(patch) = review.pointer_mut("/response/patch") else { return };
    if let Value::Array(items) = patch {
        let bytes: Vec<u8> = items.iter().filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok())).collect();
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Serves `webhook` over TLS on `listener` until `shutdown` completes (connections already open are
/// served on).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    webhook: Arc<Webhook>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a webhook connection failed");
                    continue;
                }
            },
        };
        tokio::spawn(connection(acceptor.clone(), stream, webhook.clone()));
    }
}

/// One client: the TLS handshake, then its HTTP/1.1 requests.
async fn connection(acceptor: TlsAcceptor, stream: TcpStream, webhook: Arc<Webhook>) {
    let peer = stream.peer_addr().ok();
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(?peer, error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!(?peer, "TLS handshake timed out"),
    };
    let service = hyper::service::service_fn(move |req| {
        let webhook = webhook.clone();
        async move { Ok::<_, Infallible>(webhook.handle(req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await {
        tracing::debug!(?peer, error = %e, "webhook connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_patch_goes_out_as_base64() {
        let mut review = json!({"response": {"uid": "u", "patch": [91, 93]}});
        base64_patch(&mut review);
        assert_eq!(review["response"]["patch"], "W10=");
        let mut unpatched = json!({"response": {"uid": "u"}});
        base64_patch(&mut unpatched);
        assert_eq!(unpatched, json!({"response": {"uid": "u"}}));
    }
}

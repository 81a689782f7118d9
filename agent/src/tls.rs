//! The agent on TCP with mutual TLS, for an operator off the node, and the client that connects to
//! it.
//!
//! The server ([`acceptor`], [`serve`]) presents a certificate chain and key read once from PEM files
//! and requires every client to present a certificate that chains to a CA of the client CA bundle
//! (rustls' `WebPkiClientVerifier`, on aws-lc-rs); a client without one, or with one of another CA,
//! fails its handshake and is dropped, and the listener goes on. The client ([`connect`]) verifies
//! the agent's certificate against a CA bundle and a server name, and presents its own. Both speak
//! HTTP/2 only (ALPN `h2`). tonic's own `tls` feature is not used: the TLS streams are handed to
//! tonic as plain IO.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kybernate_proto::kybernate::agent::v1::agent_client::AgentClient;
use kybernate_proto::kybernate::agent::v1::agent_server::{Agent, AgentServer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::crypto::{aws_lc_rs, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::{self, PemObject as _};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint};

use crate::error::TlsError;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`connect`] may take to dial and finish its handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the listener waits after a failed `accept` (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How many handshaken connections may wait for the server to take them.
const ACCEPTED_BACKLOG: usize = 16;
/// gRPC is HTTP/2.
const ALPN_H2: &[u8] = b"h2";

const CERT_CHAIN: &str = "one or more `-----BEGIN CERTIFICATE-----` blocks, leaf first";
const CA_BUNDLE: &str = "one or more `-----BEGIN CERTIFICATE-----` blocks";
const PRIVATE_KEY: &str = "one `PRIVATE KEY` (PKCS#8), `RSA PRIVATE KEY` or `EC PRIVATE KEY` block";

/// The TLS acceptor of the agent's TCP listener: `cert` (PEM chain, leaf first) and `key` (PEM,
/// PKCS#8, PKCS#1 or SEC1) are the agent's; clients must present a certificate chaining to a CA of
/// `client_ca` (PEM bundle).
pub fn acceptor(cert: &Path, key: &Path, client_ca: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates(cert, "server certificate chain (--tls-cert)", CERT_CHAIN)?;
    let private_key = private_key(key, "server key (--tls-key)")?;
    let roots = roots(client_ca, "client CA bundle (--tls-client-ca)")?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|source| TlsError::ClientVerifier { path: client_ca.into(), source })?;
    let identity =
        |source| TlsError::Identity { side: "server", cert: cert.into(), key: key.into(), source: Box::new(source) };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(identity)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key)
        .map_err(identity)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `service` on `listener` over mutual TLS with `acceptor` until `shutdown` completes. Each
/// connection's handshake runs on its own (at most [`HANDSHAKE_TIMEOUT`]); one that fails is logged
/// and dropped, and never stops the listener.
pub async fn serve<S: Agent>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: S,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "serving kybernate.agent.v1.Agent over TCP with mutual TLS"),
        Err(e) => tracing::info!(error = %e, "serving kybernate.agent.v1.Agent over TCP with mutual TLS"),
    }
    tonic::transport::Server::builder()
        .add_service(AgentServer::new(service))
        .serve_with_incoming_shutdown(incoming(listener, acceptor), shutdown)
        .await
}

/// The handshaken connections of `listener`: a task accepts and spawns one handshake per
/// connection; it ends when the stream is dropped.
fn incoming(listener: TcpListener, acceptor: TlsAcceptor) -> ReceiverStream<Result<TlsConnection, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a TCP connection failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                }
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    // The server may be gone by now; then the connection is just dropped.
                    Ok(Ok(tls)) => drop(tx.send(Ok(TlsConnection(tls))).await),
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed; connection dropped"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out; connection dropped"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// An accepted, handshaken connection, as tonic takes it: IO plus the TCP addresses
/// ([`tonic::Request::remote_addr`] works).
struct TlsConnection(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A client of the agent at `endpoint` (`host:port`) over mutual TLS: the agent's certificate must
/// chain to a CA of `ca` (PEM bundle) and name `server_name` (a DNS name or IP address in its
/// subjectAltName); the client presents `cert` (PEM chain, leaf first) and `key` (PEM). Connects
/// at once (TCP and handshake within 10 s); the channel reconnects the same way later.
///
/// With TLS 1.3 the agent checks the client's certificate after the client has finished its side
/// of the handshake, so a certificate the agent refuses may surface as the first call's error
/// (`UNAVAILABLE`/`UNKNOWN`, a TLS alert in its source) rather than here.
pub async fn connect(
    endpoint: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    server_name: &str,
) -> Result<AgentClient<Channel>, TlsError> {
    let roots = roots(ca, "agent CA bundle")?;
    let chain = certificates(cert, "client certificate chain", CERT_CHAIN)?;
    let private_key = private_key(key, "client key")?;
    let identity =
        |source| TlsError::Identity { side: "client", cert: cert.into(), key: key.into(), source: Box::new(source) };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(identity)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private_key)
        .map_err(identity)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|source| TlsError::ServerName { name: server_name.into(), source })?;
    let uri = Endpoint::from_shared(format!("https://{endpoint}"))
        .map_err(|source| TlsError::Endpoint { endpoint: endpoint.into(), source })?
        .connect_timeout(CONNECT_TIMEOUT);
    let connector = TlsConnector::from(Arc::new(config));
    let address = endpoint.to_string();
    let channel = uri
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name, address) = (connector.clone(), name.clone(), address.clone());
            async move {
                let tcp = TcpStream::connect(address.as_str()).await?;
                tcp.set_nodelay(true)?;
                Ok::<_, io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
        .map_err(|source| TlsError::Connect { endpoint: endpoint.into(), source })?;
    Ok(AgentClient::new(channel))
}

/// rustls' aws-lc-rs provider, named explicitly (no process-wide default is installed).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.into(), source })
}

/// The certificates of the PEM file `path`, at least one.
fn certificates(
    path: &Path,
    what: &'static str,
    expected: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem { what, path: path.into(), expected, source };
    let certs = CertificateDer::pem_slice_iter(&read(path, what)?).collect::<Result<Vec<_>, _>>().map_err(pem_error)?;
    if certs.is_empty() {
        return Err(pem_error(pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// The private key of the PEM file `path`.
fn private_key(path: &Path, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path, what)?).map_err(|source| TlsError::Pem {
        what,
        path: path.into(),
        expected: PRIVATE_KEY,
        source,
    })
}

/// The CA certificates of the PEM bundle `path` as trust anchors.
fn roots(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, what, CA_BUNDLE)? {
        roots.add(cert).map_err(|source| TlsError::Ca { what, path: path.into(), source: Box::new(source) })?;
    }
    Ok(roots)
}

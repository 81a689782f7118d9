//! The agent's TCP listener with mutual TLS against real clients: the agent's own service served by
//! `tls::serve` on 127.0.0.1:0, certificates made with rcgen.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kybernate_agent::metrics::Metrics;
use kybernate_agent::push::Sidecar;
use kybernate_agent::{tls, AgentConfig, AgentService, TlsError};
use kybernate_proto::kybernate::agent::v1::agent_client::AgentClient;
use kybernate_proto::kybernate::agent::v1::{StatusRequest, StatusResponse};
use kybernate_tests::pki::{pki, Pki};
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

const NODE: &str = "node-7";

/// The agent's own service; Status needs neither containerd (connected lazily, never here) nor CRIU
/// (a missing binary gives an empty version).
fn service(checkpoint_dir: &Path) -> AgentService {
    let config = AgentConfig {
        node_name: NODE.into(),
        containerd_state: checkpoint_dir.join("no-containerd-state"),
        checkpoint_dir: checkpoint_dir.into(),
        criu_binary: checkpoint_dir.join("no-criu"),
        sidecar: Sidecar { binary: "kybernate-sidecar".into(), config: None },
        store: Some("file:///stores/a".into()),
        checkpoint_timeout: Duration::from_secs(60),
    };
    let containerd = kybernate_agent::resolve::containerd_channel(&checkpoint_dir.join("no-containerd.sock")).unwrap();
    AgentService::new(config, containerd, Metrics::new().unwrap())
}

/// Serves the agent over mutual TLS on 127.0.0.1:0 (bound before this returns, so clients may
/// connect at once); the address.
async fn start(pki: &Pki, checkpoint_dir: &Path) -> String {
    let acceptor = tls::acceptor(&pki.server.0, &pki.server.1, &pki.ca).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tls::serve(listener, acceptor, service(checkpoint_dir), std::future::pending()));
    addr.to_string()
}

/// The error and each of its sources, joined with `: `.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Status through `client`, or the error (of the connection or the call) as its chain. With TLS 1.3
/// the agent refuses a client's certificate after the client has finished its handshake, so that
/// refusal is the first call's error.
async fn status(client: Result<AgentClient<tonic::transport::Channel>, TlsError>) -> Result<StatusResponse, String> {
    let mut client = client.map_err(|e| chain(&e))?;
    match client.status(StatusRequest {}).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => {
            // A transport failure (the handshake's alert in its source), not an answer of the service.
            assert_eq!((status.code(), status.message()), (tonic::Code::Unknown, "transport error"), "{status:?}");
            Err(chain(&status))
        }
    }
}

#[tokio::test]
async fn a_trusted_client_gets_the_status() {
    let (pki, dir) = (pki(), tempfile::tempdir().unwrap());
    let addr = start(&pki, dir.path()).await;
    for name in ["localhost", "127.0.0.1"] {
        let client = tls::connect(&addr, &pki.ca, &pki.client.0, &pki.client.1, name).await;
        let answer = status(client).await.unwrap();
        assert_eq!(
            answer,
            StatusResponse {
                node_name: NODE.into(),
                criu_version: String::new(),
                gpus: answer.gpus, // the test machine's own
                checkpoint_dir: dir.path().display().to_string(),
                store: "file:///stores/a".into(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
            }
        );
    }
}

#[tokio::test]
async fn a_client_of_another_ca_is_refused_and_the_listener_goes_on() {
    let (pki, dir) = (pki(), tempfile::tempdir().unwrap());
    let addr = start(&pki, dir.path()).await;
    let rogue = tls::connect(&addr, &pki.ca, &pki.rogue_client.0, &pki.rogue_client.1, "localhost").await;
    let err = status(rogue).await.unwrap_err();
    assert!(err.contains("received fatal alert: UnknownCA"), "{err}");
    // The refused handshake did not stop the listener.
    let client = tls::connect(&addr, &pki.ca, &pki.client.0, &pki.client.1, "localhost").await;
    assert_eq!(status(client).await.unwrap().node_name, NODE);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let (pki, dir) = (pki(), tempfile::tempdir().unwrap());
    let addr = start(&pki, dir.path()).await;
    // A client that trusts the agent but has no certificate of its own.
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&std::fs::read(&pki.ca).unwrap()).unwrap()).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = addr.clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, target) = (connector.clone(), target.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(target).await?;
                let name = ServerName::try_from("localhost").unwrap();
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
        .map_err(|source| TlsError::Connect { endpoint: addr.clone(), source });
    let err = status(channel.map(AgentClient::new)).await.unwrap_err();
    assert!(err.contains("received fatal alert: CertificateRequired"), "{err}");
}

#[tokio::test]
async fn the_client_checks_the_agents_name() {
    let (pki, dir) = (pki(), tempfile::tempdir().unwrap());
    let addr = start(&pki, dir.path()).await;
    let client = tls::connect(&addr, &pki.ca, &pki.client.0, &pki.client.1, "agent.elsewhere").await;
    let err = status(client).await.unwrap_err();
    assert!(err.starts_with(&format!("cannot connect to the agent at {addr} over mutual TLS")), "{err}");
    assert!(err.contains("invalid peer certificate: certificate not valid for name"), "{err}");
}

#[test]
fn a_missing_key_stops_the_server_at_start() {
    let pki = pki();
    let missing = pki.server.1.with_file_name("missing.key");
    let err = tls::acceptor(&pki.server.0, &missing, &pki.ca).err().expect("no acceptor without a key");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read the server key (--tls-key) {}; check the path and that this process may read it",
            missing.display()
        )
    );
    match err {
        TlsError::Read { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_pem_is_named() {
    let pki = pki();
    let not_pem = pki.ca.with_file_name("not-pem.crt");
    std::fs::write(&not_pem, "hello").unwrap();
    let err = tls::acceptor(&not_pem, &pki.server.1, &pki.ca).err().expect("no acceptor without a certificate");
    assert_eq!(
        chain(&err),
        format!(
            "the server certificate chain (--tls-cert) {} is not usable PEM; it must hold one or more `-----BEGIN \
             CERTIFICATE-----` blocks, leaf first: no items found",
            not_pem.display()
        )
    );
    // A key that is not the certificate's own.
    let err = tls::acceptor(&pki.server.0, &pki.client.1, &pki.ca).err().expect("no acceptor with a foreign key");
    assert!(chain(&err).starts_with("the certificate chain"), "{}", chain(&err));
}

//! Certificates for the mutual-TLS tests (agent and operator): a CA the server trusts, one it does
//! not, and leaf certificates of each, written as PEM files (rcgen).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A CA: its certificate and key.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        Ca { cert: params.self_signed(&key).unwrap(), key }
    }

    /// Writes a leaf certificate signed by this CA for `names`, and its key, to `dir/<stem>.{crt,key}`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, stem);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_path, key_path) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// Writes the CA certificate to `dir/<stem>.crt`.
    pub fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.crt"));
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }
}

/// The certificates of one test, in a temporary directory removed on drop: the CA the agent trusts, and one it does not.
pub struct Pki {
    _dir: tempfile::TempDir,
    /// The trusted CA's certificate.
    pub ca: PathBuf,
    /// The server's certificate and key, for `localhost` and `127.0.0.1`.
    pub server: (PathBuf, PathBuf),
    /// A client certificate and key of the trusted CA.
    pub client: (PathBuf, PathBuf),
    /// A client certificate and key of the other CA.
    pub rogue_client: (PathBuf, PathBuf),
}

/// Makes a fresh [`Pki`].
pub fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new("kybernate test CA"), Ca::new("some other CA"));
    Pki {
        ca: ca.write(dir.path(), "ca"),
        server: ca.issue(dir.path(), "agent", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth),
        client: ca.issue(dir.path(), "operator", &["kybernate-operator"], ExtendedKeyUsagePurpose::ClientAuth),
        rogue_client: other.issue(dir.path(), "rogue", &["kybernate-operator"], ExtendedKeyUsagePurpose::ClientAuth),
        _dir: dir,
    }
}

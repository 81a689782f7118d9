//! A real S3-compatible server for the tests: s3s-fs (installed by `make deps`) on a free loopback
//! port, serving a temporary directory with one bucket.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::wait_for;

/// The access key the server accepts.
pub const ACCESS_KEY: &str = "kybernate-test";
/// The secret key the server accepts.
pub const SECRET_KEY: &str = "kybernate-test-secret";
/// The bucket the server has from the start.
pub const BUCKET: &str = "bundles";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The s3s-fs binary: `$S3S_FS`, on PATH, or in cargo's bin directory.
fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return PathBuf::from(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("s3s-fs")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into_os_string()))
    {
        candidates.push(Path::new(&home).join("bin/s3s-fs"));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "s3s-fs is not installed, and the S3 tests need a real S3-compatible server: run \
             sidecar/scripts/install-s3s-fs.sh (cargo install s3s-fs --version 0.14.1 --features \
             binary --locked) or set S3S_FS=/path/to/s3s-fs"
        )
    })
}

/// A real s3s-fs server on a free loopback port, serving a temp directory. Killed on drop.
pub struct S3Server {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The directory it keeps buckets and objects in.
    pub data: tempfile::TempDir,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a server with the bucket [`BUCKET`].
    pub fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join(BUCKET)).unwrap();
        let mut s = S3Server { port: free_port(), data, child: None };
        s.restart();
        s
    }

    /// Its endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (same port and data) after [`S3Server::stop`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let child = Command::new(s3s_fs_binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start s3s-fs");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        wait_for("s3s-fs to accept connections", Duration::from_secs(20), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok().then_some(())
        })
        .unwrap();
    }

    /// Kills the server (SIGKILL), as a crash or network loss would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The file s3s-fs keeps an object in.
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.data.path().join(BUCKET).join(key)
    }

    /// The environment with which `kybernate-sidecar` reaches this server.
    pub fn sidecar_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KYBERNATE_S3_ENDPOINT", self.endpoint()),
            ("KYBERNATE_S3_REGION", "us-east-1".into()),
            ("KYBERNATE_S3_FORCE_PATH_STYLE", "true".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What [`FaultProxy`] does with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers the first request with `500 Internal Server Error` (S3's `InternalError`) and closes.
    InternalError,
    /// Reads what the client sends and never answers, until the client gives up.
    Stall,
}

/// A TCP proxy on loopback in front of an S3 server that injects faults into the connections it is
/// told to, and passes every other connection through untouched. Clients drop a connection after an
/// error, so each retry is a new connection: a queue of faults hits exactly that many attempts.
pub struct FaultProxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    plan: std::sync::Arc<std::sync::Mutex<FaultPlan>>,
}

#[derive(Default)]
struct FaultPlan {
    next: std::collections::VecDeque<Fault>,
    always: Option<Fault>,
    served: usize,
    passed: usize,
}

impl FaultProxy {
    /// Starts a proxy to `upstream_port` on 127.0.0.1 (the proxy runs until the test process ends;
    /// a connection it holds ends when its client closes it).
    pub fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let plan = std::sync::Arc::new(std::sync::Mutex::new(FaultPlan::default()));
        let shared = std::sync::Arc::clone(&plan);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let fault = {
                    let mut plan = shared.lock().unwrap();
                    let fault = plan.next.pop_front().or(plan.always);
                    match fault {
                        Some(_) => plan.served += 1,
                        None => plan.passed += 1,
                    }
                    fault
                };
                std::thread::spawn(move || serve(client, fault, upstream_port));
            }
        });
        FaultProxy { port, plan }
    }

    /// Its endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next connections get these faults, in order; later ones pass.
    pub fn fail_next(&self, faults: &[Fault]) {
        self.plan.lock().unwrap().next.extend(faults.iter().copied());
    }

    /// Every connection from now on gets `fault` (`None`: none do).
    pub fn always(&self, fault: Option<Fault>) {
        self.plan.lock().unwrap().always = fault;
    }

    /// How many connections got a fault, and how many were passed through.
    pub fn counts(&self) -> (usize, usize) {
        let plan = self.plan.lock().unwrap();
        (plan.served, plan.passed)
    }
}

fn serve(mut client: TcpStream, fault: Option<Fault>, upstream_port: u16) {
    use std::io::{Read, Write};
    match fault {
        Some(Fault::InternalError) => {
            // the request line and headers, then the answer; a body the client still sends is dropped
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code>\
                        <Message>injected by the test's fault proxy</Message></Error>";
            let answer = format!(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(answer.as_bytes());
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
        Some(Fault::Stall) => {
            let mut buf = [0u8; 65536];
            while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
        }
        None => {
            let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else { return };
            let (mut up_read, mut client_write) = (upstream.try_clone().unwrap(), client.try_clone().unwrap());
            let back = std::thread::spawn(move || {
                let _ = std::io::copy(&mut up_read, &mut client_write);
                let _ = client_write.shutdown(std::net::Shutdown::Write);
            });
            let mut up_write = upstream;
            let _ = std::io::copy(&mut client, &mut up_write);
            let _ = up_write.shutdown(std::net::Shutdown::Write);
            let _ = back.join();
        }
    }
}

//! A logging binary for containerd's `binary://` stdio URIs, for the shim tests. The shim passes the
//! URI's query as `key value` arguments; this one understands `file PATH` (required) and `fail CODE`.
//!
//! It appends to PATH: `pid <pid> ppid <ppid>`, `args <args...>`, `env <NAME=value...>` (its whole
//! environment, sorted), then signals readiness by closing fd 5, then writes each line the process
//! writes to stdout (fd 3) as `stdout <line>` and to stderr (fd 4) as `stderr <line>`, and `eof` once
//! both reached EOF; then it exits 0. With `fail CODE` it exits with CODE instead of signalling.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |key: &str| args.chunks(2).find(|kv| kv[0] == key).and_then(|kv| kv.get(1)).cloned();
    let Some(path) = value("file") else { bail!("usage: kybernate-test-logger file PATH [fail CODE]") };
    let file = OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {path}"))?;
    let log = Arc::new(Mutex::new(file));
    let line = |text: String| -> Result<()> {
        log.lock().unwrap_or_else(|p| p.into_inner()).write_all(format!("{text}\n").as_bytes())?;
        Ok(())
    };
    let ppid = std::os::unix::process::parent_id();
    line(format!("pid {} ppid {ppid}", std::process::id()))?;
    line(format!("args {}", args.join(" ")))?;
    let mut env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    line(format!("env {}", env.join(" ")))?;
    if let Some(code) = value("fail") {
        std::process::exit(code.parse().context("fail CODE")?);
    }
    // SAFETY: the shim passes the stdout and stderr pipes as fds 3 and 4 and the ready pipe as fd 5;
    // nothing else in this process owns them.
    let (stdout, stderr, ready) = unsafe { (File::from_raw_fd(3), File::from_raw_fd(4), File::from_raw_fd(5)) };
    drop(ready);
    let copies: Vec<_> = [("stdout", stdout), ("stderr", stderr)]
        .into_iter()
        .map(|(name, from)| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || -> Result<()> {
                for text in BufReader::new(from).lines() {
                    log.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .write_all(format!("{name} {}\n", text?).as_bytes())?;
                }
                Ok(())
            })
        })
        .collect();
    for copy in copies {
        copy.join().map_err(|_| anyhow::anyhow!("a copy thread panicked"))??;
    }
    line("eof".into())
}

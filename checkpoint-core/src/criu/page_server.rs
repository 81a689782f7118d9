//! The serving side of CRIU's page-server protocol as `criu lazy-pages --page-server` speaks it: the
//! daemon asks for a run of pages of one process, named by the process's page-map id and an
//! address, and a [`PageSource`] supplies their bytes from the pages image. This lets a lazy restore
//! take its memory from somewhere other than a complete local pages image: the sidecar serves it
//! from a store while the image is still being fetched (`docs/shim.md`, remote lazy restore).
//!
//! The daemon is handed its end of a connected socket with `--ps-socket`, so no port is opened.

use std::io::{self, Read, Write};

use super::pagemap::{MapKind, PageMap, PAGE_SIZE};
use super::CriuVersion;
use crate::error::{Error, Result};

/// Send pages (the reply to [`PS_IOV_GET`]), with the page flags in the upper 16 bits.
const PS_IOV_ADD_F: u32 = 6;
/// Asks for pages.
const PS_IOV_GET: u32 = 7;
/// The client is done and waits for a status word.
const PS_IOV_CLOSE: u32 = 0x1023;
/// As [`PS_IOV_CLOSE`], sent when the socket was handed in (`--ps-socket`).
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
/// The command's bits of the command word.
const PS_CMD_MASK: u32 = 0xffff;
/// Pages present (pagemap flag `PE_PRESENT`), in the reply's flag bits.
const PE_PRESENT_FLAG: u32 = (1 << 2) << 16;
/// Most bytes one request may ask for (CRIU asks for at most a few MiB at a time).
const MAX_REQUEST_BYTES: u64 = 256 << 20;

/// Supplies the bytes of pages images.
pub trait PageSource: Send + Sync {
    /// Fills `buf` with the bytes of pages image `pages_file` from `offset`.
    fn read_pages(&self, pages_file: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// How a CRIU version lays out a request (`struct page_server_iov`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// CRIU up to 4.1: a 32-bit page count (24 bytes).
    Narrow,
    /// CRIU 4.2 and later: a 64-bit page count (32 bytes).
    Wide,
}

impl Framing {
    /// The framing `version` speaks.
    pub fn of(version: CriuVersion) -> Framing {
        if (version.major, version.minor) >= (4, 2) {
            Framing::Wide
        } else {
            Framing::Narrow
        }
    }

    fn len(self) -> usize {
        match self {
            Framing::Narrow => 24,
            Framing::Wide => 32,
        }
    }
}

/// One request or reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Iov {
    cmd: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

impl Iov {
    fn decode(framing: Framing, b: &[u8]) -> Iov {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        match framing {
            Framing::Narrow => {
                Iov { cmd: u32_at(0), nr_pages: u64::from(u32_at(4)), vaddr: u64_at(8), dst_id: u64_at(16) }
            }
            Framing::Wide => Iov { cmd: u32_at(0), nr_pages: u64_at(8), vaddr: u64_at(16), dst_id: u64_at(24) },
        }
    }

    fn encode(&self, framing: Framing, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.cmd.to_le_bytes());
        match framing {
            Framing::Narrow => out.extend_from_slice(&(self.nr_pages as u32).to_le_bytes()),
            Framing::Wide => {
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&self.nr_pages.to_le_bytes());
            }
        }
        out.extend_from_slice(&self.vaddr.to_le_bytes());
        out.extend_from_slice(&self.dst_id.to_le_bytes());
    }
}

/// What a page-server session served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests answered.
    pub requests: u64,
    /// Page bytes sent.
    pub bytes: u64,
    /// Whether the daemon closed the session itself (it does once every page is in); `false` when
    /// the connection just ended.
    pub closed: bool,
}

/// Serves the page requests of one lazy-pages daemon on `stream` until it closes the session or
/// the connection ends, answering from the task maps in `maps` with `source`.
pub fn serve<S: Read + Write>(
    mut stream: S,
    maps: &[PageMap],
    source: &dyn PageSource,
    framing: Framing,
) -> Result<Served> {
    let failed =
        |what: String| Error::io("serving pages to criu lazy-pages", io::Error::new(io::ErrorKind::InvalidData, what));
    let mut served = Served::default();
    let mut header = vec![0u8; framing.len()];
    let mut reply = Vec::new();
    loop {
        match read_header(&mut stream, &mut header) {
            Ok(true) => {}
            Ok(false) => return Ok(served),
            Err(e) => return Err(Error::io("reading a request of criu lazy-pages", e)),
        }
        let iov = Iov::decode(framing, &header);
        match iov.cmd & PS_CMD_MASK {
            PS_IOV_GET => {
                let map = maps.iter().find(|m| m.kind == MapKind::Task && m.id == iov.dst_id).ok_or_else(|| {
                    failed(format!(
                        "it asked for pages of process {}, which the checkpoint has no page map of",
                        iov.dst_id
                    ))
                })?;
                let len = iov.nr_pages.saturating_mul(PAGE_SIZE);
                if len == 0 || len > MAX_REQUEST_BYTES {
                    return Err(failed(format!("it asked for {} pages at once", iov.nr_pages)));
                }
                let offset = map.locate(iov.vaddr, iov.nr_pages).ok_or_else(|| {
                    failed(format!(
                        "it asked for {} pages at {:#x} of process {}, which its page map does not hold",
                        iov.nr_pages, iov.vaddr, iov.dst_id
                    ))
                })?;
                reply.clear();
                Iov { cmd: PS_IOV_ADD_F | PE_PRESENT_FLAG, ..iov }.encode(framing, &mut reply);
                let at = reply.len();
                reply.resize(at + len as usize, 0);
                source.read_pages(&map.pages_file, offset, &mut reply[at..]).map_err(|e| {
                    Error::io(format!("reading {len} bytes of {} at {offset} for criu lazy-pages", map.pages_file), e)
                })?;
                stream.write_all(&reply).map_err(|e| Error::io("sending pages to criu lazy-pages", e))?;
                served.requests += 1;
                served.bytes += len;
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                stream.write_all(&0i32.to_le_bytes()).map_err(|e| Error::io("answering criu lazy-pages' close", e))?;
                served.closed = true;
                return Ok(served);
            }
            other => {
                return Err(failed(format!(
                    "it sent command {other:#x}, which a lazy restore's page server does not serve"
                )))
            }
        }
    }
}

/// Reads one header; `false` on a clean end of the stream before it.
fn read_header(stream: &mut impl Read, header: &mut [u8]) -> io::Result<bool> {
    let mut at = 0;
    while at < header.len() {
        match stream.read(&mut header[at..]) {
            Ok(0) if at == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the request was cut short")),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::criu::pagemap::PageRun;

    /// Page `i` of every image is filled with byte `i`.
    struct Numbered;

    impl PageSource for Numbered {
        fn read_pages(&self, pages_file: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            assert_eq!(pages_file, "pages-1.img");
            for (i, page) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
                page.fill((offset / PAGE_SIZE) as u8 + i as u8);
            }
            Ok(())
        }
    }

    fn maps() -> Vec<PageMap> {
        vec![PageMap {
            kind: MapKind::Task,
            id: 42,
            pages_file: "pages-1.img".into(),
            runs: vec![
                PageRun { vaddr: 0x1000, nr_pages: 2, offset: 0, lazy: false },
                PageRun { vaddr: 0x40000, nr_pages: 8, offset: 2 * PAGE_SIZE, lazy: true },
            ],
        }]
    }

    fn request(framing: Framing, cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Iov { cmd, nr_pages, vaddr, dst_id }.encode(framing, &mut out);
        out
    }

    fn session(framing: Framing, requests: &[Vec<u8>]) -> (Result<Served>, Vec<u8>) {
        let (mut client, server) = UnixStream::pair().unwrap();
        for r in requests {
            client.write_all(r).unwrap();
        }
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let served = serve(server, &maps(), &Numbered, framing);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        (served, answer)
    }

    #[test]
    fn answers_a_request_with_the_pages_of_its_run_and_the_close_with_zero() {
        for framing in [Framing::Narrow, Framing::Wide] {
            let (served, answer) = session(
                framing,
                &[request(framing, PS_IOV_GET, 3, 0x42000, 42), request(framing, PS_IOV_FORCE_CLOSE, 0, 0, 0)],
            );
            assert_eq!(served.unwrap(), Served { requests: 1, bytes: 3 * PAGE_SIZE, closed: true });
            let header = request(framing, PS_IOV_ADD_F | PE_PRESENT_FLAG, 3, 0x42000, 42);
            assert_eq!(&answer[..framing.len()], header.as_slice());
            let pages = &answer[framing.len()..answer.len() - 4];
            assert_eq!(pages.len() as u64, 3 * PAGE_SIZE);
            // 0x42000 is the third page of the run that starts at page 2 of the image.
            assert!(pages[..4096].iter().all(|&b| b == 4) && pages[8192..].iter().all(|&b| b == 6));
            assert_eq!(&answer[answer.len() - 4..], &0i32.to_le_bytes());
        }
    }

    #[test]
    fn a_request_outside_the_maps_fails_the_session_and_names_it() {
        let framing = Framing::Narrow;
        let (served, _) = session(framing, &[request(framing, PS_IOV_GET, 9, 0x40000, 42)]);
        let err = served.unwrap_err().to_string();
        assert!(err.contains("9 pages at 0x40000 of process 42, which its page map does not hold"), "{err}");
        let (served, _) = session(framing, &[request(framing, PS_IOV_GET, 1, 0x1000, 7)]);
        assert!(served.unwrap_err().to_string().contains("process 7, which the checkpoint has no page map of"));
        let (served, _) = session(framing, &[request(framing, 1, 1, 0x1000, 42)]);
        assert!(served.unwrap_err().to_string().contains("command 0x1"));
    }

    #[test]
    fn a_connection_that_ends_is_not_a_close() {
        let (served, answer) = session(Framing::Wide, &[]);
        assert_eq!(served.unwrap(), Served::default());
        assert!(answer.is_empty());
        let (served, _) = session(Framing::Wide, &[vec![7, 0, 0]]);
        assert!(served.unwrap_err().to_string().contains("cut short"));
    }

    #[test]
    fn the_framing_follows_the_criu_version() {
        assert_eq!(Framing::of(CriuVersion { major: 4, minor: 1, patch: 1 }), Framing::Narrow);
        assert_eq!(Framing::of(CriuVersion { major: 4, minor: 2, patch: 0 }), Framing::Wide);
    }
}

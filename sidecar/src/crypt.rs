//! Encryption at rest of the archives sent to a store: the framing of an encrypted archive, and its
//! keys.
//!
//! The archive stream (tar, optionally zstd) is encrypted with XChaCha20-Poly1305 (RustCrypto
//! `chacha20poly1305`) in the STREAM construction of the `aead` crate (`StreamBE32`: the nonce of
//! chunk *i* is the archive's random 19-byte prefix, *i* as a 32-bit big-endian counter and a
//! last-chunk flag), which authenticates every chunk and detects reordered, dropped, duplicated and
//! appended chunks and truncation (the last chunk is flagged). An encrypted archive is:
//!
//! ```text
//! header (39 bytes): magic "KYBENC1\0" | key id (8) | nonce prefix (19) | chunk size (u32 BE)
//! chunks:            ciphertext of chunk 0 | tag (16) | … | ciphertext of the last chunk | tag (16)
//! ```
//!
//! Every chunk but the last holds exactly `chunk size` bytes of plaintext (1 MiB); the last holds
//! the rest, possibly nothing. The whole header is the associated data of every chunk, so a changed
//! header fails authentication too. The key id (the first 8 bytes of SHA-256 over a domain string
//! and the key) names the key in the header and in the object's record, so a pull with the wrong
//! key is refused before anything is decrypted or written; it reveals nothing about the key.
//!
//! Keys are 32 random bytes, written as 64 hex digits or 44 base64 characters. They are zeroized
//! when dropped, and never appear in logs, `Debug` output or errors: only their key id does.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32, NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::fsutil::sync_dir;

/// First bytes of every encrypted archive (format version 1).
pub const MAGIC: [u8; 8] = *b"KYBENC1\0";
/// The scheme recorded in an encrypted object's record ([`EncryptionInfo::scheme`]).
pub const SCHEME: &str = "kybenc1-xchacha20poly1305-stream-be32";
/// Suffix added to the key of an encrypted object (`<bundle>.tar.zst.kenc`).
pub const SUFFIX: &str = ".kenc";
/// Plaintext bytes per chunk of the archives this build writes.
pub const CHUNK_SIZE: usize = 1 << 20;
/// Largest chunk size a header may name (bounds the memory of a pull).
pub const MAX_CHUNK_SIZE: usize = 16 << 20;
/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of an archive's nonce prefix (XChaCha20's 24-byte nonce less STREAM's 5).
pub const NONCE_PREFIX_LEN: usize = 19;
/// Length of the authentication tag after every chunk.
pub const TAG_LEN: usize = 16;
/// Length of the header.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_ID_LEN + NONCE_PREFIX_LEN + 4;

const KEY_ID_DOMAIN: &[u8] = b"kybernate-sidecar archive encryption key id v1\0";

pub use crate::key_id::KeyId;
use crate::key_id::KEY_ID_LEN;

/// A 32-byte archive key. Zeroized on drop; `Debug` shows only its [`KeyId`].
pub struct Key {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: KeyId,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

impl Key {
    fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Key {
        let digest = Sha256::new().chain_update(KEY_ID_DOMAIN).chain_update(bytes.as_slice()).finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Key { bytes, id: KeyId(id) }
    }

    /// A new random key (from the operating system's random source).
    pub fn generate() -> Result<Key> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        random(&mut *bytes)?;
        Ok(Key::from_bytes(bytes))
    }

    /// Parses a key written as 64 hex digits or 44 base64 characters (surrounding whitespace is
    /// ignored). The error says what is wrong without repeating any of `text`.
    pub fn parse(text: &str) -> std::result::Result<Key, String> {
        let text = text.trim();
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        match text.len() {
            0 => return Err("it is empty".into()),
            64 => hex::decode_to_slice(text, &mut *bytes).map_err(|_| "64 characters, but not all hex digits")?,
            44 => {
                // Room for base64's conservative length estimate.
                let mut buf = Zeroizing::new([0u8; 48]);
                match base64::engine::general_purpose::STANDARD.decode_slice(text, &mut *buf) {
                    Ok(KEY_LEN) => bytes.copy_from_slice(&buf[..KEY_LEN]),
                    _ => return Err("44 characters, but not the base64 of 32 bytes".into()),
                }
            }
            n => {
                return Err(format!(
                    "it is {n} characters long; a key is 64 hex digits or 44 base64 characters \
                     (make one with `kybernate-sidecar keygen --out PATH`)"
                ))
            }
        }
        Ok(Key::from_bytes(bytes))
    }

    /// Reads a key file. Refuses a file that group or others may access (`chmod 600` it), and
    /// anything but one key in hex or base64.
    pub fn load(path: &Path) -> Result<Key> {
        let origin = || format!("file {}", path.display());
        let mut file = File::open(path).map_err(|e| Error::io("open encryption key file", path, e))?;
        let mode = file.metadata().map_err(|e| Error::io("stat encryption key file", path, e))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(Error::EncryptionKey {
                origin: origin(),
                reason: format!(
                    "group or others may access it (mode {:04o}); run `chmod 600 {}` (for a Kubernetes \
                     Secret volume, set defaultMode: 0400)",
                    mode & 0o7777,
                    path.display()
                ),
            });
        }
        // Capacity for everything `take` lets through, so the text is never reallocated (and
        // copies of the key left behind unzeroized).
        const MAX: u64 = 1024;
        let mut text = Zeroizing::new(String::with_capacity(MAX as usize + 1));
        (&mut file)
            .take(MAX + 1)
            .read_to_string(&mut text)
            .map_err(|e| Error::io("read encryption key file", path, e))?;
        if text.len() as u64 > MAX {
            return Err(Error::EncryptionKey { origin: origin(), reason: "it is far too long to be a key".into() });
        }
        Key::parse(&text).map_err(|reason| Error::EncryptionKey { origin: origin(), reason })
    }

    /// The key held by environment variable `var` (e.g. from a Kubernetes Secret through
    /// `secretKeyRef`), `None` when it is not set.
    pub fn from_env(var: &str) -> Result<Option<Key>> {
        let Some(value) = std::env::var_os(var) else {
            return Ok(None);
        };
        let value = Zeroizing::new(value.into_encoded_bytes());
        let origin = format!("in environment variable {var}");
        let text = std::str::from_utf8(&value)
            .map_err(|_| Error::EncryptionKey { origin: origin.clone(), reason: "it is not UTF-8 text".into() })?;
        Key::parse(text).map(Some).map_err(|reason| Error::EncryptionKey { origin, reason })
    }

    /// The key's public name.
    pub fn id(&self) -> KeyId {
        self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.bytes).into())
    }
}

/// Writes a new random key to `path` as hex (mode 0600; the file must not exist) and returns its
/// id. Creates missing parent directories.
pub fn write_new_key(path: &Path) -> Result<KeyId> {
    let key = Key::generate()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    }
    let mut file = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::EncryptionKey {
                origin: format!("file {}", path.display()),
                reason: "it already exists, and keygen never replaces a key (archives encrypted with it \
                         could not be read any more); pick another path"
                    .into(),
            })
        }
        Err(e) => return Err(Error::io("create key file", path, e)),
    };
    let mut text = Zeroizing::new(hex::encode(key.bytes.as_slice()));
    text.push('\n');
    file.write_all(text.as_bytes()).map_err(|e| Error::io("write key file", path, e))?;
    file.sync_all().map_err(|e| Error::io("fsync key file", path, e))?;
    sync_dir(path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    Ok(key.id())
}

fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| Error::Random { source: io::Error::other(e.to_string()) })
}

/// How an object in a store is encrypted, as its record says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionInfo {
    /// The format ([`SCHEME`]).
    pub scheme: String,
    /// The key it was encrypted with.
    pub key_id: KeyId,
}

/// The keys of this node: the one new archives are encrypted with, and all that pulls accept.
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    encryption: Option<Arc<Key>>,
    decryption: Vec<Arc<Key>>,
    require_encryption: bool,
}

impl Keyring {
    /// Encrypts with `encryption` (if any); pulls accept it and every key in `older` (kept for
    /// archives pushed before a key rotation). With `require_encryption`, unencrypted objects are
    /// refused.
    pub fn new(encryption: Option<Arc<Key>>, older: Vec<Arc<Key>>, require_encryption: bool) -> Keyring {
        let mut decryption: Vec<Arc<Key>> = encryption.iter().cloned().collect();
        for key in older {
            if !decryption.iter().any(|k| k.id() == key.id()) {
                decryption.push(key);
            }
        }
        Keyring { encryption, decryption, require_encryption }
    }

    /// The key new archives are encrypted with; `None`: they are not encrypted.
    pub fn encryption_key(&self) -> Option<&Arc<Key>> {
        self.encryption.as_ref()
    }

    /// The ids of every key pulls accept (the encryption key first).
    pub fn ids(&self) -> Vec<KeyId> {
        self.decryption.iter().map(|k| k.id()).collect()
    }

    /// The key that decrypts the object `key`, whose record says `encryption`: `None` for an
    /// unencrypted object (refused with `require_encryption`), an error naming the key ids when no
    /// configured key is the right one.
    pub fn key_for(&self, key: &str, encryption: Option<&EncryptionInfo>) -> Result<Option<Arc<Key>>> {
        let Some(info) = encryption else {
            return if self.require_encryption { Err(Error::NotEncrypted { key: key.to_string() }) } else { Ok(None) };
        };
        if info.scheme != SCHEME {
            return Err(Error::Metadata {
                key: key.to_string(),
                reason: format!(
                    "its encryption scheme `{}` is unknown to this kybernate-sidecar, which reads `{SCHEME}` \
                     (upgrade it)",
                    info.scheme
                ),
            });
        }
        if self.decryption.is_empty() {
            return Err(Error::NoDecryptionKey { key: key.to_string(), key_id: info.key_id });
        }
        match self.decryption.iter().find(|k| k.id() == info.key_id) {
            Some(k) => Ok(Some(k.clone())),
            None => Err(Error::WrongKey { key: key.to_string(), expected: info.key_id, available: self.ids() }),
        }
    }
}

/// What one archive is encrypted with: a key and the archive's own nonce prefix.
#[derive(Clone, Debug)]
pub struct Sealing {
    key: Arc<Key>,
    nonce: [u8; NONCE_PREFIX_LEN],
}

impl Sealing {
    /// `key` with a fresh random nonce prefix.
    pub fn fresh(key: Arc<Key>) -> Result<Sealing> {
        let mut nonce = [0u8; NONCE_PREFIX_LEN];
        random(&mut nonce)?;
        Ok(Sealing { key, nonce })
    }

    /// `key` with a nonce prefix chosen earlier for the same archive. Encrypting different
    /// plaintext under the same key and nonce would break the encryption: reuse a nonce only to
    /// produce the very same archive again (a retried upload).
    pub fn with_nonce(key: Arc<Key>, nonce: [u8; NONCE_PREFIX_LEN]) -> Sealing {
        Sealing { key, nonce }
    }

    /// The nonce prefix.
    pub fn nonce(&self) -> [u8; NONCE_PREFIX_LEN] {
        self.nonce
    }

    /// What the object's record says about it.
    pub fn info(&self) -> EncryptionInfo {
        EncryptionInfo { scheme: SCHEME.to_string(), key_id: self.key.id() }
    }

    fn header(&self, chunk: usize) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..16].copy_from_slice(&self.key.id().0);
        h[16..35].copy_from_slice(&self.nonce);
        h[35..].copy_from_slice(&(chunk as u32).to_be_bytes());
        h
    }
}

/// A `Write` that encrypts everything written to it into `inner`: the header at once, then one
/// chunk whenever a full chunk is followed by more data; [`EncryptWriter::finish`] writes the last.
pub struct EncryptWriter<W: Write> {
    inner: W,
    stream: EncryptorBE32<XChaCha20Poly1305>,
    header: [u8; HEADER_LEN],
    buf: Vec<u8>,
    chunk: usize,
}

impl<W: Write> EncryptWriter<W> {
    /// Starts an encrypted archive in `inner` (chunks of [`CHUNK_SIZE`]).
    pub fn new(inner: W, sealing: &Sealing) -> io::Result<Self> {
        Self::with_chunk_size(inner, sealing, CHUNK_SIZE)
    }

    fn with_chunk_size(mut inner: W, sealing: &Sealing, chunk: usize) -> io::Result<Self> {
        let header = sealing.header(chunk);
        inner.write_all(&header)?;
        let stream = EncryptorBE32::from_aead(sealing.key.cipher(), (&sealing.nonce).into());
        Ok(EncryptWriter { inner, stream, header, buf: Vec::with_capacity(chunk + TAG_LEN), chunk })
    }

    /// Encrypts the last chunk and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.stream
            .encrypt_last_in_place(&self.header, &mut self.buf)
            .map_err(|_| io::Error::other("cannot encrypt the last chunk"))?;
        self.inner.write_all(&self.buf)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for EncryptWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.buf.len() == self.chunk {
            // More data follows a full chunk, so that chunk is not the last.
            self.stream
                .encrypt_next_in_place(&self.header, &mut self.buf)
                .map_err(|_| io::Error::other("the archive is too long to encrypt (more than 2^32 - 1 chunks)"))?;
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks an archive's header against `key`: its nonce prefix and chunk size.
fn parse_header(header: &[u8; HEADER_LEN], key: &Key) -> std::result::Result<([u8; NONCE_PREFIX_LEN], usize), String> {
    if header[..8] != MAGIC {
        return Err("it does not start with the KYBENC1 header of an archive encrypted by kybernate-sidecar".into());
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&header[8..16]);
    if KeyId(id) != key.id() {
        return Err(format!("its header names key id {}, its record key id {}", KeyId(id), key.id()));
    }
    let mut nonce = [0u8; NONCE_PREFIX_LEN];
    nonce.copy_from_slice(&header[16..35]);
    let chunk = u32::from_be_bytes([header[35], header[36], header[37], header[38]]) as usize;
    if !(1..=MAX_CHUNK_SIZE).contains(&chunk) {
        return Err(format!("its header names a chunk size of {chunk} bytes (1 to {MAX_CHUNK_SIZE} allowed)"));
    }
    Ok((nonce, chunk))
}

/// Random access to the plaintext of an encrypted archive: chunk *i* authenticates on its own (its
/// nonce is the prefix, *i* and the last-chunk flag, its associated data the header), so a byte
/// range is read by fetching and authenticating only the chunks that hold it. Which chunk is the
/// last follows from the object's size; a chunk moved, cut or flagged wrongly does not authenticate.
pub struct ChunkDecryptor {
    stream: StreamBE32<XChaCha20Poly1305>,
    header: [u8; HEADER_LEN],
    chunk: u64,
    chunks: u64,
    plain_size: u64,
}

impl ChunkDecryptor {
    /// Checks `header` against `key`; `object_size` is the encrypted archive's size.
    pub fn new(header: &[u8; HEADER_LEN], key: &Key, object_size: u64) -> std::result::Result<Self, String> {
        let (nonce, chunk) = parse_header(header, key)?;
        let (chunk, sealed) = (chunk as u64, (chunk + TAG_LEN) as u64);
        let body = object_size
            .checked_sub(HEADER_LEN as u64 + TAG_LEN as u64)
            .ok_or("it is shorter than a header and one tag")?;
        let chunks = body / sealed + 1;
        let last = body - (chunks - 1) * sealed;
        if chunks > u64::from(u32::MAX) || last > chunk {
            return Err(format!("its size ({object_size} bytes) is not that of an archive in {chunk}-byte chunks"));
        }
        let stream = StreamBE32::from_aead(key.cipher(), (&nonce).into());
        Ok(ChunkDecryptor { stream, header: *header, chunk, chunks, plain_size: (chunks - 1) * chunk + last })
    }

    /// Bytes of plaintext.
    pub fn plain_size(&self) -> u64 {
        self.plain_size
    }

    /// The chunks that hold plaintext bytes `range`, and where they lie in the object.
    pub fn locate(&self, range: &std::ops::Range<u64>) -> (std::ops::Range<u64>, std::ops::Range<u64>) {
        let sealed = self.chunk + TAG_LEN as u64;
        let first = range.start / self.chunk;
        let end = range.end.div_ceil(self.chunk).clamp(first + 1, self.chunks);
        let at = |i: u64| HEADER_LEN as u64 + i * sealed;
        let object_end = at(self.chunks - 1) + (self.plain_size - (self.chunks - 1) * self.chunk) + TAG_LEN as u64;
        (first..end, at(first)..at(end).min(object_end))
    }

    /// Authenticates and decrypts the sealed `chunks` (as [`ChunkDecryptor::locate`] placed them,
    /// read from the object) and returns plaintext bytes `range`, which they must hold.
    pub fn decrypt(
        &self,
        chunks: std::ops::Range<u64>,
        sealed: &[u8],
        range: &std::ops::Range<u64>,
    ) -> std::result::Result<Vec<u8>, String> {
        let mut plain = Vec::with_capacity(sealed.len());
        let mut buf = Vec::with_capacity((self.chunk as usize) + TAG_LEN);
        for (i, piece) in chunks.clone().zip(sealed.chunks(self.chunk as usize + TAG_LEN)) {
            buf.clear();
            buf.extend_from_slice(piece);
            self.stream.decrypt_in_place(i as u32, i + 1 == self.chunks, &self.header, &mut buf).map_err(|_| {
                format!("chunk {i} does not authenticate: the object was altered, truncated or reordered")
            })?;
            plain.extend_from_slice(&buf);
        }
        let from = (range.start - chunks.start * self.chunk) as usize;
        let to = from + (range.end - range.start) as usize;
        plain.get(from..to).map(<[u8]>::to_vec).ok_or_else(|| format!("chunks {chunks:?} do not hold bytes {range:?}"))
    }
}

/// A `Read` of the plaintext of an encrypted archive read from `inner`. Every chunk is
/// authenticated before any of its bytes are returned; the end of the plaintext is reported only
/// after the last chunk authenticated as the last. Once it fails, it keeps failing.
pub struct DecryptReader<R: Read> {
    inner: R,
    /// `None` once the last chunk was decrypted.
    stream: Option<DecryptorBE32<XChaCha20Poly1305>>,
    header: [u8; HEADER_LEN],
    chunk: usize,
    buf: Vec<u8>,
    pos: usize,
    /// The first byte of the next chunk, read to learn that the current one is not the last.
    carry: Option<u8>,
    index: u64,
    failure: Option<String>,
}

impl<R: Read> DecryptReader<R> {
    /// Reads and checks the header, which must name `key`. The error says what is wrong.
    pub fn new(mut inner: R, key: &Key) -> std::result::Result<Self, String> {
        let mut header = [0u8; HEADER_LEN];
        inner.read_exact(&mut header).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => "it ends inside its encryption header".to_string(),
            _ => format!("cannot read its encryption header: {e}"),
        })?;
        let (nonce, chunk) = parse_header(&header, key)?;
        let stream = DecryptorBE32::from_aead(key.cipher(), (&nonce).into());
        Ok(DecryptReader {
            inner,
            stream: Some(stream),
            header,
            chunk,
            buf: Vec::with_capacity(chunk + TAG_LEN + 1),
            pos: 0,
            carry: None,
            index: 0,
            failure: None,
        })
    }

    /// Why decryption failed, if it did (the archive was altered, truncated or reordered).
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let want = self.chunk + TAG_LEN;
        self.buf.clear();
        self.pos = 0;
        self.buf.extend(self.carry.take());
        let missing = (want + 1 - self.buf.len()) as u64;
        (&mut self.inner).take(missing).read_to_end(&mut self.buf)?;
        let last = self.buf.len() <= want;
        if !last {
            self.carry = self.buf.pop();
        }
        let index = self.index;
        self.index += 1;
        let Some(mut stream) = self.stream.take() else {
            return Ok(());
        };
        let result = if last {
            stream.decrypt_last_in_place(&self.header, &mut self.buf)
        } else {
            let r = stream.decrypt_next_in_place(&self.header, &mut self.buf);
            self.stream = Some(stream);
            r
        };
        result.map_err(|_| {
            let what = if last { "the last chunk" } else { "chunk" };
            let reason = format!(
                "{what} {index} (at byte {}) does not authenticate: the object was altered, truncated or \
                 reordered",
                HEADER_LEN as u64 + index * want as u64
            );
            self.buf.clear();
            self.failure = Some(reason.clone());
            io::Error::new(io::ErrorKind::InvalidData, reason)
        })
    }
}

impl<R: Read> Read for DecryptReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(reason) = &self.failure {
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason.clone()));
        }
        while self.pos == self.buf.len() {
            if self.stream.is_none() {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The key without the [`SUFFIX`] of an encrypted object.
pub fn strip_suffix(key: &str) -> &str {
    key.strip_suffix(SUFFIX).unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Arc<Key> {
        Arc::new(Key::parse(&hex::encode([byte; KEY_LEN])).unwrap())
    }

    fn encrypt(plain: &[u8], sealing: &Sealing, chunk: usize) -> Vec<u8> {
        let mut w = EncryptWriter::with_chunk_size(Vec::new(), sealing, chunk).unwrap();
        // Odd-sized writes, so chunk boundaries fall inside them.
        for piece in plain.chunks(7) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap()
    }

    fn decrypt(data: &[u8], key: &Key) -> std::result::Result<Vec<u8>, String> {
        let mut r = DecryptReader::new(data, key)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 5];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => {
                    assert_eq!(r.failure(), Some(e.to_string().as_str()));
                    assert!(r.read(&mut buf).is_err(), "keeps failing");
                    return Err(e.to_string());
                }
            }
        }
    }

    const CHUNK: usize = 16;

    #[test]
    fn round_trips_every_length_around_chunk_boundaries() {
        let k = key(1);
        let sealing = Sealing::fresh(k.clone()).unwrap();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let data = encrypt(&plain, &sealing, CHUNK);
            let chunks = len.div_ceil(CHUNK).max(1); // the last chunk is empty only for empty plaintext
            assert_eq!(data.len(), HEADER_LEN + len + chunks * TAG_LEN, "length {len}");
            assert_eq!(decrypt(&data, &k).unwrap(), plain, "length {len}");
        }
    }

    fn read_at(data: &[u8], key: &Key, range: std::ops::Range<u64>) -> std::result::Result<Vec<u8>, String> {
        let header: [u8; HEADER_LEN] = data[..HEADER_LEN].try_into().unwrap();
        let d = ChunkDecryptor::new(&header, key, data.len() as u64)?;
        let (chunks, at) = d.locate(&range);
        d.decrypt(chunks, &data[at.start as usize..at.end as usize], &range)
    }

    #[test]
    fn any_range_decrypts_from_its_chunks_alone() {
        let k = key(9);
        let sealing = Sealing::fresh(k.clone()).unwrap();
        for len in [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let data = encrypt(&plain, &sealing, CHUNK);
            let header: [u8; HEADER_LEN] = data[..HEADER_LEN].try_into().unwrap();
            assert_eq!(ChunkDecryptor::new(&header, &k, data.len() as u64).unwrap().plain_size(), len as u64);
            for start in 0..len {
                for end in start + 1..=len {
                    let got = read_at(&data, &k, start as u64..end as u64).unwrap();
                    assert_eq!(got, &plain[start..end], "length {len}, bytes {start}..{end}");
                }
            }
        }
        let mut data = encrypt(&[5u8; 3 * CHUNK], &sealing, CHUNK);
        data[HEADER_LEN + CHUNK + TAG_LEN + 2] ^= 1;
        assert!(read_at(&data, &k, 0..CHUNK as u64).is_ok(), "other chunks still read");
        let err = read_at(&data, &k, CHUNK as u64 + 1..CHUNK as u64 + 2).unwrap_err();
        assert_eq!(err, "chunk 1 does not authenticate: the object was altered, truncated or reordered");
        // Cut by one whole chunk, the new last chunk is not flagged as last.
        let whole = encrypt(&[5u8; 3 * CHUNK], &sealing, CHUNK);
        let cut = &whole[..whole.len() - CHUNK - TAG_LEN];
        assert!(read_at(cut, &k, CHUNK as u64..CHUNK as u64 + 1)
            .unwrap_err()
            .starts_with("chunk 1 does not authenticate"));
        assert!(read_at(&data, &key(8), 0..1).unwrap_err().contains("names key id"));
    }

    #[test]
    fn empty_plaintext_is_one_empty_last_chunk() {
        let k = key(2);
        let data = encrypt(b"", &Sealing::fresh(k.clone()).unwrap(), CHUNK_SIZE);
        assert_eq!(data.len(), HEADER_LEN + TAG_LEN);
        assert_eq!(decrypt(&data, &k).unwrap(), b"");
        // Without its one chunk it does not decrypt.
        assert!(decrypt(&data[..HEADER_LEN], &k).unwrap_err().contains("does not authenticate"));
    }

    #[test]
    fn truncation_reordering_and_tampering_are_detected() {
        let k = key(3);
        let plain: Vec<u8> = (0..4 * CHUNK + 3).map(|i| (i * 7) as u8).collect();
        let data = encrypt(&plain, &Sealing::fresh(k.clone()).unwrap(), CHUNK);
        let sealed = CHUNK + TAG_LEN;
        let chunk = |i: usize| &data[HEADER_LEN + i * sealed..(HEADER_LEN + (i + 1) * sealed).min(data.len())];

        // Cut at a chunk boundary: every chunk left authenticates, but none as the last.
        for kept in 1..=4 {
            let cut = &data[..HEADER_LEN + kept * sealed];
            let err = decrypt(cut, &k).unwrap_err();
            assert!(err.contains(&format!("the last chunk {}", kept - 1)), "{kept}: {err}");
        }
        // Cut inside a chunk.
        assert!(decrypt(&data[..data.len() - 1], &k).is_err());
        assert!(decrypt(&data[..HEADER_LEN + sealed + 3], &k).is_err());
        // Two chunks swapped, a chunk dropped, a chunk repeated, bytes appended.
        let rebuilt = |order: &[usize]| {
            let mut out = data[..HEADER_LEN].to_vec();
            for &i in order {
                out.extend_from_slice(chunk(i));
            }
            out
        };
        assert_eq!(decrypt(&rebuilt(&[0, 1, 2, 3, 4]), &k).unwrap(), plain);
        for order in [&[1, 0, 2, 3, 4][..], &[0, 2, 3, 4], &[0, 1, 1, 2, 3, 4], &[0, 1, 2, 3, 4, 4]] {
            let err = decrypt(&rebuilt(order), &k).unwrap_err();
            assert!(err.contains("does not authenticate"), "{order:?}: {err}");
        }
        // Any flipped bit, in a chunk or a tag, or in the nonce of the header (bound as associated data).
        for at in [HEADER_LEN, HEADER_LEN + CHUNK, data.len() - 1, 20] {
            let mut bad = data.clone();
            bad[at] ^= 1;
            assert!(decrypt(&bad, &k).unwrap_err().contains("does not authenticate"), "byte {at}");
        }
        // A header naming another chunk size.
        let mut bad = data.clone();
        bad[HEADER_LEN - 1] ^= 1;
        assert!(decrypt(&bad, &k).is_err());
        bad[HEADER_LEN - 4] = 0xff;
        assert!(decrypt(&bad, &k).unwrap_err().contains("chunk size"));
    }

    #[test]
    fn the_header_names_the_key_and_is_checked_before_decrypting() {
        let (k, other) = (key(4), key(5));
        let data = encrypt(b"secret", &Sealing::fresh(k.clone()).unwrap(), CHUNK);
        assert_eq!(&data[..8], b"KYBENC1\0");
        assert_eq!(&data[8..16], &k.id().0);
        assert_eq!(u32::from_be_bytes(data[35..39].try_into().unwrap()), CHUNK as u32);
        let err = decrypt(&data, &other).unwrap_err();
        assert_eq!(err, format!("its header names key id {}, its record key id {}", k.id(), other.id()));
        assert!(decrypt(b"KYBENC1", &k).unwrap_err().contains("ends inside"));
        assert!(decrypt(&[0u8; 64], &k).unwrap_err().contains("does not start with the KYBENC1 header"));
    }

    /// Pins the format: a fixed key, nonce and plaintext give these exact bytes.
    #[test]
    fn known_answer() {
        let k = key(0x42);
        assert_eq!(k.id().to_string(), hex::encode(&Sha256::digest([KEY_ID_DOMAIN, &[0x42; 32]].concat())[..8]));
        let sealing = Sealing::with_nonce(k.clone(), [7; NONCE_PREFIX_LEN]);
        let data = encrypt(&[0xAA; 40], &sealing, CHUNK);
        assert_eq!(data.len(), HEADER_LEN + 40 + 3 * TAG_LEN);
        assert_eq!(hex::encode(&data[..HEADER_LEN]), format!("4b5942454e433100{}{}00000010", k.id(), "07".repeat(19)));
        assert_eq!(hex::encode(Sha256::digest(&data)), KNOWN_SHA256);
        // Same key, nonce and plaintext: the same bytes (what lets a retried upload resume).
        assert_eq!(encrypt(&[0xAA; 40], &sealing, CHUNK), data);
    }

    /// Computed independently of this crate: HChaCha20 subkey + ChaCha20-Poly1305 (RFC 8439) of
    /// Python's `cryptography`, nonce = prefix | BE32 chunk index | last flag, header as AAD.
    const KNOWN_SHA256: &str = "1bd6e1db46c6e8bf4ccab8d81ba684a2d5757ffff0d62464edae8f645ba383e7";

    #[test]
    fn keys_parse_from_hex_or_base64_and_never_show() {
        let raw = [0x5au8; KEY_LEN];
        let hex_text = hex::encode(raw);
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let a = Key::parse(&format!("  {hex_text}\n")).unwrap();
        let b = Key::parse(&b64).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(format!("{a:?}"), format!("Key({})", a.id()));
        assert!(!format!("{:?}", Keyring::new(Some(Arc::new(a)), vec![Arc::new(b)], false)).contains(&hex_text[..16]));
        for bad in [String::new(), "ab".into(), hex_text[..63].into(), format!("{}zz", &hex_text[..62]), "=".repeat(44)]
        {
            let err = Key::parse(&bad).unwrap_err();
            assert!(bad.len() < 4 || !err.contains(&bad[..4]), "{err}");
        }
        assert!(Key::parse(&hex_text[..63]).unwrap_err().contains("63 characters"));
    }

    #[test]
    fn key_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/archive.key");
        let id = write_new_key(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Key::load(&path).unwrap().id(), id);
        let err = write_new_key(&path).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(Key::load(&path).unwrap().id(), id, "not replaced");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Key::load(&path).unwrap_err().to_string();
        assert!(err.contains("mode 0640") && err.contains(&format!("chmod 600 {}", path.display())), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(Key::load(&path).unwrap().id(), id);

        let short = dir.path().join("short.key");
        std::fs::write(&short, "0123").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Key::load(&short).unwrap_err().to_string();
        assert!(err.contains("4 characters long") && !err.contains("0123"), "{err}");
    }

    #[test]
    fn the_keyring_picks_the_key_by_id_or_names_the_ids() {
        let (new, old, stranger) = (key(6), key(7), key(8));
        let info = |k: &Key| EncryptionInfo { scheme: SCHEME.into(), key_id: k.id() };
        let ring = Keyring::new(Some(new.clone()), vec![old.clone(), new.clone()], false);
        assert_eq!(ring.ids(), vec![new.id(), old.id()]);
        assert_eq!(ring.key_for("k", Some(&info(&old))).unwrap().unwrap().id(), old.id());
        assert!(ring.key_for("k", None).unwrap().is_none());
        match ring.key_for("k", Some(&info(&stranger))).unwrap_err() {
            Error::WrongKey { expected, available, .. } => {
                assert_eq!(expected, stranger.id());
                assert_eq!(available, vec![new.id(), old.id()]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(Keyring::default().key_for("k", Some(&info(&old))), Err(Error::NoDecryptionKey { .. })));
        let strict = Keyring::new(None, vec![], true);
        assert!(matches!(strict.key_for("k", None), Err(Error::NotEncrypted { .. })));
        let future = EncryptionInfo { scheme: "kybenc9".into(), key_id: new.id() };
        assert!(ring.key_for("k", Some(&future)).unwrap_err().to_string().contains("kybenc9"));
    }
}

//! The public name of an archive encryption key ([`KeyId`]), which errors and records carry.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Bytes of a key id.
pub(crate) const KEY_ID_LEN: usize = 8;

/// The public name of a key: the first 8 bytes of SHA-256 over a domain string and the key,
/// shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(pub(crate) [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl TryFrom<String> for KeyId {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        let mut id = [0u8; KEY_ID_LEN];
        hex::decode_to_slice(&s, &mut id).map_err(|_| format!("`{s}` is not a key id (16 hex digits)"))?;
        Ok(KeyId(id))
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.to_string()
    }
}

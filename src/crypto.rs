//! Keys and authenticated encryption.
//!
//! One random 32-byte master key per repository, wrapped by each password
//! with Argon2id + AES-256-GCM. Nothing is ever sealed under the master key
//! itself: every blob gets a key derived from the master key and its own id,
//! and every other object (index segment, snapshot, config, pack blob table)
//! gets a key derived from the master key and a fresh 32-byte random salt.
//! No derived key therefore seals more than a handful of messages, so random
//! 96-bit nonces are far from the 2^32 limit, and the role (data, tree, ...)
//! and id are authenticated as associated data, so a blob cannot be swapped
//! for another.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::TryRng;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::id::{BlobId, BlobKind};

/// Bytes of AES-GCM nonce appended to every sealed message.
pub const NONCE_LEN: usize = 12;
/// Bytes of AES-GCM tag appended to every sealed message.
pub const TAG_LEN: usize = 16;
/// What sealing adds to a plaintext: tag and nonce.
pub const SEAL_OVERHEAD: usize = TAG_LEN + NONCE_LEN;
/// Salt prefixed to sealed objects (index, snapshot, config, pack tables).
pub const SALT_LEN: usize = 32;

const CONTEXT_ID_KEY: &str = "chunkvault 2026-11 blob id key";
const CONTEXT_CHUNKER_SEED: &str = "chunkvault 2026-11 chunker seed";
const CONTEXT_BLOB_KEY: &str = "chunkvault 2026-11 per-blob encryption key";
const CONTEXT_OBJECT_KEY: &str = "chunkvault 2026-11 per-object encryption key";
const KEY_WRAP_AAD: &[u8] = b"chunkvault key file v1";

/// Errors of this module. Deliberately vague about *why* an open failed:
/// a wrong key and tampered bytes look the same to an attacker.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The AES-GCM tag did not verify: wrong key (or password), wrong role
    /// or id, or altered bytes.
    #[error("authentication failed: the data was altered or the key is wrong")]
    Authentication,
    /// The sealed message (its length in bytes given) is shorter than a
    /// nonce and a tag.
    #[error("sealed message too short ({0} bytes)")]
    TooShort(usize),
    /// Argon2id parameters over the allowed maximum (4 GiB, 100 passes,
    /// 64 lanes) or refused by argon2 itself.
    #[error("invalid key derivation parameters: {0}")]
    KdfParams(String),
}

/// What a sealed message is, bound into its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Role {
    /// A data blob (file content chunk).
    Data = 1,
    /// A tree blob.
    Tree = 2,
    /// An index segment object.
    Index = 3,
    /// A snapshot manifest object.
    Snapshot = 4,
    /// The repository config object.
    Config = 5,
    /// The blob table at the end of a pack.
    PackTable = 6,
}

impl From<BlobKind> for Role {
    /// The encryption role of blobs of a kind (bound as associated data).
    fn from(kind: BlobKind) -> Role {
        match kind {
            BlobKind::Data => Role::Data,
            BlobKind::Tree => Role::Tree,
        }
    }
}

impl Role {
    /// Decodes the on-disk byte.
    pub fn from_byte(b: u8) -> Option<Role> {
        Some(match b {
            1 => Role::Data,
            2 => Role::Tree,
            3 => Role::Index,
            4 => Role::Snapshot,
            5 => Role::Config,
            6 => Role::PackTable,
            _ => return None,
        })
    }
}

/// The repository's master secret. Zeroed on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A fresh random master key from the OS generator.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        os_random(&mut k);
        MasterKey(k)
    }

    /// Builds a master key from raw bytes (tests and key unwrapping).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(bytes)
    }

    /// The key of the keyed BLAKE3 that names blobs.
    pub fn id_key(&self) -> IdKey {
        IdKey(blake3::derive_key(CONTEXT_ID_KEY, &self.0))
    }

    /// The seed mixed into the chunker's gear table, so that chunk
    /// boundaries do not leak file contents to someone without the key.
    pub fn chunker_seed(&self) -> u64 {
        let k = blake3::derive_key(CONTEXT_CHUNKER_SEED, &self.0);
        u64::from_le_bytes(k[..8].try_into().expect("8 bytes"))
    }

    fn derive(&self, context: &str, extra: &[u8]) -> Aes256Gcm {
        let mut h = blake3::Hasher::new_derive_key(context);
        h.update(&self.0);
        h.update(extra);
        let mut key = *h.finalize().as_bytes();
        let cipher = Aes256Gcm::new(&key.into());
        key.zeroize();
        cipher
    }

    /// Seals a blob's plaintext in place under the blob's own key; the
    /// buffer becomes `ciphertext || tag || nonce`.
    pub fn seal_blob(&self, role: Role, id: &BlobId, buf: &mut Vec<u8>) {
        let cipher = self.derive(CONTEXT_BLOB_KEY, &id.0);
        seal_in_place(&cipher, &blob_aad(role, id), buf);
    }

    /// Opens what [`MasterKey::seal_blob`] produced, in place.
    pub fn open_blob(&self, role: Role, id: &BlobId, buf: &mut Vec<u8>) -> Result<(), CryptoError> {
        let cipher = self.derive(CONTEXT_BLOB_KEY, &id.0);
        open_in_place(&cipher, &blob_aad(role, id), buf)
    }

    /// Seals a whole object: `salt || ciphertext || tag || nonce`, under a key
    /// derived from a fresh random salt.
    pub fn seal_object(&self, role: Role, plaintext: &[u8]) -> Vec<u8> {
        let mut salt = [0u8; SALT_LEN];
        os_random(&mut salt);
        let cipher = self.derive(CONTEXT_OBJECT_KEY, &salt);
        let mut buf = Vec::with_capacity(SALT_LEN + plaintext.len() + SEAL_OVERHEAD);
        buf.extend_from_slice(plaintext);
        seal_in_place(&cipher, &[role as u8], &mut buf);
        let mut out = Vec::with_capacity(SALT_LEN + buf.len());
        out.extend_from_slice(&salt);
        out.extend_from_slice(&buf);
        out
    }

    /// Opens what [`MasterKey::seal_object`] produced.
    pub fn open_object(&self, role: Role, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < SALT_LEN + SEAL_OVERHEAD {
            return Err(CryptoError::TooShort(sealed.len()));
        }
        let (salt, rest) = sealed.split_at(SALT_LEN);
        let cipher = self.derive(CONTEXT_OBJECT_KEY, salt);
        let mut buf = rest.to_vec();
        open_in_place(&cipher, &[role as u8], &mut buf)?;
        Ok(buf)
    }

    /// Wraps this key under a password for a key file.
    pub fn wrap(&self, password: &[u8], params: KdfParams) -> Result<WrappedKey, CryptoError> {
        let mut salt = [0u8; 16];
        os_random(&mut salt);
        let cipher = password_cipher(password, &salt, &params)?;
        let mut buf = self.0.to_vec();
        seal_in_place(&cipher, KEY_WRAP_AAD, &mut buf);
        Ok(WrappedKey { kdf: params, salt: hex::encode(salt), sealed: hex::encode(&buf) })
    }
}

/// The key naming blobs (keyed BLAKE3).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct IdKey([u8; 32]);

impl IdKey {
    /// An id key handed to a device for source-side dedup.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        IdKey(bytes)
    }

    /// The raw key, to hand to a device of the repository's tenant.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id of a blob's plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.0, plaintext).as_bytes())
    }
}

/// Argon2id cost parameters, kept in each key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
///
/// Unwrapping refuses a key file over 4 GiB of memory, 100 passes or 64
/// lanes, so a hostile key file cannot exhaust the machine.
pub struct KdfParams {
    /// Memory cost in KiB (argon2's `m`).
    pub memory_kib: u32,
    /// Number of passes over the memory (argon2's `t`).
    pub iterations: u32,
    /// Number of lanes (argon2's `p`); the lanes are filled in parallel.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 4 lanes: the second recommended setting of RFC 9106.
    /// The lanes are filled in parallel, so opening a repository costs about
    /// 40 ms of wall time on two cores instead of 80 ms with one lane, while
    /// a guess still costs an attacker the whole 64 MiB x 3 passes.
    fn default() -> Self {
        KdfParams { memory_kib: 64 * 1024, iterations: 3, parallelism: 4 }
    }
}

impl KdfParams {
    /// Refuses parameters that a hostile key file could use to exhaust memory.
    fn check(&self) -> Result<(), CryptoError> {
        if self.memory_kib > 4 * 1024 * 1024 || self.iterations > 100 || self.parallelism > 64 {
            return Err(CryptoError::KdfParams(format!("{self:?} exceeds the allowed maximum")));
        }
        Ok(())
    }
}

/// The master key as stored in a key file.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WrappedKey {
    /// The Argon2id cost the password was stretched with.
    pub kdf: KdfParams,
    /// Argon2 salt, hex.
    pub salt: String,
    /// `ciphertext || tag || nonce` of the master key, hex.
    pub sealed: String,
}

impl WrappedKey {
    /// Recovers the master key, or `Authentication` for a wrong password.
    pub fn unwrap_key(&self, password: &[u8]) -> Result<MasterKey, CryptoError> {
        let salt = hex::decode(&self.salt).map_err(|_| CryptoError::Authentication)?;
        let mut buf = hex::decode(&self.sealed).map_err(|_| CryptoError::Authentication)?;
        if salt.len() < 8 || buf.len() != 32 + SEAL_OVERHEAD {
            return Err(CryptoError::Authentication);
        }
        let cipher = password_cipher(password, &salt, &self.kdf)?;
        open_in_place(&cipher, KEY_WRAP_AAD, &mut buf)?;
        let key: [u8; 32] = buf[..32].try_into().expect("32 bytes");
        buf.zeroize();
        Ok(MasterKey(key))
    }
}

fn password_cipher(password: &[u8], salt: &[u8], p: &KdfParams) -> Result<Aes256Gcm, CryptoError> {
    let mut key = password_key(password, salt, p)?;
    let cipher = Aes256Gcm::new(&key.into());
    key.zeroize();
    Ok(cipher)
}

/// Argon2id (version 0x13) of the password: the key that wraps the master key.
fn password_key(password: &[u8], salt: &[u8], p: &KdfParams) -> Result<[u8; 32], CryptoError> {
    p.check()?;
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| CryptoError::KdfParams(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    argon.hash_password_into(password, salt, &mut key).map_err(|e| CryptoError::KdfParams(e.to_string()))?;
    Ok(key)
}

fn blob_aad(role: Role, id: &BlobId) -> [u8; 33] {
    let mut aad = [0u8; 33];
    aad[0] = role as u8;
    aad[1..].copy_from_slice(&id.0);
    aad
}

/// Fills `buf` from the operating system's generator: keys, salts and nonces
/// come straight from the kernel, never from a user-space generator that a
/// fork could duplicate.
fn os_random(buf: &mut [u8]) {
    rand::rngs::SysRng.try_fill_bytes(buf).expect("the OS random number generator failed");
}

fn seal_in_place(cipher: &Aes256Gcm, aad: &[u8], buf: &mut Vec<u8>) {
    let mut nonce = [0u8; NONCE_LEN];
    os_random(&mut nonce);
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(nonce), aad, buf.as_mut_slice().into())
        .expect("AES-GCM accepts any message below 64 GiB");
    buf.reserve(SEAL_OVERHEAD);
    buf.extend_from_slice(&tag);
    buf.extend_from_slice(&nonce);
}

fn open_in_place(cipher: &Aes256Gcm, aad: &[u8], buf: &mut Vec<u8>) -> Result<(), CryptoError> {
    if buf.len() < SEAL_OVERHEAD {
        return Err(CryptoError::TooShort(buf.len()));
    }
    let body_len = buf.len() - SEAL_OVERHEAD;
    let nonce = Nonce::try_from(&buf[body_len + TAG_LEN..]).expect("the length was checked above");
    let tag = Tag::try_from(&buf[body_len..body_len + TAG_LEN]).expect("the length was checked above");
    buf.truncate(body_len);
    cipher.decrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into(), &tag).map_err(|_| CryptoError::Authentication)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fast_kdf() -> KdfParams {
        KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 }
    }

    proptest! {
        #[test]
        fn blob_seal_open_roundtrip(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let key = MasterKey::generate();
            let id = key.id_key().blob_id(&data);
            let mut buf = data.clone();
            key.seal_blob(Role::Data, &id, &mut buf);
            prop_assert_eq!(buf.len(), data.len() + SEAL_OVERHEAD);
            key.open_blob(Role::Data, &id, &mut buf).unwrap();
            prop_assert_eq!(buf, data);
        }

        #[test]
        fn blob_tamper_is_detected(data in proptest::collection::vec(any::<u8>(), 1..2048), pos in any::<usize>(), bit in 0u8..8) {
            let key = MasterKey::generate();
            let id = key.id_key().blob_id(&data);
            let mut buf = data.clone();
            key.seal_blob(Role::Data, &id, &mut buf);
            let pos = pos % buf.len();
            buf[pos] ^= 1 << bit;
            prop_assert!(key.open_blob(Role::Data, &id, &mut buf).is_err());
        }

        #[test]
        fn object_roundtrip_and_tamper(data in proptest::collection::vec(any::<u8>(), 0..2048), pos in any::<usize>()) {
            let key = MasterKey::generate();
            let sealed = key.seal_object(Role::Index, &data);
            prop_assert_eq!(key.open_object(Role::Index, &sealed).unwrap(), data);
            let mut bad = sealed.clone();
            let pos = pos % bad.len();
            bad[pos] ^= 0x40;
            prop_assert!(key.open_object(Role::Index, &bad).is_err());
        }
    }

    #[test]
    fn blob_cannot_be_swapped_for_other_id_or_role() {
        let key = MasterKey::generate();
        let id = key.id_key().blob_id(b"hello");
        let other = key.id_key().blob_id(b"world");
        let mut buf = b"hello".to_vec();
        key.seal_blob(Role::Data, &id, &mut buf);
        assert!(key.open_blob(Role::Data, &other, &mut buf.clone()).is_err());
        assert!(key.open_blob(Role::Tree, &id, &mut buf.clone()).is_err());
        let sealed = key.seal_object(Role::Snapshot, b"{}");
        assert!(key.open_object(Role::Index, &sealed).is_err());
    }

    #[test]
    fn different_master_keys_do_not_open_each_other() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        let sealed = a.seal_object(Role::Config, b"config");
        assert!(b.open_object(Role::Config, &sealed).is_err());
        assert_ne!(a.id_key().blob_id(b"x"), b.id_key().blob_id(b"x"));
    }

    #[test]
    fn password_wrap_roundtrip_and_wrong_password() {
        let key = MasterKey::generate();
        let wrapped = key.wrap(b"correct horse", fast_kdf()).unwrap();
        let back = wrapped.unwrap_key(b"correct horse").unwrap();
        assert_eq!(back.0, key.0);
        assert!(matches!(wrapped.unwrap_key(b"wrong"), Err(CryptoError::Authentication)));
    }

    #[test]
    fn password_key_matches_the_reference_argon2id() {
        // Outputs of the reference C implementation (libargon2 through
        // Python's argon2-cffi, hash_secret_raw with type ID), one lane and
        // four: key files made with either setting, by any version of
        // chunkvault or of the argon2 crate, must keep opening.
        let (pw, salt) = (b"correct horse battery staple", b"chunkvault-salt!");
        for (lanes, expected) in [
            (1, "b8908566ee08ae52be13b30c5b3f5ed74295c16269b892fadd662aab5b526306"),
            (4, "bc7b36a2112fc3371512afde8f6659f6e0259d85cc3e390aa643018bbb594346"),
        ] {
            let params = KdfParams { memory_kib: 256, iterations: 2, parallelism: lanes };
            assert_eq!(hex::encode(password_key(pw, salt, &params).unwrap()), expected, "{lanes} lanes");
        }
    }

    #[test]
    fn hostile_kdf_params_are_refused() {
        let key = MasterKey::generate();
        let mut wrapped = key.wrap(b"pw", fast_kdf()).unwrap();
        wrapped.kdf.memory_kib = u32::MAX;
        assert!(matches!(wrapped.unwrap_key(b"pw"), Err(CryptoError::KdfParams(_))));
    }
}

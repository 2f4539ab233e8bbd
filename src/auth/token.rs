//! Token formats, sans I/O.
//!
//! Two kinds of secret tokens (deployment and device) are 32 random bytes
//! behind a kind prefix; the registry stores only their keyed hash. Session
//! tokens are claims signed with Ed25519, so a storage node can verify them
//! with the auth role's public key alone:
//!
//! `cvs1.<base64url(claims)>.<base64url(signature over "cvs1." + claims)>`
//!
//! where claims are `u8 len + tenant, u8 len + user, u8 len + device,
//! i64 LE expiry (unix seconds), 16-byte token id`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use subtle::ConstantTimeEq;

const SESSION_PREFIX: &str = "cvs1.";
/// Longest session token accepted (bounds decoding work).
const MAX_SESSION_TOKEN: usize = 1024;
const HASH_CONTEXT: &str = "chunkvault 2026-11 secret token hash";

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

/// Which secret a random token is; the prefix stops one kind being used as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    Deployment,
    Device,
}

impl SecretKind {
    fn prefix(self) -> &'static str {
        match self {
            SecretKind::Deployment => "cvdt_",
            SecretKind::Device => "cvdv_",
        }
    }
}

/// A freshly generated secret token: give `text` out once, store `hash`.
pub struct NewSecret {
    pub text: String,
    pub hash: [u8; 32],
}

/// Makes a random secret token of a kind.
pub fn new_secret(kind: SecretKind) -> NewSecret {
    let bytes: [u8; 32] = rand::random();
    NewSecret { text: format!("{}{}", kind.prefix(), URL_SAFE_NO_PAD.encode(bytes)), hash: hash_secret(&bytes) }
}

/// Parses a secret token of `kind` and returns the hash it is stored under.
pub fn secret_hash(kind: SecretKind, text: &str) -> Result<[u8; 32], TokenError> {
    let body = text.strip_prefix(kind.prefix()).ok_or(TokenError::Malformed)?;
    if body.len() != 43 {
        return Err(TokenError::Malformed);
    }
    let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| TokenError::Malformed)?;
    let bytes: [u8; 32] = raw.try_into().map_err(|_| TokenError::Malformed)?;
    Ok(hash_secret(&bytes))
}

fn hash_secret(bytes: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key(HASH_CONTEXT, bytes)
}

/// Compares two stored hashes in constant time.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// What a session token asserts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionClaims {
    pub tenant: String,
    pub user: String,
    pub device: String,
    /// Unix seconds.
    pub expires: i64,
    pub token_id: [u8; 16],
}

impl SessionClaims {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.tenant.len() + self.user.len() + self.device.len() + 24);
        for s in [&self.tenant, &self.user, &self.device] {
            // Fields are validated to be short (<= 254 bytes) before signing.
            out.push(s.len().min(255) as u8);
            out.extend_from_slice(&s.as_bytes()[..s.len().min(255)]);
        }
        out.extend_from_slice(&self.expires.to_le_bytes());
        out.extend_from_slice(&self.token_id);
        out
    }

    fn decode(mut b: &[u8]) -> Result<SessionClaims, TokenError> {
        let mut field = || -> Result<String, TokenError> {
            let (&len, rest) = b.split_first().ok_or(TokenError::Malformed)?;
            let (s, rest) = rest.split_at_checked(len as usize).ok_or(TokenError::Malformed)?;
            b = rest;
            String::from_utf8(s.to_vec()).map_err(|_| TokenError::Malformed)
        };
        let (tenant, user, device) = (field()?, field()?, field()?);
        if b.len() != 24 {
            return Err(TokenError::Malformed);
        }
        let expires = i64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let token_id = b[8..].try_into().expect("16 bytes");
        Ok(SessionClaims { tenant, user, device, expires, token_id })
    }
}

/// Signs session tokens (the auth role).
pub struct SessionSigner {
    key: SigningKey,
}

impl SessionSigner {
    pub fn new(secret: [u8; 32]) -> Self {
        SessionSigner { key: SigningKey::from_bytes(&secret) }
    }

    pub fn verifier(&self) -> SessionVerifier {
        SessionVerifier { key: self.key.verifying_key() }
    }

    pub fn sign(&self, claims: &SessionClaims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(claims.encode());
        let signed = format!("{SESSION_PREFIX}{payload}");
        let sig = self.key.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}

/// Verifies session tokens with the auth role's public key (storage nodes).
#[derive(Clone)]
pub struct SessionVerifier {
    key: VerifyingKey,
}

impl SessionVerifier {
    pub fn from_public_hex(hex_key: &str) -> Result<Self, TokenError> {
        let bytes = crate::id::parse_hex32(hex_key).map_err(|_| TokenError::Malformed)?;
        VerifyingKey::from_bytes(&bytes).map(|key| SessionVerifier { key }).map_err(|_| TokenError::Malformed)
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    /// Parses and verifies a token; `now` in unix seconds.
    pub fn verify(&self, token: &str, now: i64) -> Result<SessionClaims, TokenError> {
        if token.len() > MAX_SESSION_TOKEN {
            return Err(TokenError::Malformed);
        }
        let (signed, sig_text) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let payload = signed.strip_prefix(SESSION_PREFIX).ok_or(TokenError::Malformed)?;
        let sig_bytes: [u8; 64] = URL_SAFE_NO_PAD
            .decode(sig_text)
            .map_err(|_| TokenError::Malformed)?
            .try_into()
            .map_err(|_| TokenError::Malformed)?;
        let claims_bytes = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed)?;
        self.key.verify(signed.as_bytes(), &Signature::from_bytes(&sig_bytes)).map_err(|_| TokenError::BadSignature)?;
        // Decode only what verified: the parser never sees forged bytes' claims.
        let claims = SessionClaims::decode(&claims_bytes)?;
        if claims.expires <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claims(expires: i64) -> SessionClaims {
        SessionClaims {
            tenant: "acme".into(),
            user: "a@acme.com".into(),
            device: "phone-1".into(),
            expires,
            token_id: [9; 16],
        }
    }

    #[test]
    fn session_token_verifies_and_expires() {
        let signer = SessionSigner::new([1; 32]);
        let t = signer.sign(&claims(100));
        assert_eq!(signer.verifier().verify(&t, 99).unwrap(), claims(100));
        assert_eq!(signer.verifier().verify(&t, 100), Err(TokenError::Expired));
    }

    #[test]
    fn forged_truncated_and_foreign_tokens_are_refused() {
        let signer = SessionSigner::new([1; 32]);
        let t = signer.sign(&claims(100));
        let other = SessionSigner::new([2; 32]).verifier();
        assert_eq!(other.verify(&t, 0), Err(TokenError::BadSignature));
        assert!(signer.verifier().verify(&t[..t.len() - 3], 0).is_err());
        assert_eq!(signer.verifier().verify("cvs1.", 0), Err(TokenError::Malformed));
        // Change the claims but keep the signature.
        let forged_claims = URL_SAFE_NO_PAD.encode(claims(i64::MAX).encode());
        let sig = t.rsplit_once('.').unwrap().1;
        let forged = format!("{SESSION_PREFIX}{forged_claims}.{sig}");
        assert_eq!(signer.verifier().verify(&forged, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn public_key_roundtrips_through_hex() {
        let signer = SessionSigner::new([3; 32]);
        let v = SessionVerifier::from_public_hex(&signer.verifier().public_hex()).unwrap();
        assert!(v.verify(&signer.sign(&claims(10)), 0).is_ok());
    }

    #[test]
    fn secret_tokens_hash_by_kind() {
        let s = new_secret(SecretKind::Device);
        assert_eq!(secret_hash(SecretKind::Device, &s.text).unwrap(), s.hash);
        assert_eq!(secret_hash(SecretKind::Deployment, &s.text), Err(TokenError::Malformed));
        assert_eq!(secret_hash(SecretKind::Device, &s.text[..s.text.len() - 1]), Err(TokenError::Malformed));
        assert!(hashes_equal(&s.hash, &s.hash));
        assert!(!hashes_equal(&s.hash, &[0; 32]));
    }

    proptest! {
        #[test]
        fn claims_roundtrip(tenant in "[a-z]{1,64}", user in ".{1,60}", device in "[a-z0-9]{1,128}", expires in any::<i64>(), id in any::<[u8; 16]>()) {
            let c = SessionClaims { tenant, user, device, expires, token_id: id };
            prop_assert_eq!(SessionClaims::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn parsers_never_panic(text in ".{0,300}") {
            let v = SessionSigner::new([1; 32]).verifier();
            let _ = v.verify(&text, 0);
            let _ = secret_hash(SecretKind::Device, &text);
            let _ = SessionClaims::decode(text.as_bytes());
        }
    }
}

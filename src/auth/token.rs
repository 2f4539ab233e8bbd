//! Token formats, sans I/O.
//!
//! Three kinds of secret tokens (deployment, device, admin) are 32 random bytes
//! behind a kind prefix; the registry stores only their keyed hash. Session
//! tokens are claims signed with Ed25519, so a storage node can verify them
//! with the auth role's public key alone:
//!
//! `cvs2.<base64url(claims)>.<base64url(signature over "cvs2." + claims)>`
//!
//! where claims are `u8 len + tenant, u8 len + user, u8 len + device,
//! i64 LE expiry (unix seconds), 16-byte token id, u32 LE generation,
//! u8 policy bits` (bit 0 allowRestoreToOtherDevice, bit 1 allowOpenIn).
//!
//! `cvs1.` tokens (no generation, no policies) are still verified, as
//! generation 0 with every policy allowed, which is what they meant when they
//! were issued: storage nodes can be upgraded before the auth role.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use subtle::ConstantTimeEq;

use crate::api::Policies;

const SESSION_PREFIX: &str = "cvs2.";
/// Claims without generation and policies, from before they existed.
const SESSION_PREFIX_V1: &str = "cvs1.";
/// Longest session token accepted (bounds decoding work).
const MAX_SESSION_TOKEN: usize = 1024;
const HASH_CONTEXT: &str = "chunkvault 2026-11 secret token hash";

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token of the expected kind and shape: a wrong prefix, bad
    /// base64url, a wrong length, a session token over 1024 bytes, or claims
    /// that do not decode.
    #[error("malformed token")]
    Malformed,
    /// A session token whose signature does not verify with this key: forged,
    /// altered, or signed by another auth role's key.
    #[error("token signature does not verify")]
    BadSignature,
    /// A session token at or past its expiry.
    #[error("token expired")]
    Expired,
}

/// Which secret a random token is; the prefix stops one kind being used as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// A mass deployment token (`cvdt_`), which activates devices.
    Deployment,
    /// A device's own token (`cvdv_`), which starts sessions.
    Device,
    /// A scoped administrator's token (`admin token create`).
    Admin,
}

impl SecretKind {
    fn prefix(self) -> &'static str {
        match self {
            SecretKind::Deployment => "cvdt_",
            SecretKind::Device => "cvdv_",
            SecretKind::Admin => "cvad_",
        }
    }
}

/// A freshly generated secret token: give `text` out once, store `hash`.
pub struct NewSecret {
    /// The token to hand out once: the kind's prefix and 43 base64url
    /// characters (32 random bytes).
    pub text: String,
    /// The keyed BLAKE3 hash of the random bytes, which is all the registry
    /// stores.
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
    /// The device's tenant.
    pub tenant: String,
    /// The email the device activated with.
    pub user: String,
    /// The device id.
    pub device: String,
    /// Unix seconds.
    pub expires: i64,
    /// A random id for this session: storage nodes tell sessions apart by it
    /// (the first request of a new one refreshes the tenant's index; the
    /// metrics count active sessions). Not checked against anything.
    pub token_id: [u8; 16],
    /// Which activation of the device id the session belongs to: a reset
    /// voids the sessions of earlier ones.
    pub generation: u32,
    /// The device's policies, enforced by storage nodes.
    pub policies: Policies,
}

const POLICY_RESTORE_TO_OTHER_DEVICE: u8 = 1;
const POLICY_OPEN_IN: u8 = 2;

impl SessionClaims {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.tenant.len() + self.user.len() + self.device.len() + 29);
        for s in [&self.tenant, &self.user, &self.device] {
            // Fields are validated to be short (<= 254 bytes) before signing.
            out.push(s.len().min(255) as u8);
            out.extend_from_slice(&s.as_bytes()[..s.len().min(255)]);
        }
        out.extend_from_slice(&self.expires.to_le_bytes());
        out.extend_from_slice(&self.token_id);
        out.extend_from_slice(&self.generation.to_le_bytes());
        let p = self.policies;
        let bits = if p.allow_restore_to_other_device { POLICY_RESTORE_TO_OTHER_DEVICE } else { 0 }
            | if p.allow_open_in { POLICY_OPEN_IN } else { 0 };
        out.push(bits);
        out
    }

    /// Decodes `cvs2` claims, or `cvs1` claims when `v1`.
    fn decode(mut b: &[u8], v1: bool) -> Result<SessionClaims, TokenError> {
        let mut field = || -> Result<String, TokenError> {
            let (&len, rest) = b.split_first().ok_or(TokenError::Malformed)?;
            let (s, rest) = rest.split_at_checked(len as usize).ok_or(TokenError::Malformed)?;
            b = rest;
            String::from_utf8(s.to_vec()).map_err(|_| TokenError::Malformed)
        };
        let (tenant, user, device) = (field()?, field()?, field()?);
        if b.len() != if v1 { 24 } else { 29 } {
            return Err(TokenError::Malformed);
        }
        let expires = i64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let token_id = b[8..24].try_into().expect("16 bytes");
        let (generation, policies) = if v1 {
            (0, Policies::default())
        } else {
            let bits = b[28];
            if bits & !(POLICY_RESTORE_TO_OTHER_DEVICE | POLICY_OPEN_IN) != 0 {
                return Err(TokenError::Malformed);
            }
            let policies = Policies {
                allow_restore_to_other_device: bits & POLICY_RESTORE_TO_OTHER_DEVICE != 0,
                allow_open_in: bits & POLICY_OPEN_IN != 0,
            };
            (u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")), policies)
        };
        Ok(SessionClaims { tenant, user, device, expires, token_id, generation, policies })
    }
}

/// Signs session tokens (the auth role).
pub struct SessionSigner {
    key: SigningKey,
}

impl SessionSigner {
    /// A signer from the 32-byte Ed25519 secret key (the registry's
    /// `signing_secret`).
    pub fn new(secret: [u8; 32]) -> Self {
        SessionSigner { key: SigningKey::from_bytes(&secret) }
    }

    /// The verifier of this signer's tokens (its public key).
    pub fn verifier(&self) -> SessionVerifier {
        SessionVerifier { key: self.key.verifying_key() }
    }

    /// Signs `claims` into a `cvs2.` token. Never fails: `tenant`, `user` and
    /// `device` must each be at most 255 bytes (the API's checks keep them
    /// shorter), or they are cut.
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
    /// A verifier from the auth role's public key as 64 hex digits
    /// ([`public_hex`](Self::public_hex), served at `GET /v1/session-key`);
    /// `Malformed` if it is not a valid Ed25519 key.
    pub fn from_public_hex(hex_key: &str) -> Result<Self, TokenError> {
        let bytes = crate::id::parse_hex32(hex_key).map_err(|_| TokenError::Malformed)?;
        VerifyingKey::from_bytes(&bytes).map(|key| SessionVerifier { key }).map_err(|_| TokenError::Malformed)
    }

    /// The public key as 64 lowercase hex digits.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    /// Parses and verifies a token; `now` in unix seconds.
    pub fn verify(&self, token: &str, now: i64) -> Result<SessionClaims, TokenError> {
        if token.len() > MAX_SESSION_TOKEN {
            return Err(TokenError::Malformed);
        }
        let (signed, sig_text) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (payload, v1) = match signed.strip_prefix(SESSION_PREFIX) {
            Some(p) => (p, false),
            None => (signed.strip_prefix(SESSION_PREFIX_V1).ok_or(TokenError::Malformed)?, true),
        };
        let sig_bytes: [u8; 64] = URL_SAFE_NO_PAD
            .decode(sig_text)
            .map_err(|_| TokenError::Malformed)?
            .try_into()
            .map_err(|_| TokenError::Malformed)?;
        let claims_bytes = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed)?;
        self.key.verify(signed.as_bytes(), &Signature::from_bytes(&sig_bytes)).map_err(|_| TokenError::BadSignature)?;
        // Decode only what verified: the parser never sees forged bytes' claims.
        // The prefix is signed, so a v2 payload cannot be passed off as v1.
        let claims = SessionClaims::decode(&claims_bytes, v1)?;
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
            generation: 3,
            policies: Policies { allow_restore_to_other_device: false, allow_open_in: true },
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
    fn version_1_tokens_still_verify_with_every_policy_allowed() {
        let signer = SessionSigner::new([1; 32]);
        // A token as the previous auth role signed it: no generation, no policies.
        let c = claims(100);
        let mut v1 = c.encode();
        v1.truncate(v1.len() - 5);
        let signed = format!("{SESSION_PREFIX_V1}{}", URL_SAFE_NO_PAD.encode(&v1));
        let sig = signer.key.sign(signed.as_bytes());
        let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()));
        let got = signer.verifier().verify(&token, 0).unwrap();
        assert_eq!(got, SessionClaims { generation: 0, policies: Policies::default(), ..c });
        // A v2 payload under a v1 prefix (or the reverse) does not verify.
        let t = signer.sign(&claims(100));
        let swapped = t.replacen(SESSION_PREFIX, SESSION_PREFIX_V1, 1);
        assert_eq!(signer.verifier().verify(&swapped, 0), Err(TokenError::BadSignature));
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
        fn claims_roundtrip(
            tenant in "[a-z]{1,64}", user in ".{1,60}", device in "[a-z0-9]{1,128}", expires in any::<i64>(),
            id in any::<[u8; 16]>(), generation in any::<u32>(), r in any::<bool>(), o in any::<bool>(),
        ) {
            let policies = Policies { allow_restore_to_other_device: r, allow_open_in: o };
            let c = SessionClaims { tenant, user, device, expires, token_id: id, generation, policies };
            prop_assert_eq!(SessionClaims::decode(&c.encode(), false).unwrap(), c);
        }

        #[test]
        fn parsers_never_panic(text in ".{0,300}") {
            let v = SessionSigner::new([1; 32]).verifier();
            let _ = v.verify(&text, 0);
            let _ = secret_hash(SecretKind::Device, &text);
            let _ = SessionClaims::decode(text.as_bytes(), false);
            let _ = SessionClaims::decode(text.as_bytes(), true);
        }
    }
}

//! PURE: signing events in the Standard Webhooks format
//! (<https://www.standardwebhooks.com/>), so a receiver can check that an
//! event came from us and was not altered.
//!
//! Three headers go with each request: `webhook-id` (the CloudEvent's id),
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`, a
//! space-separated list of `v1,<base64 HMAC-SHA256>` over
//! `id.timestamp.body`, one per signing secret. Two secrets at once is how a
//! rotation goes: a receiver accepts a request if any signature matches one
//! of its secrets, so the new secret is added here, then at the receiver,
//! then the old one is removed here.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;

/// The header carrying the message id.
pub const WEBHOOK_ID: &str = "webhook-id";
/// The header carrying the signing time, Unix seconds.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// The header carrying the signatures.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// The prefix Standard Webhooks gives a secret's base64.
pub const SECRET_PREFIX: &str = "whsec_";

/// The spec asks for secrets of 24 to 64 bytes; shorter ones are guessable.
const MIN_SECRET_BYTES: usize = 24;
const MAX_SECRET_BYTES: usize = 64;

/// The secrets requests are signed with, in the order given.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "Signer({} secrets)", self.keys.len())
    }
}

impl Signer {
    /// Parses secrets separated by whitespace (a file may hold one per
    /// line), each `whsec_<base64>` or bare base64. The error names the
    /// secret by position only, never its value.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (index, secret) in text.split_whitespace().enumerate() {
            let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
            let bytes = BASE64
                .decode(encoded)
                .map_err(|e| format!("secret {} is not base64: {e}", index + 1))?;
            if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&bytes.len()) {
                return Err(format!(
                    "secret {} is {} bytes; Standard Webhooks secrets are {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}",
                    index + 1,
                    bytes.len()
                ));
            }
            keys.push(hmac::Key::new(hmac::HMAC_SHA256, &bytes));
        }
        if keys.is_empty() {
            return Err("no signing secret in it".to_owned());
        }
        Ok(Self { keys })
    }

    /// The `webhook-signature` value for a message.
    pub fn signature(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut content = Vec::with_capacity(id.len() + body.len() + 24);
        content.extend_from_slice(id.as_bytes());
        content.push(b'.');
        content.extend_from_slice(timestamp.to_string().as_bytes());
        content.push(b'.');
        content.extend_from_slice(body);
        self.keys
            .iter()
            .map(|key| format!("v1,{}", BASE64.encode(hmac::sign(key, &content))))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification and its reference
    /// libraries' tests.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: u64 = 1_614_265_330;
    const SPEC_BODY: &str = r#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specification_example_as_the_specification_does() {
        let signer = Signer::parse(SPEC_SECRET).unwrap();
        assert_eq!(
            signer.signature(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY.as_bytes()),
            SPEC_SIGNATURE
        );
    }

    #[test]
    fn two_secrets_give_two_signatures_in_their_order() {
        let other = format!("{SECRET_PREFIX}{}", BASE64.encode([7u8; 32]));
        let signer = Signer::parse(&format!("{other}\n{SPEC_SECRET}\n")).unwrap();
        let signature = signer.signature(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY.as_bytes());
        let parts: Vec<&str> = signature.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_ne!(parts[0], SPEC_SIGNATURE);
        assert_eq!(parts[1], SPEC_SIGNATURE);
    }

    #[test]
    fn a_bare_base64_secret_is_the_same_secret() {
        let bare = SPEC_SECRET.strip_prefix(SECRET_PREFIX).unwrap();
        let signer = Signer::parse(bare).unwrap();
        assert_eq!(
            signer.signature(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY.as_bytes()),
            SPEC_SIGNATURE
        );
    }

    #[test]
    fn bad_secrets_are_refused_without_printing_them() {
        for (text, says) in [
            ("", "no signing secret"),
            ("  \n ", "no signing secret"),
            ("whsec_!!!", "secret 1 is not base64"),
            ("whsec_c2hvcnQ=", "secret 1 is 5 bytes"),
        ] {
            let error = Signer::parse(text).unwrap_err();
            assert!(error.contains(says), "{text:?}: {error}");
            assert!(!error.contains("c2hvcnQ"), "{error}");
        }
        let error = Signer::parse(&format!("{SPEC_SECRET} nope")).unwrap_err();
        assert!(error.contains("secret 2"), "{error}");
    }

    #[test]
    fn debug_output_hides_the_keys() {
        let signer = Signer::parse(SPEC_SECRET).unwrap();
        assert_eq!(format!("{signer:?}"), "Signer(1 secrets)");
    }
}

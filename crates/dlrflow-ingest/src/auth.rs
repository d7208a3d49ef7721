//! Webhook authentication: HTTP Basic as RFC 7617 defines it, or a secret
//! path token, always compared in constant time against every active secret
//! (lengths too: both sides are compared as SHA-256 digests, so a guess of
//! the wrong length takes as long as one of the right length).

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use dlrflow_runtime::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::config::{Credential, SourceConfig};

const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Parses an `Authorization` header value as HTTP Basic credentials.
///
/// The scheme is case-insensitive; the credentials are base64 of UTF-8
/// `user-id ":" password`, where the password is everything after the first
/// colon and may itself contain colons.
pub fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = BASE64.decode(token.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// True when the header carries one of `credentials`. Every credential is
/// compared, whatever matched earlier, so timing reveals nothing about which
/// part of which secret was right.
pub fn basic_matches(value: Option<&[u8]>, credentials: &[Credential]) -> bool {
    let Some((user, password)) = value.and_then(parse_basic) else {
        return false;
    };
    let mut ok = Choice::from(0);
    for c in credentials {
        let user_ok = same(user.as_bytes(), c.username.as_bytes());
        let pass_ok = same(password.as_bytes(), c.password.expose_secret().as_bytes());
        ok |= user_ok & pass_ok;
    }
    ok.into()
}

/// True when `token` is one of the source's active path tokens.
pub fn path_token_matches(token: &str, source: &SourceConfig) -> bool {
    let mut ok = Choice::from(0);
    for t in &source.path_tokens {
        ok |= same(token.as_bytes(), t.expose_secret().as_bytes());
    }
    ok.into()
}

/// Equality in time independent of where the two differ and of their
/// lengths: `subtle` compares slices of different lengths in no time at all.
fn same(given: &[u8], secret: &[u8]) -> Choice {
    Sha256::digest(given)
        .as_slice()
        .ct_eq(Sha256::digest(secret).as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlrflow_runtime::Secret;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn cred(u: &str, p: &str) -> Credential {
        Credential {
            username: u.into(),
            password: Secret::new(p),
        }
    }

    #[test]
    fn parses_per_rfc_7617() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (&format!("Basic {}", b64("u:p")), Some(("u", "p"))),
            (&format!("basic {}", b64("u:p")), Some(("u", "p"))),
            (&format!("BASIC   {}", b64("u:p")), Some(("u", "p"))),
            (&format!("Basic {}", b64("u:pa:ss:")), Some(("u", "pa:ss:"))),
            (&format!("Basic {}", b64("ünï:cødé")), Some(("ünï", "cødé"))),
            (&format!("Basic {}", b64("u:")), Some(("u", ""))),
            (
                &format!("Basic {}", b64("u:p").trim_end_matches('=')),
                Some(("u", "p")),
            ),
            (&format!("Bearer {}", b64("u:p")), None),
            ("Basic !!!notbase64", None),
            (&format!("Basic {}", b64("no-colon")), None),
            ("Basic", None),
            ("", None),
        ];
        for (header, want) in cases {
            let got = parse_basic(header.as_bytes());
            let want = want.map(|(u, p)| (u.to_owned(), p.to_owned()));
            assert_eq!(got, want, "{header}");
        }
        // Not UTF-8 inside the base64.
        let latin1 = base64::engine::general_purpose::STANDARD.encode([b'u', b':', 0xff]);
        assert_eq!(parse_basic(format!("Basic {latin1}").as_bytes()), None);
    }

    #[test]
    fn any_active_credential_matches_and_near_misses_do_not() {
        let creds = [cred("hook", "old-secret"), cred("hook", "new:secret")];
        let header = |u: &str, p: &str| format!("Basic {}", b64(&format!("{u}:{p}")));
        assert!(basic_matches(
            Some(header("hook", "old-secret").as_bytes()),
            &creds
        ));
        assert!(basic_matches(
            Some(header("hook", "new:secret").as_bytes()),
            &creds
        ));
        assert!(!basic_matches(
            Some(header("hook", "old-secre").as_bytes()),
            &creds
        ));
        assert!(!basic_matches(
            Some(header("hook", "old-secretX").as_bytes()),
            &creds
        ));
        assert!(!basic_matches(
            Some(header("hoo", "old-secret").as_bytes()),
            &creds
        ));
        assert!(!basic_matches(None, &creds));
    }
}

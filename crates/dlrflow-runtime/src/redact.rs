//! What a service prints never holds a secret.
//!
//! Every text that may carry something from outside — an error of Redis,
//! PostgreSQL, Kafka, HTTP or the configuration, a readiness reason, a job's
//! `last_error`, the process's exit error — passes through [`scrub`] before it
//! is logged, stored or served. [`scrub`] replaces
//!
//! * every secret [`register`]ed (each service registers its own at load:
//!   API keys, credentials, path tokens, `kafka.settings` secrets, and the
//!   passwords of `redis.url`, `postgres.url` and other URLs, as written and
//!   percent-decoded) wherever it appears, and
//! * the password of any `scheme://user:password@host` in the text, even one
//!   never registered (`redis://:pw@host` → `redis://:***@host`),
//!
//! and [`error_text`] also bounds what is copied.

use std::sync::Mutex;

/// What a secret is replaced with.
pub const MASK: &str = crate::settings::MASK;

/// The bound of an error text copied into a log line, a readiness reason or
/// `reconcile_jobs.last_error` (bytes).
pub const ERROR_BOUND: usize = crate::text::ERROR_BOUND;

/// Secrets shorter than this are only hidden inside URLs: replacing every
/// occurrence of two letters would garble every line.
const MIN_SECRET_LEN: usize = 4;

static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Adds a secret to hide from now on (process-wide; duplicates are ignored).
pub fn register(secret: &str) {
    let s = secret.trim();
    if s.len() < MIN_SECRET_LEN {
        return;
    }
    let mut all = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    if !all.iter().any(|k| k == s) {
        all.push(s.to_owned());
        // Longest first, so a secret containing another is hidden whole.
        all.sort_by_key(|k| std::cmp::Reverse(k.len()));
    }
}

/// Registers the password of `url`, as written and percent-decoded — also
/// of a malformed URL (`postgres:/user:pw@host`), which a server may echo
/// back in an error (e.g. as a database name).
pub fn register_url(url: &str) {
    let parsed = url::Url::parse(url).ok();
    let passwords = [
        parsed.as_ref().and_then(|u| u.password()),
        raw_password(url),
    ];
    for pw in passwords.into_iter().flatten() {
        register(pw);
        if let Ok(decoded) = percent_decode(pw) {
            register(&decoded);
        }
    }
}

/// `text` with every registered secret and every URL password masked.
pub fn scrub(text: &str) -> String {
    let mut out = text.to_owned();
    {
        let all = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
        for s in all.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
    }
    redact_urls(&out)
}

/// [`scrub`], then truncated to [`ERROR_BOUND`]: for error texts.
pub fn error_text(text: &str) -> String {
    crate::text::truncate(&scrub(text), ERROR_BOUND).into_owned()
}

/// Masks the password of every `scheme://userinfo@` in `text`.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, query, fragment, or where the URL
        // obviously ends in free text.
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>' | '`') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..=colon]);
                        out.push_str(MASK);
                    }
                    // A lone userinfo may be a token (`redis://token@host`).
                    None if userinfo.is_empty() => {}
                    None => out.push_str(MASK),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// What stands between the user's `:` and the last `@`, however the URL is
/// written (`scheme://user:pw@`, `scheme:/user:pw@`, `user:pw@host`).
fn raw_password(url: &str) -> Option<&str> {
    let before_at = &url[..url.rfind('@')?];
    let userinfo = match before_at.find("//") {
        Some(i) => &before_at[i + 2..],
        None => {
            // `scheme:/user:pw` or `scheme:user:pw`: drop the scheme.
            let rest = match before_at.split_once(':') {
                Some((scheme, rest))
                    if !scheme.is_empty()
                        && scheme.bytes().all(|c| {
                            c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')
                        })
                        && rest.contains(':') =>
                {
                    rest
                }
                _ => before_at,
            };
            rest.trim_start_matches('/')
        }
    };
    let pw = &userinfo[userinfo.find(':')? + 1..];
    (!pw.is_empty()).then_some(pw)
}

fn percent_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_masked_in_free_text() {
        assert_eq!(
            redact_urls("connecting to redis://:pw@host:6379/0 failed"),
            "connecting to redis://:***@host:6379/0 failed"
        );
        assert_eq!(
            redact_urls("(postgres://u:p@ss@db/x) and https://h/p?q=a://b"),
            "(postgres://u:***@db/x) and https://h/p?q=a://b"
        );
        assert_eq!(redact_urls("redis://tok@h"), "redis://***@h");
        assert_eq!(redact_urls("http://h:80/a"), "http://h:80/a");
        assert_eq!(redact_urls("no url here"), "no url here");
    }

    #[test]
    fn registered_secrets_are_masked_anywhere() {
        register("s3cr3t-key-for-the-unit-test");
        register_url("redis://:p%40ss-word-unit@h:1");
        let s = scrub("key s3cr3t-key-for-the-unit-test, pw p@ss-word-unit, p%40ss-word-unit");
        assert_eq!(s, "key ***, pw ***, ***");
        register("ab");
        assert_eq!(scrub("ab"), "ab", "too short to mask everywhere");
        // A malformed URL's password, echoed back by a server.
        register_url("postgres:/postgres:pw-of-a-typo@127.0.0.1:5432");
        assert_eq!(
            scrub(r#"database "postgres:pw-of-a-typo@127.0.0.1:5432" does not exist"#),
            r#"database "postgres:***@127.0.0.1:5432" does not exist"#
        );
        assert_eq!(raw_password("redis://:pw1@h"), Some("pw1"));
        assert_eq!(raw_password("user:pw2@h"), Some("pw2"));
        assert_eq!(raw_password("redis://h:6379"), None);
    }

    #[test]
    fn a_lone_url_keeps_everything_but_its_password() {
        assert_eq!(
            redact_urls("postgres://user:secret@db:5432/x?sslmode=require"),
            "postgres://user:***@db:5432/x?sslmode=require"
        );
        assert_eq!(redact_urls("rediss://tok@h"), "rediss://***@h");
        assert_eq!(
            redact_urls("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_urls("postgres://u:p@w@h/db"),
            "postgres://u:***@h/db"
        );
    }

    #[test]
    fn error_text_is_scrubbed_and_bounded() {
        let long = format!("redis://:pw@h {}", "é".repeat(1000));
        let t = error_text(&long);
        assert!(t.len() <= ERROR_BOUND + 20, "{}", t.len());
        assert!(t.starts_with("redis://:***@h"), "{t}");
    }
}

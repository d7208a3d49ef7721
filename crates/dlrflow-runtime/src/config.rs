//! Configuration loading shared by every binary.
//!
//! Precedence, lowest first: the binary's embedded TOML defaults, the file
//! named by `--config` or `DLRFLOW_CONFIG`, then `DLRFLOW_…` environment
//! variables where `__` separates nesting levels
//! (`DLRFLOW_KAFKA__BROKERS=…` sets `kafka.brokers`).
//!
//! A setting nothing reads is an error, not a silent default: any unknown key
//! in the file (also inside flattened sections and lists), and any unknown
//! nested key from the environment
//! (`DLRFLOW_KAFKA__BROKRES`). Top-level environment names without `__`
//! (`DLRFLOW_TEST_…`, `DLRFLOW_LOG_FORMAT`) belong to other tools and are
//! left alone.

use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The environment variable naming an optional configuration file.
pub const CONFIG_FILE_ENV: &str = "DLRFLOW_CONFIG";

/// A configuration that cannot be used, naming the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration file {path}: not found")]
    MissingFile { path: String },
    #[error("configuration setting `{setting}`: {reason}")]
    Invalid { setting: String, reason: String },
}

impl ConfigError {
    pub fn invalid(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// Settings that were renamed: the old key is refused with a pointer to the new
/// one instead of a bare "unknown setting".
const RENAMED: &[(&str, &str)] = &[("postgres.pool_size", "postgres.max_connections")];

/// A service's whole load: [`load`], then every secret registered with
/// [`crate::redact`] (so nothing printed from now on shows one), then the
/// service's own validation. What each binary's `Config::load` is.
pub fn load_service<T: DeserializeOwned + Serialize>(
    defaults: &str,
    file: Option<&Path>,
    register_secrets: impl FnOnce(&T),
    validate: impl FnOnce(&T) -> Result<(), ConfigError>,
) -> Result<T, ConfigError> {
    let cfg: T = load(defaults, file)?;
    register_secrets(&cfg);
    validate(&cfg)?;
    Ok(cfg)
}

/// Loads `T` from embedded defaults, an optional file and the environment.
///
/// A value that cannot be read is named by its key, never shown: it may be
/// a secret.
///
/// `file` wins over `DLRFLOW_CONFIG`. A named file that does not exist is an
/// error: a typo in a path must not silently fall back to the defaults.
///
/// Unknown keys are found by serializing what was read and comparing its
/// keys with the input's: a key of the input that does not come back was read
/// by nothing. This sees through `#[serde(flatten)]`, which hides unknown keys
/// from serde itself, so `T` (and every type in it) must serialize with the
/// same key names it reads (no `skip_serializing`, no aliases).
pub fn load<T: DeserializeOwned + Serialize>(
    defaults: &str,
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    let env_file = std::env::var_os(CONFIG_FILE_ENV).map(std::path::PathBuf::from);
    let file = file.map(Path::to_path_buf).or(env_file);
    let mut figment = Figment::from(Toml::string(defaults));
    let mut file_keys = Vec::new();
    if let Some(path) = &file {
        if !path.exists() {
            return Err(ConfigError::MissingFile {
                path: path.display().to_string(),
            });
        }
        if let Ok(dict) = Figment::from(Toml::file(path)).extract::<figment::value::Dict>() {
            file_keys = dict.into_keys().collect();
        }
        figment = figment.merge(Toml::file(path));
    }
    let figment = figment.merge(Env::prefixed("DLRFLOW_").ignore(&["CONFIG"]).split("__"));
    // Top-level names without `__` from the environment (`DLRFLOW_TEST_…`,
    // `DLRFLOW_LOG_FORMAT`) belong to other tools; in the file they are typos.
    extract(&figment, |path| {
        path.contains('.') || file_keys.iter().any(|k| k.eq_ignore_ascii_case(path))
    })
}

/// Loads `T` from the TOML file at `path` alone (no defaults, no
/// environment), with the same checks as [`load`]: e.g. a file of sources
/// that the service reads again while it runs.
pub fn load_file<T: DeserializeOwned + Serialize>(path: &Path) -> Result<T, ConfigError> {
    if !path.exists() {
        return Err(ConfigError::MissingFile {
            path: path.display().to_string(),
        });
    }
    extract(&Figment::from(Toml::file(path)), |_| true)
}

/// Extracts `T` and refuses any key it does not read (those `counts`).
fn extract<T: DeserializeOwned + Serialize>(
    figment: &Figment,
    counts: impl Fn(&str) -> bool,
) -> Result<T, ConfigError> {
    let cfg: T = figment
        .extract()
        .map_err(|e| without_values(ConfigError::Load(Box::new(e))))?;
    let input: serde_json::Value = figment
        .extract()
        .map_err(|e| without_values(ConfigError::Load(Box::new(e))))?;
    let read = serde_json::to_value(&cfg)
        .map_err(|e| ConfigError::invalid("configuration", format!("cannot be listed: {e}")))?;
    let mut unknown = Vec::new();
    unread_keys(&input, &read, "", &mut unknown);
    unknown.retain(|path| counts(path));
    if let Some(first) = unknown.first() {
        if let Some((_, new)) = RENAMED.iter().find(|(old, _)| old == first) {
            return Err(ConfigError::invalid(
                first.clone(),
                format!("was renamed to `{new}`"),
            ));
        }
        return Err(ConfigError::invalid(
            first.clone(),
            format!(
                "unknown setting{} ({}); check the spelling against the documented keys",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", ")
            ),
        ));
    }
    Ok(cfg)
}

/// Collects the dotted paths of the keys in `input` that `read` lacks.
fn unread_keys(
    input: &serde_json::Value,
    read: &serde_json::Value,
    at: &str,
    unknown: &mut Vec<String>,
) {
    use serde_json::Value;
    match (input, read) {
        (Value::Object(input), Value::Object(read)) => {
            for (key, value) in input {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                match read.get(key) {
                    Some(back) => unread_keys(value, back, &path, unknown),
                    None => unknown.push(path),
                }
            }
        }
        (Value::Array(input), Value::Array(read)) => {
            for (i, (value, back)) in input.iter().zip(read).enumerate() {
                unread_keys(value, back, &format!("{at}[{i}]"), unknown);
            }
        }
        _ => {}
    }
}

/// A configuration that could not be read, rewritten so that it names the
/// key and what was expected but never shows the value found there: the
/// value may be a password, or a whole `DLRFLOW_SOURCES` list with its
/// credentials, that TOML could not parse.
fn without_values(err: ConfigError) -> ConfigError {
    let ConfigError::Load(errors) = err else {
        return err;
    };
    let mut setting = String::from("configuration");
    let mut reasons = Vec::new();
    for (i, e) in (*errors).into_iter().enumerate() {
        let key = e.path.join(".");
        if i == 0 && !key.is_empty() {
            setting = key.clone();
        }
        let from = e
            .metadata
            .as_ref()
            .map(|m| match &m.source {
                Some(src) => format!(" in {} {src}", m.name),
                None => format!(" in {}", m.name),
            })
            .unwrap_or_default();
        let at = if i == 0 || key.is_empty() {
            String::new()
        } else {
            format!(" at `{key}`")
        };
        reasons.push(format!(
            "{}{at}{from}",
            kind_without_value(&e.kind.to_string())
        ));
    }
    ConfigError::invalid(setting, reasons.join("; "))
}

/// figment's error text with the offending value cut out: `invalid type:
/// found string "s3cret", expected u64` → `invalid type: expected u64`.
fn kind_without_value(kind: &str) -> String {
    for prefix in ["invalid type", "invalid value", "unknown variant"] {
        if kind.starts_with(prefix) {
            return match kind.rfind(", expected ") {
                Some(at) => format!("{prefix}: expected{}", &kind[at + ", expected".len()..]),
                None => format!("{prefix} (value not shown)"),
            };
        }
    }
    if kind.starts_with("signed integer") || kind.starts_with("unsigned integer") {
        return "integer out of range (value not shown)".into();
    }
    kind.to_owned()
}

#[cfg(test)]
// `figment::Jail`'s closure must return `figment::Error`, which is large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Serialize)]
    struct Sample {
        kafka: Kafka,
    }
    #[derive(Debug, Deserialize, Serialize)]
    struct Kafka {
        brokers: String,
        timeout_ms: u64,
    }

    #[test]
    fn environment_overrides_defaults_with_double_underscore_nesting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DLRFLOW_KAFKA__TIMEOUT_MS", "42");
            let cfg: Sample =
                load("[kafka]\nbrokers = \"a:1\"\ntimeout_ms = 3000\n", None).unwrap();
            assert_eq!(cfg.kafka.brokers, "a:1");
            assert_eq!(cfg.kafka.timeout_ms, 42);
            Ok(())
        });
    }

    #[test]
    fn a_misspelled_setting_stops_the_load() {
        figment::Jail::expect_with(|jail| {
            let defaults = "[kafka]\nbrokers = \"a:1\"\ntimeout_ms = 1\n";
            // Other tools' variables are not settings.
            jail.set_env("DLRFLOW_TEST_KAFKA_BROKERS", "x");
            jail.set_env("DLRFLOW_LOG_FORMAT", "json");
            load::<Sample>(defaults, None).unwrap();
            jail.set_env("DLRFLOW_KAFKA__TIMEOUT_SM", "5");
            let err = load::<Sample>(defaults, None).unwrap_err();
            assert!(err.to_string().contains("kafka.timeout_sm"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "brokers = \"top-level typo\"\n")?;
            let err = load::<Sample>(
                "[kafka]\nbrokers = \"a:1\"\ntimeout_ms = 1\n",
                Some(Path::new("c.toml")),
            )
            .unwrap_err();
            assert!(err.to_string().contains("`brokers`"), "{err}");
            Ok(())
        });
    }

    #[derive(Debug, Deserialize, Serialize)]
    struct Flattened {
        kafka: Section,
        #[serde(default)]
        sources: Vec<Source>,
    }
    #[derive(Debug, Deserialize, Serialize)]
    struct Section {
        #[serde(flatten)]
        client: Kafka,
        topic: String,
    }
    #[derive(Debug, Deserialize, Serialize)]
    struct Source {
        name: String,
    }

    #[derive(Debug, Deserialize, Serialize)]
    struct SourcesOnly {
        #[serde(default)]
        sources: Vec<Source>,
    }

    #[test]
    fn a_file_alone_is_checked_like_a_configuration() {
        figment::Jail::expect_with(|jail| {
            // The environment does not reach a file loaded alone.
            jail.set_env("DLRFLOW_SOURCES", "[{name=\"env\"}]");
            jail.create_file("s.toml", "[[sources]]\nname = \"a\"\n")?;
            let ok = load_file::<SourcesOnly>(Path::new("s.toml")).unwrap();
            assert_eq!(ok.sources.len(), 1);
            assert_eq!(ok.sources[0].name, "a");
            jail.create_file("bad.toml", "[[sources]]\nname = \"a\"\npasword = \"x\"\n")?;
            let err = load_file::<SourcesOnly>(Path::new("bad.toml")).unwrap_err();
            assert!(err.to_string().contains("sources[0].pasword"), "{err}");
            let err = load_file::<SourcesOnly>(Path::new("missing.toml")).unwrap_err();
            assert!(err.to_string().contains("missing.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_found_inside_flattened_sections_and_lists() {
        let defaults = "[kafka]\nbrokers = \"a:1\"\ntimeout_ms = 1\ntopic = \"t\"\n";
        figment::Jail::expect_with(|jail| {
            jail.set_env("DLRFLOW_KAFKA__TOPIC", "raw");
            let cfg = load::<Flattened>(defaults, None).unwrap();
            assert_eq!(cfg.kafka.topic, "raw");
            jail.set_env("DLRFLOW_KAFKA__BROKRES", "b:2");
            let err = load::<Flattened>(defaults, None).unwrap_err();
            assert!(err.to_string().contains("kafka.brokres"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[[sources]]\nname = \"a\"\nnmae = \"b\"\n")?;
            let err = load::<Flattened>(defaults, Some(Path::new("c.toml"))).unwrap_err();
            assert!(err.to_string().contains("sources[0].nmae"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_renamed_key_points_to_its_new_name() {
        #[derive(Debug, Deserialize, Serialize)]
        struct Pg {
            postgres: PgSection,
        }
        #[derive(Debug, Deserialize, Serialize)]
        struct PgSection {
            max_connections: u32,
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("DLRFLOW_POSTGRES__POOL_SIZE", "4");
            let err = load::<Pg>("[postgres]\nmax_connections = 8\n", None).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("postgres.pool_size") && text.contains("postgres.max_connections"),
                "{text}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let err = load::<Sample>("", Some(Path::new("/nonexistent/dlrflow.toml"))).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/dlrflow.toml"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_value_names_the_setting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DLRFLOW_KAFKA__TIMEOUT_MS", "soon");
            let err =
                load::<Sample>("[kafka]\nbrokers = \"a:1\"\ntimeout_ms = 1\n", None).unwrap_err();
            assert!(
                err.to_string().to_lowercase().contains("kafka.timeout_ms"),
                "{err}"
            );
            Ok(())
        });
    }
}

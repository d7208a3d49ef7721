//! Configuration loading shared by every binary.
//!
//! Precedence, lowest first: the binary's embedded TOML defaults, the file
//! named by `--config` or `DLRFLOW_CONFIG`, then `DLRFLOW_…` environment
//! variables where `__` separates nesting levels
//! (`DLRFLOW_KAFKA__BROKERS=…` sets `kafka.brokers`).
//!
//! A setting nothing reads is an error, not a silent default: any unknown key
//! in the file, and any unknown nested key from the environment
//! (`DLRFLOW_KAFKA__BROKRES`). Top-level environment names without `__`
//! (`DLRFLOW_TEST_…`, `DLRFLOW_LOG_FORMAT`) belong to other tools and are
//! left alone.

use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;

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

/// Loads `T` from embedded defaults, an optional file and the environment.
///
/// `file` wins over `DLRFLOW_CONFIG`. A named file that does not exist is an
/// error: a typo in a path must not silently fall back to the defaults.
pub fn load<T: DeserializeOwned>(defaults: &str, file: Option<&Path>) -> Result<T, ConfigError> {
    let env_file = std::env::var_os(CONFIG_FILE_ENV).map(std::path::PathBuf::from);
    let file = file.map(Path::to_path_buf).or(env_file);
    let mut figment = Figment::from(Toml::string(defaults));
    if let Some(path) = &file {
        if !path.exists() {
            return Err(ConfigError::MissingFile {
                path: path.display().to_string(),
            });
        }
    }
    let mut file_keys = Vec::new();
    if let Some(path) = &file {
        if let Ok(dict) = Figment::from(Toml::file(path)).extract::<figment::value::Dict>() {
            file_keys = dict.into_keys().collect();
        }
        figment = figment.merge(Toml::file(path));
    }
    let figment = figment.merge(Env::prefixed("DLRFLOW_").ignore(&["CONFIG"]).split("__"));
    let cfg: T = figment
        .extract()
        .map_err(|e| ConfigError::Load(Box::new(e)))?;
    // The same again, noting every key the type did not read.
    let value: figment::value::Value = figment
        .extract()
        .map_err(|e| ConfigError::Load(Box::new(e)))?;
    let mut unknown = Vec::new();
    let _: Result<T, _> = serde_ignored::deserialize(&value, |path| {
        let path = path.to_string();
        let nested = path.contains('.');
        if nested || file_keys.iter().any(|k| k.eq_ignore_ascii_case(&path)) {
            unknown.push(path);
        }
    });
    if let Some(first) = unknown.first() {
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

#[cfg(test)]
// `figment::Jail`'s closure must return `figment::Error`, which is large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Sample {
        kafka: Kafka,
    }
    #[derive(Debug, Deserialize)]
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

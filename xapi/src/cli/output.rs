//! Output for people (aligned text) and for scripts (`--output json`), and
//! the exit codes every command shares.

use std::process::ExitCode;

use clap::ValueEnum;
use serde::Serialize;

/// How a command prints its result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned text for people.
    #[default]
    Text,
    /// One JSON document for scripts.
    Json,
}

/// A command that could not run: bad usage or unusable input. Exit code 2.
#[derive(Debug)]
pub struct InputError(pub String);

impl<E: std::fmt::Display> From<E> for InputError {
    fn from(error: E) -> Self {
        InputError(error.to_string())
    }
}

/// Exit code 2, the code for usage and input errors.
pub fn input_error_exit(error: &InputError) -> ExitCode {
    eprintln!("hsev: error: {}", error.0);
    ExitCode::from(2)
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> Result<(), InputError> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Renders a JSON value as indented `key: value` lines.
pub fn print_tree(value: &serde_json::Value) {
    fn walk(value: &serde_json::Value, indent: usize, out: &mut String) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match value {
                        serde_json::Value::Object(inner) if !inner.is_empty() => {
                            out.push_str(&format!("{:indent$}{key}:\n", ""));
                            walk(value, indent + 2, out);
                        }
                        _ => out.push_str(&format!("{:indent$}{key}: {}\n", "", scalar(value))),
                    }
                }
            }
            other => out.push_str(&format!("{:indent$}{}\n", "", scalar(other))),
        }
    }
    fn scalar(value: &serde_json::Value) -> String {
        match value {
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::Array(items) => {
                items.iter().map(scalar).collect::<Vec<_>>().join(", ")
            }
            other => other.to_string(),
        }
    }
    let mut out = String::new();
    walk(value, 0, &mut out);
    print!("{out}");
}

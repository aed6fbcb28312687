//! `hsev-opensvc`: the launcher an OpenSVC `app` resource of type
//! `forking` calls as its `script`, and the `container.hsev` driver runs.
//!
//! ```text
//! hsev-opensvc start | stop [--force] | status | info | provision | unprovision | provisioned
//! ```
//!
//! Everything else comes from the environment (see [`environment`]).
//! Exit codes follow the agent's `retcodes = 0:up 1:down`: for `status`,
//! 0 up, 1 down, 2 anything else (a warning); for the other actions, 0
//! done, 1 tried and failed, 2 not done as given (a bad spec or
//! environment, hsevd unreachable, another service's VM). Progress and
//! results go to stdout (the agent logs them as information), errors to
//! stderr, one line each; a token is never printed.

mod actions;
mod environment;
mod ownership;

use std::process::ExitCode;

use hsev_xapi::cli::client::{Connection, ConnectionArgs, RemoteError, Settings};

use crate::actions::ActionError;
use crate::environment::Launch;

const USAGE: &str =
    "usage: hsev-opensvc start | stop [--force] | status | info | provision | unprovision | provisioned";

/// What the agent asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Start,
    Stop { force: bool },
    Status,
    Info,
    Provision,
    Unprovision,
    Provisioned,
}

impl Action {
    fn parse(args: &[String]) -> Result<Self, String> {
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(match words.as_slice() {
            ["start"] => Action::Start,
            ["stop"] => Action::Stop { force: false },
            ["stop", "--force"] => Action::Stop { force: true },
            ["status"] => Action::Status,
            ["info"] => Action::Info,
            ["provision"] => Action::Provision,
            ["unprovision"] => Action::Unprovision,
            ["provisioned"] => Action::Provisioned,
            _ => return Err(format!("{words:?} is not an action; {USAGE}")),
        })
    }

    /// Whether it answers with a status line and 0/1/2 (so that every
    /// error is a 2).
    fn is_query(self) -> bool {
        matches!(self, Action::Status | Action::Provisioned)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let action = match Action::parse(&args) {
        Ok(action) => action,
        Err(message) => {
            eprintln!("hsev-opensvc: error: {message}");
            return ExitCode::from(2);
        }
    };
    let (code, settings) = run(action);
    ExitCode::from(code.unwrap_or_else(|error| {
        let message = error.to_string();
        let message = match (&settings, &error) {
            (Some(settings), ActionError::Remote(remote)) => {
                settings.redact(&remote.message(&settings.endpoint))
            }
            (Some(settings), _) => settings.redact(&message),
            (None, _) => message,
        };
        eprintln!("hsev-opensvc: error: {message}");
        if action.is_query() {
            2
        } else {
            error.exit_code()
        }
    }))
}

/// Runs the action; answers its exit code, and the connection settings
/// once known (to keep the token out of any message).
fn run(action: Action) -> (Result<u8, ActionError>, Option<Settings>) {
    let launch = match Launch::from_process() {
        Ok(launch) => launch,
        Err(error) => return (Err(error.into()), None),
    };
    let settings = match Settings::resolve(&ConnectionArgs::default()) {
        Ok(settings) => settings,
        Err(message) => return (Err(RemoteError::Input(message).into()), None),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return (
                Err(ActionError::Failed(format!(
                    "cannot start the async runtime: {error}"
                ))),
                Some(settings),
            )
        }
    };
    let outcome = runtime.block_on(async {
        let quick = action.is_query() || action == Action::Info;
        let work = async {
            let connection = Connection::open(&settings).await?;
            perform(action, &connection, &launch).await
        };
        if quick {
            tokio::time::timeout(launch.call_timeout, work)
                .await
                .unwrap_or_else(|_| Err(actions::call_timed_out(&launch, launch.call_timeout)))
        } else {
            work.await
        }
    });
    (outcome, Some(settings))
}

async fn perform(
    action: Action,
    connection: &Connection,
    launch: &Launch,
) -> Result<u8, ActionError> {
    let mut stdout = std::io::stdout();
    match action {
        Action::Start => actions::start(connection, launch, &mut stdout).await,
        Action::Stop { force } => actions::stop(connection, launch, force, &mut stdout).await,
        Action::Status => {
            let (code, line) = actions::status(connection, launch).await?;
            println!("{line}");
            Ok(code)
        }
        Action::Info => {
            print!("{}", actions::info(connection, launch).await?);
            Ok(0)
        }
        Action::Provision => actions::provision(connection, launch, &mut stdout).await,
        Action::Unprovision => actions::unprovision(connection, launch, &mut stdout).await,
        Action::Provisioned => {
            let (code, line) = actions::provisioned(connection, launch).await?;
            println!("{line}");
            Ok(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_contracts_actions_parse() {
        let parse = |words: &[&str]| {
            Action::parse(
                &words
                    .iter()
                    .map(|word| (*word).to_owned())
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(parse(&["start"]), Ok(Action::Start));
        assert_eq!(
            parse(&["stop", "--force"]),
            Ok(Action::Stop { force: true })
        );
        assert!(parse(&[]).is_err());
        assert!(parse(&["restart"]).is_err());
        assert!(parse(&["status", "extra"]).is_err());
        assert!(Action::Status.is_query() && !Action::Start.is_query());
    }
}

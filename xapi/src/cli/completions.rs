//! `hsev completions`: shell completion scripts, generated from the
//! command definitions so that they never fall behind.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use clap_complete::Shell;

/// `hsev completions SHELL`.
#[derive(Debug, Args)]
#[command(after_help = "Install, for example:\n  \
    hsev completions bash > /etc/bash_completion.d/hsev\n  \
    hsev completions zsh > \"${fpath[1]}/_hsev\"\n  \
    hsev completions fish > ~/.config/fish/completions/hsev.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

/// Prints the completion script of `command` for the chosen shell.
pub fn run(args: &CompletionsArgs, command: &mut clap::Command) -> ExitCode {
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, command, name, &mut script);
    // A closed pipe (`| head`) is not an error.
    match std::io::stdout().write_all(&script) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("hsev: error: cannot write to stdout: {error}");
            ExitCode::from(1)
        }
        _ => ExitCode::SUCCESS,
    }
}

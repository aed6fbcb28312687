//! The LUKS2 format of HyperSEV's encrypted data disks. The host creates
//! the disk empty and never sees its key; on the guest's first boot the
//! agent formats it with [`luks_format`] using the key the tenant's broker
//! released, on every boot it opens it with [`luks_open`]; what a disk
//! holds before that is [`disk_content`]'s to say.
//!
//! This module owns the two cryptsetup command lines and how the key
//! reaches cryptsetup: through a pipe to its standard input, and nothing
//! else. It never writes a key to a file (tmpfs included), never puts one
//! on a command line or in the environment, never logs one and never keeps
//! a copy: the caller owns the key and zeroizes it.
//!
//! The key is the raw disk key the key broker holds, random bytes the
//! broker generated. A random key needs no slow KDF, so
//! the keyslot uses PBKDF2-SHA256 at the LUKS2 minimum of 1000 iterations
//! rather than Argon2: a guest has little memory and, under TCG, no fast
//! AES or SHA.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// What [`luks_format`] passes to cryptsetup before the image path: LUKS2,
/// no questions, PBKDF2-SHA256 at 1000 iterations, AES-XTS with a 512-bit
/// volume key, the key read from standard input to its end.
pub const FORMAT_ARGS: &[&str] = &[
    "luksFormat",
    "--type",
    "luks2",
    "--batch-mode",
    "--pbkdf",
    "pbkdf2",
    "--pbkdf-force-iterations",
    "1000",
    "--hash",
    "sha256",
    "--cipher",
    "aes-xts-plain64",
    "--key-size",
    "512",
    "--key-file",
    "-",
];

/// Where cryptsetup is looked for when it is not on `PATH` (hsevd may run
/// with a `PATH` without the sbin folders).
const CRYPTSETUP_FALLBACKS: &[&str] = &["/usr/sbin/cryptsetup", "/sbin/cryptsetup"];

/// Why a LUKS operation failed. Never carries key material: cryptsetup's
/// own error output, at most.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    /// An empty key would make a disk anyone opens.
    #[error("the disk key is empty")]
    EmptyKey,
    /// cryptsetup is not installed.
    #[error("cryptsetup is not installed (not on PATH, not in /usr/sbin or /sbin)")]
    NoCryptsetup,
    /// cryptsetup could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key could not be handed to cryptsetup.
    #[error("cannot pass the key to cryptsetup {operation}: {source}")]
    KeyPipe {
        /// `luksFormat` or `open`.
        operation: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// cryptsetup ran and failed.
    #[error("cryptsetup {operation} {target} failed ({status}): {stderr}")]
    Failed {
        /// `luksFormat` or `open`.
        operation: &'static str,
        /// The image or device.
        target: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it said, trimmed.
        stderr: String,
    },
}

/// What a data disk holds before the agent opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskContent {
    /// A LUKS2 header: a disk formatted on an earlier boot.
    Luks,
    /// Zeros only where a header would be: the disk the host created.
    Empty,
    /// Something else: never formatted over, it may hold data.
    Unknown,
}

/// How far an empty disk must be zeros: both LUKS2 header copies and the
/// start of the keyslot area.
const EMPTY_PROBE_BYTES: usize = 1 << 20;

/// What `device` holds at its start.
pub fn disk_content(device: &Path) -> std::io::Result<DiskContent> {
    use std::io::Read;
    let mut head = Vec::with_capacity(EMPTY_PROBE_BYTES);
    std::fs::File::open(device)?
        .take(EMPTY_PROBE_BYTES as u64)
        .read_to_end(&mut head)?;
    Ok(classify(&head))
}

/// [`disk_content`] of a disk that starts with `head`.
fn classify(head: &[u8]) -> DiskContent {
    // LUKS2's primary header magic at 0 ("LUKS\xba\xbe", version 2).
    if head.len() >= 8 && head[..6] == *b"LUKS\xba\xbe" && head[6..8] == [0, 2] {
        DiskContent::Luks
    } else if !head.is_empty() && head.iter().all(|&byte| byte == 0) {
        DiskContent::Empty
    } else {
        DiskContent::Unknown
    }
}

/// The cryptsetup binary: the first on `PATH`, else `/usr/sbin` or `/sbin`.
pub fn cryptsetup() -> Result<PathBuf, LuksError> {
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("cryptsetup"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(CRYPTSETUP_FALLBACKS.iter().map(PathBuf::from))
        .find(|candidate| candidate.is_file())
        .ok_or(LuksError::NoCryptsetup)
}

/// The exact command that formats `image` (a file or a block device) as
/// HyperSEV's LUKS2 data disk, reading the key from standard input. Spawn
/// it with [`luks_format`], which passes the key.
pub fn format_command(cryptsetup: &Path, image: &Path) -> Command {
    let mut command = Command::new(cryptsetup);
    command.args(FORMAT_ARGS).arg(image);
    command
}

/// The command that opens the LUKS2 `device` as `/dev/mapper/<name>`,
/// reading the key from standard input.
pub fn open_command(cryptsetup: &Path, device: &Path, name: &str) -> Command {
    let mut command = Command::new(cryptsetup);
    command
        .args(["open", "--type", "luks2", "--key-file", "-"])
        .arg(device)
        .arg(name);
    command
}

/// Formats `image` (an existing file of the disk's size, or a block device)
/// as LUKS2 unlocked by `key`, which goes to cryptsetup through a pipe.
/// Everything on `image` is lost.
pub fn luks_format(image: &Path, key: &[u8]) -> Result<(), LuksError> {
    if key.is_empty() {
        return Err(LuksError::EmptyKey);
    }
    let command = format_command(&cryptsetup()?, image);
    run_with_key(command, key, "luksFormat", image)
}

/// Opens the LUKS2 `device` with `key` as `/dev/mapper/<name>`, and answers
/// that path.
pub fn luks_open(device: &Path, name: &str, key: &[u8]) -> Result<PathBuf, LuksError> {
    if key.is_empty() {
        return Err(LuksError::EmptyKey);
    }
    let command = open_command(&cryptsetup()?, device, name);
    run_with_key(command, key, "open", device)?;
    Ok(Path::new("/dev/mapper").join(name))
}

/// Runs `command` with `key` on its standard input (then closed), its
/// standard output discarded and its error output kept for the error.
fn run_with_key(
    mut command: Command,
    key: &[u8],
    operation: &'static str,
    target: &Path,
) -> Result<(), LuksError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LuksError::Spawn { program, source })?;
    // A key of a few dozen bytes fits the pipe's buffer: the write cannot
    // wait for the child. Dropping the pipe ends cryptsetup's key file.
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(key))
        .unwrap_or(Ok(()));
    let output = child
        .wait_with_output()
        .map_err(|source| LuksError::KeyPipe { operation, source })?;
    if !output.status.success() {
        return Err(LuksError::Failed {
            operation,
            target: target.display().to_string(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    // cryptsetup succeeded, so it read the key: a write error now would be
    // a broken pipe after the fact, still worth refusing.
    written.map_err(|source| LuksError::KeyPipe { operation, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the test keys (the broker's disk keys are 32 bytes).
    const KEY_BYTES: usize = 32;

    #[test]
    fn a_disk_is_luks_empty_or_left_alone() {
        let mut luks = vec![0u8; 4096];
        luks[..8].copy_from_slice(b"LUKS\xba\xbe\x00\x02");
        assert_eq!(classify(&luks), DiskContent::Luks);
        assert_eq!(classify(&vec![0; EMPTY_PROBE_BYTES]), DiskContent::Empty);
        let mut data = vec![0u8; EMPTY_PROBE_BYTES];
        data[EMPTY_PROBE_BYTES - 1] = 1;
        assert_eq!(classify(&data), DiskContent::Unknown, "one byte of data");
        let mut luks1 = luks.clone();
        luks1[7] = 1;
        assert_eq!(classify(&luks1), DiskContent::Unknown, "LUKS1 is not ours");
        assert_eq!(classify(&[]), DiskContent::Unknown, "an empty device");
    }

    #[test]
    fn the_format_command_is_the_documented_one_and_holds_no_key() {
        let command = format_command(Path::new("/sbin/cryptsetup"), Path::new("/disks/a.luks"));
        let args: Vec<String> = command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "luksFormat --type luks2 --batch-mode --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
             --hash sha256 --cipher aes-xts-plain64 --key-size 512 --key-file - /disks/a.luks"
        );
        assert_eq!(command.get_envs().count(), 0);
        let open = open_command(Path::new("cryptsetup"), Path::new("/dev/vdb"), "hsev-data");
        let args: Vec<String> = open
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "open --type luks2 --key-file - /dev/vdb hsev-data"
        );
    }

    #[test]
    fn the_key_reaches_the_child_on_stdin_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = dir.path().join("got");
        let key: Vec<u8> = (0..=255u8).cycle().take(KEY_BYTES * 3).collect();
        let mut command = Command::new("sh");
        command.arg("-c").arg(r#"cat > "$0""#).arg(&copy);
        run_with_key(command, &key, "open", Path::new("test")).expect("runs");
        assert_eq!(std::fs::read(&copy).expect("copied"), key);
    }

    #[test]
    fn a_failing_child_gives_its_error_output() {
        let mut command = Command::new("sh");
        command.arg("-c").arg("echo 'No key available' >&2; exit 2");
        let error = run_with_key(command, b"k", "open", Path::new("/dev/vdb")).expect_err("fails");
        let message = error.to_string();
        assert!(
            message.contains("cryptsetup open /dev/vdb failed")
                && message.contains("No key available"),
            "{message}"
        );
        assert!(matches!(
            luks_format(Path::new("/nonexistent"), b""),
            Err(LuksError::EmptyKey)
        ));
    }

    /// The real cryptsetup, when this machine has it and lets us use it:
    /// a file formatted with one key opens with it and with no other.
    #[test]
    fn a_formatted_image_opens_with_its_key_only() {
        let cryptsetup = cryptsetup().expect("cryptsetup (`make deps` installs cryptsetup-bin)");
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.luks");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(32 << 20))
            .expect("image");
        assert_eq!(disk_content(&image).expect("readable"), DiskContent::Empty);
        let key = [0x42u8; KEY_BYTES];
        match luks_format(&image, &key) {
            Ok(()) => {}
            Err(LuksError::Failed { stderr, .. }) if stderr.contains("ermission") => {
                println!("skipped: cryptsetup cannot format here: {stderr}");
                return;
            }
            Err(error) => panic!("luks_format: {error}"),
        }
        let header = std::fs::read(&image).expect("image");
        assert!(header.starts_with(b"LUKS\xba\xbe"), "a LUKS header");
        assert_eq!(disk_content(&image).expect("readable"), DiskContent::Luks);
        assert!(
            !header.windows(KEY_BYTES).any(|window| window == key),
            "the key is not in the image"
        );
        let test = |key: &[u8]| {
            let mut command = Command::new(&cryptsetup);
            command
                .args([
                    "open",
                    "--test-passphrase",
                    "--type",
                    "luks2",
                    "--key-file",
                    "-",
                ])
                .arg(&image);
            run_with_key(command, key, "open", &image)
        };
        test(&key).expect("the key opens it");
        let mut wrong = key;
        wrong[0] ^= 1;
        assert!(test(&wrong).is_err(), "another key does not");
    }
}

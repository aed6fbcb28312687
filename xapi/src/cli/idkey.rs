//! `hsev idkey` and `hsev idblock`: the owner's side of SNP ID blocks, on
//! the owner's machine. `idkey generate` makes an ID (or author) key and
//! prints the digest a policy's `allowed_id_key_digests` lists;
//! `idblock sign` signs an ID block over a launch measurement the owner
//! computed, so that its key never has to leave its machine.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use hsev_attestation::id_block::{public_key_digest, IdBlock, SignedIdBlock};
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use serde_json::json;

use super::output::{print_json, InputError, OutputFormat};

/// `hsev idkey ...`.
#[derive(Debug, Subcommand)]
pub enum IdKeyCommand {
    /// Make an ECDSA P-384 ID or author key (PEM, mode 0600) and print its
    /// digest, the value a policy's allowed_id_key_digests lists.
    Generate {
        /// Where to write the private key; never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Print the digest of an ID or author key (private or public PEM).
    Digest {
        /// The key.
        key: PathBuf,
    },
}

/// `hsev idblock ...`.
#[derive(Debug, Subcommand)]
pub enum IdBlockCommand {
    /// Sign an ID block over a launch measurement, with the ID key and
    /// optionally the author key; writes the 96-byte ID_BLOCK and the
    /// 4096-byte ID_AUTH_INFO.
    Sign(SignArgs),
}

/// What an ID block says.
#[derive(Debug, Clone, Args)]
pub struct IdBlockFields {
    /// Family id, 32 hex digits [default: zeros].
    #[arg(long, value_name = "HEX", value_parser = parse_hex::<16>)]
    pub family_id: Option<[u8; 16]>,
    /// Image id, 32 hex digits [default: zeros].
    #[arg(long, value_name = "HEX", value_parser = parse_hex::<16>)]
    pub image_id: Option<[u8; 16]>,
    /// Guest SVN, reported back in every report.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub guest_svn: u32,
}

/// `hsev idblock sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The ID key (`hsev idkey generate`).
    #[arg(long, value_name = "FILE")]
    id_key: PathBuf,
    /// An author key that signs the ID key.
    #[arg(long, value_name = "FILE")]
    author_key: Option<PathBuf>,
    /// The launch measurement to authorise, 96 hex digits.
    #[arg(long, value_name = "HEX", value_parser = parse_hex::<48>)]
    measurement: [u8; 48],
    /// The guest policy the launch must have, hex.
    #[arg(long, value_name = "HEX", value_parser = parse_policy)]
    policy: u64,
    #[command(flatten)]
    fields: IdBlockFields,
    /// Where to write the ID_BLOCK.
    #[arg(long, value_name = "FILE")]
    out_block: PathBuf,
    /// Where to write the ID_AUTH_INFO.
    #[arg(long, value_name = "FILE")]
    out_auth: PathBuf,
}

fn parse_hex<const N: usize>(text: &str) -> Result<[u8; N], String> {
    let bytes = hex::decode(text).map_err(|_| format!("{text:?} is not hex"))?;
    bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| format!("{} hex digits, not {}", 2 * N, 2 * bytes.len()))
}

fn parse_policy(text: &str) -> Result<u64, String> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u64::from_str_radix(digits, 16).map_err(|_| format!("{text:?} is not a hex guest policy"))
}

/// Reads a P-384 private key (PEM).
pub fn read_private_key(path: &Path) -> Result<EcKey<Private>, InputError> {
    let pem = std::fs::read(path)
        .map_err(|error| InputError(format!("cannot read {}: {error}", path.display())))?;
    PKey::private_key_from_pem(&pem)
        .and_then(|key| key.ec_key())
        .map_err(|_| InputError(format!("{}: not an EC private key in PEM", path.display())))
}

/// Signs `block` with the keys in `id_key` and `author_key`.
pub fn sign(
    block: IdBlock,
    id_key: &Path,
    author_key: Option<&Path>,
) -> Result<SignedIdBlock, InputError> {
    let id = read_private_key(id_key)?;
    let author = author_key.map(read_private_key).transpose()?;
    SignedIdBlock::sign(block, &id, author.as_deref())
        .map_err(|error| InputError(format!("cannot sign the ID block: {error}")))
}

/// Runs an `hsev idkey` command.
pub fn run_idkey(command: &IdKeyCommand) -> Result<ExitCode, InputError> {
    match command {
        IdKeyCommand::Generate { out, output } => {
            let group = EcGroup::from_curve_name(Nid::SECP384R1)?;
            let key = EcKey::generate(&group)?;
            let pem = PKey::from_ec_key(key.clone())?.private_key_to_pem_pkcs8()?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .map_err(|error| InputError(format!("cannot create {}: {error}", out.display())))?;
            file.write_all(&pem)
                .map_err(|error| InputError(format!("cannot write {}: {error}", out.display())))?;
            let digest = hex::encode(public_key_digest(&key)?);
            match output {
                OutputFormat::Json => print_json(&json!({"key": out, "digest": digest}))?,
                OutputFormat::Text => {
                    println!(
                        "{}: ECDSA P-384 key (keep it on this machine)",
                        out.display()
                    );
                    println!("digest: {digest}");
                }
            }
        }
        IdKeyCommand::Digest { key } => {
            let pem = std::fs::read(key)
                .map_err(|error| InputError(format!("cannot read {}: {error}", key.display())))?;
            let public: EcKey<Public> = PKey::private_key_from_pem(&pem)
                .and_then(|private| private.ec_key())
                .and_then(|private| EcKey::from_public_key(private.group(), private.public_key()))
                .or_else(|_| PKey::public_key_from_pem(&pem).and_then(|public| public.ec_key()))
                .map_err(|_| InputError(format!("{}: not an EC key in PEM", key.display())))?;
            println!("{}", hex::encode(public_key_digest(&public)?));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs an `hsev idblock` command.
pub fn run_idblock(command: &IdBlockCommand) -> Result<ExitCode, InputError> {
    let IdBlockCommand::Sign(args) = command;
    let block = IdBlock {
        launch_digest: args.measurement,
        family_id: args.fields.family_id.unwrap_or_default(),
        image_id: args.fields.image_id.unwrap_or_default(),
        guest_svn: args.fields.guest_svn,
        policy: args.policy,
    };
    let signed = sign(block, &args.id_key, args.author_key.as_deref())?;
    for (path, bytes) in [
        (&args.out_block, signed.block.to_bytes().as_slice()),
        (&args.out_auth, signed.auth_bytes()),
    ] {
        std::fs::write(path, bytes)
            .map_err(|error| InputError(format!("cannot write {}: {error}", path.display())))?;
    }
    println!(
        "ID block for measurement {} and policy {:#x}: {} and {}{}",
        hex::encode(args.measurement),
        args.policy,
        args.out_block.display(),
        args.out_auth.display(),
        if signed.author_key_enabled() {
            " (ID key signed by the author key)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

//! `hsev image`: the guest images of the pool (`hsev.v1.ImageService`):
//! every caller lists them, admins import them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use hsev_proto::v1::{Image, ImageRef, ImportImageRequest, ListImagesRequest};
use serde_json::{json, Map, Value};

use super::client::{
    self, follow_progress, print_json, print_stdout, render_table, Connection, ConnectionArgs,
    Fields, RemoteError,
};
use super::output::OutputFormat;

/// `hsev image ...` and its connection flags.
#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: ImageCommand,
}

/// Image commands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import an image (admins): hsevd checks every artifact's sha256
    /// against the manifest and copies it into its store.
    Import {
        /// Unique name.
        name: String,
        /// The folder `make image` writes (`images/out`: manifest.json and
        /// the artifacts it names), as hsevd's host sees it.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List the images.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Every field of an image.
    Show {
        /// Id or name.
        image: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// Runs an image command.
pub fn run(args: &ImageArgs) -> ExitCode {
    client::run(&args.connection, async |connection| {
        execute(connection, &args.command).await
    })
}

/// The folder to send: hsevd reads it on its own host, so a local daemon
/// gets an absolute path checked here, a remote one the path as given,
/// which must be absolute.
fn source_dir(connection: &Connection, from: &Path) -> Result<String, RemoteError> {
    let folder = if connection.endpoint().is_local() {
        let folder = std::path::absolute(from)
            .map_err(|error| RemoteError::Input(format!("--from {}: {error}", from.display())))?;
        if !folder.join("manifest.json").is_file() {
            return Err(RemoteError::Input(format!(
                "{} has no manifest.json: give the folder `make image` writes (images/out)",
                folder.display()
            )));
        }
        folder
    } else if from.is_absolute() {
        from.to_owned()
    } else {
        return Err(RemoteError::Input(format!(
            "--from {}: hsevd at {} reads the folder on its own host: give an absolute path there",
            from.display(),
            connection.endpoint()
        )));
    };
    folder.into_os_string().into_string().map_err(|folder| {
        RemoteError::Input(format!(
            "--from {}: not UTF-8",
            Path::new(&folder).display()
        ))
    })
}

async fn execute(connection: &Connection, command: &ImageCommand) -> Result<ExitCode, RemoteError> {
    let mut images = connection.images();
    match command {
        ImageCommand::Import { name, from, output } => {
            let request = ImportImageRequest {
                name: name.clone(),
                source_dir: source_dir(connection, from)?,
            };
            // Progress messages carry a Vm, not an Image: the image is
            // fetched once the import has ended.
            follow_progress(images.import_image(request).await?).await?;
            let image = images
                .get_image(ImageRef {
                    image: name.clone(),
                })
                .await?
                .into_inner();
            print_image(&image, *output)?;
        }
        ImageCommand::List { output } => {
            let list = images.list_images(ListImagesRequest {}).await?.into_inner();
            match output {
                OutputFormat::Json => {
                    print_json(&Value::Array(list.images.iter().map(image_json).collect()))?;
                }
                OutputFormat::Text if list.images.is_empty() => eprintln!("no images"),
                OutputFormat::Text => print_stdout(&image_table(&list.images))?,
            }
        }
        ImageCommand::Show { image, output } => {
            let request = ImageRef {
                image: image.clone(),
            };
            print_image(&images.get_image(request).await?.into_inner(), *output)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_image(image: &Image, output: OutputFormat) -> Result<(), RemoteError> {
    match output {
        OutputFormat::Json => print_json(&image_json(image)),
        OutputFormat::Text => print_stdout(&render_image(image)),
    }
}

/// The artifacts' digests, sorted by role.
fn sorted_digests(image: &Image) -> Vec<(&String, &String)> {
    let mut digests: Vec<_> = image.sha256.iter().collect();
    digests.sort();
    digests
}

/// An image as one JSON document.
pub fn image_json(image: &Image) -> Value {
    let sha256: Map<String, Value> = sorted_digests(image)
        .into_iter()
        .map(|(role, digest)| (role.clone(), Value::String(digest.clone())))
        .collect();
    json!({
        "id": image.id,
        "name": image.name,
        "sha256": sha256,
        "cmdline": image.cmdline,
        "measured_direct_boot": image.measured_direct_boot,
        "size_bytes": image.size_bytes,
        "imported_at": image.imported_at,
    })
}

/// A size in bytes for people.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        let scale = 1024_u64.pow(u32::try_from(unit).unwrap_or(0));
        let tenths = bytes % scale * 10 / scale;
        format!("{}.{tenths} {}", bytes / scale, UNITS[unit])
    }
}

/// Every field of an image, for people.
pub fn render_image(image: &Image) -> String {
    let mut fields = Fields::default();
    fields.add("name", &image.name);
    fields.add("id", &image.id);
    fields.add(
        "size",
        format!(
            "{} ({} bytes)",
            human_size(image.size_bytes),
            image.size_bytes
        ),
    );
    fields.add(
        "measured boot",
        if image.measured_direct_boot {
            "yes: the firmware measures kernel, initrd and command line"
        } else {
            "no: only the firmware is measured"
        },
    );
    fields.add("cmdline", &image.cmdline);
    for (role, digest) in sorted_digests(image) {
        fields.add(format!("sha256 {role}"), digest);
    }
    fields.add("imported at", &image.imported_at);
    fields.render()
}

/// The `list` table.
pub fn image_table(images: &[Image]) -> String {
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|image| {
            vec![
                image.id.chars().take(12).collect(),
                image.name.clone(),
                human_size(image.size_bytes),
                if image.measured_direct_boot {
                    "yes"
                } else {
                    "no"
                }
                .to_owned(),
                image.imported_at.clone(),
            ]
        })
        .collect();
    render_table(&["ID", "NAME", "SIZE", "MEASURED BOOT", "IMPORTED"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Image {
        Image {
            id: "a1b2c3d4e5f60718293a4b5c6d7e8f90".into(),
            name: "debian".into(),
            sha256: [
                ("kernel".to_owned(), "bb".repeat(32)),
                ("firmware".to_owned(), "aa".repeat(32)),
            ]
            .into_iter()
            .collect(),
            cmdline: "console=ttyS0".into(),
            measured_direct_boot: true,
            size_bytes: 50 * 1024 * 1024 + 512 * 1024,
            imported_at: "2025-06-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(12), "12 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(50 * 1024 * 1024 + 512 * 1024), "50.5 MiB");
    }

    #[test]
    fn show_lists_digests_by_role() {
        let text = render_image(&sample());
        let firmware = text.find("sha256 firmware:").expect("firmware");
        let kernel = text.find("sha256 kernel:").expect("kernel");
        assert!(firmware < kernel, "{text}");
        assert!(
            text.contains("size:            50.5 MiB (52953088 bytes)"),
            "{text}"
        );
    }

    #[test]
    fn the_table_and_json() {
        assert_eq!(
            image_table(&[sample()]),
            "ID            NAME    SIZE      MEASURED BOOT  IMPORTED\n\
             a1b2c3d4e5f6  debian  50.5 MiB  yes            2025-06-01T00:00:00Z\n"
        );
        assert_eq!(image_json(&sample())["sha256"]["kernel"], "bb".repeat(32));
    }
}

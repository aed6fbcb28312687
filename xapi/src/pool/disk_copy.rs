//! Moving a VM's disk between two hosts of the pool for a cold migration:
//! the source streams the file over the pool's mTLS channel with the
//! SHA-256 of the whole file last; the target appends to a `.partial` copy
//! (so a cut-off copy resumes where it stopped), checks the checksum, and
//! only then gives the copy the disk's name. An encrypted disk moves as the
//! ciphertext it is: nothing here reads what a disk holds.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::pin::Pin;

use hsev_proto::internal::host_agent_client::HostAgentClient;
use hsev_proto::internal::{DiskRef, FileChunk};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::host_service::Membership;
use super::tls::client_config;
use crate::daemon::error::OpError;
use crate::model::DiskRecord;

/// How much of a disk one chunk carries.
pub const CHUNK: usize = 1 << 20;

/// The HTTP/2 flow-control window of a disk copy: a few chunks in flight.
const WINDOW: u32 = 8 << 20;

/// The largest HTTP/2 frame a disk copy takes: more than a chunk and its
/// framing.
const FRAME: u32 = 2 << 20;

/// Streams the file at `path` (a VM's disk, an image's artifact) from
/// `offset`, then its SHA-256 (of the whole file, the part already sent
/// included).
pub fn send_file(
    path: PathBuf,
    offset: u64,
) -> Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let send = |item| sender.blocking_send(item).is_ok();
        let result = (|| -> std::io::Result<()> {
            let mut file = std::fs::File::open(&path)?;
            let size = file.metadata()?.len();
            let mut hasher = openssl::sha::Sha256::new();
            let mut buffer = vec![0u8; CHUNK];
            let mut at = 0u64;
            // The part the receiver has goes into the checksum only.
            while at < offset.min(size) {
                let want =
                    usize::try_from((offset.min(size) - at).min(CHUNK as u64)).unwrap_or(CHUNK);
                file.read_exact(&mut buffer[..want])?;
                hasher.update(&buffer[..want]);
                at += want as u64;
            }
            file.seek(SeekFrom::Start(at))?;
            let mut first = true;
            loop {
                let read = file.read(&mut buffer)?;
                if read == 0 {
                    break;
                }
                hasher.update(&buffer[..read]);
                let chunk = FileChunk {
                    offset: at,
                    data: buffer[..read].to_vec(),
                    size: if first { size } else { 0 },
                    sha256: Vec::new(),
                };
                first = false;
                at += read as u64;
                if !send(Ok(chunk)) {
                    return Ok(());
                }
            }
            send(Ok(FileChunk {
                offset: at,
                data: Vec::new(),
                size: if first { size } else { 0 },
                sha256: hasher.finish().to_vec(),
            }));
            Ok(())
        })();
        if let Err(error) = result {
            let _ = sender.blocking_send(Err(Status::internal(format!(
                "reading {}: {error}",
                path.display()
            ))));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}

/// Copies `disk` from the host at `address` into `target`, resuming a
/// partial copy, and checks the whole file's SHA-256 before it takes the
/// disk's name.
pub async fn fetch_disk(
    membership: &Membership,
    from: &str,
    address: &str,
    disk: &DiskRecord,
    target: PathBuf,
    progress: &(dyn Fn(&str, &str, u32) + Sync),
) -> Result<u64, OpError> {
    let partial = target.with_extension("partial");
    if let Some(parent) = partial.parent() {
        std::fs::create_dir_all(parent).map_err(|error| {
            OpError::internal(format!("cannot create {}: {error}", parent.display()))
        })?;
    }
    let offset = std::fs::metadata(&partial)
        .map(|metadata| metadata.len())
        .unwrap_or(0);
    // HTTP/2's default 64 KiB windows would have the sender wait for a
    // window update every 64 KiB, and its 16 KiB frames cut each chunk in
    // 64: a disk streams through wide windows in whole-chunk frames.
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
        .map(|endpoint| {
            endpoint
                .initial_stream_window_size(Some(WINDOW))
                .initial_connection_window_size(Some(WINDOW))
                .max_frame_size(Some(FRAME))
        })
        .and_then(|endpoint| {
            endpoint.tls_config(client_config(
                &membership.identity,
                &membership.ca_pem,
                from,
            ))
        })
        .map_err(|error| OpError::internal(format!("host {from} at {address}: {error}")))?
        .connect()
        .await
        .map_err(|error| {
            OpError::unavailable(format!("cannot reach host {from} at {address}: {error}"))
        })?;
    let mut stream = HostAgentClient::new(channel)
        .send_disk(DiskRef {
            vm: disk.vm.0.clone(),
            disk: disk.name.clone(),
            offset,
        })
        .await
        .map_err(|status| super::wire::op_error(&status))?
        .into_inner();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)
        .map_err(|error| {
            OpError::internal(format!("cannot write {}: {error}", partial.display()))
        })?;
    // The checksum is computed as the copy is written (the part a resumed
    // copy already holds read once first), so a disk is read only once.
    let mut hasher = hash_prefix(&partial, offset)?;
    let started = std::time::Instant::now();
    let mut size = 0;
    let mut copied = offset;
    let mut reported = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|status| super::wire::op_error(&status))?;
        if chunk.size > 0 {
            size = chunk.size;
        }
        if !chunk.sha256.is_empty() {
            let streamed = started.elapsed();
            file.sync_all().map_err(|error| {
                OpError::internal(format!("cannot write {}: {error}", partial.display()))
            })?;
            tracing::info!(
                vm = %disk.vm,
                disk = %disk.name,
                from,
                mib = (copied - offset) >> 20,
                streamed_ms = streamed.as_millis(),
                synced_ms = (started.elapsed() - streamed).as_millis(),
                "disk copied"
            );
            drop(file);
            let local = hasher.finish().to_vec();
            if local != chunk.sha256 {
                let _ = std::fs::remove_file(&partial);
                return Err(OpError::internal(format!(
                    "disk {} of VM {}: the copy's SHA-256 {} is not the source's {}: the copy is \
                     dropped, a new migration starts it again",
                    disk.name,
                    disk.vm,
                    hex::encode(local),
                    hex::encode(&chunk.sha256)
                )));
            }
            std::fs::rename(&partial, &target).map_err(|error| {
                OpError::internal(format!("cannot rename {}: {error}", partial.display()))
            })?;
            return Ok(copied);
        }
        if chunk.offset != copied {
            return Err(OpError::internal(format!(
                "disk {}: a chunk at {} where {} was expected",
                disk.name, chunk.offset, copied
            )));
        }
        file.write_all(&chunk.data).map_err(|error| {
            OpError::internal(format!("cannot write {}: {error}", partial.display()))
        })?;
        hasher.update(&chunk.data);
        copied += chunk.data.len() as u64;
        let percent = (copied * 100).checked_div(size).unwrap_or(100);
        if percent >= reported + 10 {
            reported = percent;
            progress(
                "copy",
                &format!("disk {}: {} of {} MiB", disk.name, copied >> 20, size >> 20),
                u32::try_from(percent).unwrap_or(100),
            );
        }
    }
    Err(OpError::unavailable(format!(
        "the copy of disk {} from {from} was cut off at {copied} bytes; it resumes from there",
        disk.name
    )))
}

/// The SHA-256 state after the first `length` bytes of `path` (what a
/// resumed copy already holds).
fn hash_prefix(path: &std::path::Path, length: u64) -> Result<openssl::sha::Sha256, OpError> {
    let mut hasher = openssl::sha::Sha256::new();
    if length == 0 {
        return Ok(hasher);
    }
    let file = std::fs::File::open(path)
        .map_err(|error| OpError::internal(format!("cannot read {}: {error}", path.display())))?;
    let mut reader = file.take(length);
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let read = reader.read(&mut buffer).map_err(|error| {
            OpError::internal(format!("cannot read {}: {error}", path.display()))
        })?;
        if read == 0 {
            return Ok(hasher);
        }
        hasher.update(&buffer[..read]);
    }
}

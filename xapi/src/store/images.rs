//! Guest images.

use rusqlite::{named_params, OptionalExtension};

use super::codec::{self, IMAGE_COLUMNS};
use super::hosts::not_found;
use super::{Entity, Result, SqliteStore, StoreError};
use crate::model::ImageRecord;

/// Finds an image by id, else by name (an id wins over an equal name).
const IMAGE_BY_ID_OR_NAME: &str = "WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1";

impl SqliteStore {
    /// Records an imported image.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] if its id or its name is taken;
    /// [`StoreError::Invalid`] for a size past `i64::MAX` or a folder that
    /// is not UTF-8; [`StoreError::Constraint`] for an empty id or name.
    pub fn insert_image(&self, image: &ImageRecord) -> Result<()> {
        let op = "record the image";
        let dir = codec::path_text(&image.dir, "image folder")?;
        let sha256 = codec::json(&image.sha256, "image digests")?;
        let size_bytes = codec::integer(image.size_bytes, "image size")?;
        let imported_at = codec::nanos(image.imported_at, "image import time")?;
        self.write(op, |transaction| {
            let taken = transaction
                .query_row(
                    "SELECT id FROM image WHERE id = ?1 OR name = ?2 LIMIT 1",
                    (&image.id, &image.name),
                    |row| row.get::<_, String>(0),
                )
                .optional()
                .map_err(StoreError::sql(op))?;
            if let Some(taken) = taken {
                return Err(StoreError::Conflict {
                    entity: Entity::Image,
                    key: if taken == image.id {
                        taken
                    } else {
                        image.name.clone()
                    },
                });
            }
            transaction
                .execute(
                    "INSERT INTO image (id, name, dir, sha256, cmdline, measured_direct_boot,
                                        size_bytes, imported_at)
                     VALUES (:id, :name, :dir, :sha256, :cmdline, :measured_direct_boot,
                             :size_bytes, :imported_at)",
                    named_params! {
                        ":id": image.id,
                        ":name": image.name,
                        ":dir": dir,
                        ":sha256": sha256,
                        ":cmdline": image.cmdline,
                        ":measured_direct_boot": image.measured_direct_boot,
                        ":size_bytes": size_bytes,
                        ":imported_at": imported_at,
                    },
                )
                .map_err(StoreError::sql(op))?;
            Ok(())
        })
    }

    /// One image, by id or name.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    pub fn get_image(&self, id_or_name: &str) -> Result<ImageRecord> {
        get_image_in(&self.connection(), id_or_name)
    }

    /// Every image, by name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn list_images(&self) -> Result<Vec<ImageRecord>> {
        self.connection()
            .prepare_cached(&format!("SELECT {IMAGE_COLUMNS} FROM image ORDER BY name"))
            .and_then(|mut statement| {
                statement
                    .query_map([], codec::image_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(StoreError::sql("list the images"))
    }

    /// Removes an image that no VM uses, and returns it (so that the caller
    /// can remove its folder).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`]; [`StoreError::InUse`] while VMs use it.
    pub fn delete_image(&self, id_or_name: &str) -> Result<ImageRecord> {
        let op = "delete the image";
        self.write(op, |transaction| {
            let image = get_image_in(transaction, id_or_name)?;
            let users: u64 = transaction
                .query_row(
                    "SELECT count(*) FROM vm WHERE image = ?1",
                    [&image.id],
                    |row| codec::total_at(row, 0),
                )
                .map_err(StoreError::sql(op))?;
            if users > 0 {
                return Err(StoreError::InUse {
                    entity: Entity::Image,
                    key: image.name,
                    users,
                });
            }
            transaction
                .execute("DELETE FROM image WHERE id = ?1", [&image.id])
                .map_err(StoreError::sql(op))?;
            Ok(image)
        })
    }
}

fn get_image_in(connection: &rusqlite::Connection, id_or_name: &str) -> Result<ImageRecord> {
    connection
        .prepare_cached(&format!(
            "SELECT {IMAGE_COLUMNS} FROM image {IMAGE_BY_ID_OR_NAME}"
        ))
        .and_then(|mut statement| {
            statement
                .query_row([id_or_name], codec::image_from_row)
                .optional()
        })
        .map_err(StoreError::sql("read the image"))?
        .ok_or_else(|| not_found(Entity::Image, id_or_name))
}

//! Moving a pool from one store to another (`hsevd migrate-store`: SQLite
//! to etcd), record by record, then reading everything back from the
//! target and comparing it with the source before declaring success.
//!
//! What it must never do: write into a target that already holds a pool,
//! or change the source. Join tokens and create request ids are not
//! carried over: tokens are single-use and short-lived (create new ones on
//! the new store); request ids only matter while a create is retried.

use std::fmt;

use super::{Result, Store, StoreError, VmFilter};

/// What a copy moved, each count checked against the target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Hosts.
    pub hosts: usize,
    /// Images.
    pub images: usize,
    /// VMs.
    pub vms: usize,
    /// Their disks.
    pub disks: usize,
    /// Revoked certificates.
    pub revoked: usize,
    /// Migrations in flight.
    pub migrations: usize,
    /// Events.
    pub events: usize,
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} host(s), {} image(s), {} VM(s) with {} disk(s), {} revoked certificate(s), \
             {} migration(s) in flight, {} event(s)",
            self.hosts,
            self.images,
            self.vms,
            self.disks,
            self.revoked,
            self.migrations,
            self.events
        )
    }
}

/// Copies every record of `source` into `target`, which must hold no pool,
/// and checks that `target` then reads back the same records.
///
/// # Errors
///
/// [`StoreError::Conflict`] if `target` holds a pool already;
/// [`StoreError::Invalid`] (field `copy`) if a record reads back
/// differently; any error of either store.
pub fn copy_pool(source: &Store, target: &Store) -> Result<CopyReport> {
    let pool = source.pool()?;
    match target.pool() {
        Err(StoreError::NoPool) => {}
        Ok(existing) => {
            return Err(StoreError::Conflict {
                entity: super::Entity::Pool,
                key: existing.name,
            })
        }
        Err(error) => return Err(error),
    }
    let hosts = source.list_hosts()?;
    let images = source.list_images()?;
    let vms = source.list_vms(VmFilter::all())?;
    let revoked_hosts: Vec<(String, String)> = source
        .revoked_certificates()?
        .into_iter()
        .map(|fingerprint| (fingerprint, String::new()))
        .collect();
    let migrations = source.migrations()?;
    let events = source.events(None, usize::MAX)?;

    for host in &hosts {
        target.upsert_host(host)?;
    }
    for image in &images {
        target.insert_image(image)?;
    }
    let mut disks = 0;
    for vm in &vms {
        let vm_disks = source.disks(&vm.id)?;
        disks += vm_disks.len();
        target.insert_vm(vm, &vm_disks)?;
    }
    for (fingerprint, host) in &revoked_hosts {
        target.revoke_certificate(fingerprint, host)?;
    }
    for migration in &migrations {
        target.begin_migration(
            &migration.vm,
            &migration.from_host,
            &migration.to_host,
            migration.restart,
        )?;
        if migration.phase == "moved" {
            // Its VM is already recorded on the target host.
            let host = target.get_vm(&migration.vm.0, None)?.host;
            target.commit_migration(&migration.vm)?;
            target.set_vm_host(&migration.vm, &host)?;
        }
    }
    for event in &events {
        target.import_event(event)?;
    }
    // The pool last: a copy cut half-way leaves a target without a pool,
    // which hsevd refuses to serve and a new copy may overwrite.
    target.init_pool(&pool.name)?;

    let differs = |what: &str| StoreError::Invalid {
        field: "copy",
        reason: format!("the target's {what} differ from the source's"),
    };
    if target.list_hosts()? != hosts {
        return Err(differs("hosts"));
    }
    if target.list_images()? != images {
        return Err(differs("images"));
    }
    // A migration recorded as moved was committed again on the target,
    // which stamped its VM's update time anew.
    let moved: Vec<_> = migrations
        .iter()
        .filter(|migration| migration.phase == "moved")
        .map(|migration| &migration.vm)
        .collect();
    let copied_vms = target.list_vms(VmFilter::all())?;
    let same_vms = copied_vms.len() == vms.len()
        && copied_vms.iter().zip(&vms).all(|(copied, original)| {
            let mut copied = copied.clone();
            if moved.contains(&&copied.id) {
                copied.updated_at = original.updated_at;
            }
            &copied == original
        });
    if !same_vms {
        return Err(differs("VMs"));
    }
    for vm in &vms {
        if target.disks(&vm.id)? != source.disks(&vm.id)? {
            return Err(differs("disks"));
        }
    }
    if target.revoked_certificates()?.len() != revoked_hosts.len() {
        return Err(differs("revoked certificates"));
    }
    if target.migrations()? != migrations {
        return Err(differs("migrations"));
    }
    let copied = target.events(None, usize::MAX)?;
    let same_events = copied.len() == events.len()
        && copied
            .iter()
            .zip(&events)
            .all(|(a, b)| (&a.vm, &a.kind, &a.detail, a.at) == (&b.vm, &b.kind, &b.detail, b.at));
    if !same_events {
        return Err(differs("events"));
    }
    Ok(CopyReport {
        hosts: hosts.len(),
        images: images.len(),
        vms: vms.len(),
        disks,
        revoked: revoked_hosts.len(),
        migrations: migrations.len(),
        events: events.len(),
    })
}

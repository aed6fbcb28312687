//! Where each record lives in etcd, under the pool's prefix.
//!
//! ```text
//! PREFIX pool                       the pool (name, creation time)
//! PREFIX serial                     bumped by every record write
//! PREFIX host/NAME                  a host
//! PREFIX image/ID                   an image
//! PREFIX image-name/NAME            -> its id (names are unique)
//! PREFIX vm/ID                      a VM with its disks
//! PREFIX vm-name/OWNER \0 NAME      -> its id (names are unique per owner)
//! PREFIX disk-path/PATH             -> its VM's id (paths are unique)
//! PREFIX token/SHA256               a join token (by its secret's hash)
//! PREFIX revoked/FINGERPRINT        a revoked certificate
//! PREFIX migration/VM               a migration in flight
//! PREFIX request/ID                 -> the VM a create with this request id made
//! PREFIX event/UUID                 an event (its seq: the key's create revision)
//! PREFIX vm-event/VM/UUID           the same event, under its VM
//! PREFIX pool-ca                    the pool CA's fingerprint (its certificate's)
//! PREFIX coordinator/NAME           where coordinator NAME's pool listener is
//! ```
//!
//! A NUL separates an owner from a name: neither may contain one (the API
//! refuses control characters in names).

/// The keys of one pool.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for part in parts {
            key.push_str(part);
        }
        key
    }

    pub(super) fn pool(&self) -> String {
        self.key(&["pool"])
    }

    pub(super) fn serial(&self) -> String {
        self.key(&["serial"])
    }

    pub(super) fn hosts(&self) -> String {
        self.key(&["host/"])
    }

    pub(super) fn host(&self, name: &str) -> String {
        self.key(&["host/", name])
    }

    pub(super) fn images(&self) -> String {
        self.key(&["image/"])
    }

    pub(super) fn image(&self, id: &str) -> String {
        self.key(&["image/", id])
    }

    pub(super) fn image_name(&self, name: &str) -> String {
        self.key(&["image-name/", name])
    }

    pub(super) fn vms(&self) -> String {
        self.key(&["vm/"])
    }

    pub(super) fn vm(&self, id: &str) -> String {
        self.key(&["vm/", id])
    }

    pub(super) fn vm_names(&self) -> String {
        self.key(&["vm-name/"])
    }

    pub(super) fn vm_name(&self, owner: &str, name: &str) -> String {
        self.key(&["vm-name/", owner, "\0", name])
    }

    pub(super) fn disk_path(&self, path: &str) -> String {
        self.key(&["disk-path/", path])
    }

    pub(super) fn token(&self, secret_sha256: &str) -> String {
        self.key(&["token/", secret_sha256])
    }

    pub(super) fn revoked_all(&self) -> String {
        self.key(&["revoked/"])
    }

    pub(super) fn revoked(&self, fingerprint: &str) -> String {
        self.key(&["revoked/", fingerprint])
    }

    pub(super) fn migrations(&self) -> String {
        self.key(&["migration/"])
    }

    pub(super) fn migration(&self, vm: &str) -> String {
        self.key(&["migration/", vm])
    }

    pub(super) fn request(&self, id: &str) -> String {
        self.key(&["request/", id])
    }

    pub(super) fn events(&self) -> String {
        self.key(&["event/"])
    }

    pub(super) fn event(&self, id: &str) -> String {
        self.key(&["event/", id])
    }

    pub(super) fn vm_events(&self, vm: &str) -> String {
        self.key(&["vm-event/", vm, "/"])
    }

    pub(super) fn vm_event(&self, vm: &str, id: &str) -> String {
        self.key(&["vm-event/", vm, "/", id])
    }

    pub(super) fn pool_ca(&self) -> String {
        self.key(&["pool-ca"])
    }

    pub(super) fn coordinators(&self) -> String {
        self.key(&["coordinator/"])
    }

    pub(super) fn coordinator(&self, name: &str) -> String {
        self.key(&["coordinator/", name])
    }
}

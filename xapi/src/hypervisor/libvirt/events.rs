//! libvirt's domain lifecycle events, kept as the last event per domain.
//!
//! libvirt tells its clients when a domain starts, pauses, resumes, shuts
//! down, crashes or stops, and why (the event's detail: destroyed, the
//! guest shut down, QEMU failed, ...). The driver answers `state` from
//! these events, so a monitor pass over many VMs costs no call to the
//! daemon, and a domain that has already vanished (transient domains do,
//! once they end) is still known to have ended, and why.
//!
//! The `virt` crate (0.5) binds the event loop but not
//! `virConnectDomainEventRegisterAny`: this module calls libvirt's C API
//! for it, the only unsafe code of the driver, each block with why it is
//! sound. It must never hold the log's lock across a libvirt call.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use virt::connect::Connect;
use virt::sys;

use super::super::{DriverError, ExitReason};

/// One lifecycle event: libvirt's `virDomainEventType` and its detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// `VIR_DOMAIN_EVENT_*`.
    pub event: i32,
    /// The per-event detail (`VIR_DOMAIN_EVENT_STOPPED_FAILED`, ...).
    pub detail: i32,
}

/// What a lifecycle event says of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meaning {
    /// It runs (started, resumed).
    Running,
    /// It is paused; why.
    Paused(String),
    /// It ended; why.
    Ended(ExitReason),
    /// Nothing about whether it runs (defined, undefined, shutdown begun).
    Nothing,
}

const STARTED: i32 = sys::VIR_DOMAIN_EVENT_STARTED as i32;
const SUSPENDED: i32 = sys::VIR_DOMAIN_EVENT_SUSPENDED as i32;
const RESUMED: i32 = sys::VIR_DOMAIN_EVENT_RESUMED as i32;
const STOPPED: i32 = sys::VIR_DOMAIN_EVENT_STOPPED as i32;
const PMSUSPENDED: i32 = sys::VIR_DOMAIN_EVENT_PMSUSPENDED as i32;
const CRASHED: i32 = sys::VIR_DOMAIN_EVENT_CRASHED as i32;

impl Lifecycle {
    /// The event's meaning for [`super::super::RuntimeState`].
    pub fn meaning(self) -> Meaning {
        match self.event {
            STARTED | RESUMED => Meaning::Running,
            SUSPENDED => {
                Meaning::Paused(format!("paused (libvirt suspend detail {})", self.detail))
            }
            PMSUSPENDED => Meaning::Paused("suspended by the guest".to_owned()),
            CRASHED => Meaning::Ended(ExitReason::GuestPanicked),
            STOPPED => Meaning::Ended(stopped_reason(self.detail)),
            _ => Meaning::Nothing,
        }
    }
}

/// Why a domain stopped, from `VIR_DOMAIN_EVENT_STOPPED_*`.
pub fn stopped_reason(detail: i32) -> ExitReason {
    match u32::try_from(detail).unwrap_or(u32::MAX) {
        sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => ExitReason::GuestShutdown,
        sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED => ExitReason::GuestPanicked,
        sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => ExitReason::ProcessExited {
            detail: "libvirt destroyed the domain".to_owned(),
        },
        sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => ExitReason::ProcessExited {
            detail: "QEMU ended unexpectedly (libvirt: stopped, failed)".to_owned(),
        },
        other => ExitReason::ProcessExited {
            detail: format!("libvirt stopped the domain (stopped detail {other})"),
        },
    }
}

/// The last lifecycle event of each domain, by UUID.
#[derive(Debug, Default)]
pub struct EventLog {
    last: Mutex<HashMap<String, Lifecycle>>,
}

impl EventLog {
    fn record(&self, uuid: String, lifecycle: Lifecycle) {
        tracing::debug!(%uuid, ?lifecycle, "libvirt lifecycle event");
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uuid, lifecycle);
    }

    /// The last event of `uuid`, if one came since it was forgotten.
    pub fn last(&self, uuid: &str) -> Option<Lifecycle> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uuid)
            .copied()
    }

    /// Forgets `uuid` (before a start, after a stop).
    pub fn forget(&self, uuid: &str) {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uuid);
    }
}

/// Starts libvirt's default event loop, once per process, on a thread of
/// its own. It must run before the first connection is opened, or that
/// connection gets no events.
pub fn start_loop() -> Result<(), DriverError> {
    static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    LOOP.get_or_init(|| {
        // Errors come back to the caller, named: libvirt need not also
        // print them to stderr.
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl().map_err(|error| error.to_string())?;
        std::thread::Builder::new()
            .name("libvirt-events".to_owned())
            .spawn(|| loop {
                if let Err(error) = virt::event::event_run_default_impl() {
                    tracing::warn!(%error, "libvirt event loop");
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map(drop)
            .map_err(|error| error.to_string())
    })
    .clone()
    .map_err(|error| DriverError::Libvirt {
        what: "starting the event loop".to_owned(),
        message: error,
    })
}

/// A lifecycle-event registration on one connection; dropping it
/// deregisters.
#[derive(Debug)]
pub struct Subscription {
    connection: Connect,
    callback_id: c_int,
}

/// Registers `log` for the lifecycle events of every domain of
/// `connection`.
pub fn subscribe(connection: &Connect, log: Arc<EventLog>) -> Result<Subscription, DriverError> {
    let opaque = Box::into_raw(Box::new(log)).cast::<c_void>();
    let callback: sys::virConnectDomainEventCallback = Some(on_lifecycle);
    // SAFETY: libvirt calls the lifecycle callback through the generic
    // pointer type with the lifecycle signature (its own
    // VIR_DOMAIN_EVENT_CALLBACK cast does the same); both are `Option`s of
    // `unsafe extern "C" fn` pointers, of one size.
    let generic: sys::virConnectDomainEventGenericCallback =
        unsafe { std::mem::transmute(callback) };
    // SAFETY: the connection pointer is live for the call (borrowed from
    // `connection`); `opaque` is a leaked `Box<Arc<EventLog>>` that libvirt
    // hands back to `on_lifecycle` and finally to `free_log`, which frees
    // it once; a null domain asks for every domain's events.
    let callback_id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            connection.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            generic,
            opaque,
            Some(free_log),
        )
    };
    if callback_id < 0 {
        // SAFETY: registration failed, so libvirt kept no copy of
        // `opaque` and will never call `free_log` with it.
        drop(unsafe { Box::from_raw(opaque.cast::<Arc<EventLog>>()) });
        return Err(DriverError::Libvirt {
            what: "registering for lifecycle events".to_owned(),
            message: virt::error::Error::last_error().to_string(),
        });
    }
    Ok(Subscription {
        connection: connection.clone(),
        callback_id,
    })
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // SAFETY: `self.connection` holds a reference on the connection the
        // callback was registered on, so the pointer is live; the id is
        // the one that registration returned.
        let _ = unsafe {
            sys::virConnectDomainEventDeregisterAny(self.connection.as_ptr(), self.callback_id)
        };
    }
}

/// libvirt's lifecycle callback: records the event under the domain UUID.
unsafe extern "C" fn on_lifecycle(
    _connection: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the `Box<Arc<EventLog>>` given at registration,
    // alive until libvirt calls `free_log`, after the last callback.
    let log = unsafe { &*opaque.cast::<Arc<EventLog>>() };
    let mut buffer: [c_char; sys::VIR_UUID_STRING_BUFLEN as usize] =
        [0; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: libvirt passes a domain that is valid for the callback's
    // duration, and the buffer has VIR_UUID_STRING_BUFLEN bytes, as the
    // call requires.
    if unsafe { sys::virDomainGetUUIDString(domain, buffer.as_mut_ptr()) } == 0 {
        // SAFETY: on success libvirt wrote a NUL-terminated string.
        let uuid = unsafe { CStr::from_ptr(buffer.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        log.record(uuid, Lifecycle { event, detail });
    }
    0
}

/// Frees the log handle libvirt held for a registration.
unsafe extern "C" fn free_log(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once per registration, with the pointer
    // `subscribe` leaked, after the last callback that uses it.
    drop(unsafe { Box::from_raw(opaque.cast::<Arc<EventLog>>()) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_lifecycle_events_mean_states() {
        let stopped = |detail: u32| Lifecycle {
            event: STOPPED,
            detail: detail as i32,
        };
        assert_eq!(
            stopped(sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN).meaning(),
            Meaning::Ended(ExitReason::GuestShutdown)
        );
        match stopped(sys::VIR_DOMAIN_EVENT_STOPPED_FAILED).meaning() {
            Meaning::Ended(ExitReason::ProcessExited { detail }) => {
                assert!(detail.contains("unexpectedly"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Lifecycle {
                event: CRASHED,
                detail: 0
            }
            .meaning(),
            Meaning::Ended(ExitReason::GuestPanicked)
        );
        assert_eq!(
            Lifecycle {
                event: STARTED,
                detail: 0
            }
            .meaning(),
            Meaning::Running
        );
        assert_eq!(
            Lifecycle {
                event: sys::VIR_DOMAIN_EVENT_DEFINED as i32,
                detail: 0
            }
            .meaning(),
            Meaning::Nothing
        );
        let log = EventLog::default();
        log.record("u".into(), stopped(0));
        assert_eq!(log.last("u"), Some(stopped(0)));
        log.forget("u");
        assert_eq!(log.last("u"), None);
    }
}

//! Prometheus metrics, served in the text exposition format on
//! `metrics_listen` at `/metrics`.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of API request counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The RPC.
    pub method: String,
    /// Its gRPC status code name.
    pub code: String,
}

/// Labels of VM gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The VM state.
    pub state: String,
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// API requests by method and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// VMs by state.
    pub vms: Family<StateLabels, Gauge>,
    /// Seconds from a start request to the VMM process running.
    pub start_seconds: Histogram,
    /// VMM processes found dead by the monitor.
    pub vm_crashes: Counter,
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("hsevd");
        let requests = Family::<RequestLabels, Counter>::default();
        let vms = Family::<StateLabels, Gauge>::default();
        let start_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        let vm_crashes = Counter::default();
        registry.register(
            "api_requests",
            "API requests by method and gRPC code",
            requests.clone(),
        );
        registry.register("vms", "VMs by state", vms.clone());
        registry.register(
            "vm_start_seconds",
            "Seconds from a start request to the VMM running",
            start_seconds.clone(),
        );
        registry.register("vm_crashes", "VMM processes found dead", vm_crashes.clone());
        Arc::new(Metrics {
            registry: Mutex::new(registry),
            requests,
            vms,
            start_seconds,
            vm_crashes,
        })
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

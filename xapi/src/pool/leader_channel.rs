//! A member host's channel to the pool's coordinator when the pool may
//! have several (on etcd, one leads at a time and only the leader serves
//! the pool protocol): the coordinators' pool addresses, the one in use,
//! and a move to the next when it stops answering. Every call goes to the
//! address in use; the heartbeat loop moves on and learns the addresses
//! ([`crate::pool::member::heartbeats`]).
//!
//! It owns nothing but the choice of address: what a call means, and when
//! to give up on an address, are its callers'.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::daemon::error::OpError;

/// The channel. Clones share the address in use.
#[derive(Debug, Clone)]
pub struct LeaderChannel {
    tls: ClientTlsConfig,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    addresses: Vec<String>,
    current: usize,
    channel: Channel,
}

/// A lazy channel to `address` (`host:port`), mTLS with `tls`.
fn connect(address: &str, tls: &ClientTlsConfig) -> Result<Channel, OpError> {
    Ok(Endpoint::from_shared(format!("https://{address}"))
        .and_then(|endpoint| endpoint.tls_config(tls.clone()))
        .map_err(|error| OpError::invalid(format!("coordinator {address}: {error}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

impl LeaderChannel {
    /// A channel to the first of `addresses` (at least one), then the
    /// others in turn; it must be made inside the tokio runtime.
    pub fn new(addresses: Vec<String>, tls: ClientTlsConfig) -> Result<Self, OpError> {
        let first = addresses
            .first()
            .ok_or_else(|| OpError::invalid("no coordinator address"))?;
        let channel = connect(first, &tls)?;
        Ok(LeaderChannel {
            tls,
            state: Arc::new(Mutex::new(State {
                addresses,
                current: 0,
                channel,
            })),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The address in use.
    pub fn address(&self) -> String {
        let state = self.state();
        state.addresses[state.current].clone()
    }

    /// Every address known, the one in use among them.
    pub fn addresses(&self) -> Vec<String> {
        self.state().addresses.clone()
    }

    /// Takes `addresses` (from the leader's answer) as the known ones,
    /// keeping the one in use; answers whether the list changed.
    pub fn learn(&self, addresses: &[String]) -> bool {
        let mut state = self.state();
        let current = state.addresses[state.current].clone();
        let mut learned: Vec<String> = Vec::with_capacity(addresses.len() + 1);
        for address in addresses {
            if !learned.contains(address) {
                learned.push(address.clone());
            }
        }
        if !learned.contains(&current) {
            learned.insert(0, current.clone());
        }
        if learned == state.addresses {
            return false;
        }
        state.current = learned
            .iter()
            .position(|address| *address == current)
            .unwrap_or_default();
        state.addresses = learned;
        true
    }

    /// Moves to the next address, when there is another; answers it.
    pub fn move_on(&self) -> Option<String> {
        let mut state = self.state();
        if state.addresses.len() < 2 {
            return None;
        }
        let next = (state.current + 1) % state.addresses.len();
        match connect(&state.addresses[next], &self.tls) {
            Ok(channel) => {
                state.current = next;
                state.channel = channel;
                Some(state.addresses[next].clone())
            }
            Err(error) => {
                tracing::warn!(%error, "a coordinator address is unusable");
                None
            }
        }
    }
}

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for LeaderChannel {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    /// Always ready: readiness is the channel in use's, awaited per call.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        use tower::ServiceExt;
        let channel = self.state().channel.clone();
        Box::pin(async move { channel.oneshot(request).await })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests

    use super::*;

    #[tokio::test]
    async fn it_keeps_the_address_in_use_and_moves_on_in_turn() {
        let channel =
            LeaderChannel::new(vec!["10.0.0.1:7444".into()], ClientTlsConfig::new()).unwrap();
        assert_eq!(channel.move_on(), None, "nowhere else to go");
        let learned = [
            "10.0.0.2:7444".to_owned(),
            "10.0.0.3:7444".to_owned(),
            "10.0.0.2:7444".to_owned(),
        ];
        assert!(channel.learn(&learned));
        assert_eq!(
            channel.addresses(),
            ["10.0.0.1:7444", "10.0.0.2:7444", "10.0.0.3:7444"]
        );
        assert!(!channel.learn(&learned), "nothing new");
        assert_eq!(channel.address(), "10.0.0.1:7444");
        assert_eq!(channel.move_on().as_deref(), Some("10.0.0.2:7444"));
        assert_eq!(channel.move_on().as_deref(), Some("10.0.0.3:7444"));
        assert!(channel.clone().learn(&["10.0.0.3:7444".to_owned()]));
        assert_eq!(channel.addresses(), ["10.0.0.3:7444"]);
        assert_eq!(channel.move_on(), None);
        assert_eq!(channel.address(), "10.0.0.3:7444");
        assert!(LeaderChannel::new(Vec::new(), ClientTlsConfig::new()).is_err());
    }
}

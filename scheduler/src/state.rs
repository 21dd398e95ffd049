//! What every handler and background task of the scheduler shares.

use std::sync::Arc;

use flota_shared::config::Config;
use flota_shared::store::Store;

use crate::activity::Activity;
use crate::broker::Broker;
use crate::dependencies::Dependencies;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub config: Config,
    pub store: Store,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    pub activity: Arc<Activity>,
    pub deps: Dependencies,
}

/// Redis connections of a scheduler's pool (one shared multiplexed connection
/// carries the commands; the pool makes and replaces it).
pub const REDIS_POOL_SIZE: usize = 64;

impl AppState {
    pub fn new(config: Config, store: Store) -> AppState {
        Self::assemble(config, store, Arc::default(), Arc::default())
    }

    /// The same metrics and activity over connections of its own (a Redis
    /// pool, a publishing AMQP connection), for a part of the scheduler that
    /// runs on a runtime of its own: a connection is driven by the runtime that
    /// opened it, and a wake-up across runtimes is a thread switch.
    pub fn with_own_connections(&self) -> anyhow::Result<AppState> {
        let pool = flota_shared::store::pool(&self.config, REDIS_POOL_SIZE)?;
        let store = Store::new(pool, &self.config.prefix);
        Ok(Self::assemble(self.config.clone(), store, self.metrics.clone(), self.activity.clone()))
    }

    fn assemble(config: Config, store: Store, metrics: Arc<Metrics>, activity: Arc<Activity>) -> AppState {
        // The scheduler records results and plans: it is the one that sets how long they stay.
        let store = store.with_retention(config.result_ttl);
        let broker = Broker::new(&config);
        let deps =
            Dependencies { store: store.clone(), broker: broker.clone(), topo: broker.topology().clone() };
        AppState { config, store, broker, metrics, activity, deps }
    }
}

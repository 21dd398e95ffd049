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

impl AppState {
    pub fn new(config: Config, store: Store) -> AppState {
        let broker = Broker::new(&config);
        let deps =
            Dependencies { store: store.clone(), broker: broker.clone(), topo: broker.topology().clone() };
        AppState {
            config,
            store,
            broker,
            metrics: Arc::new(Metrics::default()),
            activity: Arc::new(Activity::default()),
            deps,
        }
    }

    /// The same metrics and activity over connections of its own (a Redis
    /// pool, a publishing AMQP connection), for a part of the scheduler that
    /// runs on a runtime of its own: a connection is driven by the runtime that
    /// opened it, and a wake-up across runtimes is a thread switch.
    pub fn with_own_connections(&self) -> anyhow::Result<AppState> {
        let store = Store::new(flota_shared::store::pool(&self.config, 64)?, &self.config.prefix);
        let broker = Broker::new(&self.config);
        let deps =
            Dependencies { store: store.clone(), broker: broker.clone(), topo: broker.topology().clone() };
        Ok(AppState {
            config: self.config.clone(),
            store,
            broker,
            metrics: self.metrics.clone(),
            activity: self.activity.clone(),
            deps,
        })
    }
}

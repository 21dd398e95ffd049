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
}

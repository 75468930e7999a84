//! `--platform docker`: the running containers of a plain Docker host, grouped by Compose
//! project.

use std::time::SystemTime;

use super::{client::InspectCache, decode::group_by_compose, DockerClient};
use crate::inventory::{Inventory, InventoryFuture, InventorySource, SourceError};

/// `--platform docker`: the running containers of a plain Docker host, grouped by Compose
/// project; containers in no project are standalone.
#[derive(Debug)]
pub struct DockerSource {
    client: DockerClient,
    cache: InspectCache,
}

impl DockerSource {
    pub fn new(client: DockerClient) -> Self {
        Self {
            client,
            cache: InspectCache::default(),
        }
    }

    async fn fetch_inner(&mut self) -> Result<Inventory, SourceError> {
        let containers = self
            .client
            .containers(&mut self.cache)
            .await
            .map_err(|e| e.into_source_error(self.client.socket()))?;
        let (tasks, standalone) = group_by_compose(containers);
        let mut inventory = Inventory::empty("docker");
        inventory.fetched_at = SystemTime::now();
        inventory.workloads = tasks;
        inventory.standalone = standalone;
        Ok(inventory)
    }
}

impl InventorySource for DockerSource {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn fetch(&mut self) -> InventoryFuture<'_> {
        Box::pin(self.fetch_inner())
    }
}

//! Services and backends in the balancer's maps: the typed API behind `upsert_service`,
//! `set_backends`, `remove_service` and `service_stats`.
//!
//! Every change is validated in full (and its Maglev table built) before any map is written, so a
//! rejected change leaves the running tables untouched. Tables are switched, never edited: a new
//! inner map is filled, then put in the service's `MAGLEV` slot in one update, so no flow ever
//! meets a half-written table. Backends that leave are deactivated only after the switch.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::{
    dnat_checksum_deltas, vip_slot, BackendValue, ServiceKey, ServiceValue, TrafficStats,
    BACKEND_ACTIVE, BACKEND_REMOTE, FAMILY_IPV4, FAMILY_IPV6, MAP_BACKENDS, MAP_BACKEND_STATS,
    MAP_MAGLEV, MAP_SERVICES, MAP_SERVICE_STATS, MAP_VIP_FILTER, PROTO_TCP, PROTO_UDP,
};

use super::{map_error, tables, Dataplane, DataplaneError, Result};

/// Services whose tables are built together and switched in with one update in
/// [`Dataplane::sync`] (each table's map stays open until its batch is switched in).
const SYNC_BATCH: usize = 256;
/// Tables built at once, on every core, before they are written.
const BUILD_TOGETHER: usize = 16;
pub use crate::config::{Backend, Protocol, Service};
use crate::maglev;

/// Counters of one service and of each of its backends, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStats {
    pub service: Service,
    pub traffic: TrafficStats,
    pub backends: Vec<(Backend, TrafficStats)>,
}

/// What user space remembers of a service it has written.
#[derive(Debug, Clone)]
pub(super) struct ServiceState {
    pub id: u32,
    /// (backend, backend id), in the order given.
    pub backends: Vec<(Backend, u32)>,
}

/// A change between [`Dataplane::stage`] and [`Dataplane::commit`].
pub(super) struct Staged {
    service: Service,
    /// The service's state before the change.
    old: ServiceState,
    assigned: Vec<(Backend, u32)>,
    /// `None`: no backend has a weight; the service's entry gets table size 0.
    table: Option<MapData>,
}

/// Id allocation and per-service state, rebuilt from the maps when they were pinned.
#[derive(Debug, Default)]
pub(super) struct Registry {
    pub services: BTreeMap<Service, ServiceState>,
    pub service_ids: Ids,
    pub backend_ids: Ids,
    pub next_generation: u32,
    /// Services per VIP_FILTER slot.
    pub vip_filter: BTreeMap<u32, u32>,
    /// Services counted in `vip_filter`.
    pub counted: BTreeSet<Service>,
    /// How Maglev tables are written (see [`tables::probe_kind`]).
    pub table_kind: tables::TableKind,
}

impl Registry {
    pub fn vip_filter_has(&self, service: &Service) -> bool {
        self.counted.contains(service)
    }
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        FAMILY_IPV4
    } else {
        FAMILY_IPV6
    }
}

fn addr16(ip: &IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            a
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn ip_from(family_tag: u8, addr: &[u8; 16]) -> IpAddr {
    if family_tag == FAMILY_IPV4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    }
}

pub(super) fn service_key(service: &Service) -> ServiceKey {
    ServiceKey {
        addr: addr16(&service.vip),
        port: service.port.to_be_bytes(),
        proto: protocol_number(service.protocol),
        family: family(&service.vip),
    }
}

/// Ids in use, and a floor below which every id is taken: giving out the lowest free id costs
/// what it skips past the floor, not a walk over every id in use.
#[derive(Debug, Default)]
pub(super) struct Ids {
    used: BTreeSet<u32>,
    floor: u32,
}

impl Ids {
    /// Takes the lowest free id below `capacity`.
    pub fn take(&mut self, capacity: u32) -> Option<u32> {
        let mut expected = self.floor;
        for id in self.used.range(self.floor..) {
            if *id != expected {
                break;
            }
            expected += 1;
        }
        if expected >= capacity {
            return None;
        }
        self.used.insert(expected);
        self.floor = expected + 1;
        Some(expected)
    }

    /// Marks an id taken (recovering pinned maps).
    pub fn insert(&mut self, id: u32) {
        self.used.insert(id);
    }

    pub fn release(&mut self, id: u32) {
        self.used.remove(&id);
        self.floor = self.floor.min(id);
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }
}

/// The node of a backend read back from the map (`None`: this node's).
fn backend_node(value: &BackendValue) -> Option<IpAddr> {
    (value.flags & BACKEND_REMOTE != 0).then(|| ip_from(value.family, &value.node))
}

fn maglev_backends(backends: &[Backend]) -> Vec<maglev::Backend> {
    backends
        .iter()
        .map(|b| maglev::Backend {
            key: b.maglev_key(),
            weight: b.weight,
        })
        .collect()
}

fn build_table(service: &Service, backends: &[Backend], size: u32) -> Result<maglev::Table> {
    maglev::build(&maglev_backends(backends), size).map_err(|e| invalid_table(service, e))
}

fn invalid_table(service: &Service, e: maglev::MaglevError) -> DataplaneError {
    DataplaneError::InvalidService {
        service: service.to_string(),
        reason: e.to_string(),
    }
}

/// Checks a service and its backends; every error names the offending value.
pub fn validate(service: &Service, backends: &[Backend], table_size: u32) -> Result<()> {
    let invalid = |reason: String| DataplaneError::InvalidService {
        service: service.to_string(),
        reason,
    };
    if let Err(e) = crate::config::validate_service_ip("vip", service.vip) {
        return Err(invalid(e.to_string()));
    }
    if service.port == 0 {
        return Err(invalid("port 0 is not a service port".into()));
    }
    for b in backends {
        if b.ip.is_ipv4() != service.vip.is_ipv4() {
            return Err(invalid(format!(
                "backend {} is not of the VIP's address family (no NAT46/64)",
                b.maglev_key()
            )));
        }
        if let Err(e) = crate::config::validate_service_ip("backend", b.ip) {
            return Err(invalid(e.to_string()));
        }
        if b.port == 0 {
            return Err(invalid(format!("backend {} has port 0", b.ip)));
        }
        if let Some(node) = b.node {
            if node.is_ipv4() != b.ip.is_ipv4() {
                return Err(invalid(format!(
                    "backend {} is on node {node}, of another address family: it cannot be tunnelled there",
                    b.maglev_key()
                )));
            }
            if let Err(e) = crate::config::validate_service_ip("backend's node", node) {
                return Err(invalid(e.to_string()));
            }
        }
    }
    maglev::check(&maglev_backends(backends), table_size).map_err(|e| invalid(e.to_string()))
}

impl Dataplane {
    /// Creates the service or replaces its backends.
    pub fn upsert_service(&mut self, service: Service, backends: &[Backend]) -> Result<()> {
        validate(&service, backends, self.table_size)?;
        self.check_tunnels(&service, backends)?;
        let table = build_table(&service, backends, self.table_size)?;
        let staged = self.upsert_stage(service, backends, table)?;
        self.commit(vec![staged])
    }

    /// A new service's id and counters, then [`Self::stage`].
    fn upsert_stage(
        &mut self,
        service: Service,
        backends: &[Backend],
        table: maglev::Table,
    ) -> Result<Staged> {
        if !self.registry.services.contains_key(&service) {
            let id = self
                .registry
                .service_ids
                .take(self.capacities.services)
                .ok_or(DataplaneError::Full {
                    what: "services",
                    capacity: self.capacities.services,
                })?;
            self.registry.services.insert(
                service,
                ServiceState {
                    id,
                    backends: Vec::new(),
                },
            );
            self.reset_stats(MAP_SERVICE_STATS, id)?;
            tracing::info!(event = "serviceAdded", service = %service, id);
        }
        self.stage(&service, backends, table)
    }

    /// Replaces a service's backends: established flows keep a backend that stays; flows of a
    /// removed backend move; a new backend takes only new flows.
    pub fn set_backends(&mut self, service: &Service, backends: &[Backend]) -> Result<()> {
        validate(service, backends, self.table_size)?;
        self.check_tunnels(service, backends)?;
        let table = build_table(service, backends, self.table_size)?;
        let staged = self.stage(service, backends, table)?;
        self.commit(vec![staged])
    }

    /// The first half of a change: the backends' entries written (new ids for new backends)
    /// and the new table created, not yet switched in.
    fn stage(
        &mut self,
        service: &Service,
        backends: &[Backend],
        table: maglev::Table,
    ) -> Result<Staged> {
        let state = self
            .registry
            .services
            .get(service)
            .cloned()
            .ok_or_else(|| DataplaneError::InvalidService {
                service: service.to_string(),
                reason: "no such service".into(),
            })?;
        let old: BTreeMap<String, u32> = state
            .backends
            .iter()
            .map(|(b, id)| (b.maglev_key(), *id))
            .collect();
        let new_count = backends
            .iter()
            .filter(|b| !old.contains_key(&b.maglev_key()))
            .count();
        let free = self.capacities.backends as usize - self.registry.backend_ids.len();
        if new_count > free {
            return Err(DataplaneError::Full {
                what: "backends",
                capacity: self.capacities.backends,
            });
        }

        // 1. Backend entries: keep the ids of backends that stay, allocate the new ones.
        let mut assigned: Vec<(Backend, u32)> = Vec::with_capacity(backends.len());
        for b in backends {
            let id = match old.get(&b.maglev_key()) {
                Some(id) => *id,
                None => {
                    let id = self
                        .registry
                        .backend_ids
                        .take(self.capacities.backends)
                        .expect("counted above");
                    self.reset_stats(MAP_BACKEND_STATS, id)?;
                    id
                }
            };
            assigned.push((*b, id));
        }
        let generation_base = self.registry.next_generation;
        {
            let mut array: Array<&mut MapData, BackendValue> = Array::try_from(
                self.ebpf
                    .map_mut(MAP_BACKENDS)
                    .ok_or(DataplaneError::MissingMap(MAP_BACKENDS))?,
            )
            .map_err(map_error(MAP_BACKENDS))?;
            for (i, (b, id)) in assigned.iter().enumerate() {
                // A backend that stays keeps its generation (its flows stay valid); a new one
                // gets a fresh one, so flows tracked to an earlier holder of its id are not its.
                let existing = if old.contains_key(&b.maglev_key()) {
                    Some(array.get(id, 0).map_err(map_error(MAP_BACKENDS))?)
                } else {
                    None
                }
                .filter(|existing| existing.flags & BACKEND_ACTIVE != 0);
                let (csum_ip, csum_l4) = dnat_checksum_deltas(
                    family(&b.ip),
                    &addr16(&service.vip),
                    service.port.to_be_bytes(),
                    &addr16(&b.ip),
                    b.port.to_be_bytes(),
                );
                let value = BackendValue {
                    addr: addr16(&b.ip),
                    port: b.port.to_be_bytes(),
                    family: family(&b.ip),
                    flags: if b.node.is_some() {
                        BACKEND_ACTIVE | BACKEND_REMOTE
                    } else {
                        BACKEND_ACTIVE
                    },
                    service_id: state.id,
                    generation: existing
                        .map_or(generation_base.wrapping_add(i as u32), |e| e.generation),
                    weight: b.weight,
                    csum_ip,
                    csum_l4,
                    node: b.node.as_ref().map_or([0; 16], addr16),
                };
                array.set(*id, value, 0).map_err(map_error(MAP_BACKENDS))?;
            }
        }
        self.registry.next_generation = generation_base.wrapping_add(assigned.len() as u32);

        // 2. The new table, switched in by `commit`.
        let table = if table.slots.is_empty() {
            None
        } else {
            let ids: Vec<u32> = table
                .slots
                .iter()
                .map(|index| assigned[*index as usize].1)
                .collect();
            Some(tables::table(self.registry.table_kind, &ids)?)
        };
        Ok(Staged {
            service: *service,
            old: state,
            assigned,
            table,
        })
    }

    /// The second half of staged changes: their tables switched in (one batch), then each
    /// service's entry pointed at its table, and the backends that left deactivated.
    fn commit(&mut self, staged: Vec<Staged>) -> Result<()> {
        let switches: Vec<(u32, &MapData)> = staged
            .iter()
            .filter_map(|s| s.table.as_ref().map(|t| (s.old.id, t)))
            .collect();
        tables::switch(self.maglev_map()?, &switches)?;
        for change in staged {
            self.finish(change)?;
        }
        Ok(())
    }

    fn maglev_map(&self) -> Result<&MapData> {
        match self.ebpf.map(MAP_MAGLEV) {
            Some(Map::ArrayOfMaps(data)) => Ok(data),
            _ => Err(DataplaneError::MissingMap(MAP_MAGLEV)),
        }
    }

    fn finish(&mut self, change: Staged) -> Result<()> {
        let Staged {
            service,
            old: state,
            assigned,
            table,
        } = change;
        let service = &service;
        let table_size = if table.is_some() { self.table_size } else { 0 };
        {
            let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> = HashMap::try_from(
                self.ebpf
                    .map_mut(MAP_SERVICES)
                    .ok_or(DataplaneError::MissingMap(MAP_SERVICES))?,
            )
            .map_err(map_error(MAP_SERVICES))?;
            services
                .insert(
                    service_key(service),
                    ServiceValue {
                        id: state.id,
                        table_size,
                    },
                    0,
                )
                .map_err(map_error(MAP_SERVICES))?;
        }

        // 3. Backends that left: deactivated after the switch, ids freed.
        let kept: BTreeSet<u32> = assigned.iter().map(|(_, id)| *id).collect();
        let gone: Vec<u32> = state
            .backends
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| !kept.contains(id))
            .collect();
        self.deactivate_backends(&gone)?;
        self.retire_backend_stats(state.id, &gone)?;
        tracing::info!(
            event = "backendsSet",
            service = %service,
            backends = assigned.len(),
            removed = gone.len(),
            table_size
        );
        if let Some(s) = self.registry.services.get_mut(service) {
            s.backends = assigned;
        }
        if !self.registry.vip_filter_has(service) {
            self.count_vip(service, 1)?;
        }
        Ok(())
    }

    /// Stops balancing a service: new packets to it pass to the kernel untouched.
    pub fn remove_service(&mut self, service: &Service) -> Result<()> {
        let Some(state) = self.registry.services.get(service).cloned() else {
            return Err(DataplaneError::InvalidService {
                service: service.to_string(),
                reason: "no such service".into(),
            });
        };
        {
            let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> = HashMap::try_from(
                self.ebpf
                    .map_mut(MAP_SERVICES)
                    .ok_or(DataplaneError::MissingMap(MAP_SERVICES))?,
            )
            .map_err(map_error(MAP_SERVICES))?;
            services
                .remove(&service_key(service))
                .map_err(map_error(MAP_SERVICES))?;
        }
        let ids: Vec<u32> = state.backends.iter().map(|(_, id)| *id).collect();
        self.deactivate_backends(&ids)?;
        self.registry.service_ids.release(state.id);
        self.registry.services.remove(service);
        self.count_vip(service, -1)?;
        tracing::info!(event = "serviceRemoved", service = %service);
        Ok(())
    }

    /// Makes the data plane hold exactly this: the program on `interfaces` and no other, these
    /// services with these backends (unchanged ones are not touched, so they keep their
    /// flows), these L2 VIPs. Every service is validated before the first change.
    pub fn sync(
        &mut self,
        interfaces: &[super::Interface],
        services: &BTreeMap<Service, Vec<Backend>>,
        l2: &[super::L2Vip],
    ) -> Result<()> {
        // Only what differs from what is written is validated and written: a service equal
        // to its written state was validated when it was written.
        let unchanged = |registry: &Registry, service: &Service, backends: &[Backend]| {
            registry.services.get(service).is_some_and(|state| {
                state.backends.len() == backends.len()
                    && state
                        .backends
                        .iter()
                        .zip(backends)
                        .all(|((b, _), w)| b == w)
            })
        };
        let changed: Vec<(Service, &[Backend])> = services
            .iter()
            .filter(|(service, backends)| !unchanged(&self.registry, service, backends))
            .map(|(service, backends)| (*service, backends.as_slice()))
            .collect();
        for (service, backends) in &changed {
            validate(service, backends, self.table_size)?;
            self.check_tunnels(service, backends)?;
        }
        let wanted: BTreeSet<u32> = interfaces.iter().map(|i| i.ifindex).collect();
        let gone: Vec<u32> = self
            .attached()
            .map(|(ifindex, _)| ifindex)
            .filter(|i| !wanted.contains(i))
            .collect();
        for ifindex in gone {
            self.detach(ifindex);
        }
        self.attach_all(interfaces)?;
        let removed: Vec<Service> = self
            .registry
            .services
            .keys()
            .filter(|service| !services.contains_key(service))
            .copied()
            .collect();
        for service in &removed {
            self.remove_service(service)?;
        }
        // Tables are built on every core a few at a time and each written into its own inner
        // map at once (a table is 64 KiB at the default M: building a whole batch first would
        // hold them all); a batch's tables are then switched in together.
        for batch in changed.chunks(SYNC_BATCH) {
            let mut staged = Vec::with_capacity(batch.len());
            for few in batch.chunks(BUILD_TOGETHER) {
                let lists: Vec<Vec<maglev::Backend>> = few
                    .iter()
                    .map(|(_, backends)| maglev_backends(backends))
                    .collect();
                let tables = maglev::build_many(&lists, self.table_size);
                for ((service, backends), table) in few.iter().zip(tables) {
                    let change = table
                        .map_err(|e| invalid_table(service, e))
                        .and_then(|table| self.upsert_stage(*service, backends, table));
                    match change {
                        Ok(change) => staged.push(change),
                        Err(e) => {
                            // What was staged is committed: no id is left allocated to nothing.
                            self.commit(staged)?;
                            return Err(e);
                        }
                    }
                }
            }
            self.commit(staged)?;
        }
        self.set_l2_vips(l2)
    }

    /// The services this data plane balances, with their backends.
    pub fn services(&self) -> Vec<(Service, Vec<Backend>)> {
        self.registry
            .services
            .iter()
            .map(|(s, state)| (*s, state.backends.iter().map(|(b, _)| *b).collect()))
            .collect()
    }

    /// Per-service and per-backend counters, summed over CPUs. A service's are its backends'
    /// plus those of backends that left it (`MAP_SERVICE_STATS`).
    pub fn service_stats(&self) -> Result<Vec<ServiceStats>> {
        let read = |name: &'static str, id: u32| -> Result<TrafficStats> {
            let array: PerCpuArray<&MapData, TrafficStats> = PerCpuArray::try_from(
                self.ebpf
                    .map(name)
                    .ok_or(DataplaneError::MissingMap(name))?,
            )
            .map_err(map_error(name))?;
            let values = array.get(&id, 0).map_err(map_error(name))?;
            Ok(values
                .iter()
                .fold(TrafficStats::default(), |sum, v| sum.add(*v)))
        };
        let mut out = Vec::new();
        for (service, state) in &self.registry.services {
            // The backends that left, then the ones in service (see `MAP_SERVICE_STATS`).
            let mut traffic = read(MAP_SERVICE_STATS, state.id)?;
            let mut backends = Vec::new();
            for (b, id) in &state.backends {
                let counted = read(MAP_BACKEND_STATS, *id)?;
                traffic = traffic.add(counted);
                backends.push((*b, counted));
            }
            out.push(ServiceStats {
                service: *service,
                traffic,
                backends,
            });
        }
        Ok(out)
    }

    /// Adds `delta` services to the VIP_FILTER slot of the service's VIP and writes it.
    fn count_vip(&mut self, service: &Service, delta: i64) -> Result<()> {
        let slot = vip_slot(&addr16(&service.vip));
        let count = self.registry.vip_filter.entry(slot).or_insert(0);
        *count = (*count as i64 + delta).max(0) as u32;
        let value = *count;
        if value == 0 {
            self.registry.vip_filter.remove(&slot);
        }
        if delta > 0 {
            self.registry.counted.insert(*service);
        } else {
            self.registry.counted.remove(service);
        }
        self.write_vip_slot(slot, value)
    }

    fn write_vip_slot(&mut self, slot: u32, value: u32) -> Result<()> {
        let mut array: Array<&mut MapData, u32> = Array::try_from(
            self.ebpf
                .map_mut(MAP_VIP_FILTER)
                .ok_or(DataplaneError::MissingMap(MAP_VIP_FILTER))?,
        )
        .map_err(map_error(MAP_VIP_FILTER))?;
        array.set(slot, value, 0).map_err(map_error(MAP_VIP_FILTER))
    }

    fn deactivate_backends(&mut self, ids: &[u32]) -> Result<()> {
        let mut array: Array<&mut MapData, BackendValue> = Array::try_from(
            self.ebpf
                .map_mut(MAP_BACKENDS)
                .ok_or(DataplaneError::MissingMap(MAP_BACKENDS))?,
        )
        .map_err(map_error(MAP_BACKENDS))?;
        for id in ids {
            let mut value = array.get(id, 0).map_err(map_error(MAP_BACKENDS))?;
            value.flags = 0;
            array.set(*id, value, 0).map_err(map_error(MAP_BACKENDS))?;
            self.registry.backend_ids.release(*id);
        }
        Ok(())
    }

    /// Adds the counters of backends that left a service to the service's own (per CPU), so its
    /// traffic never goes backwards; the backends' ids are reset when they are given out again.
    /// Called after the backends were deactivated: the XDP program counts nothing more on them
    /// (but for a packet in flight on another CPU at that instant).
    fn retire_backend_stats(&mut self, service_id: u32, backend_ids: &[u32]) -> Result<()> {
        if backend_ids.is_empty() {
            return Ok(());
        }
        let left: Vec<PerCpuValues<TrafficStats>> = {
            let array: PerCpuArray<&MapData, TrafficStats> = PerCpuArray::try_from(
                self.ebpf
                    .map(MAP_BACKEND_STATS)
                    .ok_or(DataplaneError::MissingMap(MAP_BACKEND_STATS))?,
            )
            .map_err(map_error(MAP_BACKEND_STATS))?;
            backend_ids
                .iter()
                .map(|id| array.get(id, 0).map_err(map_error(MAP_BACKEND_STATS)))
                .collect::<Result<_>>()?
        };
        let mut array: PerCpuArray<&mut MapData, TrafficStats> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(MAP_SERVICE_STATS)
                .ok_or(DataplaneError::MissingMap(MAP_SERVICE_STATS))?,
        )
        .map_err(map_error(MAP_SERVICE_STATS))?;
        let mut sums: Vec<TrafficStats> = array
            .get(&service_id, 0)
            .map_err(map_error(MAP_SERVICE_STATS))?
            .iter()
            .copied()
            .collect();
        for values in &left {
            for (sum, value) in sums.iter_mut().zip(values.iter()) {
                *sum = sum.add(*value);
            }
        }
        let sums = PerCpuValues::try_from(sums)
            .map_err(|e| DataplaneError::Cpus(std::io::Error::other(e.to_string())))?;
        array
            .set(service_id, sums, 0)
            .map_err(map_error(MAP_SERVICE_STATS))
    }

    fn reset_stats(&mut self, name: &'static str, id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        let mut array: PerCpuArray<&mut MapData, TrafficStats> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or(DataplaneError::MissingMap(name))?,
        )
        .map_err(map_error(name))?;
        let zeros = PerCpuValues::try_from(vec![TrafficStats::default(); cpus])
            .map_err(|e| DataplaneError::Cpus(std::io::Error::other(e.to_string())))?;
        array.set(id, zeros, 0).map_err(map_error(name))
    }

    /// Rebuilds the registry from maps that were pinned by an earlier run.
    pub(super) fn recover_registry(&mut self) -> Result<()> {
        let services: HashMap<&MapData, ServiceKey, ServiceValue> = HashMap::try_from(
            self.ebpf
                .map(MAP_SERVICES)
                .ok_or(DataplaneError::MissingMap(MAP_SERVICES))?,
        )
        .map_err(map_error(MAP_SERVICES))?;
        let mut by_id: BTreeMap<u32, Service> = BTreeMap::new();
        for entry in services.iter() {
            let (key, value) = entry.map_err(map_error(MAP_SERVICES))?;
            let protocol = if key.proto == PROTO_TCP {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            let service = Service {
                vip: ip_from(key.family, &key.addr),
                port: u16::from_be_bytes(key.port),
                protocol,
            };
            by_id.insert(value.id, service);
        }
        if by_id.is_empty() {
            return self.probe_table_kind();
        }
        let backends: Array<&MapData, BackendValue> = Array::try_from(
            self.ebpf
                .map(MAP_BACKENDS)
                .ok_or(DataplaneError::MissingMap(MAP_BACKENDS))?,
        )
        .map_err(map_error(MAP_BACKENDS))?;
        let mut registry = Registry::default();
        for (id, service) in &by_id {
            registry.service_ids.insert(*id);
            registry.services.insert(
                *service,
                ServiceState {
                    id: *id,
                    backends: Vec::new(),
                },
            );
        }
        for (index, value) in backends.iter().enumerate() {
            let value = value.map_err(map_error(MAP_BACKENDS))?;
            registry.next_generation = registry
                .next_generation
                .max(value.generation.wrapping_add(1));
            if value.flags & BACKEND_ACTIVE == 0 {
                continue;
            }
            let Some(service) = by_id.get(&value.service_id) else {
                continue;
            };
            registry.backend_ids.insert(index as u32);
            let backend = Backend {
                ip: ip_from(value.family, &value.addr),
                port: u16::from_be_bytes(value.port),
                weight: value.weight,
                node: backend_node(&value),
            };
            if let Some(state) = registry.services.get_mut(service) {
                state.backends.push((backend, index as u32));
            }
        }
        tracing::info!(
            event = "servicesRecovered",
            services = registry.services.len()
        );
        self.registry = registry;
        self.probe_table_kind()
    }

    /// Which inner maps the (pinned) `MAGLEV` map takes; tried in a service id no one holds.
    fn probe_table_kind(&mut self) -> Result<()> {
        let Some(free) = self.registry.service_ids.take(self.capacities.services) else {
            return Ok(());
        };
        self.registry.service_ids.release(free);
        self.registry.table_kind = tables::probe_kind(self.maglev_map()?, free)?;
        Ok(())
    }
}

fn sum_stats<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, TrafficStats>,
    id: u32,
    name: &'static str,
) -> Result<TrafficStats> {
    let values = array.get(&id, 0).map_err(map_error(name))?;
    Ok(values
        .iter()
        .fold(TrafficStats::default(), |sum, v| sum.add(*v)))
}

/// Reads services, their active backends and counters straight from the maps (for inspection
/// of pinned maps; the daemon's own view is its registry).
pub(super) fn read_services<T: std::borrow::Borrow<MapData>>(
    services: &HashMap<T, ServiceKey, ServiceValue>,
    backends: &Array<T, BackendValue>,
    service_stats: &PerCpuArray<T, TrafficStats>,
    backend_stats: &PerCpuArray<T, TrafficStats>,
) -> Result<Vec<ServiceStats>> {
    let mut by_id: BTreeMap<u32, ServiceStats> = BTreeMap::new();
    for entry in services.iter() {
        let (key, value) = entry.map_err(map_error(MAP_SERVICES))?;
        let service = Service {
            vip: ip_from(key.family, &key.addr),
            port: u16::from_be_bytes(key.port),
            protocol: if key.proto == PROTO_TCP {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
        };
        by_id.insert(
            value.id,
            ServiceStats {
                service,
                // The backends that left; those in service are added below.
                traffic: sum_stats(service_stats, value.id, MAP_SERVICE_STATS)?,
                backends: Vec::new(),
            },
        );
    }
    for (index, value) in backends.iter().enumerate() {
        let value = value.map_err(map_error(MAP_BACKENDS))?;
        if value.flags & BACKEND_ACTIVE == 0 {
            continue;
        }
        if let Some(stats) = by_id.get_mut(&value.service_id) {
            let backend = Backend {
                ip: ip_from(value.family, &value.addr),
                port: u16::from_be_bytes(value.port),
                weight: value.weight,
                node: backend_node(&value),
            };
            let traffic = sum_stats(backend_stats, index as u32, MAP_BACKEND_STATS)?;
            stats.traffic = stats.traffic.add(traffic);
            stats.backends.push((backend, traffic));
        }
    }
    let mut out: Vec<ServiceStats> = by_id.into_values().collect();
    out.sort_by_key(|s| s.service);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> Service {
        Service {
            vip: "198.51.100.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn backend(ip: &str, port: u16) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port,
            weight: 1,
            node: None,
        }
    }

    /// The lowest free id by walking every id in use from 0.
    fn lowest_free(used: &BTreeSet<u32>, capacity: u32) -> Option<u32> {
        (0..capacity).find(|id| !used.contains(id))
    }

    #[test]
    fn ids_give_the_lowest_free_id_like_a_walk_from_zero_through_random_takes_and_releases() {
        let mut next = crate::test_sequence(7);
        for capacity in [1, 2, 17, 300] {
            let (mut ids, mut model) = (Ids::default(), BTreeSet::new());
            for step in 0..3000 {
                if next().is_multiple_of(3) && !model.is_empty() {
                    let victim = *model.iter().nth(next() as usize % model.len()).unwrap();
                    model.remove(&victim);
                    ids.release(victim);
                } else {
                    let want = lowest_free(&model, capacity);
                    assert_eq!(ids.take(capacity), want, "capacity {capacity}, step {step}");
                    if let Some(id) = want {
                        model.insert(id);
                    }
                }
                assert_eq!(ids.len(), model.len());
            }
        }
        let mut recovered = Ids::default();
        for id in [0, 1, 3] {
            recovered.insert(id);
        }
        assert_eq!(recovered.take(10), Some(2));
        assert_eq!(recovered.take(10), Some(4));
        assert_eq!(recovered.take(5), None);
    }

    #[test]
    fn validation_names_the_offending_value() {
        let cases: Vec<(Service, Vec<Backend>, u32, &str)> = vec![
            (
                svc(),
                vec![backend("2001:db8::1", 80)],
                1009,
                "not of the VIP's address family",
            ),
            (svc(), vec![backend("198.51.100.20", 0)], 1009, "has port 0"),
            (svc(), vec![backend("224.0.0.1", 80)], 1009, "multicast"),
            (
                svc(),
                vec![backend("198.51.100.20", 80), backend("198.51.100.20", 80)],
                1009,
                "listed twice",
            ),
            (svc(), vec![backend("198.51.100.20", 80)], 1000, "not prime"),
            (
                svc(),
                (1..=10)
                    .map(|i| backend(&format!("198.51.100.{i}"), 80))
                    .collect(),
                7,
                "too small for 10 backends",
            ),
            (Service { port: 0, ..svc() }, vec![], 1009, "port 0"),
        ];
        for (service, backends, m, expected) in cases {
            let err = validate(&service, &backends, m).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(err.contains(&service.to_string()), "{err}");
        }
        assert!(
            validate(&svc(), &[], 1009).is_ok(),
            "zero backends is a valid state"
        );
    }

    #[test]
    fn services_and_backends_print_in_url_form() {
        assert_eq!(svc().to_string(), "198.51.100.10:80/tcp");
        let v6 = Service {
            vip: "2001:db8::10".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        assert_eq!(v6.to_string(), "[2001:db8::10]:53/udp");
        assert_eq!(
            backend("2001:db8::2", 8080).maglev_key(),
            "[2001:db8::2]:8080"
        );
    }
}

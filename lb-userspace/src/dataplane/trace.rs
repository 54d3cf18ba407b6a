//! The kernel side of `sluice trace`: writes the pinned `TRACE_FILTER`, renews its lease, reads
//! `TRACE_EVENTS`. What to ask for and how events read is `crate::trace` (pure).

use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData, RingBuf};
use lb_common::{TraceEvent, TraceFilter, MAP_TRACE_EVENTS, MAP_TRACE_FILTER};

use super::{map_error, monotonic_ns, require_root, DataplaneError, Result};

/// A running trace. Dropping it turns the trace off; if the process dies instead, the lease
/// runs out and the programs turn it off themselves.
pub struct TraceSession {
    filter: Array<MapData, TraceFilter>,
    events: RingBuf<MapData>,
}

impl TraceSession {
    /// Opens the pinned trace maps and starts the trace `wanted` describes (its `active` and
    /// `until` are set here), for `lease_ns`. Refuses while another trace holds the lease.
    pub fn start(pin_dir: &Path, mut wanted: TraceFilter, lease_ns: u64) -> Result<Self> {
        require_root()?;
        let open = |name: &'static str| {
            let path: PathBuf = pin_dir.join(name);
            MapData::from_pin(&path).map_err(|source| DataplaneError::Pinned { path, source })
        };
        let mut filter: Array<MapData, TraceFilter> =
            Array::try_from(Map::Array(open(MAP_TRACE_FILTER)?))
                .map_err(map_error(MAP_TRACE_FILTER))?;
        let events = RingBuf::try_from(Map::RingBuf(open(MAP_TRACE_EVENTS)?))
            .map_err(map_error(MAP_TRACE_EVENTS))?;
        let now = monotonic_ns();
        let running = filter.get(&0, 0).map_err(map_error(MAP_TRACE_FILTER))?;
        if running.active != 0 && running.until > now {
            return Err(DataplaneError::TraceRunning {
                seconds: (running.until - now) as f64 / 1e9,
            });
        }
        wanted.active = 1;
        wanted.until = now + lease_ns;
        wanted.lost = 0;
        filter
            .set(0, wanted, 0)
            .map_err(map_error(MAP_TRACE_FILTER))?;
        let mut session = Self { filter, events };
        // Events of an earlier trace that nobody read.
        while session.events.next().is_some() {}
        Ok(session)
    }

    /// Extends the lease to `lease_ns` from now.
    pub fn renew(&mut self, lease_ns: u64) -> Result<()> {
        let mut current = self
            .filter
            .get(&0, 0)
            .map_err(map_error(MAP_TRACE_FILTER))?;
        current.active = 1;
        current.until = monotonic_ns() + lease_ns;
        self.filter
            .set(0, current, 0)
            .map_err(map_error(MAP_TRACE_FILTER))
    }

    /// The events written since the last call, oldest first.
    pub fn events(&mut self) -> Vec<TraceEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= std::mem::size_of::<TraceEvent>() {
                out.push(bytemuck::pod_read_unaligned(
                    &item[..std::mem::size_of::<TraceEvent>()],
                ));
            }
        }
        out
    }

    /// Events the ring buffer had no room for, so far.
    pub fn lost(&self) -> u64 {
        self.filter.get(&0, 0).map_or(0, |f| f.lost)
    }

    fn stop(&mut self) -> Result<()> {
        self.filter
            .set(0, <TraceFilter as bytemuck::Zeroable>::zeroed(), 0)
            .map_err(map_error(MAP_TRACE_FILTER))
    }
}

impl Drop for TraceSession {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(event = "traceStopFailed", error = %e);
        }
    }
}

impl super::Dataplane {
    /// Writes this data plane's trace filter directly (the benchmark times the programs with a
    /// trace on); `sluice trace` goes through [`TraceSession`] on the pinned maps instead.
    pub fn set_trace_filter(&mut self, filter: TraceFilter) -> Result<()> {
        let mut array: Array<&mut MapData, TraceFilter> = Array::try_from(
            self.ebpf
                .map_mut(MAP_TRACE_FILTER)
                .ok_or(DataplaneError::MissingMap(MAP_TRACE_FILTER))?,
        )
        .map_err(map_error(MAP_TRACE_FILTER))?;
        array.set(0, filter, 0).map_err(map_error(MAP_TRACE_FILTER))
    }
}

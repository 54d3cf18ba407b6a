//! Every map of the data plane object, in one place. BTF maps, so `bpftool map dump` prints the
//! field names of lb-common's key and value types. User space pins them under /sys/fs/bpf/sluice/.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{GlobalStats, L2VipKey, L2VipValue, L2_VIPS_DEFAULT_CAPACITY};

/// (ifindex, IP) → MAC to answer ARP/NDP with. No entry for an ifindex: no answer there.
#[btf_map]
pub static L2_VIPS: HashMap<L2VipKey, L2VipValue, { L2_VIPS_DEFAULT_CAPACITY as usize }> =
    HashMap::new();

/// Outcome counters, one slot, one copy per CPU.
#[btf_map]
pub static GLOBAL_STATS: PerCpuArray<GlobalStats, 1> = PerCpuArray::new();

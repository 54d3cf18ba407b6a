//! Maglev tables in the kernel: each service's table is an inner array of `MAGLEV`, created
//! memory-mappable and written through one mapping (a copy, not one syscall per slot), then
//! switched in with the other tables of its batch in one `BPF_MAP_UPDATE_BATCH`.
//!
//! Why batches: every update of a map-of-maps makes the kernel wait for an RCU grace period
//! (`maybe_wait_bpf_programs`, so that no program still runs with the old table when the call
//! returns): milliseconds each. One update per service made 10,000 services take 90 s; one
//! per batch pays that wait once for the batch.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::{Array, Map, MapData, MapError};
use lb_common::{BPF_F_INNER_MAP, BPF_F_MMAPABLE};

use super::{map_error, DataplaneError, Result};

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// How tables are written: maps pinned by a release whose inner-map template was not
/// memory-mappable take only plain inner arrays, written one slot per syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum TableKind {
    #[default]
    Mapped,
    Plain,
}

fn inner_map(len: usize, flags: u32) -> Result<MapData> {
    let obj = aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, 4, len as u32, flags);
    MapData::create(obj, "sluice_maglev", None).map_err(map_error("MAGLEV inner"))
}

/// A new inner map holding `ids` (backend id per slot).
pub(super) fn table(kind: TableKind, ids: &[u32]) -> Result<MapData> {
    match kind {
        TableKind::Mapped => mapped_table(ids),
        TableKind::Plain => plain_table(ids),
    }
}

fn plain_table(ids: &[u32]) -> Result<MapData> {
    let mut map = Map::Array(inner_map(ids.len(), BPF_F_INNER_MAP)?);
    let mut array: Array<&mut MapData, u32> =
        Array::try_from(&mut map).map_err(map_error("MAGLEV inner"))?;
    for (slot, id) in ids.iter().enumerate() {
        array
            .set(slot as u32, id, 0)
            .map_err(map_error("MAGLEV inner"))?;
    }
    match map {
        Map::Array(data) => Ok(data),
        _ => unreachable!("created as an array"),
    }
}

fn mapped_table(ids: &[u32]) -> Result<MapData> {
    let map = inner_map(ids.len(), BPF_F_INNER_MAP | BPF_F_MMAPABLE)?;
    // An array's values sit 8 bytes apart (the kernel rounds each value up to 8 bytes).
    let stride = 8;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let len = (ids.len() * stride).div_ceil(page) * page;
    // SAFETY: the fd is a BPF array of `ids.len()` values 8 bytes apart, created with
    // BPF_F_MMAPABLE; the mapping covers them, is written only inside them and is unmapped
    // before returning.
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            map.fd().as_fd().as_raw_fd(),
            0,
        );
        if base == libc::MAP_FAILED {
            return Err(syscall_error("mmap", io::Error::last_os_error()));
        }
        let base = base as *mut u8;
        for (slot, id) in ids.iter().enumerate() {
            std::ptr::write(base.add(slot * stride) as *mut u32, *id);
        }
        libc::munmap(base as *mut libc::c_void, len);
    }
    Ok(map)
}

fn syscall_error(call: &'static str, io_error: io::Error) -> DataplaneError {
    DataplaneError::Map {
        map: "MAGLEV",
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

/// Puts each table in its service's slot of the `MAGLEV` map `outer`, in one batch.
pub(super) fn switch(outer: &MapData, tables: &[(u32, &MapData)]) -> Result<()> {
    if tables.is_empty() {
        return Ok(());
    }
    let keys: Vec<u32> = tables.iter().map(|(id, _)| *id).collect();
    let fds: Vec<u32> = tables
        .iter()
        .map(|(_, map)| map.fd().as_fd().as_raw_fd() as u32)
        .collect();
    update_batch(outer, &keys, &fds).map_err(|e| syscall_error("bpf_map_update_batch", e))
}

/// `BPF_MAP_UPDATE_BATCH` (aya has no call for it).
fn update_batch(map: &MapData, keys: &[u32], values: &[u32]) -> io::Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is the kernel's batch attribute layout; keys and values hold `count`
    // elements each and outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which tables the pinned `MAGLEV` map takes: a one-slot table is put in a free service id
/// and removed again. `free_id` is a service id no service holds.
pub(super) fn probe_kind(outer: &MapData, free_id: u32) -> Result<TableKind> {
    let probe = mapped_table(&[0])?;
    match update_batch(outer, &[free_id], &[probe.fd().as_fd().as_raw_fd() as u32]) {
        Ok(()) => {
            delete(outer, free_id);
            Ok(TableKind::Mapped)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                event = "plainMaglevTables",
                "the pinned MAGLEV map was created by an older release and takes only plain inner arrays: tables are written slot by slot until its pins are replaced"
            );
            Ok(TableKind::Plain)
        }
        Err(e) => Err(syscall_error("bpf_map_update_batch", e)),
    }
}

fn delete(map: &MapData, key: u32) {
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: the kernel's element attribute layout; the key outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        );
    }
}

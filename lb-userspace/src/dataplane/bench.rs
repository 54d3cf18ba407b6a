//! Timing the data plane's programs with BPF_PROG_TEST_RUN, for `cargo xtask bench`.
//!
//! A program that rewrites the packet cannot be timed with `repeat` > 1 on its own: from the
//! second run on it sees its own output. So rewriting paths are timed behind
//! `bench_restore_then_call` (copy the original frame back, then tail-call the program under
//! test), and the cost of that wrapper is measured the same way in front of `bench_floor` and
//! subtracted. Each measurement also checks that the wrapped run's action and output equal a
//! single direct run's.

use aya::{
    maps::{Array, ProgramArray},
    programs::{ProgramFd, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{bench as names, BenchFrame, BENCH_FRAME_MAX, PROG_XDP_INGRESS};

use super::{
    load_error, map_error, program, program_load_error, program_mut, run_xdp, test_run_tc,
    test_run_xdp, Dataplane, DataplaneError, Result,
};
use super::{RunOutcome, XdpAction};

static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-bench.o"));

/// One timing: nanoseconds per packet, and what the program did to the frame.
#[derive(Debug, Clone)]
pub struct Timing {
    pub ns_per_packet: f64,
    pub outcome: RunOutcome,
}

/// The benchmark programs next to a loaded data plane.
pub struct BenchHarness {
    dataplane: Dataplane,
    bench: Ebpf,
}

impl BenchHarness {
    /// Loads the benchmark object next to `dataplane` (which should be loaded unpinned).
    pub fn new(dataplane: Dataplane) -> Result<Self> {
        let mut bench = EbpfLoader::new()
            .load(BENCH_OBJECT)
            .map_err(|e| load_error("sluice-bench", e))?;
        for name in [names::PROG_TC_FLOOR, names::PROG_TC_RESTORE_THEN_CALL] {
            let program: &mut SchedClassifier = program_mut(&mut bench, name)?;
            super::retry_eagain(|| program.load()).map_err(|e| program_load_error(name, e))?;
        }
        for name in [
            names::PROG_FLOOR,
            names::PROG_RESTORE_THEN_CALL,
            names::PROG_PUSH_FLOOR,
            names::PROG_POP_FLOOR,
        ] {
            let program: &mut Xdp = program_mut(&mut bench, name)?;
            super::retry_eagain(|| program.load()).map_err(|e| program_load_error(name, e))?;
        }
        Ok(Self { dataplane, bench })
    }

    /// The data plane under test (to set VIPs before timing).
    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    fn program(&self, name: &'static str) -> Result<&Xdp> {
        program(&self.bench, name)
    }

    fn time(
        &self,
        program: &Xdp,
        name: &'static str,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<f64> {
        Ok(test_run_xdp(program, name, ifindex, frame, repeat)?.1)
    }

    /// The floor: a program that only returns XDP_PASS.
    pub fn floor(&self, ifindex: u32, frame: &[u8], repeat: u32) -> Result<Timing> {
        let program = self.program(names::PROG_FLOOR)?;
        let ns = self.time(program, names::PROG_FLOOR, ifindex, frame, repeat)?;
        let outcome = run_xdp(program, names::PROG_FLOOR, ifindex, frame)?;
        Ok(Timing {
            ns_per_packet: ns,
            outcome,
        })
    }

    /// The ingress program run directly, `repeat` times on the same buffer. Valid only for paths
    /// that leave the frame untouched; returns an error otherwise.
    pub fn ingress_direct(&self, ifindex: u32, frame: &[u8], repeat: u32) -> Result<Timing> {
        let program = self.dataplane.ingress()?;
        let outcome = run_xdp(program, PROG_XDP_INGRESS, ifindex, frame)?;
        if outcome.frame != frame {
            return Err(DataplaneError::InvalidBenchmark(
                "the ingress program rewrote this frame: time it with ingress_restored".into(),
            ));
        }
        let ns = self.time(program, PROG_XDP_INGRESS, ifindex, frame, repeat)?;
        Ok(Timing {
            ns_per_packet: ns,
            outcome,
        })
    }

    /// The ingress program behind the restore wrapper, minus the wrapper's own cost (measured in
    /// front of the floor program). Checks the wrapped run does what a direct run does.
    pub fn ingress_restored(
        &mut self,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(Timing, f64)> {
        self.ingress_restored_varying(ifindex, frame, repeat, 0)
    }

    /// Like [`Self::ingress_restored`], but each run first writes a fresh counter at
    /// `vary_offset` (0: off), so every run is a new flow. Then only the action of a wrapped
    /// run is checked against a direct run.
    pub fn ingress_restored_varying(
        &mut self,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
        vary_offset: u32,
    ) -> Result<(Timing, f64)> {
        let direct = self.dataplane.run_ingress(ifindex, frame)?;
        self.set_restore_frame(frame, vary_offset)?;
        let ingress_fd = program_fd(self.dataplane.ingress()?, PROG_XDP_INGRESS)?;
        let floor_fd = program_fd(self.program(names::PROG_FLOOR)?, names::PROG_FLOOR)?;

        self.set_target(&ingress_fd)?;
        let wrapper = self.program(names::PROG_RESTORE_THEN_CALL)?;
        let wrapped = run_xdp(wrapper, names::PROG_RESTORE_THEN_CALL, ifindex, frame)?;
        if (vary_offset == 0 && wrapped != direct) || wrapped.action != direct.action {
            return Err(DataplaneError::InvalidBenchmark(format!(
                "the wrapped run differs from the direct run: {:?} vs {:?}",
                wrapped.action, direct.action
            )));
        }
        let with_ingress = self.time_wrapper(ifindex, frame, repeat)?;

        self.set_target(&floor_fd)?;
        let wrapper = self.program(names::PROG_RESTORE_THEN_CALL)?;
        let overhead_run = run_xdp(wrapper, names::PROG_RESTORE_THEN_CALL, ifindex, frame)?;
        if overhead_run.action != XdpAction::Pass {
            return Err(DataplaneError::InvalidBenchmark(format!(
                "restore wrapper in front of the floor returned {:?}",
                overhead_run.action
            )));
        }
        let overhead = self.time_wrapper(ifindex, frame, repeat)?;
        let floor = self.floor(ifindex, frame, repeat)?.ns_per_packet;
        // wrapper+ingress − (wrapper+floor) + floor = ingress alone.
        Ok((
            Timing {
                ns_per_packet: with_ingress - overhead + floor,
                outcome: direct,
            },
            overhead - floor,
        ))
    }

    /// [`Self::ingress_restored`] for a path that moves the frame's start by 20 bytes
    /// (`push`: puts an outer header on; else takes one off): the restore wrapper then moves
    /// it back each run, which the program itself does not pay for. That move is measured
    /// (the wrapper in front of a floor that moves the head the same way: two moves) and half
    /// of it subtracted too. Returns the timing and the cost of one head move.
    pub fn ingress_restored_moving(
        &mut self,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
        push: bool,
    ) -> Result<(Timing, f64)> {
        let (timing, _) = self.ingress_restored(ifindex, frame, repeat)?;
        let name = if push {
            names::PROG_PUSH_FLOOR
        } else {
            names::PROG_POP_FLOOR
        };
        let mover_fd = program_fd(self.program(name)?, name)?;
        self.set_target(&mover_fd)?;
        let with_mover = self.time_wrapper(ifindex, frame, repeat)?;
        let floor_fd = program_fd(self.program(names::PROG_FLOOR)?, names::PROG_FLOOR)?;
        self.set_target(&floor_fd)?;
        let overhead = self.time_wrapper(ifindex, frame, repeat)?;
        let one_move = ((with_mover - overhead) / 2.0).max(0.0);
        Ok((
            Timing {
                ns_per_packet: timing.ns_per_packet - one_move,
                outcome: timing.outcome,
            },
            one_move,
        ))
    }

    /// The canary: the restore wrapper in front of the floor program, `repeat` times. Timed
    /// before and after each sample, it tells a slow phase of the machine (this VM runs 1.6–1.8×
    /// slower in phases nothing inside it causes) from a slow program.
    pub fn canary(&mut self, ifindex: u32, frame: &[u8], repeat: u32) -> Result<f64> {
        self.set_restore_frame(frame, 0)?;
        let floor_fd = program_fd(self.program(names::PROG_FLOOR)?, names::PROG_FLOOR)?;
        self.set_target(&floor_fd)?;
        self.time_wrapper(ifindex, frame, repeat)
    }

    /// The TC egress program behind the TC restore wrapper, minus the wrapper's own cost
    /// (measured in front of the TC floor). Checks the wrapped run rewrites as a direct run does.
    pub fn egress_restored(&mut self, frame: &[u8], repeat: u32) -> Result<(f64, Vec<u8>, f64)> {
        let direct = self.dataplane.run_egress(frame)?;
        self.set_restore_frame(frame, 0)?;
        let egress_fd = clone_fd(self.dataplane.egress()?.fd(), lb_common::PROG_TC_EGRESS)?;
        let floor_fd = clone_fd(
            self.tc_program(names::PROG_TC_FLOOR)?.fd(),
            names::PROG_TC_FLOOR,
        )?;
        self.set_tc_target(&egress_fd)?;
        let wrapped = self.run_tc(names::PROG_TC_RESTORE_THEN_CALL, frame, 1)?;
        if wrapped.1 != direct {
            return Err(DataplaneError::InvalidBenchmark(
                "the wrapped TC run rewrote the frame differently from a direct run".into(),
            ));
        }
        let with_egress = self
            .run_tc(names::PROG_TC_RESTORE_THEN_CALL, frame, repeat)?
            .0;
        self.set_tc_target(&floor_fd)?;
        let overhead = self
            .run_tc(names::PROG_TC_RESTORE_THEN_CALL, frame, repeat)?
            .0;
        let floor = self.run_tc(names::PROG_TC_FLOOR, frame, repeat)?.0;
        Ok((with_egress - overhead + floor, direct, floor))
    }

    fn tc_program(&self, name: &'static str) -> Result<&SchedClassifier> {
        program(&self.bench, name)
    }

    /// Runs a TC program `repeat` times; returns ns per run and the frame after one run.
    fn run_tc(&self, name: &'static str, frame: &[u8], repeat: u32) -> Result<(f64, Vec<u8>)> {
        let (out, ns) = test_run_tc(self.tc_program(name)?, name, frame, repeat)?;
        Ok((ns, out))
    }

    fn set_tc_target(&mut self, fd: &ProgramFd) -> Result<()> {
        let map = self
            .bench
            .map_mut(names::MAP_TC_TARGET)
            .ok_or(DataplaneError::MissingMap(names::MAP_TC_TARGET))?;
        let mut array = ProgramArray::try_from(map).map_err(map_error(names::MAP_TC_TARGET))?;
        array.set(0, fd, 0).map_err(map_error(names::MAP_TC_TARGET))
    }

    fn set_restore_frame(&mut self, frame: &[u8], vary_offset: u32) -> Result<()> {
        if frame.len() > BENCH_FRAME_MAX || !frame.len().is_multiple_of(2) {
            return Err(DataplaneError::InvalidBenchmark(format!(
                "frames to restore must have an even length of at most {BENCH_FRAME_MAX} bytes, not {}",
                frame.len()
            )));
        }
        let mut value = BenchFrame {
            len: frame.len() as u32,
            vary_offset,
            data: [0; BENCH_FRAME_MAX],
        };
        value.data[..frame.len()].copy_from_slice(frame);
        let map = self
            .bench
            .map_mut(names::MAP_FRAME)
            .ok_or(DataplaneError::MissingMap(names::MAP_FRAME))?;
        let mut array: Array<_, BenchFrame> =
            Array::try_from(map).map_err(map_error(names::MAP_FRAME))?;
        array.set(0, value, 0).map_err(map_error(names::MAP_FRAME))
    }

    /// The restore wrapper in front of whatever [`Self::set_target`] put behind it.
    fn time_wrapper(&self, ifindex: u32, frame: &[u8], repeat: u32) -> Result<f64> {
        let wrapper = self.program(names::PROG_RESTORE_THEN_CALL)?;
        self.time(
            wrapper,
            names::PROG_RESTORE_THEN_CALL,
            ifindex,
            frame,
            repeat,
        )
    }

    fn set_target(&mut self, fd: &aya::programs::ProgramFd) -> Result<()> {
        let map = self
            .bench
            .map_mut(names::MAP_TARGET)
            .ok_or(DataplaneError::MissingMap(names::MAP_TARGET))?;
        let mut array = ProgramArray::try_from(map).map_err(map_error(names::MAP_TARGET))?;
        array.set(0, fd, 0).map_err(map_error(names::MAP_TARGET))
    }
}

fn clone_fd(
    fd: std::result::Result<&ProgramFd, aya::programs::ProgramError>,
    program: &'static str,
) -> Result<ProgramFd> {
    fd.map_err(|source| DataplaneError::Program { program, source })?
        .try_clone()
        .map_err(|e| DataplaneError::InvalidBenchmark(e.to_string()))
}

/// An owned copy of a loaded program's fd (to put in a program array).
fn program_fd(program: &Xdp, name: &'static str) -> Result<aya::programs::ProgramFd> {
    program
        .fd()
        .map_err(|source| DataplaneError::Program {
            program: name,
            source,
        })?
        .try_clone()
        .map_err(|e| DataplaneError::InvalidBenchmark(e.to_string()))
}

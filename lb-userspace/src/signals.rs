//! Signals, blocked for the whole process and waited for synchronously: no handler runs, so
//! nothing is interrupted mid-way. Block them before starting any thread.

use anyhow::Result;

/// Signals blocked for this process and waited for synchronously (no handler runs).
pub struct SignalSet(libc::sigset_t);

impl SignalSet {
    pub fn block(signals: &[libc::c_int]) -> Result<Self> {
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe { libc::sigemptyset(&mut set) };
        for signal in signals {
            unsafe { libc::sigaddset(&mut set, *signal) };
        }
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            anyhow::bail!(
                "cannot block signals: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        Ok(Self(set))
    }

    pub fn wait(&self) -> Result<libc::c_int> {
        let mut signal: libc::c_int = 0;
        let rc = unsafe { libc::sigwait(&self.0, &mut signal) };
        if rc != 0 {
            anyhow::bail!("sigwait failed: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(signal)
    }

    /// Waits up to `timeout` for a signal; `None` when none came.
    pub fn wait_for(&self, timeout: std::time::Duration) -> Result<Option<libc::c_int>> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        let rc = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        if rc < 0 {
            let error = std::io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => anyhow::bail!("sigtimedwait failed: {error}"),
            };
        }
        Ok(Some(rc))
    }
}

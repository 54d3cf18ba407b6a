//! Network namespaces made by a test, deleted when dropped (also when the test panics), and the
//! processes started in them, killed by PID when dropped.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
};

/// Runs a command, panicking with its stderr when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("sl{}-{n}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs a command inside this namespace (`ip netns exec`), panicking with its stderr if it
    /// fails; returns its stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let out = self.exec_output(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command inside this namespace and returns what it did, whatever that was.
    pub fn exec_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.run_in_background(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Starts `f` on a thread that has entered this namespace; join it for the result.
    pub fn run_in_background<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// The MAC address of an interface in this namespace.
    pub fn mac(&self, ifname: &str) -> [u8; 6] {
        let json = self.ip(&["-j", "link", "show", ifname]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        let text = v[0]["address"].as_str().expect("address").to_string();
        let mut mac = [0u8; 6];
        for (i, part) in text.split(':').enumerate() {
            mac[i] = u8::from_str_radix(part, 16).unwrap();
        }
        mac
    }

    /// True when an XDP program is attached to the interface.
    pub fn has_xdp(&self, ifname: &str) -> bool {
        let json = self.ip(&["-j", "-d", "link", "show", ifname]);
        json.contains("\"xdp\"")
    }

    /// Starts `cmd` inside this namespace (`ip netns exec`), stderr piped.
    pub fn spawn(&self, cmd: &[&str]) -> Process {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Process { child: Some(child) }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Creates a veth pair with one end in each namespace.
pub fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) {
    sh(&[
        "ip", "link", "add", a_name, "netns", &a.name, "type", "veth", "peer", "name", b_name,
        "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

/// Starts any command (stderr piped), e.g. `nsenter ... sluice run`.
pub fn spawn_command(cmd: &[&str]) -> Process {
    let child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    Process { child: Some(child) }
}

/// A process a test started; killed (SIGKILL, by PID) and reaped on drop.
pub struct Process {
    child: Option<Child>,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Reads stderr line by line until a line contains `marker` (returns the lines read) or the
    /// process exits (panics with everything it printed).
    pub fn wait_for_stderr(&mut self, marker: &str) -> String {
        self.wait_for_stderr_then_log(marker, None)
    }

    /// [`Self::wait_for_stderr`], then appends the rest of stderr to `log` (when given).
    pub fn wait_for_stderr_then_log(
        &mut self,
        marker: &str,
        log: Option<std::path::PathBuf>,
    ) -> String {
        use std::io::{BufRead, BufReader, Write};
        let child = self.child.as_mut().unwrap();
        let stderr = child.stderr.take().expect("stderr piped");
        let mut reader = BufReader::new(stderr);
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).unwrap();
            seen.push_str(&line);
            if line.contains(marker) {
                // Keep draining in the background so the process never blocks on a full pipe.
                let mut file = log.and_then(|p| File::create(p).ok());
                std::thread::spawn(move || {
                    let mut sink = String::new();
                    while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                        if let Some(f) = file.as_mut() {
                            let _ = f.write_all(sink.as_bytes());
                        }
                        sink.clear();
                    }
                });
                return seen;
            }
            if n == 0 {
                let status = child.wait().unwrap();
                panic!("process exited ({status}) before printing {marker:?}:\n{seen}");
            }
        }
    }

    /// Moves the child out (this one is left empty), e.g. to stop it and start another.
    pub fn take(&mut self) -> Process {
        Process {
            child: self.child.take(),
        }
    }

    /// Runs `sluice inspect --json` in this process's mount and network namespaces (where its
    /// bpffs and pinned maps are) and returns the document.
    pub fn inspect_json(&self, sluice_bin: &str) -> serde_json::Value {
        self.inspect_json_with(sluice_bin, &[])
    }

    /// [`Self::inspect_json`] with more arguments (e.g. `--config FILE`).
    pub fn inspect_json_with(&self, sluice_bin: &str, args: &[&str]) -> serde_json::Value {
        let out = Command::new("nsenter")
            .args(["--target", &self.pid().to_string(), "--mount", "--net"])
            .args([sluice_bin, "inspect", "--json"])
            .args(args)
            .output()
            .expect("nsenter (util-linux)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
    }

    /// Sends `signal` and waits for the exit; returns the exit status.
    pub fn stop(mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // `ip netns exec` execs the command, so this PID is the command itself.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `f` on a thread inside a fresh, anonymous network namespace (gone when the thread ends)
/// that holds a veth pair `veth0`/`veth1`, so BPF_PROG_TEST_RUN can name real ifindexes.
/// Returns `f`'s result; `f` gets the ifindexes of veth0 and veth1.
pub fn in_private_netns_with_veth<T: Send + 'static>(
    f: impl FnOnce(u32, u32) -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        // Children forked from this thread inherit its network namespace.
        sh(&[
            "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ]);
        let index = |name: &str| {
            let c = std::ffi::CString::new(name).unwrap();
            let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
            assert_ne!(i, 0, "{name} missing");
            i
        };
        f(index("veth0"), index("veth1"))
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

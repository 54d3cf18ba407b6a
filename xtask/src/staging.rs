//! What `xtask image` and `xtask deb` share: a scratch directory that is removed whatever
//! happens, the tools they call (each named with the Debian package that has it), digests, and
//! the build's timestamp (so that the same commit gives the same bytes).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// A directory under `target/` that is removed when dropped (on success and on every error):
/// nothing half-written is left where a user would pick it up.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(parent: &Path, what: &str) -> Result<Self> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let path = parent.join(format!(".{what}-{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The options `xtask image` and `xtask deb` take.
#[derive(Debug, Default)]
pub struct Options {
    pub out: Option<PathBuf>,
    pub binary: Option<PathBuf>,
    pub fast: bool,
    pub tag: Option<String>,
}

/// Parses `--out FILE`, `--binary FILE`, `--fast`, and `--tag NAME:TAG` when `tag` allows it;
/// an error names the argument and shows `usage`.
pub fn options(args: &[String], usage: &str, tag: bool) -> Result<Options> {
    let mut o = Options::default();
    let mut args = args.iter();
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{a} needs a value: {usage}"))
        };
        match a.as_str() {
            "--out" => o.out = Some(PathBuf::from(value()?)),
            "--binary" => o.binary = Some(PathBuf::from(value()?)),
            "--tag" if tag => o.tag = Some(value()?.clone()),
            "--fast" => o.fast = true,
            other => bail!("unknown argument {other:?}: {usage}"),
        }
    }
    Ok(o)
}

/// The binary to package (`--binary`, else a release build made now) and its version, from
/// its own `--version` ("sluice 0.1.0" → "0.1.0"): the binary runs here, too.
pub fn binary_and_version(root: &Path, binary: Option<PathBuf>) -> Result<(PathBuf, String)> {
    let binary = match binary {
        Some(b) => b,
        None => {
            crate::build_ebpf()?;
            crate::build_release_sluice()?;
            root.join("target/release/sluice")
        }
    };
    let out = quiet(Command::new(&binary).arg("--version"))?;
    let version = out
        .split_whitespace()
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("{} --version printed {out:?}", binary.display()))?;
    Ok((binary, version))
}

/// Fails unless `command` is on the PATH, naming the Debian package that has it.
pub fn need(command: &str, package: &str) -> Result<()> {
    if crate::have(command) {
        return Ok(());
    }
    bail!("`{command}` is not installed: it is in the Debian package {package} (`apt-get install {package}`, or `cargo xtask setup`)")
}

/// Runs `cmd`; on failure the error names the command and carries its stderr.
pub fn quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The SHA-256 of a file, in hex.
pub fn sha256(file: &Path) -> Result<String> {
    need("sha256sum", "coreutils")?;
    let out = quiet(Command::new("sha256sum").arg(file))?;
    let hex = out.split_whitespace().next().unwrap_or_default();
    if hex.len() != 64 {
        bail!("sha256sum printed {out:?} for {}", file.display());
    }
    Ok(hex.to_string())
}

/// The build's time, in seconds since 1970: `SOURCE_DATE_EPOCH` when set, else the last
/// commit's, else 0. Every timestamp inside an archive is this one.
pub fn source_epoch(root: &Path) -> u64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return t;
    }
    crate::output(
        Command::new("git")
            .args(["log", "-1", "--format=%ct"])
            .current_dir(root),
    )
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// `epoch` as RFC 3339 (UTC).
pub fn rfc3339(epoch: u64) -> String {
    let days = epoch / 86_400;
    let secs = epoch % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A deterministic tar of `entries` (relative to `dir`): sorted names, owner root, every time
/// `epoch`, no access or change times.
pub fn tar(dir: &Path, entries: &[&str], out: &Path, epoch: u64) -> Result<()> {
    need("tar", "tar")?;
    quiet(
        Command::new("tar")
            .args([
                "--create",
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--format=posix",
                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            ])
            .arg(format!("--mtime=@{epoch}"))
            .arg("--file")
            .arg(out)
            .arg("--directory")
            .arg(dir)
            .args(entries),
    )
    .map(drop)
}

/// Copies `from` to `to` (creating its directory) with `mode`.
pub fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", to.display()))?;
    Ok(())
}

/// Writes `text` to `to` (creating its directory) with `mode`.
pub fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(to, text).with_context(|| format!("cannot write {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", to.display()))?;
    Ok(())
}

/// Moves a finished file into place (same filesystem: atomic), replacing an older one.
pub fn publish(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_renders_epochs_as_utc_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_906_623), "2026-11-28T22:57:03Z");
    }
}
